"""The baselines a search seeds and re-evaluates: every builder x discretisation x NFE of its space.

Model-free discretisations come from ``usf.baselines.discretize``. ``gits`` grids are computed on
the model (``usf/gits.py``, cached per model hash), in one Ray task on a worker, which loads the
model as a trial does; the searcher's seed phase and the final re-evaluation read the same grids.
"""

from __future__ import annotations

import time

from s3_ray.config import SearchConfig
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.schedule import SolverSchedule


def gits_grids(cfg: SearchConfig, out=None) -> dict[str, list[float]]:
    """``{"name/nfe": times}`` for every baseline and NFE of ``cfg`` when its discretizations list
    ``gits`` (else empty). Needs a connected Ray."""
    if "gits" not in cfg.discretizations:
        return {}
    import ray

    task = ray.remote(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)(_gits_task)
    started = time.time()
    grids = ray.get(task.remote(cfg.model.model_dump_json(), cfg.metric.model_dump_json(), list(cfg.baselines),
                                list(cfg.nfe)))
    if out is not None:
        print(f"GITS grids: {len(grids)} (baselines x NFE) in {time.time() - started:.0f} s "
              "(cached per model on the worker)", file=out)
    return grids


def _gits_task(model_json: str, metric_json: str, names: list[str], nfes: list[int]) -> dict[str, list[float]]:
    import torch

    torch.set_num_threads(1)
    from s3_ray.metrics.baseline_table import gits_grid_for
    from s3_ray.metrics.evaluate import get_target

    target = get_target(model_json, metric_json)
    return {f"{name}/{nfe}": [float(t) for t in gits_grid_for(target, name, nfe)] for name in names for nfe in nfes}


def baseline_schedules(cfg: SearchConfig, noise, grids: dict[str, list[float]]) -> list[tuple[int, str, SolverSchedule]]:
    """(nfe, "name/discretization", schedule) for every baseline of ``cfg``, NFE by NFE."""
    out = []
    for nfe in cfg.nfe:
        for name in cfg.baselines:
            for disc in cfg.discretizations:
                grid = None
                if disc == "gits":
                    if f"{name}/{nfe}" not in grids:
                        raise ValueError(f"discretizations: no GITS grid for {name} at NFE {nfe} (compute them with "
                                         "seed_baselines.gits_grids)")
                    grid = grids[f"{name}/{nfe}"]
                out.append((nfe, f"{name}/{disc}", build_baseline(name, noise, nfe, discretization=disc, grid=grid)))
    return out

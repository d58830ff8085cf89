"""The honest baseline table: every baseline builder x discretisation at each NFE on the embedded
model, FID and KID against both reference sets (data and model), averaged over seeds.

Builders include the peers iPNDM (a schedule, ``ipndm``) and, when asked for with
``discretizations=[..., "gits"]``, GITS grids computed on the model (cached; see usf/gits.py).
Writes ``baselines_digits.{json,md}`` with the best baseline per NFE marked.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from s3_ray.progress import Progress


def _score_one(args) -> dict:
    name, disc, nfe, samples, seeds = args
    import torch

    torch.set_num_threads(1)
    from s3_ray.config import MetricConfig, ModelConfig
    from s3_ray.metrics.evaluate import get_target
    from s3_ray.metrics.fid import fid_kid, uint8_images
    from s3_ray.usf.baselines import build_baseline

    target = get_target(ModelConfig().model_dump_json(), MetricConfig(reference="model").model_dump_json())
    grid = gits_grid_for(target, name, nfe) if disc == "gits" else None
    s = build_baseline(name, target.noise, nfe, discretization=disc, grid=grid)
    _, model_ref = target.reference_images()
    out = {"name": name, "discretization": disc, "nfe": nfe, "failed": False}
    vals = {"fid_data": [], "kid_data": [], "fid_model": [], "kid_model": []}
    for seed in seeds:
        x = target.sample(s, samples, seed)
        if not bool(torch.isfinite(x).all()):
            out["failed"] = True
            break
        u8 = uint8_images(x)
        d = fid_kid(u8)  # training data
        m = fid_kid(u8, model_ref)
        vals["fid_data"].append(d["fid"]), vals["kid_data"].append(d["kid"])
        vals["fid_model"].append(m["fid"]), vals["kid_model"].append(m["kid"])
    for k, v in vals.items():
        out[k] = float(np.mean(v)) if v and not out["failed"] else None
        if k.startswith("fid"):
            out[k + "_spread"] = float(np.std(v)) if v and not out["failed"] else None
    return out


def gits_grid_for(target, name: str, nfe: int, **options):
    """The cached GITS grid of baseline ``name`` at ``nfe`` on ``target``'s model (a Target with an
    eps(x, t) model), keyed by its weights hash and model configuration."""
    import hashlib

    from s3_ray.metrics.fid import cache_dir
    from s3_ray.usf.gits import cached_gits_grid

    if getattr(target, "model", None) is None:
        raise ValueError(f"discretization 'gits' needs the model as eps(x, t); model.kind "
                         f"{target.model_cfg.kind!r} samples through its pipeline")
    how = hashlib.sha256(target.model_cfg.model_dump_json(exclude={"checkpoint"}).encode()).hexdigest()[:8]
    n = options.get("n_samples") or 256  # (gits_grid's default teacher size)
    model = target.producer.model_for(0, n)  # a guided model's grid: of its guided eps, classes balanced
    # (class-conditional: a new key, so that a grid cached from the unguided network is not trusted)
    key = f"{target.weights_sha}-{how}" + ("-guided-balanced" if target.model.n_classes else "")
    return cached_gits_grid(model, target.noise, name, nfe, model_hash=key,
                            cache_dir=cache_dir() / "gits", shape=target.shape, dtype=target.dtype,
                            device=target.device, data_mean=target.data_mean,
                            **{k: v for k, v in options.items() if v is not None})


def _model_reference() -> None:
    """Make (or find cached) the 'model' reference set of the embedded model, as ``_score_one`` would."""
    import torch

    torch.set_num_threads(1)
    from s3_ray.config import MetricConfig, ModelConfig
    from s3_ray.metrics.evaluate import get_target

    get_target(ModelConfig().model_dump_json(), MetricConfig(reference="model").model_dump_json()).reference_images()


def baseline_table(nfes, samples: int = 1000, seeds: int = 2, out_dir="benchmarks/results", workers: int | None = None,
                   names=None, discretizations=None) -> dict:
    from s3_ray.usf.baselines import BASELINES, DISCRETIZATIONS

    names = list(names or BASELINES)
    discs = list(discretizations or DISCRETIZATIONS)
    seed_list = list(range(seeds))
    jobs = [(n, d, nfe, samples, seed_list) for nfe in nfes for n in names for d in discs]
    start = time.time()
    workers = workers or min(2, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        pool.submit(_model_reference).result()  # made once (with its own progress), not by every worker
        with Progress(len(jobs), "baselines", "schedules", per="min") as progress:
            rows = []
            for r in pool.map(_score_one, jobs, chunksize=4):
                rows.append(r)
                progress.update(1, f"NFE {r['nfe']} {r['name']}/{r['discretization']}")
    converged = _converged(samples, seed_list)
    best = {}
    for nfe in nfes:
        ok = [r for r in rows if r["nfe"] == nfe and not r["failed"]]
        for ref in ("data", "model") if ok else ():
            b = min(ok, key=lambda r: r[f"fid_{ref}"])
            best[f"{nfe}/{ref}"] = f"{b['name']}/{b['discretization']}"
    result = {"samples": samples, "seeds": seed_list, "nfe": list(nfes), "converged": converged, "best": best,
              "rows": rows, "seconds": time.time() - start}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "baselines_digits.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table_markdown(result)
    (out / "baselines_digits.md").write_text(md)
    print(md)
    return result


def _converged(samples: int, seeds: list[int]) -> dict:
    """FID of the high-accuracy reference solve (data reference) and the held-out noise floor."""
    from s3_ray.config import MetricConfig, ModelConfig
    from s3_ray.metrics.evaluate import REFERENCE_SOLVER, get_target
    from s3_ray.metrics.fid import digits_reference, fid_kid, uint8_images
    from s3_ray.usf.baselines import build_baseline

    target = get_target(ModelConfig().model_dump_json(), MetricConfig().model_dump_json())
    s = build_baseline(REFERENCE_SOLVER[0], target.noise, REFERENCE_SOLVER[1])
    fids = [fid_kid(uint8_images(target.sample(s, samples, seed)))["fid"] for seed in seeds]
    floor = fid_kid(digits_reference("heldout"))["fid"]
    return {"fid_data": float(np.mean(fids)), "fid_data_spread": float(np.std(fids)), "heldout_floor": float(floor),
            "solver": f"{REFERENCE_SOLVER[0]}@{REFERENCE_SOLVER[1]}"}


def table_markdown(result: dict) -> str:
    c = result["converged"]
    lines = ["# Baselines on the embedded digits model", "",
             f"FID/KID, {result['samples']} samples, mean over seeds {result['seeds']}. Converged FID (data reference, "
             f"{c['solver']}): {c['fid_data']:.3f} ± {c['fid_data_spread']:.3f}; held-out-vs-train floor {c['heldout_floor']:.3f} "
             "(397 held-out images: FID is biased upwards at small N, so compare it only at equal N).",
             "**Bold** = best baseline at that NFE by FID against that reference (data or model).", "",
             "| NFE | baseline | discretization | FID (data) | KID (data) | FID (model) | KID (model) |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["nfe"], r["fid_data"] if r["fid_data"] is not None else 1e9)):
        key = f"{r['name']}/{r['discretization']}"
        b = result["best"].get(f"{r['nfe']}/data") == key
        bm = result["best"].get(f"{r['nfe']}/model") == key
        if r["failed"]:
            lines.append(f"| {r['nfe']} | {r['name']} | {r['discretization']} | failed (NaN) | | | |")
            continue
        f = f"**{r['fid_data']:.3f}**" if b else f"{r['fid_data']:.3f}"
        fm = f"**{r['fid_model']:.3f}**" if bm else f"{r['fid_model']:.3f}"
        lines.append(f"| {r['nfe']} | {r['name']} | {r['discretization']} | {f} | {r['kid_data']:.5f} | "
                     f"{fm} | {r['kid_model']:.5f} |")
    for ref in ("data", "model"):
        lines += ["", f"Best per NFE ({ref} reference): "
                  + ", ".join(f"{k.split('/')[0]}: {v}" for k, v in result["best"].items() if k.endswith(f"/{ref}"))]
    return "\n".join(lines) + "\n"

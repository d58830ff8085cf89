"""Checks that run before a search starts anything (Ray, MLflow, a run directory).

``check_space`` is pure (it runs whenever a search space is parsed, also by ``s3 submit`` on the
user's machine); ``check_files`` reads the files a space names (on the machine that runs the
driver: a cluster's paths are the cluster's); ``check_resources`` compares ``resources`` with the
Ray cluster right after connecting; ``run_dir_for`` keeps every run directory inside its root.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s3_ray.config import SearchConfig


def check_space(cfg: SearchConfig) -> None:
    """What the fields imply together: a known noise schedule, a final-time range below its T, every
    NFE reachable under the decisions. ValueError names the field. A pipeline's noise schedule is in
    its folder, which may be on a cluster only: ``check_files`` checks those on the driver's machine."""
    from s3_ray.usf.baselines import NEEDS_EMS

    if cfg.model.kind == "diffusers_pipeline":
        if "dpmsolver_v3" in cfg.decisions.predictions:
            raise ValueError("decisions.predictions: 'dpmsolver_v3' needs the model's EMS, computed from the model "
                             "as eps(x, t); a diffusers pipeline samples through its own loop (drop it there)")
        if set(cfg.baselines) & set(NEEDS_EMS):
            raise ValueError(f"baselines: {sorted(set(cfg.baselines) & set(NEEDS_EMS))} need the model's EMS, "
                             "which a diffusers pipeline target does not compute")
        if cfg.model.noise_schedule is not None:
            _noise_by_name(cfg.model.noise_schedule)
        return
    check_noise_space(cfg, _noise_by_name(cfg.model.noise_schedule))


def _noise_by_name(name: str):
    from s3_ray.usf.noise import get_noise_schedule

    try:
        return get_noise_schedule(name)
    except ValueError as e:
        raise ValueError(f"model.noise_schedule: {e}") from None


def check_noise_space(cfg: SearchConfig, noise) -> None:
    """The t_end range and every NFE under the decisions, on the model's noise schedule."""
    from s3_ray.search.space import random_schedule_at_nfe

    if cfg.decisions.t_end_range is not None and cfg.decisions.t_end_range[1] >= noise.T:
        raise ValueError(f"decisions.t_end_range: must end below the noise schedule's T = {noise.T:g}, "
                         f"got {list(cfg.decisions.t_end_range)}")
    from s3_ray.usf.baselines import AYS_DISCRETIZATIONS, discretize

    for d in cfg.discretizations:
        if d in AYS_DISCRETIZATIONS:
            try:
                discretize(noise, max(cfg.nfe), d)
            except ValueError as e:
                raise ValueError(f"discretizations: {e}") from None
    for nfe in cfg.nfe:
        try:
            random_schedule_at_nfe(np.random.default_rng(0), noise, nfe, cfg.decisions, cfg.operators)
        except ValueError as e:
            raise ValueError(f"nfe: {nfe} cannot be reached under decisions (afs {list(cfg.decisions.afs)}, "
                             f"correctors {list(cfg.decisions.correctors)}, max_steps {cfg.decisions.max_steps}, "
                             f"min_dlambda {cfg.decisions.min_dlambda:g}): {e}") from None


def search_decisions(cfg: SearchConfig) -> SearchConfig:
    """``cfg`` with the decisions its target can run: for a pipeline, the values ``S3Scheduler``
    cannot express there are left out of the defaults; a space that sets one explicitly is refused
    (ValueError naming decisions.<field> and the pipeline class). Reads the pipeline folder."""
    if cfg.model.kind != "diffusers_pipeline":
        return cfg
    from s3_ray.models.pipeline import check_pipeline, unsupported_decisions
    from s3_ray.search.space import restrict_decisions

    info = check_pipeline(cfg.model)
    bad = unsupported_decisions(info.cls, info.noise)
    bad["afs"] = tuple(sorted({*bad.get("afs", ()), "mean_x0"}))  # no data mean inside a pipeline
    decisions = restrict_decisions(cfg.decisions, bad, f"{info.cls} ({info.dir})")
    return cfg if decisions == cfg.decisions else cfg.model_copy(update={"decisions": decisions})


def check_files(cfg: SearchConfig) -> SearchConfig:
    """The files the space names: ``seed_schedules`` (valid schedules on the model's noise schedule,
    at a searched NFE, runnable by the target), ``model.checkpoint`` or ``model.pipeline`` (its
    folder, scheduler config, prompts, image size, and what the decisions imply on its noise
    schedule), Inception weights. Returns ``cfg`` with the decisions the target can run
    (``search_decisions``). ValueError names the field and file."""
    from s3_ray.models.pipeline import noise_for
    from s3_ray.usf.schedule import ScheduleError, load_schedule

    if cfg.model.kind == "checkpoint":
        from s3_ray.models.checkpoint import model_dir

        model_dir(cfg.model.checkpoint)
    pipeline = cfg.model.kind == "diffusers_pipeline"
    if pipeline:
        from s3_ray.metrics.evaluate import check_pipeline_metric
        from s3_ray.models.pipeline import check_metric_space, check_pipeline

        cfg = search_decisions(cfg)
        check_pipeline_metric(cfg.metric)
        check_metric_space(check_pipeline(cfg.model).cls, cfg.model, cfg.metric)
    noise = noise_for(cfg.model)
    if pipeline:
        check_noise_space(cfg, noise)
    for i, f in enumerate(cfg.seed_schedules):
        try:
            s = load_schedule(f)
        except ScheduleError as e:
            raise ValueError(f"seed_schedules[{i}]: {e}") from None
        if s.noise_schedule != noise.name:
            raise ValueError(f"seed_schedules[{i}]: {f} is for noise schedule {s.noise_schedule!r}, the model's is "
                             f"{noise.name!r}")
        if s.nfe() not in cfg.nfe:
            raise ValueError(f"seed_schedules[{i}]: {f} costs {s.nfe()} NFE, outside the searched nfe {list(cfg.nfe)}")
        if pipeline:
            from s3_ray.models.pipeline import model_index, pipeline_dir
            from s3_ray.pipelines import check_expressible

            cls = model_index(pipeline_dir(cfg.model.pipeline))["_class_name"]
            try:
                check_expressible(s, cls)
            except ScheduleError as e:
                raise ValueError(f"seed_schedules[{i}]: {f}: {cls} cannot run it: {e}") from None
    return cfg


def check_resources(cfg: SearchConfig, nodes: list[dict], local: bool) -> str | None:
    """Can one node of the Ray cluster (``ray.nodes()``) ever run a trial? Local Ray: ValueError if
    not. A cluster may still add nodes (autoscaling): a warning to print instead (None if it fits)."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    need = {"CPU": cfg.resources.cpu, "GPU": cfg.resources.gpu}
    if any(all(r.get(k, 0.0) >= v for k, v in need.items() if v > 0) for r in alive):
        return None
    have = ", ".join(f"{r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for r in alive) or "none"
    msg = (f"resources: a trial needs {cfg.resources.cpu:g} CPU and {cfg.resources.gpu:g} GPU on one node; the "
           f"{'local machine' if local else 'cluster'}'s nodes have {have}")
    if local:
        raise ValueError(msg + ": lower resources.cpu / resources.gpu in the search space")
    return msg + ": trials wait until the cluster's autoscaler adds such a node (stop the job if it has none)"


def run_dir_for(runs_root: str | Path, name: str) -> Path:
    """``<runs_root>/<name>`` resolved, refused (ValueError naming --name) unless it lies directly
    inside the resolved runs root."""
    root = Path(runs_root).resolve()
    run_dir = (root / name).resolve()
    if run_dir.parent != root or name in ("", ".", ".."):
        raise ValueError(f"--name: {name!r} must name a directory directly inside {root} (no path, no '..')")
    return run_dir

"""``s3 export --diffusers``: a search's best schedules as an ``S3Scheduler`` folder, or as a pipeline
folder that uses it.

The scheduler folder holds ``scheduler_config.json`` only (noise schedule + one schedule per NFE),
loadable with ``S3Scheduler.from_pretrained``. A pipeline folder holds a ``model_index.json`` whose
``scheduler`` entry is ``["s3_ray", "S3Scheduler"]``, the scheduler in ``scheduler/``, and a symbolic
link to each other component of the original pipeline (no copy of the weights), so
``import s3_ray; DiffusionPipeline.from_pretrained(OUT_DIR)`` loads it.

Everything is checked before anything is written; the folder is built beside ``OUT_DIR`` and moved
into place at the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from s3_ray.usf.noise import noise_from_diffusers_config
from s3_ray.usf.schedule import SolverSchedule, load_schedule

S3_SCHEDULER_ENTRY = ["s3_ray", "S3Scheduler"]


class ExportError(ValueError):
    """An export that cannot be done; the message names the file or option."""


def _read_json(path: Path, what: str) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"{what}: {path} is not readable JSON ({e})") from None
    if not isinstance(out, dict):
        raise ExportError(f"{what}: {path} holds {type(out).__name__}, not a JSON object")
    return out


def run_schedules(run_dir: Path, nfes: list[int] | None = None) -> list[SolverSchedule]:
    """The exported best schedules of a finished search (``run_dir/best/nfe<k>.json``)."""
    best = run_dir / "best"
    files = sorted(best.glob("nfe*.json"), key=lambda f: int(f.stem[3:]) if f.stem[3:].isdigit() else -1)
    if not files:
        raise ExportError(f"--run: {run_dir} holds no best/nfe*.json (not a finished search)")
    by_nfe = {}
    for f in files:
        try:
            s = load_schedule(f)
        except ValueError as e:
            raise ExportError(f"--run: {f}: {e}") from None
        by_nfe[s.nfe()] = s
    if nfes:
        missing = sorted(set(nfes) - set(by_nfe))
        if missing:
            raise ExportError(f"--nfe: the run has no schedule at NFE {missing} (it has {sorted(by_nfe)})")
        return [by_nfe[k] for k in sorted(set(nfes))]
    return [by_nfe[k] for k in sorted(by_nfe)]


def _run_model(run_dir: Path) -> dict:
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"--run: {run_dir} has no config.json (not a search's run directory)")
    model = _read_json(cfg_path, "--run").get("model")
    if not isinstance(model, dict):
        raise ExportError(f"--run: {cfg_path} has no 'model' object (not a search's config)")
    return model


def run_noise(run_dir: Path):
    """The noise schedule the run searched on (as the search itself built it)."""
    from s3_ray.config import ModelConfig
    from s3_ray.models.pipeline import noise_for

    try:
        return noise_for(ModelConfig.model_validate(_run_model(run_dir)))
    except (ValueError, OSError) as e:
        raise ExportError(f"--run: the model of {run_dir / 'config.json'} cannot be rebuilt ({e})") from None


def run_pipeline_dir(run_dir: Path) -> Path | None:
    """The pipeline folder a search ran on (model.kind diffusers_pipeline, or a checkpoint that is a
    pipeline folder with ``scheduler/``), or None."""
    model = _run_model(run_dir)
    for key in ("pipeline", "checkpoint"):
        p = model.get(key)
        if p and (Path(p) / "scheduler" / "scheduler_config.json").is_file():
            return Path(p)
    return None


def _scheduler_config(pipeline: Path) -> dict:
    path = pipeline / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ExportError(f"--pipeline: {pipeline} has no scheduler/scheduler_config.json")
    return _read_json(path, "--pipeline")


def build_scheduler(schedules: list[SolverSchedule], scheduler_config: dict, pipeline_class: str | None):
    """An ``S3Scheduler`` over ``scheduler_config``'s noise schedule holding ``schedules``; refuses a
    schedule that ``pipeline_class``'s loop cannot run (naming the step and decision)."""
    from s3_ray.pipelines.expressible import check_expressible
    from s3_ray.pipelines.scheduler import S3Scheduler

    for s in schedules:
        try:
            check_expressible(s, pipeline_class)
        except ValueError as e:
            raise ExportError(f"NFE {s.nfe()}: {e}") from None
    try:
        return S3Scheduler.from_config(scheduler_config, schedules=schedules)
    except ValueError as e:
        raise ExportError(f"the pipeline's scheduler_config.json: {e}") from None


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--diffusers: {out} exists and is not a directory")
        if any(out.iterdir()):
            earlier = (out / "scheduler_config.json").is_file() or (out / "model_index.json").is_file()
            if not force:
                raise ExportError(f"--diffusers: {out} is not empty (--force replaces an earlier export)")
            if not earlier:
                raise ExportError(f"--diffusers: {out} is not an earlier export (no scheduler_config.json or "
                                  "model_index.json); not replacing it")


def export_diffusers(run_dir: Path, out: Path, pipeline: Path | None = None, nfes: list[int] | None = None,
                     force: bool = False) -> Path:
    """Write the scheduler folder (or, with ``pipeline``, a pipeline folder) to ``out``; returns ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    schedules = run_schedules(run_dir, nfes)
    source = Path(pipeline) if pipeline is not None else run_pipeline_dir(run_dir)
    if source is None:
        raise ExportError(f"--pipeline: {run_dir} did not search a diffusers pipeline; give --pipeline PIPE_DIR "
                          "(a pipeline folder whose scheduler/scheduler_config.json has the searched noise schedule)")
    index_path = source / "model_index.json"
    index = _read_json(index_path, "--pipeline") if pipeline is not None or index_path.is_file() else {}
    if pipeline is not None and "scheduler" not in index:
        raise ExportError(f"--pipeline: {index_path} has no 'scheduler' component")
    # The loop that will run the schedules: the pipeline's class (a bare scheduler folder gets the
    # strictest check a pipeline-less class name gives: AFS refused unless the class is known).
    scheduler_config = _scheduler_config(source)
    searched = run_noise(run_dir)
    try:
        target = noise_from_diffusers_config(scheduler_config)
    except ValueError as e:
        raise ExportError(f"--pipeline: {source / 'scheduler' / 'scheduler_config.json'}: {e}") from None
    if target.spec() != searched.spec():
        raise ExportError(f"--pipeline: {source}'s scheduler has the noise schedule {target.spec()}, but the run "
                          f"searched {searched.spec()}: its schedules would run on another model's noise levels")
    scheduler = build_scheduler(schedules, scheduler_config, index.get("_class_name"))
    if pipeline is None:
        index = None
    _prepare_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        if index is None:
            scheduler.save_pretrained(str(tmp))
        else:
            scheduler.save_pretrained(str(tmp / "scheduler"))
            new_index = dict(index, scheduler=S3_SCHEDULER_ENTRY)
            (tmp / "model_index.json").write_text(json.dumps(new_index, indent=2, sort_keys=True) + "\n")
            for name, entry in index.items():
                if name.startswith("_") or name == "scheduler" or not isinstance(entry, list):
                    continue
                if entry[0] is None or not (source / name).exists():
                    continue  # an absent optional component (e.g. safety_checker: [null, null])
                os.symlink((source / name).resolve(), tmp / name, target_is_directory=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

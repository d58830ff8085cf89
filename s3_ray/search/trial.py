"""The Ray Tune trial: evaluate one schedule (lives in the package so workers can import it).

The trial's config (made by the searcher) holds the schedule as canonical JSON, the evaluation
settings (model and metric configs as JSON), the sample count and the common-random-number seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from s3_ray.metrics.evaluate import evaluate, get_target
from s3_ray.usf.schedule import SolverSchedule


def run_trial(config: dict) -> dict:
    """Evaluate ``config['schedule']``; returns the metrics dict that the trainable reports.

    With ``config['cache_dir']`` results are cached by (schedule hash, samples, seed, model, metric):
    a trial re-run after a driver restart answers from the cache."""
    started_at = time.time()
    cache = _cache_path(config)
    if cache is not None and cache.is_file():
        return {**json.loads(cache.read_text()), "cached": 1}
    torch.set_num_threads(1)
    target = get_target(config["model"], config["metric"])  # cached: loaded once per worker process
    if "screen" in config:
        result = screen_schedules(config["screen"], target, int(config["samples"]), int(config["seed"]),
                                  config.get("fidelity", "rmse"))
    else:
        schedule = SolverSchedule.from_json(config["schedule"])
        result = evaluate(schedule, target, n=int(config["samples"]), seed=int(config["seed"]))
    result["failed"] = int(result["failed"])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, cache)
    if config.get("synthetic"):  # a benchmark: the trial lasts its drawn duration
        from s3_ray.config import SyntheticConfig
        from s3_ray.search.synthetic import pad_to_duration

        pad_to_duration(SyntheticConfig.model_validate_json(config["synthetic"]), config["trial_key"],
                        int(config["seed"]), started_at)
    return {**result, "cached": 0, "started_at": started_at, "ended_at": time.time()}


def screen_schedules(schedules: list[str], target, n: int, seed: int, fidelity: str = "rmse") -> dict:
    """A screening trial (multi-fidelity search): each schedule's ``n`` samples scored by their RMSE
    against the converged solve from the same noise (``fidelity`` rmse) or by the search metric
    (``metric``). ``scores`` in the given order; ``score`` is their best (what Tune and the MLflow
    child run show, also as ``screen_best_<rmse|metric kind>``); a NaN schedule scores
    ``metric.worst_score``."""
    from s3_ray.config import MetricConfig

    started = time.perf_counter()
    if fidelity == "rmse":
        metric = MetricConfig(kind="rmse", worst_score=target.metric_cfg.worst_score)
        target.reference_solution(n, seed)  # the converged solve, once per process
    elif fidelity == "metric":
        metric = target.metric_cfg
    else:
        raise ValueError(f"screen.fidelity: {fidelity!r} is not 'rmse' or 'metric'")
    scores = [evaluate(SolverSchedule.from_json(s), target, metric, n=n, seed=seed)["score"] for s in schedules]
    return {"scores": scores, "score": min(scores), f"screen_best_{metric.kind}": min(scores),
            "n_schedules": len(scores), "n": n, "seed": seed, "failed": False,
            "seconds": time.perf_counter() - started}


def _cache_path(config: dict) -> Path | None:
    if not config.get("cache_dir"):
        return None
    key = [config["schedule_hash"], config["samples"], config["seed"], config["model"], config["metric"]]
    if config.get("fidelity", "rmse") != "rmse":  # a screening trial's fidelity (rmse keys as before)
        key.append(config["fidelity"])
    key = json.dumps(key)
    return Path(config["cache_dir"]) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def trainable(config: dict) -> None:
    """Ray Tune function trainable."""
    import ray
    from ray import tune

    result = run_trial(config)
    result["node_id"] = ray.get_runtime_context().get_node_id()
    tune.report(result)

"""Warm starts: a search begins with the results of earlier searches of the same model and metric.

``warm_start`` in the search space (or ``s3 search --warm-start DIR``, repeatable) lists earlier
run directories (``runs/<name>/``). Their searchers' saved states hold every full evaluation
(schedule, score, NFE); those whose NFE this search covers enter the searcher's pool and its
predictor's training set as evaluated (source ``warm``), are never evaluated again and cost no
budget; the final re-evaluation considers their best as it does the search's own. A score is only
comparable under the same model, metric and noise seed, so a run that differs in any of them is
refused with the field that differs. Each schedule counts once (the earliest run listed wins).
"""

from __future__ import annotations

from pathlib import Path

from s3_ray.config import SearchConfig
from s3_ray.search.searcher import load_saved_state

# What a score depends on besides the schedule (metric.final_* only shape the final table).
METRIC_FIELDS = ("kind", "reference", "samples", "reference_samples", "feature_extractor",
                 "feature_extractor_weights_path", "worst_score")


def check_compatible(cfg: SearchConfig, other: SearchConfig, where: str) -> None:
    """ValueError naming the first field under which ``other``'s scores mean something else."""
    mine, theirs = cfg.model.model_dump(mode="json"), other.model.model_dump(mode="json")
    for k in mine:
        if mine[k] != theirs.get(k):
            raise ValueError(f"warm_start: {where} was searched with model.{k} = {theirs.get(k)!r}, this search has "
                             f"{mine[k]!r}: its scores are of another model")
    mine, theirs = cfg.metric.model_dump(mode="json"), other.metric.model_dump(mode="json")
    for k in METRIC_FIELDS:
        if mine[k] != theirs[k]:
            raise ValueError(f"warm_start: {where} was scored with metric.{k} = {theirs[k]!r}, this search has "
                             f"{mine[k]!r}: its scores are of another metric")
    if cfg.seed != other.seed:
        raise ValueError(f"warm_start: {where} used seed {other.seed}, this search {cfg.seed}: its scores come from "
                         "other noise (common random numbers need the same seed)")


def load_warm_results(cfg: SearchConfig) -> list[dict]:
    """The reusable results of ``cfg.warm_start``'s runs, in order: dicts with schedule, schedule_hash,
    nfe, score, failed, source 'warm', warm_source (its source there) and warm_from (the run directory)."""
    out, seen = [], set()
    for i, d in enumerate(cfg.warm_start):
        where = f"warm_start[{i}] ({d})"
        try:
            state = load_saved_state(Path(d) / "tune")
        except ValueError as e:
            raise ValueError(f"warm_start: {e}") from None
        try:
            other = SearchConfig.model_validate(state["config"])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{where}: its searcher state holds no valid search config ({e})") from None
        check_compatible(cfg, other, where)
        for r in sorted(state.get("results", []), key=lambda r: r.get("index", 0)):
            if r["nfe"] in cfg.nfe and r["schedule_hash"] not in seen:
                seen.add(r["schedule_hash"])
                out.append({"schedule": r["schedule"], "schedule_hash": r["schedule_hash"], "nfe": r["nfe"],
                            "score": float(r["score"]), "failed": bool(r.get("failed")), "source": "warm",
                            "warm_source": r.get("source"), "warm_from": str(d)})
    return out

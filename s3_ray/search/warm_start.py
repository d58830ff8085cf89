"""Warm starts: a search begins with the results of earlier searches of the same model and metric.

``warm_start`` in the search space (or ``s3 search --warm-start DIR``, repeatable) lists earlier
run directories (``runs/<name>/``), whose searchers' saved states hold every full evaluation
(schedule, score, NFE), or MLflow experiments (``<tracking URI>#<experiment name>``, or a link
copied from the MLflow UI: ``http://host:5000/#/experiments/<id>[/runs/<parent run id>]``), whose
searches' parent and trial runs hold the same (``mlflow_tracking.read_searches``). Those whose NFE this search covers enter the searcher's pool and its
predictor's training set as evaluated (source ``warm``), are never evaluated again and cost no
budget; the final re-evaluation considers their best as it does the search's own. A score is only
comparable under the same model, metric and noise seed, so a run that differs in any of them is
refused with the field that differs. Each schedule counts once (the earliest run listed wins).

Across NFEs (``warm_split``, default 3): per NFE k+1 of this search, the listed runs' best schedules
at NFE k (whether or not k is in this search's range) with their longest step split in two are
evaluated in the seed phase (source ``split``): a good k-step schedule is usually close to a good
(k+1)-step one.
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


def is_store_ref(entry: str) -> bool:
    """A ``warm_start`` entry naming an MLflow store (``<tracking URI>#<experiment>``), not a run directory."""
    return "://" in entry


def warm_states(cfg: SearchConfig) -> list[tuple[str, dict]]:
    """(where, saved searcher state) of each search ``cfg.warm_start`` names (a run directory, or
    every search in an MLflow experiment), each checked against ``cfg`` (ValueError naming the
    entry, the run and the field)."""
    from s3_ray.tracking.mlflow_tracking import read_searches

    out = []
    for i, d in enumerate(cfg.warm_start):
        if is_store_ref(d):
            try:
                found = [(f"warm_start[{i}] ({where})", state) for where, state in read_searches(d)]
            except ValueError as e:
                raise ValueError(f"warm_start[{i}]: {e}") from None
        else:
            try:
                found = [(f"warm_start[{i}] ({d})", load_saved_state(Path(d) / "tune"))]
            except ValueError as e:
                raise ValueError(f"warm_start: {e}") from None
        for where, state in found:
            try:
                other = SearchConfig.model_validate(state["config"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{where}: it holds no valid search config ({e})") from None
            check_compatible(cfg, other, where)
            out.append((where, state))
    return out


def load_warm_results(cfg: SearchConfig, states: list[tuple[str, dict]] | None = None) -> list[dict]:
    """The reusable results of ``cfg.warm_start``'s runs, in order: dicts with schedule, schedule_hash,
    nfe, score, failed, source 'warm', warm_source (its source there) and warm_from (the entry and run
    it came from). ``states``: ``warm_states(cfg)`` when already read (default: read them)."""
    out, seen = [], set()
    for where, state in warm_states(cfg) if states is None else states:
        for r in sorted(state.get("results", []), key=lambda r: r.get("index", 0)):
            if r["nfe"] in cfg.nfe and r["schedule_hash"] not in seen:
                seen.add(r["schedule_hash"])
                out.append({"schedule": r["schedule"], "schedule_hash": r["schedule_hash"], "nfe": r["nfe"],
                            "score": float(r["score"]), "failed": bool(r.get("failed")), "source": "warm",
                            "warm_source": r.get("source"), "warm_from": where})
    return out


def split_seeds(cfg: SearchConfig, noise, states: list[tuple[str, dict]] | None = None) -> list:
    """The ``warm_split`` best NFE-k schedules of the warm runs, per NFE k+1 of ``cfg``, each split
    into an NFE-(k+1) schedule (``space.split_longest_step``); best first within each NFE."""
    from s3_ray.search.space import split_longest_step
    from s3_ray.usf.schedule import SolverSchedule

    if not cfg.warm_split:
        return []
    by_nfe: dict[int, dict[str, tuple[float, str]]] = {}
    for _, state in warm_states(cfg) if states is None else states:
        for r in state.get("results", []):
            if not r.get("failed") and r["nfe"] + 1 in cfg.nfe:
                by_nfe.setdefault(r["nfe"], {}).setdefault(r["schedule_hash"], (float(r["score"]), r["schedule"]))
    out = []
    for k in sorted(by_nfe):
        made = 0
        for _, sj in sorted(by_nfe[k].values()):
            s = split_longest_step(SolverSchedule.from_json(sj), noise, cfg.decisions)
            if s is not None:
                out.append(s)
                made += 1
            if made == cfg.warm_split:
                break
    return out

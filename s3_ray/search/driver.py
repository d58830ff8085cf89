"""The search driver: Ray Tune + S3Searcher + MLflow, then the final re-evaluation and export.

Layout of a run directory ``runs/<name>/``: ``tune/`` (Tune's experiment state, resumable),
``mlflow.db`` + ``mlartifacts/`` (the default tracking store), ``best/nfe<k>.json``, ``summary.md``,
``summary.json`` and the plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

from s3_ray.config import SearchConfig
from s3_ray.errors import first_line
from s3_ray.models.pipeline import noise_for
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.schedule import SolverSchedule

TUNE_NAME = "tune"


class SearchError(RuntimeError):
    """A search cannot start or continue; the message says what to run next."""


def prepare_ray_env(run_dir: Path, local: bool) -> None:
    """Environment for Ray: a short per-run temp dir, no usage stats, loopback-only when local.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when ``ray`` is first imported: the variable
    reaches the processes Ray starts, and for this process (which may have imported ``ray`` already)
    the constant it was read into is set too. Measured: with only the variable set after ``import
    ray``, the node advertised the outward address and GCS, raylets and workers listened on ``*``."""
    short = hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]
    os.environ.setdefault("RAY_TMPDIR", f"/tmp/s3r-{short}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every port on 127.0.0.1 (measured)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if "ray._private.ray_constants" in sys.modules:
            sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False
    Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)


def init_ray(address: str | None, run_dir: Path):
    """Connect to ``address`` (or $RAY_ADDRESS, set inside a Ray job), else start a local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    prepare_ray_env(run_dir, local=address is None)
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


def _trial_records(results) -> list[tuple[str, dict, dict]]:
    """(trial key, config, metrics) of every trial that reported."""
    return [(r.config["trial_key"], r.config, r.metrics) for r in results if r.metrics and "score" in r.metrics]


def run_search(cfg: SearchConfig, *, address: str | None = None, mlflow_uri: str | None = None, algo: str = "s3",
               resume: bool = False, fresh: bool = False, runs_root: str | Path = "runs", out=sys.stdout) -> dict:
    """Run (or resume) a search; returns the summary dict.

    Everything that can be checked is checked before anything is started or changed (the space's
    files, the tracking server, Ray's resources); only then does ``fresh`` delete the old run. A
    search that fails after its MLflow parent run exists marks that run FAILED with the reason."""
    from s3_ray.search.preflight import check_files, check_resources, run_dir_for
    from s3_ray.search.warm_start import load_warm_results, split_seeds, warm_states
    from s3_ray.tracking.mlflow_tracking import TRACKING_FILE, read_tracking, write_tracking

    try:
        run_dir = run_dir_for(runs_root, cfg.name)
    except ValueError as e:
        raise SearchError(str(e)) from None
    tune_dir = run_dir / TUNE_NAME
    if resume:
        if not _can_restore(tune_dir):
            raise SearchError(f"nothing to resume in {tune_dir}: start it with `s3 search --space ...` (without --resume)")
        cfg = SearchConfig.model_validate_json((run_dir / "config.json").read_text())
    elif tune_dir.exists() and not fresh:
        raise SearchError(f"{run_dir} already holds a search: continue it with --resume, or start over with --fresh")
    try:
        cfg = check_files(cfg)  # with the decisions the target can run
        states = [] if resume else warm_states(cfg)  # read once (a store's artifacts), before --fresh may delete a listed run
        warm, splits = load_warm_results(cfg, states), split_seeds(cfg, noise_for(cfg.model), states)
    except ValueError as e:
        raise SearchError(str(e)) from None
    tracking = read_tracking(run_dir / TRACKING_FILE) if resume else {}
    local_store = f"sqlite:///{run_dir / 'mlflow.db'}"
    if mlflow_uri:
        uri, artifacts = mlflow_uri, None
    elif tracking.get("uri"):
        uri, artifacts = tracking["uri"], tracking.get("artifact_root")
    else:
        uri, artifacts = local_store, (run_dir / "mlartifacts").as_uri()
    # A tracking server must answer before anything starts; the run's own store is made below.
    tracker = None if uri == local_store else _tracker(uri, cfg.name, artifacts)

    init_ray(address, run_dir)
    import ray

    try:
        warning = check_resources(cfg, ray.nodes(), local=not (address or os.environ.get("RAY_ADDRESS")))
    except ValueError as e:
        raise SearchError(str(e)) from None
    if warning:
        print(f"warning: {warning}", file=out)
    if fresh and run_dir.exists():  # every check passed: only now is the old run deleted
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=1))
    tracker = tracker or _tracker(uri, cfg.name, artifacts)
    parent_id = tracker.start_parent(cfg.model_dump(mode="json"), algo,
                                     resume_id=tracking.get("parent_run_id") if tracking.get("uri") == uri else None)
    write_tracking(run_dir / TRACKING_FILE, uri, cfg.name, artifacts, parent_id)
    try:
        return _search(cfg, run_dir, tracker, parent_id, algo=algo, resume=resume, out=out,
                       browse=_browse(uri, local_store, tracker.experiment_id), warm=warm, splits=splits)
    except Exception as e:
        tracker.fail_parent(parent_id, first_line(e))
        raise


def _browse(uri: str, local_store: str, experiment_id: str) -> str:
    """How to see the trials: the MLflow UI's URL (and, for the run's own store, the command that serves it)."""
    from s3_ray.tracking.mlflow_tracking import ui_url

    if uri == local_store:
        return f"mlflow ui --backend-store-uri {uri}\n  then open {ui_url('http://127.0.0.1:5000', experiment_id)}"
    return ui_url(uri, experiment_id)


def _can_restore(tune_dir: Path) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(str(tune_dir))


def _tracker(uri: str, name: str, artifacts: str | None):
    """The search's MLflow Tracker; SearchError (what to run next) if the store cannot be reached."""
    from s3_ray.tracking.mlflow_tracking import Tracker

    try:
        return Tracker(uri, name, artifacts)
    except Exception as e:
        raise SearchError(f"cannot reach MLflow at {uri} ({first_line(e)}): start it (`s3 mlflow-server`, "
                          f"`make mlflow`) or leave out --mlflow-uri to track in the run directory, then rerun "
                          f"this command") from e


def _search(cfg: SearchConfig, run_dir: Path, tracker, parent_id: str, *, algo: str, resume: bool, out,
            browse: str, warm: list[dict] = (), splits: list = ()) -> dict:
    """Tune's fit, the final re-evaluation and the summary (the run directory and tracking are set up)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from s3_ray.search.actor_cache import keep_idle_trial_actors
    from s3_ray.search.searcher import S3Searcher, predictor_quality
    from s3_ray.search.trial import trainable
    from s3_ray.tracking.mlflow_tracking import TRACKING_FILE, MlflowTrialCallback

    tune_dir = run_dir / TUNE_NAME
    # Snapshot Tune's experiment state every second (default: >= 10 s), so a killed driver re-runs
    # at most the trials of the last second (answered from the result cache, logged once).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # Of Tune's default per-trial loggers (CSV, JSON, TensorBoard), which write in the driver's loop,
    # keep only JSON (Tune's ResultGrid reads it); TensorBoard alone cost ~10 ms per trial (py-spy).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Tune's newer console output prints a banner even at verbose=0, with num_samples=-1 shown as
    # "Number of trials 9223372036854775807"; its classic reporter at verbose=0 prints nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = time.time()
    resources = {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu}
    fn = tune.with_resources(trainable, resources)
    if resume:
        tuner = tune.Tuner.restore(str(tune_dir), trainable=fn, resume_errored=True)
    else:
        from s3_ray.search.seed_baselines import gits_grids

        searcher = S3Searcher(cfg, algo=algo, gits_grids=gits_grids(cfg, out) if algo in ("s3", "evolution") else {},
                              warm_results=list(warm), split_seeds=list(splits))
        if cfg.warm_start:
            n_split = sum(1 for q in searcher.queue if q["source"] == "split")
            print(f"warm start: {searcher.n_warm} earlier results reused from {', '.join(cfg.warm_start)}; "
                  f"{n_split} of their best NFE-k schedules split into NFE-(k+1) seeds", file=out)
        searcher.trial_settings = {"cache_dir": str(run_dir / "results-cache")}
        tuner = tune.Tuner(
            fn,
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=cfg.concurrency,
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=TUNE_NAME, storage_path=str(run_dir), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=2),
                                      callbacks=[MlflowTrialCallback(str(run_dir / TRACKING_FILE)),
                                                 JsonLoggerCallback(), _search_progress(cfg, algo)]),
        )
    keep_idle_trial_actors(cfg.concurrency)  # else one actor is left after the first stage boundary
    results = tuner.fit()
    records = _trial_records(results)
    added = _sync(tracker, records, out)
    print(f"search: {len(records)} trials in {time.time() - started:.0f} s ({added or 0} synced to MLflow at the end)",
          file=out)

    full = [r for r in records if "screen" not in r[1]]  # screening trials are in MLflow, not in the tables
    state = _searcher_state(tune_dir)
    warm_used = [r for r in state.get("results", []) if r.get("source") == "warm"]
    taus = predictor_quality(state) if state else []
    summary = finalize(cfg, full, run_dir, tracker, parent_id, out, taus=taus, warm=warm_used,
                       screened_trials=len(records) - len(full))
    if added is None:  # MLflow was down when the trials ended: try again after the final evaluation
        added = _sync(tracker, records, out, last=True)
        if added is not None:
            print(f"MLflow is back: {added} trial(s) synced", file=out)
    summary["search_seconds"] = time.time() - started
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nbrowse: {browse}", file=out)
    return summary


def _search_progress(cfg: SearchConfig, algo: str):
    """The search's progress display (stderr): trials of the budget, stage, best score per NFE, ETA."""
    from s3_ray.search.progress import SearchProgress

    return SearchProgress(cfg.budget, cfg.metric.kind, stages=cfg.stages if algo == "s3" else None)


def _searcher_state(tune_dir: Path) -> dict:
    """The searcher's last saved state; {} if there is none."""
    from s3_ray.search.searcher import load_saved_state

    try:
        return load_saved_state(tune_dir)
    except ValueError:
        return {}


def _sync(tracker, records, out, last: bool = False) -> int | None:
    """Log the trials missing from MLflow; None if the server could not be reached."""
    try:
        return tracker.sync_trials(records)
    except Exception as e:  # the server may still be down: the records stay in runs/<name>/tune
        then = ("rerun the same `s3 search` command with --resume once the server is back (finished trials are not re-run)"
                if last else "trying again after the final evaluation")
        print(f"warning: MLflow sync at {tracker.uri} failed ({first_line(e)}); the trials' results are in "
              f"the run directory (tune/): {then}", file=out)
        return None


# ---- final re-evaluation ------------------------------------------------------------------------

def _final_eval_task(schedule_json: str, model_json: str, metric_json: str, n: int, seed: int) -> dict:
    import torch

    from s3_ray.metrics.evaluate import evaluate, get_target

    torch.set_num_threads(1)
    target = get_target(model_json, metric_json)
    return evaluate(SolverSchedule.from_json(schedule_json), target, n=n, seed=seed)


def finalize(cfg: SearchConfig, records, run_dir: Path, tracker, parent_id: str, out, taus=(), warm=(),
             screened_trials: int = 0) -> dict:
    """Re-evaluate the top-k searched schedules (this search's and the reused ``warm`` results) and
    every baseline per NFE with more samples on fresh seeds; export the best schedule per NFE; write
    summary.md; log the parent run."""
    import ray

    noise = noise_for(cfg.model)
    by_nfe = defaultdict(list)
    for _, c, r in records:
        if c["source"] != "baseline" and not r.get("failed"):
            by_nfe[c["nfe"]].append((r["score"], c["schedule"]))
    for r in warm:  # (a reused baseline result is re-evaluated as a baseline below, not as searched)
        if not r["failed"] and r.get("warm_source") != "baseline":  # (loaded at the searched NFEs only)
            by_nfe[r["nfe"]].append((r["score"], r["schedule"]))
    from s3_ray.search.seed_baselines import baseline_schedules, gits_grids

    baseline_set = baseline_schedules(cfg, noise, gits_grids(cfg, out))
    candidates = []  # (nfe, kind, label, schedule_json)
    for nfe in cfg.nfe:
        for _, sj in sorted(by_nfe[nfe])[: cfg.final_top_k]:
            candidates.append((nfe, "searched", SolverSchedule.from_json(sj).schedule_hash()[:10], sj))
        candidates += [(nfe, "baseline", label, s.to_json()) for n, label, s in baseline_set if n == nfe]
    from s3_ray.metrics.evaluate import REFERENCE_SOLVER

    converged = build_baseline(REFERENCE_SOLVER[0], noise, REFERENCE_SOLVER[1]).to_json()
    candidates.append((REFERENCE_SOLVER[1], "converged", f"{REFERENCE_SOLVER[0]}/{REFERENCE_SOLVER[1]}", converged))
    seeds = [cfg.seed + 10_000 + j for j in range(cfg.metric.final_seeds)]
    task = ray.remote(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)(_final_eval_task)
    mj, xj = cfg.model.model_dump_json(), cfg.metric.model_dump_json()
    refs = [[task.remote(sj, mj, xj, cfg.metric.final_samples, seed) for seed in seeds] for *_, sj in candidates]
    from s3_ray.search.progress import gather

    scores = [sum(r["score"] for r in rs) / len(rs) for rs in gather(refs)]

    rows, best_dir = [], run_dir / "best"
    best_dir.mkdir(exist_ok=True)
    conv_score = scores[-1]
    for nfe in cfg.nfe:
        entries = [(sc, kind, label, sj) for (n, kind, label, sj), sc in zip(candidates, scores) if n == nfe and kind != "converged"]
        searched = sorted(e for e in entries if e[1] == "searched")
        baselines = sorted(e for e in entries if e[1] == "baseline")
        best = min(entries)  # the best schedule at this NFE, searched or not, is what we export
        SolverSchedule.from_json(best[3]).save(best_dir / f"nfe{nfe}.json")
        row = {"nfe": nfe, "searched": searched[0][0] if searched else None,
               "searched_hash": searched[0][2] if searched else None,
               "best_baseline": baselines[0][2] if baselines else None,
               "best_baseline_score": baselines[0][0] if baselines else None, "exported": best[2]}
        row["ratio"] = (row["searched"] / row["best_baseline_score"]) if searched and baselines else None
        rows.append(row)
    _sample_grids(cfg, best_dir, run_dir / "grids")
    summary = {"name": cfg.name, "metric": cfg.metric.kind, "reference": cfg.metric.reference,
               "final_samples": cfg.metric.final_samples, "final_seeds": seeds, "converged": conv_score, "rows": rows,
               "predictor_tau": list(taus), "trials": len(records),
               "warm_start": {"runs": list(cfg.warm_start), "reused": len(warm),
                              "split": sum(1 for _, c, _ in records if c["source"] == "split")},
               "pareto": pareto_front(rows),
               "screened_trials": screened_trials,
               "all": [{"nfe": n, "kind": k, "label": lab, "score": sc} for (n, k, lab, _), sc in zip(candidates, scores)]}
    md = summary_markdown(summary)
    (run_dir / "summary.md").write_text(md)
    print(md, file=out)
    _write_report(run_dir, summary, records, out)
    _log_parent(tracker, parent_id, summary, run_dir, out)
    return summary


def _write_report(run_dir: Path, summary: dict, records, out) -> None:
    """``report.html`` and its plots; a failure is a warning (the search's results are already saved)."""
    from s3_ray.tracking.report import write_report

    try:
        path = write_report(run_dir, summary, records)
        print(f"report: {path} (`s3 report {run_dir} --open` opens it)", file=out)
    except Exception as e:
        print(f"warning: writing the report failed ({first_line(e)}); `s3 report {run_dir}` tries again", file=out)


def _sample_grids(cfg: SearchConfig, best_dir: Path, grid_dir: Path, n: int = 64):
    """An image grid of each exported schedule's samples (image models only)."""
    from s3_ray.metrics.evaluate import get_target

    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    if not target.is_image:
        return
    from s3_ray.metrics.fid import uint8_images
    from s3_ray.tracking.plots import image_grid

    grid_dir.mkdir(exist_ok=True)
    for f in sorted(best_dir.glob("nfe*.json")):
        x = target.sample(SolverSchedule.from_json(f.read_text()), n, cfg.seed + 20_000)
        image_grid(uint8_images(x), grid_dir / f"{f.stem}.png")


def pareto_front(rows: list[dict]) -> list[dict]:
    """The non-dominated (NFE, score) points of a search's final table: an NFE is on the front when
    its best schedule (the exported one, searched or baseline) scores lower than every smaller NFE's."""
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: r["nfe"]):
        score = min(x for x in (r["searched"], r["best_baseline_score"]) if x is not None)
        if score < best:
            front.append({"nfe": r["nfe"], "score": score, "schedule": r["exported"]})
            best = score
    return front


def winner(row: dict) -> str:
    """Whose schedule is exported at the row's NFE (the best one): 'S3' or the baseline's name."""
    if row["searched"] is not None and row["exported"] == row["searched_hash"]:
        return "S3"
    return str(row["exported"])


def summary_markdown(summary: dict) -> str:
    metric = summary["metric"].upper()
    against = "vs a converged solve from the same noise" if metric == "RMSE" else f"{summary['reference']} reference"
    lines = [f"# {summary['name']}: searched schedules vs the best tuned baseline", "",
             f"{metric} ({against}), {summary['final_samples']} samples x {len(summary['final_seeds'])} "
             f"fresh seeds; converged {metric} (reference solver): {summary['converged']:.3f}", "",
             f"| NFE | S3 {metric} | best baseline | its {metric} | ratio | converged | winner |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        s3 = "-" if r["searched"] is None else f"{r['searched']:.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['nfe']} | {s3} | {r['best_baseline']} | {r['best_baseline_score']:.3f} | {ratio} | "
                     f"{summary['converged']:.3f} | {winner(r)} |")
    taus = [t for t in summary.get("predictor_tau", []) if t.get("kendall_tau") is not None]
    if taus:
        lines += ["", "Predictor Kendall tau per stage, held-out split of its training set / its own proposals once "
                  "evaluated: " + ", ".join(f"stage {t['stage']}: {t['kendall_tau']:.2f} (n={t['n_train']}) / "
                                            f"{t.get('proposal_tau', float('nan')):.2f} (n={t.get('n_evaluated', 0)})"
                                            for t in taus)]
    if summary.get("pareto"):
        on = {p["nfe"] for p in summary["pareto"]}
        off = [r["nfe"] for r in summary["rows"] if r["nfe"] not in on]
        lines += ["", "Pareto front (best final score vs NFE): " + ", ".join(
            f"NFE {p['nfe']}: {p['score']:.3f} ({p['schedule']})" for p in summary["pareto"])
            + (f"; off the front (a smaller NFE does as well): {', '.join(map(str, off))}" if off else "")]
    warm = summary.get("warm_start") or {}
    if warm.get("runs"):
        lines += ["", f"Warm start: {warm['reused']} earlier results reused from {', '.join(warm['runs'])}; "
                      f"{warm.get('split', 0)} of their NFE-k schedules split into NFE-(k+1) seeds (evaluated)."]
    screened = [t for t in taus if "screen_vs_full_tau" in t]
    if screened:
        lines += ["", f"Screening ({summary.get('screened_trials', 0)} screening trials): Kendall tau per stage, "
                  "predictor vs screening score (every screened schedule) / screening vs full score (survivors): "
                  + ", ".join(f"stage {t['stage']}: {t['predicted_vs_screen_tau']:.2f} (n={t['screened']}) / "
                              f"{t['screen_vs_full_tau']:.2f} (n={t['survivors']})" for t in screened)]
    return "\n".join(lines) + "\n"


def _log_parent(tracker, parent_id, summary, run_dir: Path, out):
    from mlflow.entities import Metric, RunTag

    from s3_ray.tracking.report import COMPARE_DIR, PLOTS, REPORT, REPORT_DATA

    try:
        metrics = []
        for r in summary["rows"]:
            if r["searched"] is not None:
                metrics.append(Metric(f"best_nfe{r['nfe']}", r["searched"], 0, 0))
            metrics.append(Metric(f"baseline_nfe{r['nfe']}", r["best_baseline_score"], 0, 0))
        metrics.append(Metric("converged", summary["converged"], 0, 0))
        metrics += [Metric(f"pareto_nfe{p['nfe']}", p["score"], 0, 0) for p in summary.get("pareto", [])]
        metrics += [Metric(key, t[key], 0, t["stage"]) for t in summary.get("predictor_tau", [])
                    for key in ("kendall_tau", "proposal_tau", "predicted_vs_screen_tau", "screen_vs_full_tau")
                    if t.get(key) is not None and t[key] == t[key]]
        tags = [RunTag(f"{key}_nfe{r['nfe']}", value) for r in summary["rows"]
                for key, value in (("best_baseline", r["best_baseline"]), ("winner", winner(r))) if value]
        tracker.client.log_batch(parent_id, metrics=metrics, tags=tags)
        best = {int(f.stem[3:]): SolverSchedule.from_json(f.read_text()).schedule_hash()
                for f in (run_dir / "best").glob("nfe*.json")}
        tracker.describe_parent(parent_id, summary_markdown(summary), best)
        for p in ["summary.md", *PLOTS, REPORT, REPORT_DATA]:
            if (run_dir / p).exists():  # the plots and the report are missing only if the report failed
                tracker.client.log_artifact(parent_id, str(run_dir / p))
        tracker.client.log_artifacts(parent_id, str(run_dir / "best"), "best")
        for d in ["grids", COMPARE_DIR]:
            if (run_dir / d).exists():
                tracker.client.log_artifacts(parent_id, str(run_dir / d), d)
        tracker.client.set_terminated(parent_id, "FINISHED")
    except Exception as e:
        print(f"warning: logging the summary to MLflow failed ({first_line(e)}); files are in {run_dir}; rerun the "
              f"same `s3 search` command with --resume once the server is back to log them", file=out)

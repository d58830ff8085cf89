"""End to end: `s3 search` on a local Ray (127.0.0.1) with an sqlite MLflow store; then a driver
killed mid-search (SIGKILL) and resumed with --resume."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from s3_ray.config import load_config
from s3_ray.search.warm_start import load_warm_results
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import VPLinear
from s3_ray.usf.schedule import SolverSchedule, load_schedule

from .search_helpers import (
    mlflow_runs,
    run,
    search_cmd,
    search_env,
    search_to_end,
    stop_test_ray,
    trial_runs,
    tune_results,
    tune_trials,
    wait_for,
    write_space,
)

pytestmark = pytest.mark.slow


def nan_schedule(path: Path) -> Path:
    """A valid schedule that blows up: a huge relaxation slope overflows to inf, then NaN."""
    d = json.loads(build_baseline("dpm_solver_pp_2m", VPLinear(), 4).to_json())
    d["steps"][2]["derivatives"][0]["relaxation"] = {"kind": "linear", "scale": 1.0, "slope": 1e300}
    SolverSchedule.from_dict(d).save(path)
    return path


def test_smoke_search_end_to_end(tmp_path):
    # plan_ahead 1: each stage is planned in the background while the previous stage's last trial runs,
    # in chunks of 2 (stages of 3) made on 2 planning processes beside the driver
    space = write_space(tmp_path, name="e2e", seed_schedules=[str(nan_schedule(tmp_path / "nan.json"))], plan_ahead=1,
                        plan_chunk=2, plan_workers=2)
    r = search_to_end(space, tmp_path)
    run_dir = tmp_path / "runs" / "e2e"
    cfg = load_config(space)
    assert "| NFE | S3 FID | best baseline" in r.stdout and "mlflow ui --backend-store-uri" in r.stdout
    assert (run_dir / "summary.md").is_file() and (run_dir / "score_vs_nfe.png").is_file()
    best = load_schedule(run_dir / "best" / "nfe4.json")
    assert best.nfe() == 4
    # MLflow: one child per trial, decisions as params, the NaN schedule as a penalised trial
    runs = trial_runs(run_dir / "mlflow.db", "e2e")
    assert len(runs) == cfg.budget
    assert len({x.data.tags["s3.trial_id"] for x in runs}) == cfg.budget
    assert len({x.data.tags["ray.trial_id"] for x in runs}) == cfg.budget
    for x in runs:
        p = x.data.params
        assert {"nfe", "stage", "source", "afs", "s00.order", "s00.pred", "s00.points", "s00.corrector"} <= set(p)
        assert "score" in x.data.metrics and "seconds" in x.data.metrics and "s3.schedule_hash" in x.data.tags
    user = [x for x in runs if x.data.params["source"] == "user"]
    assert len(user) == 1 and user[0].data.metrics["failed"] == 1.0
    assert user[0].data.metrics["score"] == cfg.metric.worst_score and user[0].info.status == "FAILED"
    assert {x.data.params["source"] for x in runs} >= {"user", "baseline", "random", "predictor"}
    # Tune's own results: every trial once, all terminated
    trials = tune_trials(run_dir / "tune")
    assert len(trials) == cfg.budget and all(t["status"] == "TERMINATED" for t in trials)
    # per trial only Tune's JSON log (its ResultGrid reads it): no TensorBoard or CSV files in the driver's loop
    logs = [f.name for f in (run_dir / "tune").glob("*/*") if f.parent.is_dir() and f.is_file()]
    assert logs.count("result.json") == cfg.budget
    assert not [f for f in logs if f.startswith("events.out.tfevents") or f == "progress.csv"]
    # each stage trained on every result but the previous stage's last one
    state = json.loads(max((run_dir / "tune").glob("searcher-state-*.pkl"), key=lambda p: p.stat().st_mtime).read_text())
    starts = [min(r["index"] for r in state["results"] if r["stage"] == k) for k in range(cfg.stages)]
    assert [t["n_train"] for t in state["taus"]] == [start - 1 for start in starts]
    assert [t["chosen"] for t in state["taus"]] == state["stage_budgets"] and state["stream"] is None


def test_screened_search_end_to_end(tmp_path):
    """Multi-fidelity stages on a real Ray: screening trials logged as MLflow runs of kind 'screen'
    (no score metric), only full evaluations in Tune's records and the final table; plan_ahead 1
    plans each stage once the previous stage's survivors run."""
    screen = {"samples": 16, "factor": 2, "cost": 0.1, "batch": 2}
    space = write_space(tmp_path, name="screened", budget=12, plan_ahead=1, screen=screen)
    r = search_to_end(space, tmp_path)
    run_dir = tmp_path / "runs" / "screened"
    assert "| NFE | S3 FID | best baseline" in r.stdout and "Screening (6 screening trials)" in r.stdout
    state = json.loads(max((run_dir / "tune").glob("searcher-state-*.pkl"), key=lambda p: p.stat().st_mtime).read_text())
    # seed phase: 2 baselines + 2 random = 4; stages of 4: 3 survivors of 6 screened (3 + 0.6 <= 4)
    assert len(state["results"]) == 4 + 2 * 3 and len(state["screened"]) == 2 * 6
    assert sum(x["survived"] for x in state["screened"]) == 6 and state["spent"] == pytest.approx(4 + 2 * 3.6)
    trials = run_dir / "mlflow.db"
    assert len(trial_runs(trials, "screened")) == 10
    screens = mlflow_runs(trials, "screened", "screen")
    assert len(screens) == 6
    for x in screens:
        assert "score" not in x.data.metrics and x.data.metrics["screen_best_rmse"] > 0
        assert x.data.params["n_schedules"] == "2" and x.data.params["samples"] == "16"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["screened_trials"] == 6 and summary["trials"] == 10
    assert all("screen_vs_full_tau" in t for t in summary["predictor_tau"])


def test_warm_started_search_end_to_end(tmp_path):
    """`s3 search --warm-start <its MLflow store>#<experiment>`: the earlier search's results (the
    same as its run directory holds) are reused (count in the output and summary), none is evaluated
    again, the budget pays for new trials only."""
    space = write_space(tmp_path, name="first", budget=8)
    search_to_end(space, tmp_path)
    first = tmp_path / "runs" / "first"
    first_hashes = {r["schedule_hash"] for r in json.loads(
        max((first / "tune").glob("searcher-state-*.pkl"), key=lambda p: p.stat().st_mtime).read_text())["results"]}
    assert len(first_hashes) == 8
    wider = write_space(tmp_path, name="first", budget=8, nfe=[4, 5])  # NFE 5 seeded from NFE 4 by splits
    # the first search's MLflow experiment holds the same results as its run directory
    store = f"sqlite:///{first}/mlflow.db#first"
    from_dir, from_store = (load_warm_results(load_config(wider).model_copy(update={"warm_start": (w,)}))
                            for w in (str(first), store))
    assert [(w["schedule_hash"], w["score"]) for w in from_store] == [(w["schedule_hash"], w["score"]) for w in from_dir]
    assert len(from_store) == 8
    try:
        r = run(search_cmd(wider, tmp_path / "runs", "--name", "second", "--warm-start", store), search_env(tmp_path),
                tmp_path)
    finally:
        stop_test_ray(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "warm start: 8 earlier results reused" in r.stdout and "Warm start: 8 earlier results reused" in r.stdout
    assert "3 of their best NFE-k schedules split into NFE-(k+1) seeds" in r.stdout
    second = tmp_path / "runs" / "second"
    summary = json.loads((second / "summary.json").read_text())
    assert summary["warm_start"] == {"runs": [store], "reused": 8, "split": 3} and summary["trials"] == 8
    runs = trial_runs(second / "mlflow.db", "second")
    assert len(runs) == 8 and not {x.data.tags["s3.schedule_hash"] for x in runs} & first_hashes
    split = [x for x in runs if x.data.params["source"] == "split"]
    assert len(split) == 3 and {x.data.params["nfe"] for x in split} == {"5"}
    # another metric's results are refused before anything starts
    other = write_space(tmp_path, name="third", metric={"kind": "rmse", "samples": [200]})
    r = run(search_cmd(other, tmp_path / "runs", "--warm-start", str(first)), search_env(tmp_path), tmp_path)
    stop_test_ray(tmp_path)
    assert r.returncode == 2 and "warm_start[0]" in r.stderr and "metric.kind" in r.stderr
    assert not (tmp_path / "runs" / "third").exists()


def finished(runs):
    """Child runs whose logging is complete (a run is created RUNNING, then filled and terminated)."""
    return [x for x in runs if x.info.status != "RUNNING"]


def test_driver_killed_then_resumed(tmp_path):
    space = write_space(tmp_path, name="resume", budget=14, concurrency=1)
    env = search_env(tmp_path)
    runs_root = tmp_path / "runs"
    db = runs_root / "resume" / "mlflow.db"
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(search_cmd(space, runs_root), env=env, cwd=tmp_path, start_new_session=True,
                                stdout=f, stderr=subprocess.STDOUT)
    try:
        # Open the store only once the driver has created it (its tune/ dir comes later): two processes
        # initialising one new sqlite store race in MLflow's schema migration (measured: the driver's fails).
        tune_dir = runs_root / "resume" / "tune"
        progress = wait_for(lambda: proc.poll() is not None
                            or (tune_dir.exists() and len(finished(trial_runs(db, "resume"))) >= 5), timeout=300)
        assert progress and proc.poll() is None, f"no progress; driver exit code {proc.poll()}:\n{log.read_text()[-3000:]}"
        before = {x.data.tags["s3.trial_id"]: x.data.metrics["score"] for x in finished(trial_runs(db, "resume"))}
    finally:
        t_kill = time.time()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything in its session
        proc.wait(timeout=30)
        stop_test_ray(tmp_path)  # its local Ray, by PID
    assert len(before) < 14
    r = run(search_cmd(space, runs_root, "--resume"), env, tmp_path)
    stop_test_ray(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = tune_trials(runs_root / "resume" / "tune")
    assert len({t["trial_id"] for t in trials}) == len(trials) == 14
    keys = [t["config"]["trial_key"] for t in trials]
    assert len(set(keys)) == 14 and len({t["config"]["schedule_hash"] for t in trials}) == 14
    runs = trial_runs(db, "resume")
    logged = [x.data.tags["s3.trial_id"] for x in runs]
    assert sorted(logged) == sorted(keys)  # no finished trial lost or duplicated in MLflow
    after = {x.data.tags["s3.trial_id"]: x.data.metrics["score"] for x in runs}
    assert all(after[k] == v for k, v in before.items())
    # finished trials were not evaluated again: Tune runs a trial again after the restore if it ended after
    # Tune's last snapshot, and the result cache answers it; the trials in MLflow before the kill have no result
    # evaluated after it (Tune's result timestamps: whole seconds, rounded down)
    results = tune_results(runs_root / "resume" / "tune")
    assert sorted(results) == sorted(keys)
    assert all(sum(r["cached"] == 0 for r in rs) <= 1 for rs in results.values()), results
    assert all(r["cached"] == 1 or r["timestamp"] <= t_kill for k in before for r in results[k]), \
        {k: [(r["cached"], r["timestamp"]) for r in results[k]] for k in before}
    # one parent run, the first driver's, finished by the resumed one; every child run under it
    parents = mlflow_runs(db, "resume", "search")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", [(p.info.run_id, p.info.status) for p in parents]
    assert {x.data.tags["mlflow.parentRunId"] for x in runs} == {parents[0].info.run_id}
    assert (runs_root / "resume" / "summary.md").is_file()


def test_bad_space_and_missing_resume_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbudget: -3\nmetric: {kind: fid, samples: []}\n")
    try:
        r = run(search_cmd(bad, tmp_path / "runs"), search_env(tmp_path), tmp_path)
        assert r.returncode == 2 and "budget: Input should be greater than or equal to 1" in r.stderr
        assert "metric.samples" in r.stderr and "Traceback" not in r.stderr
        space = write_space(tmp_path, name="never")
        r = run(search_cmd(space, tmp_path / "runs", "--resume"), search_env(tmp_path), tmp_path)
        assert r.returncode == 2 and "nothing to resume" in r.stderr
    finally:
        stop_test_ray(tmp_path)  # no Ray should have started; removes the test's Ray temp dir

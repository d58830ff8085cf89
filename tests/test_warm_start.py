"""Warm starts: a search seeded with an earlier search's results (same model, metric and seed).

Searchers driven without Ray on the analytic Gaussian-mixture target (as test_searcher.py); the
earlier search's state is saved where a run directory keeps it (``<run>/tune/searcher-state-*.pkl``)."""

import numpy as np
import pytest

from s3_ray.config import parse_config
from s3_ray.search.searcher import S3Searcher
from s3_ray.search.warm_start import load_warm_results

from .test_searcher import CFG as SEARCHER_CFG
from .test_searcher import run_loop

CFG = {  # the searcher tests' Gaussian-mixture search, smaller
    **SEARCHER_CFG,
    "name": "gmm-warm",
    "budget": 40,
    "random_init": 3,
    "predictor": {"epochs": 60, "candidates": 120},
    "seed": 7,
}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    run = tmp_path_factory.mktemp("earlier")
    (run / "tune").mkdir()
    s = S3Searcher(parse_config(CFG), algo="s3")
    assert run_loop(s) == "finished"
    s.save(str(run / "tune" / "searcher-state-2026-12-05_00-00-00.pkl"))
    return run, s


def test_a_warm_search_reuses_every_result_and_never_reevaluates_one(earlier):
    run, first = earlier
    cfg = parse_config({**CFG, "budget": 30, "warm_start": [str(run)]})
    warm = load_warm_results(cfg)
    assert len(warm) == len(first.results) == 40
    assert {w["schedule_hash"] for w in warm} == {r["schedule_hash"] for r in first.results}
    s = S3Searcher(cfg, algo="s3", warm_results=warm)
    assert s.n_warm == 40
    assert run_loop(s) == "finished"
    new = [r for r in s.results if r["source"] != "warm"]
    assert len(new) == cfg.budget  # the budget pays for new evaluations only
    assert not {r["schedule_hash"] for r in new} & {w["schedule_hash"] for w in warm}
    assert not [r for r in new if r["source"] == "baseline"]  # every seed baseline was reused
    assert s.taus[0]["n_train"] >= 40  # the first stage's predictor trained on the reused results
    # a later search also starts from the reused results when restored
    restored = S3Searcher(cfg, algo="s3", warm_results=warm)
    restored.set_state(s.get_state())
    assert restored.n_warm == 40 and len(restored.results) == 70


def test_only_results_at_a_searched_nfe_are_reused(earlier):
    run, first = earlier
    cfg = parse_config({**CFG, "nfe": [5, 6], "warm_start": [str(run)]})
    warm = load_warm_results(cfg)
    assert len(warm) == sum(1 for r in first.results if r["nfe"] == 5) > 0 and {w["nfe"] for w in warm} == {5}


@pytest.mark.parametrize("change, field", [
    ({"model": {"kind": "gmm", "noise_schedule": "vp_cosine"}}, "model.noise_schedule"),
    ({"metric": {"kind": "rmse", "samples": [128]}}, "metric.samples"),
    ({"metric": {"kind": "rmse", "samples": [64], "worst_score": 5.0}}, "metric.worst_score"),
    ({"seed": 8}, "seed"),
])
def test_results_of_another_model_metric_or_seed_are_refused(earlier, change, field):
    run, _ = earlier
    cfg = parse_config({**CFG, **change, "warm_start": [str(run)]})
    with pytest.raises(ValueError, match=rf"warm_start\[0\] \(.*\) (was searched with|was scored with|used) {field}"):
        load_warm_results(cfg)


def test_a_directory_without_a_search_is_refused(tmp_path):
    cfg = parse_config({**CFG, "warm_start": [str(tmp_path)]})
    with pytest.raises(ValueError, match="warm_start: .* holds no finished search"):
        load_warm_results(cfg)
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "searcher-state-x.pkl").write_text("not json")
    with pytest.raises(ValueError, match="is not a searcher state"):
        load_warm_results(cfg)


def test_splitting_the_longest_step_adds_one_nfe_in_the_middle_of_that_step():
    from s3_ray.search.space import split_longest_step
    from s3_ray.usf.baselines import build_baseline
    from s3_ray.usf.noise import get_noise_schedule

    noise = get_noise_schedule("vp_linear")
    s = build_baseline("dpm_solver_pp_2m", noise, 4, discretization="time_uniform")  # unequal logSNR steps
    out = split_longest_step(s, noise)
    assert out.nfe() == 5 and len(out.steps) == len(s.steps) + 1
    lam = noise.lambda_(np.array([noise.T, *(st.t for st in s.steps)]))
    new = noise.lambda_(np.array([noise.T, *(st.t for st in out.steps)]))
    i = int(np.argmax(np.diff(lam)))
    assert np.allclose(np.delete(new, i + 1), lam, atol=1e-9)  # every old time kept
    assert new[i + 1] == pytest.approx(0.5 * (lam[i] + lam[i + 1]), abs=1e-9)  # the new one halves that step
    assert out.steps[i].order == s.steps[i].order and out.steps[i].prediction == s.steps[i].prediction


def test_a_warm_search_seeds_the_next_nfe_with_the_earlier_best_split(earlier):
    from s3_ray.search.space import split_longest_step
    from s3_ray.search.warm_start import split_seeds
    from s3_ray.usf.schedule import SolverSchedule

    run, first = earlier  # NFE 4 and 5
    cfg = parse_config({**CFG, "nfe": [5, 6], "budget": 40, "warm_start": [str(run)]})
    s0 = S3Searcher(cfg, algo="s3")
    seeds = split_seeds(cfg, s0.noise)
    assert [s.nfe() for s in seeds] == [5, 5, 5, 6, 6, 6]  # warm_split = 3 per NFE k+1
    best4 = min((r for r in first.results if r["nfe"] == 4 and not r["failed"]), key=lambda r: r["score"])
    assert seeds[0] == split_longest_step(SolverSchedule.from_json(best4["schedule"]), s0.noise, cfg.decisions)
    s = S3Searcher(cfg, algo="s3", warm_results=load_warm_results(cfg), split_seeds=seeds)
    assert run_loop(s) == "finished"
    split = [r for r in s.results if r["source"] == "split"]
    assert len(split) == 6 and all(r["stage"] == -1 for r in split)  # evaluated in the seed phase
    assert len([r for r in s.results if r["source"] != "warm"]) == cfg.budget  # they are paid from the budget
    assert split_seeds(parse_config({**CFG, "nfe": [5, 6], "warm_split": 0, "warm_start": [str(run)]}), s0.noise) == []
    assert S3Searcher(cfg, algo="random", split_seeds=seeds).queue[0]["source"] == "random"  # pool-free: not used


# ---- warm start from an MLflow experiment --------------------------------------------------------
@pytest.fixture(scope="module")
def logged(earlier, tmp_path_factory):
    """The earlier search logged by the real tracker into a real sqlite MLflow store."""
    from s3_ray.tracking.mlflow_tracking import Tracker

    _, first = earlier
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    tracker = Tracker(uri, CFG["name"], artifact_root=str(root / "artifacts"))
    parent = tracker.start_parent(first.cfg.model_dump(mode="json"), "s3")
    for r in first.results:
        assert tracker.log_trial(r["trial_id"], r, {"score": r["score"], "failed": r["failed"]})
    return uri, tracker.experiment_id, parent, root


def _key(results):
    return [(r["schedule_hash"], r["nfe"], r["score"], r["failed"]) for r in results]


def test_an_mlflow_experiment_warm_starts_like_the_run_directory(earlier, logged):
    run, first = earlier
    uri, exp_id, parent, _ = logged
    from_dir = load_warm_results(parse_config({**CFG, "warm_start": [str(run)]}))
    by_name = load_warm_results(parse_config({**CFG, "warm_start": [f"{uri}#{CFG['name']}"]}))
    by_link = load_warm_results(parse_config({**CFG, "warm_start": [f"{uri}#/experiments/{exp_id}/runs/{parent}"]}))
    assert len(by_name) == len(first.results) == 40
    assert _key(by_name) == _key(by_link) == _key(from_dir)  # same schedules, scores, failures, order
    assert [r["schedule"] for r in by_name] == [r["schedule"] for r in from_dir]
    assert {r["warm_source"] for r in by_name} == {r["source"] for r in first.results}
    assert all(parent in r["warm_from"] for r in by_name)
    # and the searcher takes them as it takes a run directory's
    cfg = parse_config({**CFG, "budget": 30, "warm_start": [f"{uri}#{CFG['name']}"]})
    assert S3Searcher(cfg, algo="s3", warm_results=by_name).n_warm == 40


def test_an_mlflow_search_of_another_seed_is_refused_naming_the_run(logged):
    uri, _, parent, _ = logged
    cfg = parse_config({**CFG, "seed": 8, "warm_start": [f"{uri}#{CFG['name']}"]})
    with pytest.raises(ValueError, match=rf"warm_start\[0\] \(.*run {parent}\) used seed 7, this search 8"):
        load_warm_results(cfg)


@pytest.mark.parametrize("ref, message", [
    ("sqlite:///nowhere.db", "names no experiment: write <tracking URI>#<experiment name>"),
    ("{uri}#no-such-search", "holds no experiment named 'no-such-search'"),
])
def test_an_mlflow_reference_without_a_search_is_refused(logged, ref, message):
    cfg = parse_config({**CFG, "warm_start": [ref.format(uri=logged[0])]})
    with pytest.raises(ValueError, match=rf"warm_start\[0\]: .*{message}"):
        load_warm_results(cfg)


def test_a_swapped_schedule_artifact_is_refused(logged):
    """A valid schedule.json that is not the run's own (edited in the store) is not reused."""
    import json

    uri, _, _, root = logged
    files = sorted((root / "artifacts").rglob("schedule.json"))
    by_nfe: dict[int, list] = {}
    for f in files:
        by_nfe.setdefault(len(json.loads(f.read_text())["steps"]), []).append(f)
    a, b = next(v for v in by_nfe.values() if len(v) >= 2)[:2]
    text_a, text_b = a.read_text(), b.read_text()
    assert text_a != text_b
    try:
        a.write_text(text_b)
        cfg = parse_config({**CFG, "warm_start": [f"{uri}#{CFG['name']}"]})
        with pytest.raises(ValueError, match="schedule.json does not match its tags .* edited or corrupt"):
            load_warm_results(cfg)
    finally:
        a.write_text(text_a)


def test_a_link_from_a_real_tracking_server_warm_starts(earlier, tmp_path):
    """`--warm-start 'http://127.0.0.1:<port>/#/experiments/<id>'` (as copied from the MLflow UI) on a
    real `mlflow server` (sqlite behind it, artifacts served by the server)."""
    import socket

    from s3_ray.tracking import server
    from s3_ray.tracking.mlflow_tracking import Tracker

    run, first = earlier
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tmp_path / "server.log"
    proc = server.start_server(port=port, runs=tmp_path / "runs", log=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        assert server.wait_healthy(uri, 180, proc), log.read_text()[-3000:]
        tracker = Tracker(uri, CFG["name"])
        tracker.start_parent(first.cfg.model_dump(mode="json"), "s3")
        for r in first.results:
            tracker.log_trial(r["trial_id"], r, {"score": r["score"], "failed": r["failed"]})
        link = f"{uri}/#/experiments/{tracker.experiment_id}"
        warm = load_warm_results(parse_config({**CFG, "warm_start": [link]}))
        assert _key(warm) == _key(load_warm_results(parse_config({**CFG, "warm_start": [str(run)]})))
    finally:
        server.stop_server(proc)

"""The scale tools: synthetic trials, the discrete-event simulation of the searcher, the utilisation
accounting, the bounded predictor training set, and asynchronous stages."""

import time

import numpy as np
import pytest

from s3_ray.config import ConfigError, SyntheticConfig, parse_config
from s3_ray.metrics.evaluate import evaluate, get_target
from s3_ray.search.searcher import S3Searcher, training_subset
from s3_ray.search.simulate import Timeline, simulate, utilisation
from s3_ray.search.synthetic import trial_duration
from s3_ray.search.trial import run_trial
from s3_ray.usf.schedule import SolverSchedule

CFG = {
    "name": "sim-test", "model": {"kind": "gmm"}, "metric": {"kind": "rmse", "samples": [32]},
    "nfe": [4, 5], "budget": 60, "stages": 3, "random_init": 3,
    "baselines": ["ddim", "dpm_solver_pp_2m"], "discretizations": ["logsnr_uniform", "time_uniform"],
    "predictor": {"epochs": 40, "candidates": 60}, "seed": 5,
    "synthetic": {"median_s": 2.0, "sigma": 0.3, "straggler_prob": 0.1, "straggler_factor": 5.0},
}


def drive_in_order(searcher: S3Searcher, workers: int) -> list[str]:
    """A plain driver (no clock): keep ``workers`` trials in flight, complete the oldest first."""
    target, inflight, out = None, [], []
    while True:
        while len(inflight) < workers:
            cfg = searcher.suggest(f"t{len(out):06d}")
            if not isinstance(cfg, dict):
                break
            inflight.append((f"t{len(out):06d}", cfg))
            out.append(cfg["schedule_hash"])
        if not inflight:
            if searcher._plan_job is None:
                return out
            searcher.plan_future().result()
            continue
        tid, cfg = inflight.pop(0)
        target = target or get_target(cfg["model"], cfg["metric"])
        searcher.on_trial_complete(tid, evaluate(SolverSchedule.from_json(cfg["schedule"]), target,
                                                 n=cfg["samples"], seed=cfg["seed"]))


@pytest.mark.parametrize("algo,plan_ahead", [("s3", 0), ("s3", 60), ("evolution", 0)])
def test_simulation_proposes_what_the_searcher_proposes_in_a_plain_driver(algo, plan_ahead):
    cfg = parse_config({**CFG, "plan_ahead": plan_ahead})
    tl = simulate(cfg, workers=4, algo=algo, completion_order=min)  # oldest trial id first
    driven = S3Searcher(cfg, algo=algo)
    plain = drive_in_order(driven, workers=4)
    assert len(tl.proposals) == cfg.budget
    assert tl.proposals == plain
    assert tl.best == {nfe: min(r["score"] for r in driven.results if r["nfe"] == nfe) for nfe in cfg.nfe}


def test_asynchronous_stages_do_not_depend_on_completion_order():
    """plan_ahead >= a stage: each stage trains on every result suggested before the previous stage
    began, whatever order the results arrive in (shuffled, random durations)."""
    cfg = parse_config({**CFG, "plan_ahead": 1000})
    runs = []
    for order_seed in (0, 1):
        rng = np.random.default_rng(order_seed)
        tl = simulate(cfg, workers=6, completion_order=lambda ids, rng=rng: ids[rng.integers(len(ids))])
        runs.append(tl.proposals)
    default = simulate(cfg, workers=6).proposals  # by simulated durations
    assert runs[0] == runs[1] == default and len(default) == cfg.budget
    s = S3Searcher(cfg)
    drive_in_order(s, workers=6)
    starts = [min(r["index"] for r in s.results if r["stage"] == k) for k in range(cfg.stages)]
    seed_size = starts[0]
    assert seed_size >= 2 * cfg.concurrency
    assert [t["n_train"] for t in s.taus] == [(seed_size + 1) // 2, starts[0] + 1, starts[1] + 1]


def test_utilisation_of_a_hand_made_timeline():
    # 2 slots, window from the 2nd start (t=0) to the last start (t=4):
    # busy 0-1 x2, 1-2 x1 (barrier), 2-3 x1 (planning 2-2.5, then turnaround), 3-4 x2
    tl = Timeline(2, trials=[(0, 1), (0, 3), (2.5, 4), (3, 5), (4, 6)],
                  waits=[(1, 2, "results"), (2, 2.5, "planning")])
    u = utilisation(tl)
    assert u["window_s"] == 4
    busy = 2 * 1 + 1 * 1 + 1 * 0.5 + 2 * 0.5 + 2 * 1  # 0-1, 1-2, 2-2.5, 2.5-3, 3-4
    assert u["utilisation"] == pytest.approx(busy / 8)
    assert u["idle_share"] == pytest.approx({"stage barrier": 1 / 8, "planning": 0.5 / 8, "turnaround": 0.0})


def test_simulated_clock_counts_durations_and_turnaround():
    cfg = parse_config({**CFG, "synthetic": {"median_s": 1.0, "sigma": 0.0, "straggler_prob": 0.0}})
    tl = simulate(cfg, workers=1, algo="random", turnaround_s=0.5)
    starts = [s for s, _ in tl.trials]
    assert all(e - s == pytest.approx(1.0) for s, e in tl.trials)
    gaps = np.diff(starts)
    own = np.array(tl.decision_s[1::2][: len(gaps)])  # each start follows one completion + one suggest
    assert np.all(gaps >= 1.5) and np.all(gaps <= 1.5 + 0.05)
    assert utilisation(tl)["idle_share"]["turnaround"] > 0.3 and own.max() < 0.05


def test_training_subset_is_bounded_keeps_the_best_and_ignores_arrival_order():
    rng = np.random.default_rng(0)
    results = [{"index": i, "nfe": 4 + i % 2, "score": float(rng.random())} for i in range(3000)]
    sub = training_subset(results, 400, seed=1)
    assert 390 <= len(sub) <= 410
    assert [r["index"] for r in sub] == sorted(r["index"] for r in sub)
    for nfe in (4, 5):
        group = sorted((r for r in results if r["nfe"] == nfe), key=lambda r: r["score"])
        kept = {r["index"] for r in sub if r["nfe"] == nfe}
        assert {r["index"] for r in group[:50]} <= kept  # the best quarter of ~200 per NFE
    shuffled = list(results)
    rng.shuffle(shuffled)
    again = training_subset(sorted(shuffled, key=lambda r: r["index"]), 400, seed=1)
    assert again == sub
    assert training_subset(results[:300], 400, seed=1) == results[:300]


def test_synthetic_durations_are_deterministic_with_their_tail():
    cfg = SyntheticConfig(median_s=2.0, sigma=0.25, straggler_prob=0.05, straggler_factor=5.0)
    d = np.array([trial_duration(cfg, f"{i:05d}-abc", 0) for i in range(4000)])
    assert trial_duration(cfg, "00007-abc", 0) == d[7] and trial_duration(cfg, "00007-abc", 1) != d[7]
    stragglers = d > 6.0
    assert 0.04 < stragglers.mean() < 0.06
    assert np.median(d[~stragglers]) == pytest.approx(2.0, rel=0.03)
    assert np.median(d[stragglers]) == pytest.approx(10.0, rel=0.05)


def test_synthetic_trial_lasts_its_duration_and_reports_its_interval():
    cfg = parse_config({**CFG, "synthetic": {"median_s": 0.4, "sigma": 0.0, "straggler_prob": 0.0}})
    s = S3Searcher(cfg)
    config = s.suggest("t0")
    t0 = time.time()
    result = run_trial(config)
    assert time.time() - t0 >= 0.4 and result["ended_at"] - result["started_at"] >= 0.4
    assert result["score"] > 0 and result["failed"] == 0


def test_synthetic_trials_need_the_gmm_model():
    with pytest.raises(ConfigError, match="synthetic: needs model.kind 'gmm'"):
        parse_config({**CFG, "model": {"kind": "digits"}, "metric": {"kind": "fid", "samples": [50]}})
    assert parse_config({k: v for k, v in CFG.items() if k != "synthetic"}).synthetic is None

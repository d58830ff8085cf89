"""S3Searcher without a Ray cluster: a suggest/complete loop on a real cheap objective (RMSE of the
analytic Gaussian-mixture model against a high-accuracy solve from the same noise)."""

import json
import math

import numpy as np
import pytest
import scipy.stats
from ray.tune.search import Searcher

from s3_ray.config import parse_config
from s3_ray.metrics.evaluate import evaluate, get_target
from s3_ray.search import predictor as predictor_module
from s3_ray.search.predictor import heldout_tau, kendall_tau, per_nfe_tau
from s3_ray.search.searcher import S3Searcher, predictor_quality
from s3_ray.usf.schedule import SolverSchedule

CFG = {
    "name": "gmm-test",
    "model": {"kind": "gmm"},
    "metric": {"kind": "rmse", "samples": [64]},
    "nfe": [4, 5],
    "budget": 70,
    "stages": 2,
    "random_init": 4,
    "baselines": ["ddim", "dpm_solver_pp_2m", "unipc_bh2"],
    "discretizations": ["logsnr_uniform", "time_uniform"],
    "predictor": {"epochs": 150, "candidates": 150},
    "seed": 3,
}


def run_loop(searcher, n_max=1000, stop_after=None):
    target = None
    n = 0
    while n < n_max:
        tid = f"t{searcher.n_suggested:04d}"
        cfg = searcher.suggest(tid)
        if cfg == Searcher.FINISHED:
            return "finished"
        assert cfg is not None, "nothing pending, so the searcher must not ask to wait"
        target = target or get_target(cfg["model"], cfg["metric"])
        r = evaluate(SolverSchedule.from_json(cfg["schedule"]), target, n=cfg["samples"], seed=cfg["seed"])
        searcher.on_trial_complete(tid, r)
        n += 1
        if stop_after is not None and n >= stop_after:
            return "stopped"
    return "exhausted"


def test_loop_improves_on_seeded_baselines(monkeypatch):
    cfg = parse_config(CFG)
    s = S3Searcher(cfg, algo="s3")
    assert run_loop(s) == "finished"
    assert len(s.results) == cfg.budget
    assert len({r["schedule_hash"] for r in s.results}) == cfg.budget  # deduplicated
    assert [t["stage"] for t in s.taus] == [0, 1]
    for nfe in cfg.nfe:
        base = min(r["score"] for r in s.results if r["nfe"] == nfe and r["source"] == "baseline")
        found = min(r["score"] for r in s.results if r["nfe"] == nfe and r["source"] == "predictor")
        print(f"NFE {nfe}: best baseline RMSE {base:.4f}, best searched {found:.4f}, taus {s.taus}")
        assert found < base

    # Predictor quality is measured after the search. proposal_tau: Kendall tau of each stage's
    # predictions for the schedules it chose against their scores, per NFE (groups of >= 3),
    # weighted by group size; recomputed here with scipy from the results.
    quality = predictor_quality(json.loads(json.dumps(s.get_state())))
    assert [q["stage"] for q in quality] == [0, 1]
    for q in quality:
        own = [r for r in s.results if r["stage"] == q["stage"] and r["source"] == "predictor"]
        assert q["n_evaluated"] == q["chosen"] == len(own) > 0
        taus, sizes = [], []
        for nfe in sorted({r["nfe"] for r in own}):
            group = [r for r in own if r["nfe"] == nfe]
            if len(group) >= 3:
                taus.append(scipy.stats.kendalltau([r["predicted"] for r in group], [r["score"] for r in group]).statistic)
                sizes.append(len(group))
        assert q["proposal_tau"] == pytest.approx(np.average(taus, weights=sizes), abs=1e-12)
        # NaN where no NFE group of the 25 % held out has 3 schedules (stage 0 here: ~10 per NFE)
        assert math.isnan(q["kendall_tau"]) or -1 <= q["kendall_tau"] <= 1
    assert math.isfinite(quality[-1]["kendall_tau"])
    print("predictor quality", quality)

    # kendall_tau is the held-out tau on each stage's own training set: with a predictor that knows
    # the true scores it is exactly 1 (NaN where the split leaves no group of 3), and it was fit on
    # 75 % of that training set.
    _use_known_predictor(monkeypatch, {r["schedule_hash"]: r["score"] for r in s.results})
    known = predictor_quality(json.loads(json.dumps(s.get_state())))
    ordered = sorted(s.results, key=lambda r: r["index"])
    for q, k, fit, held in zip(quality, known, _KnownPredictor.fits, _KnownPredictor.predicted, strict=True):
        if math.isnan(q["kendall_tau"]):
            assert math.isnan(k["kendall_tau"])
        else:
            assert k["kendall_tau"] == pytest.approx(1.0)
        trained = {r["schedule_hash"] for r in ordered[: q["n_train"]]}
        assert not fit & held and fit | held == trained and abs(len(held) - 0.25 * len(trained)) <= 2


@pytest.mark.parametrize("algo", ["s3", "evolution", "random", "optuna-tpe"])
def test_save_restore_reproduces_next_suggestion(tmp_path, algo):
    cfg = parse_config({**CFG, "budget": 40})
    a = S3Searcher(cfg, algo=algo)
    run_loop(a, stop_after=33)  # into the first stage for s3
    path = tmp_path / "searcher.json"
    a.save(str(path))
    json.loads(path.read_text())  # plain JSON, no pickle
    b = S3Searcher(parse_config({**CFG, "seed": 99}), algo="random")  # different state, overwritten by restore
    b.restore(str(path))
    na, nb = a.suggest("next"), b.suggest("next")
    assert na == nb and na is not None
    assert b.algo == algo and b.n_suggested == a.n_suggested


def test_waits_for_results_at_stage_boundary_and_finishes_at_budget():
    cfg = parse_config({**CFG, "budget": 30, "stages": 1})
    s = S3Searcher(cfg)
    seeds = 3 * 2 * 2 + 4 * 2  # baselines x discretisations x NFEs + random
    ids = [f"p{i}" for i in range(seeds)]
    for tid in ids:
        assert isinstance(s.suggest(tid), dict)
    assert s.suggest("early") is None  # stage 0 needs every seed result first
    target = None
    for tid in ids:
        cfg_t = s.pending[tid]
        target = target or get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
        s.on_trial_complete(tid, evaluate(SolverSchedule.from_json(cfg_t["schedule"]), target, n=64))
    s.on_trial_complete("unknown-trial", {"score": 1.0})  # ignored
    rest = [s.suggest(f"q{i}") for i in range(cfg.budget - seeds)]
    assert all(isinstance(c, dict) and c["source"] == "predictor" for c in rest)
    assert s.suggest("over") == Searcher.FINISHED


def test_failed_trials_get_worst_score():
    cfg = parse_config({**CFG, "budget": 5})
    s = S3Searcher(cfg)
    s.suggest("a"), s.suggest("b"), s.suggest("c")
    s.on_trial_complete("a", None, error=True)
    s.on_trial_complete("b", {"score": float("nan"), "failed": 1})
    s.on_trial_complete("c", {"score": 0.5, "failed": 0})
    worst = cfg.metric.worst_score
    assert [(r["score"], r["failed"]) for r in s.results] == [(worst, True), (worst, True), (0.5, False)]


def run_concurrent(searcher, workers: int, order_seed: int, stop_when=None):
    """Tune-like loop with up to ``workers`` trials in flight, completed in a seeded random order;
    a stage planned ahead is sometimes awaited before the next completion, sometimes not.
    Returns (overlapped: a trial was suggested while one of an earlier stage was in flight,
    in-flight trial configs when ``stop_when(searcher)`` became true, else None)."""
    rng = np.random.default_rng(order_seed)
    target, inflight, overlapped, finished = None, {}, False, False
    while True:
        while not finished and len(inflight) < workers:
            tid = f"t{searcher.n_suggested:04d}"
            cfg = searcher.suggest(tid)
            if cfg == Searcher.FINISHED:
                finished = True
            if not isinstance(cfg, dict):
                break
            overlapped |= any(p["stage"] < cfg["stage"] for p in inflight.values())
            inflight[tid] = cfg
        if stop_when is not None and stop_when(searcher):
            return overlapped, inflight
        if not inflight:
            if finished:
                return overlapped, None
            assert searcher._plan_job is not None, "nothing in flight: only a stage being planned may hold it up"
            searcher.plan_future().result()
            continue
        if searcher._plan_job is not None and rng.random() < 0.5:
            searcher.plan_future().result()
        tid = str(rng.choice(sorted(inflight)))
        cfg = inflight.pop(tid)
        target = target or get_target(cfg["model"], cfg["metric"])
        searcher.on_trial_complete(tid, evaluate(SolverSchedule.from_json(cfg["schedule"]), target,
                                                 n=cfg["samples"], seed=cfg["seed"]))


def _trace(searcher):
    return [(r["index"], r["schedule_hash"], r["stage"]) for r in sorted(searcher.results, key=lambda r: r["index"])]


@pytest.mark.parametrize("plan_ahead", [0, 5, 100])
def test_plan_ahead_is_independent_of_completion_order(plan_ahead):
    """With trials in flight concurrently, the proposals (and hence the whole search) do not depend
    on the order results arrive in; with plan_ahead > 0 later stages start while earlier trials
    still run, and each stage trains on all but the previous phase's last plan_ahead results (but
    on a stage's first result at least, and on half the seed phase at least)."""
    cfg = parse_config({**CFG, "plan_ahead": plan_ahead})
    runs = []
    for order_seed in (1, 2):
        s = S3Searcher(cfg)
        overlapped, _ = run_concurrent(s, workers=3, order_seed=order_seed)
        assert len(s.results) == cfg.budget
        runs.append((overlapped, _trace(s), s.taus))
    assert runs[0][1] == runs[1][1] and runs[0][2] == runs[1][2]
    trace, taus = runs[0][1], runs[0][2]
    stage_start = [min(i for i, _, st in trace if st == k) for k in range(cfg.stages)]
    phase_start = [0, *stage_start[:-1]]
    least = [(stage_start[0] + 1) // 2, *(prev + 1 for prev in phase_start[1:])]
    assert [t["n_train"] for t in taus] == [max(start - plan_ahead, low) for low, start in zip(least, stage_start)]
    assert runs[0][0] == runs[1][0] == (plan_ahead > 0)


def test_plan_ahead_restored_mid_planning_continues_the_same_search(tmp_path):
    """A state saved while the next stage is being planned (the driver killed then) replans it
    identically after restore: the search ends with the same trials as an uninterrupted one."""
    cfg = parse_config({**CFG, "plan_ahead": 5})
    whole = S3Searcher(cfg)
    run_concurrent(whole, workers=3, order_seed=1)
    a = S3Searcher(cfg)
    _, inflight = run_concurrent(a, workers=3, order_seed=4, stop_when=lambda s: s._plan_job is not None)
    assert inflight, "stopped while trials of the current stage were still running"
    path = tmp_path / "searcher.json"
    a.save(str(path))
    b = S3Searcher(cfg)
    b.restore(str(path))
    assert b._plan_job is None and set(b.pending) == set(inflight)
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    for tid, c in inflight.items():  # Tune resumes the in-flight trials and reports them to the restored searcher
        b.on_trial_complete(tid, evaluate(SolverSchedule.from_json(c["schedule"]), target, n=c["samples"], seed=c["seed"]))
    run_concurrent(b, workers=3, order_seed=5)
    assert _trace(b) == _trace(whole) and b.taus == whole.taus


@pytest.mark.parametrize("plan_ahead", [0, 3])
def test_search_without_seed_schedules_finishes(plan_ahead):
    """No baselines and no random seeds: stage 0 is planned from nothing (mutants of an empty pool
    are random schedules), with or without planning ahead; the search does not wait forever."""
    cfg = parse_config({**CFG, "baselines": [], "random_init": 0, "budget": 12, "plan_ahead": plan_ahead})
    s = S3Searcher(cfg)
    assert not s.queue
    run_concurrent(s, workers=2, order_seed=0)
    assert len(s.results) == cfg.budget and [t["n_train"] for t in s.taus][0] == 0


def test_kendall_tau_on_hand_made_rankings():
    # n = 4: 6 pairs; one discordant pair gives (5 - 1) / 6, two give (4 - 2) / 6
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(2 / 3)
    assert kendall_tau([1, 2, 3, 4], [20, 30, 10, 40]) == pytest.approx(1 / 3)
    # tau-b, one tied pair in the true scores: C = 3, D = 2, tau = (C - D) / sqrt(6 (6 - 1))
    assert kendall_tau([1, 2, 3, 4], [1, 3, 3, 2]) == pytest.approx(1 / math.sqrt(30))
    # a failed schedule (NaN / inf score) ranks below every finite one
    assert kendall_tau([1, 2, 3], [0.1, 0.2, float("nan")]) == pytest.approx(1.0)
    assert kendall_tau([3, 2, 1], [0.1, 0.2, float("inf")]) == pytest.approx(-1.0)
    # undefined: 0
    assert kendall_tau([1], [2]) == 0.0 and kendall_tau([1, 1, 1], [1, 2, 3]) == 0.0


def test_per_nfe_tau_weights_groups_and_skips_small_ones():
    nfes = [4, 4, 4, 5, 5, 5, 5, 6, 6]
    pred = [1, 2, 3, 1, 2, 3, 4, 1, 2]
    true = [1, 2, 3, 4, 3, 2, 1, 2, 1]  # NFE 4: tau 1 (3 items), NFE 5: tau -1 (4), NFE 6: 2 items, skipped
    assert per_nfe_tau(nfes, pred, true) == pytest.approx((3 * 1 - 4 * 1) / 7)
    assert per_nfe_tau(nfes, pred, true, min_group=4) == pytest.approx(-1.0)
    assert math.isnan(per_nfe_tau([4, 4, 5], [1, 2, 3], [1, 2, 3]))


class _KnownPredictor:
    """Stands in for the MLP in heldout_tau: predicts each schedule's true score (sign = 1) or its
    negation (sign = -1), so the held-out tau is known exactly: 1 or -1. Records the schedule hashes
    it was fit on and asked to predict."""

    sign = 1.0
    all_scores: dict = {}
    fits: list = []
    predicted: list = []

    def __init__(self, cfg, noise, seed=0, **_):
        pass

    def fit(self, schedules, scores):
        _KnownPredictor.fits.append({s.schedule_hash() for s in schedules})
        return self

    def predict(self, schedules):
        _KnownPredictor.predicted.append({s.schedule_hash() for s in schedules})
        return np.array([self.sign * self.all_scores[s.schedule_hash()] for s in schedules])


def _use_known_predictor(monkeypatch, scores: dict, sign: float = 1.0):
    monkeypatch.setattr(predictor_module, "Predictor", _KnownPredictor)
    monkeypatch.setattr(_KnownPredictor, "sign", sign)
    monkeypatch.setattr(_KnownPredictor, "all_scores", scores)
    monkeypatch.setattr(_KnownPredictor, "fits", [])
    monkeypatch.setattr(_KnownPredictor, "predicted", [])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_heldout_tau_with_a_known_predictor(monkeypatch, sign):
    from s3_ray.search.space import random_schedule_at_nfe
    from s3_ray.usf.noise import VPLinear

    noise, rng = VPLinear(), np.random.default_rng(0)
    schedules = [random_schedule_at_nfe(rng, noise, n) for n in [4] * 16 + [5] * 12 + [6] * 4]
    scores = list(rng.normal(size=len(schedules)))
    assert len({s.schedule_hash() for s in schedules}) == len(schedules)
    _use_known_predictor(monkeypatch, {s.schedule_hash(): v for s, v in zip(schedules, scores)}, sign)
    cfg = parse_config(CFG).predictor
    # held out: 25 % of each NFE group (4, 3, 1 schedules); the NFE-6 group has < 3 and is skipped
    assert heldout_tau(schedules, scores, cfg, noise, seed=1) == pytest.approx(sign)
    (fit,), (held,) = _KnownPredictor.fits, _KnownPredictor.predicted
    assert len(fit) == 32 - 8 and not fit & held and fit | held == {s.schedule_hash() for s in schedules}
    # a different seed holds out a different split
    heldout_tau(schedules, scores, cfg, noise, seed=2)
    assert _KnownPredictor.fits[1] != fit


def test_predictor_quality_measures_each_stage_on_its_own_capped_training_set(monkeypatch):
    """With predictor.max_train capping the training set, the held-out tau after the search is
    measured on the very set the stage's predictor was fit on (not on the first n_train results)."""
    cfg = parse_config({**CFG, "predictor": {**CFG["predictor"], "max_train": 20}})
    planned = []
    fit = predictor_module.PredictorEnsemble.fit

    def recording_fit(self, schedules, scores, *rest):
        planned.append({s.schedule_hash() for s in schedules})
        return fit(self, schedules, scores, *rest)

    monkeypatch.setattr(predictor_module.PredictorEnsemble, "fit", recording_fit)
    s = S3Searcher(cfg, algo="s3")
    assert run_loop(s) == "finished"
    monkeypatch.setattr(predictor_module.PredictorEnsemble, "fit", fit)
    assert [len(p) for p in planned] == [t["n_train"] for t in s.taus] and planned[-1] and len(planned[-1]) <= 21
    ordered = sorted(s.results, key=lambda r: r["index"])
    assert planned[-1] != {r["schedule_hash"] for r in ordered[: s.taus[-1]["n_train"]]}  # the cap chose a subset
    _use_known_predictor(monkeypatch, {r["schedule_hash"]: r["score"] for r in s.results})
    predictor_quality(json.loads(json.dumps(s.get_state())))
    for trained, fit_on, held in zip(planned, _KnownPredictor.fits, _KnownPredictor.predicted, strict=True):
        assert not fit_on & held and fit_on | held == trained


def test_forest_search_improves_is_independent_of_completion_order_and_restores_mid_planning(tmp_path):
    """predictor.model 'forest' in the searcher: the search beats the seeded baselines, does not
    depend on the order results arrive in, and a state saved while a stage is planned continues
    to the same trials as an uninterrupted search."""
    cfg = parse_config({**CFG, "plan_ahead": 5, "predictor": {"model": "forest", "trees": 100, "candidates": 150}})
    runs = []
    for order_seed in (1, 2):
        s = S3Searcher(cfg)
        run_concurrent(s, workers=3, order_seed=order_seed)
        runs.append(s)
    assert _trace(runs[0]) == _trace(runs[1]) and runs[0].taus == runs[1].taus
    for nfe in cfg.nfe:
        res = runs[0].results
        base = min(r["score"] for r in res if r["nfe"] == nfe and r["source"] == "baseline")
        assert min(r["score"] for r in res if r["nfe"] == nfe and r["source"] == "predictor") < base
    a = S3Searcher(cfg)
    _, inflight = run_concurrent(a, workers=3, order_seed=4, stop_when=lambda s: s._plan_job is not None)
    a.save(str(tmp_path / "searcher.json"))
    b = S3Searcher(cfg)
    b.restore(str(tmp_path / "searcher.json"))
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    for tid, c in inflight.items():
        b.on_trial_complete(tid, evaluate(SolverSchedule.from_json(c["schedule"]), target, n=c["samples"], seed=c["seed"]))
    run_concurrent(b, workers=3, order_seed=5)
    assert _trace(b) == _trace(runs[0]) and b.taus == runs[0].taus
    quality = predictor_quality(json.loads(json.dumps(runs[0].get_state())))
    print("forest predictor quality", [(q["stage"], round(q["proposal_tau"], 3), round(q["kendall_tau"], 3)) for q in quality])
    assert all(math.isfinite(q["proposal_tau"]) for q in quality)

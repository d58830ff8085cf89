"""Multi-fidelity S3 stages (``screen``): a cheap screening rung, then full evaluation of the best.

Driven without Ray through the real trial function (``run_trial``) on the analytic Gaussian-mixture
target, as in test_searcher.py; the screening fidelity is recomputed here with ``evaluate``."""

import copy
import json

import pytest
import scipy.stats
from ray.tune.search import Searcher

from s3_ray.config import ConfigError, MetricConfig, ModelConfig, ScreenConfig, parse_config
from s3_ray.metrics.evaluate import evaluate, get_target
from s3_ray.search.searcher import S3Searcher, predictor_quality, screen_split
from s3_ray.search.trial import run_trial
from s3_ray.usf.schedule import SolverSchedule

from .test_searcher import CFG as SEARCHER_CFG

CFG = {  # the searcher tests' Gaussian-mixture search, smaller
    **SEARCHER_CFG,
    "name": "gmm-screen",
    "budget": 60,
    "random_init": 3,
    "predictor": {"epochs": 60, "candidates": 120},
    "screen": {"samples": 16, "factor": 3, "cost": 0.1, "batch": 8},
    "seed": 5,
}


def drive(searcher, trace: list, stop=None, n_max=500):
    """Suggest/complete serially with the real trial function; ``trace`` gets (trial id, config,
    result). ``stop(searcher, trace)`` True: return 'stopped' before the next suggestion."""
    for _ in range(n_max):
        if stop is not None and stop(searcher, trace):
            return "stopped"
        tid = f"t{searcher.n_suggested:04d}"
        cfg = searcher.suggest(tid)
        if cfg == Searcher.FINISHED:
            return "finished"
        assert cfg is not None, "nothing is pending: the searcher must not wait"
        result = run_trial(cfg)
        trace.append((tid, cfg, result))
        searcher.on_trial_complete(tid, result)
    return "exhausted"


@pytest.fixture(scope="module")
def screened_run():
    s = S3Searcher(parse_config(CFG), algo="s3")
    trace = []
    assert drive(s, trace) == "finished"
    return s, trace


def test_screen_split_is_the_largest_affordable_stage():
    sc = ScreenConfig(factor=4, cost=0.05)
    assert screen_split(40, sc) == 33  # 33 + 132 x 0.05 = 39.6 <= 40 < 34 + 136 x 0.05
    assert screen_split(1.1, sc) == 0  # too small to screen: the stage runs unscreened
    sc = ScreenConfig(factor=3, cost=0.1)
    assert screen_split(22, sc) == 16  # 16 x 1.3 = 20.8; 17 x 1.3 = 22.1 > 22


def test_survivors_are_exactly_the_best_at_the_screening_fidelity(screened_run):
    s, trace = screened_run
    cfg = s.cfg
    screens = [(c, r) for _, c, r in trace if "screen" in c]
    assert screens and all(c["metric"] == cfg.metric.model_dump_json() for c, _ in screens)
    # the screening scores, recomputed: RMSE of 16 samples against the converged solve, same noise
    target = get_target(cfg.model.model_dump_json(), cfg.metric.model_dump_json())
    rmse = MetricConfig(kind="rmse")
    score_of = {}
    for c, r in screens:
        assert c["samples"] == 16 and len(c["screen"]) <= 8
        for sj, h, got in zip(c["screen"], c["schedule_hashes"], r["scores"]):
            want = evaluate(SolverSchedule.from_json(sj), target, rmse, n=16, seed=c["seed"])["score"]
            assert got == pytest.approx(want, rel=1e-12)
            score_of[h] = got
    assert {x["schedule_hash"]: x["screen_score"] for x in s.screened} == score_of
    full = [(c, r) for _, c, r in trace if "screen" not in c and c["stage"] >= 0]
    for stage in range(cfg.stages):
        rows = [x for x in s.screened if x["stage"] == stage]
        kept = [x for x in rows if x["survived"]]
        info = s.taus[stage]
        assert info["screened"] == len(rows) and info["chosen"] == info["survivors"] == len(kept)
        assert len(kept) == screen_split(s.stage_budgets[stage], cfg.screen)
        assert len(rows) == cfg.screen.factor * len(kept)
        for nfe in cfg.nfe:  # survivors are a prefix of each NFE's ranking by screening score
            group = [x for x in rows if x["nfe"] == nfe]
            worst_kept = max((x["screen_score"] for x in group if x["survived"]), default=-1.0)
            best_dropped = min((x["screen_score"] for x in group if not x["survived"]), default=float("inf"))
            assert worst_kept <= best_dropped
        # the survivors, and only they, were then evaluated in full at the search's sample count
        evaluated = {c["schedule_hash"] for c, _ in full if c["stage"] == stage}
        assert evaluated == {x["schedule_hash"] for x in kept}
        assert all(c["samples"] == 64 for c, _ in full)


def test_cost_accounting_adds_up(screened_run):
    s, trace = screened_run
    cfg = s.cfg
    charged = sum(c["cost"] for _, c, _ in trace)
    assert charged == pytest.approx(s.spent, abs=1e-9) and s.spent <= cfg.budget + 1e-9
    seed_phase = [c for _, c, _ in trace if c["stage"] == -1]
    assert all(c["cost"] == 1.0 for c in seed_phase)
    assert sum(s.stage_budgets) == cfg.budget - len(seed_phase)
    for stage in range(cfg.stages):
        screens = [c for _, c, _ in trace if c["stage"] == stage and "screen" in c]
        fulls = [c for _, c, _ in trace if c["stage"] == stage and "screen" not in c]
        n_screened = sum(len(c["screen"]) for c in screens)
        stage_cost = sum(c["cost"] for c in screens + fulls)
        assert stage_cost == pytest.approx(len(fulls) + cfg.screen.cost * n_screened, abs=1e-9)
        assert stage_cost <= s.stage_budgets[stage] + 1e-9
        assert s.stage_budgets[stage] - stage_cost < 1 + cfg.screen.factor * cfg.screen.cost  # no affordable survivor left out
    # full evaluations are the searcher's results; screening trials are not
    assert len(s.results) == sum(1 for _, c, _ in trace if "screen" not in c)


def test_quality_reports_how_the_screening_fidelity_ranked(screened_run):
    s, trace = screened_run
    quality = predictor_quality(json.loads(json.dumps(s.get_state())))
    assert [q["stage"] for q in quality] == [0, 1]
    for q in quality:
        assert -1 <= q["screen_vs_full_tau"] <= 1 and -1 <= q["predicted_vs_screen_tau"] <= 1
        print(f"stage {q['stage']}: screen vs full tau {q['screen_vs_full_tau']:.2f}, "
              f"predicted vs screen tau {q['predicted_vs_screen_tau']:.2f}")
    # against taus computed here from the trace with scipy: per NFE over each stage's survivors,
    # weighted by group size
    screen_score = {h: sc for _, c, r in trace if "screen" in c for h, sc in zip(c["schedule_hashes"], r["scores"])}
    for q in quality:
        full = [(c["nfe"], screen_score[c["schedule_hash"]], r["score"]) for _, c, r in trace
                if c["stage"] == q["stage"] and "screen" not in c]
        groups = [[(a, b) for n, a, b in full if n == nfe] for nfe in sorted({n for n, *_ in full})]
        groups = [g for g in groups if len(g) >= 3]
        want = sum(len(g) * scipy.stats.kendalltau(*zip(*g)).statistic for g in groups) / sum(map(len, groups))
        assert q["screen_vs_full_tau"] == pytest.approx(want, abs=1e-9)
    # both fidelities are RMSE against the same converged solve (16 vs 64 samples): better than
    # chance even among survivors (a restricted range: 16 per stage, tau 0.0-0.86 over seeds 5-12)
    assert sum(q["screen_vs_full_tau"] for q in quality) / len(quality) > 0.2


def test_resume_in_the_middle_of_a_rung_continues_without_rerunning(screened_run, tmp_path):
    reference, ref_trace = screened_run
    s = S3Searcher(parse_config(CFG), algo="s3")
    first = []

    def mid_rung(searcher, trace):  # stop with some but not all of stage 0's screening trials done
        return searcher.rung is not None and len(searcher.rung["scores"]) == 2
    assert drive(s, first, stop=mid_rung) == "stopped"
    # one more screening trial suggested, still in flight when the state is saved
    tid = f"t{s.n_suggested:04d}"
    in_flight = s.suggest(tid)
    assert "screen" in in_flight
    path = tmp_path / "state.json"
    s.save(str(path))

    restored = S3Searcher(parse_config(CFG), algo="s3")
    restored.restore(str(path))
    assert restored.rung is not None and len(restored.rung["scores"]) == 2 and tid in restored.pending
    restored.on_trial_complete(tid, run_trial(copy.deepcopy(in_flight)))  # Tune re-runs the in-flight trial
    rest = []
    assert drive(restored, rest) == "finished"
    done_before = {c["trial_key"] for _, c, _ in first} | {in_flight["trial_key"]}
    assert not done_before & {c["trial_key"] for _, c, _ in rest}  # nothing finished is suggested again
    keys = [c["trial_key"] for _, c, _ in first] + [in_flight["trial_key"]] + [c["trial_key"] for _, c, _ in rest]
    assert keys == [c["trial_key"] for _, c, _ in ref_trace]  # the same search as without the interruption
    assert restored.screened == reference.screened and restored.spent == pytest.approx(reference.spent)


def test_screen_refused_with_synthetic_trials():
    bad = {**CFG, "synthetic": {"median_s": 0.1}}
    with pytest.raises(ConfigError, match="screen"):
        parse_config(bad)


def test_metric_fidelity_scores_with_the_search_metric():
    """``screen.fidelity: metric`` scores each schedule with the search's own metric (here FID of the
    digits model against its data) on ``screen.samples`` samples, not with the RMSE."""
    from s3_ray.models.pipeline import noise_for
    from s3_ray.usf.baselines import build_baseline

    model, metric = ModelConfig(kind="digits"), MetricConfig(kind="fid", samples=(1000,))
    target = get_target(model.model_dump_json(), metric.model_dump_json())
    noise = noise_for(model)
    schedules = [build_baseline(name, noise, 4).to_json() for name in ("ddim", "dpm_solver_pp_2m", "unipc_bh2")]
    base = {"screen": schedules, "schedule_hashes": ["a", "b", "c"], "schedule_hash": "abc", "samples": 128,
            "seed": 3, "model": model.model_dump_json(), "metric": metric.model_dump_json()}
    by_metric = run_trial({**base, "fidelity": "metric"})
    want = [evaluate(SolverSchedule.from_json(s), target, n=128, seed=3)["score"] for s in schedules]
    assert by_metric["scores"] == pytest.approx(want, rel=1e-9)
    assert by_metric["screen_best_fid"] == min(want) and "screen_best_rmse" not in by_metric
    by_rmse = run_trial(base)  # the default fidelity (a config from before 'fidelity' existed)
    rmse = MetricConfig(kind="rmse")
    assert by_rmse["scores"] == pytest.approx(
        [evaluate(SolverSchedule.from_json(s), target, rmse, n=128, seed=3)["score"] for s in schedules], rel=1e-9)
    assert by_rmse["scores"] != pytest.approx(by_metric["scores"], rel=1e-3)
    with pytest.raises(ConfigError, match="fidelity"):
        parse_config({**CFG, "screen": {**CFG["screen"], "fidelity": "fid"}})


def test_metric_screening_draws_its_own_noise():
    """With ``fidelity: metric`` the screening trials use noise seed ``seed + SCREEN_SEED_OFFSET``,
    the full evaluations the search's seed (rmse screening keeps the search's seed: common random
    numbers with the converged solve)."""
    from s3_ray.search.searcher import SCREEN_SEED_OFFSET

    cfg = parse_config({**CFG, "screen": {**CFG["screen"], "fidelity": "metric"}, "budget": 40})
    s, trace = S3Searcher(cfg, algo="s3"), []
    assert drive(s, trace) == "finished"
    screens = [c for _, c, _ in trace if "screen" in c]
    assert screens and {c["seed"] for c in screens} == {cfg.seed + SCREEN_SEED_OFFSET}
    assert {c["fidelity"] for c in screens} == {"metric"}
    assert {c["seed"] for _, c, _ in trace if "screen" not in c} == {cfg.seed}

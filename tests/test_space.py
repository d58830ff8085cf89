"""The decision space: random schedules, repair and the evolutionary operators stay valid, inside the
DecisionSpace, at their intended NFE, and deterministic per seed."""

import math
from pathlib import Path

import numpy as np
import pytest

from s3_ray.config import DecisionSpace, OperatorConfig, load_config
from s3_ray.search.space import (
    NAMED_SLOPE,
    _nudge,
    crossover,
    mutate,
    propose,
    random_schedule,
    random_schedule_at_nfe,
    repair,
)
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import EDM, VPLinear
from s3_ray.usf.schedule import SolverSchedule

VP, EDM_ = VPLinear(), EDM()
DEFAULT = (DecisionSpace(), OperatorConfig())
RESTRICTED = (DecisionSpace(predictions=("data",), max_order=2, correctors=("none",), max_steps=8), OperatorConfig())
IMPLICIT = (
    DecisionSpace(max_order=4, correctors=("none", "pseudo", "implicit"), min_dlambda=0.2, max_steps=10),
    OperatorConfig(corrector_probs={"none": 0.4, "pseudo": 0.4, "implicit": 0.2}, first_derivative_points=(1, 2, 3)),
)
CASES = [
    (VP, *DEFAULT), (EDM_, *DEFAULT), (VP, *RESTRICTED), (EDM_, *RESTRICTED),
    (VP, IMPLICIT[0].model_copy(update={"t_end_range": (1e-3, 5e-3)}), IMPLICIT[1]),
    (EDM_, IMPLICIT[0].model_copy(update={"t_end_range": (0.002, 0.01)}), IMPLICIT[1]),
]
NO_ADD_DELETE = {"add_step_prob": 0.0, "delete_step_prob": 0.0}


def check(s: SolverSchedule, noise, dec: DecisionSpace):
    """Valid (round trip) and inside the decision space."""
    assert SolverSchedule.from_json(s.to_json()).schedule_hash() == s.schedule_hash()
    assert s.noise_schedule == noise.name and s.t_start == noise.T
    assert s.afs in dec.afs and 1 <= len(s.steps) <= dec.max_steps
    lo, hi = dec.t_end_range or (noise.t_end_default, noise.t_end_default)
    assert lo <= s.t_end <= hi
    lam = noise.lambda_(np.array(s.times))
    assert np.all(np.diff(lam) >= dec.min_dlambda - 1e-9), np.diff(lam)
    for i, st in enumerate(s.steps):
        assert st.prediction in dec.predictions and st.order <= min(dec.max_order, i + 1)
        if st.corrector is not None:
            assert st.corrector.kind in dec.correctors and i < len(s.steps) - 1


def nfe_range(noise, dec):
    return range(1, min(8, dec.max_steps - 1 + ("none" in dec.afs)) + 1)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_operators_valid_in_space_and_at_nfe(case):
    noise, dec, ops = CASES[case]
    rng = np.random.default_rng(case)
    nfes = list(nfe_range(noise, dec))
    pool = {n: [] for n in nfes}
    made = {"random": [], "mutate": [], "crossover": [], "propose": []}  # hashes of what the operators returned
    for _ in range(25):  # random schedules
        s = random_schedule(rng, noise, int(rng.integers(1, dec.max_steps + 1)), dec, ops)
        check(s, noise, dec)
        n = int(rng.choice(nfes))
        s2 = random_schedule_at_nfe(rng, noise, n, dec, ops)
        check(s2, noise, dec)
        assert s2.nfe() == n
        pool[n].append((s2, float(rng.random())))
        made["random"] += [s.schedule_hash(), s2.schedule_hash()]
    # baselines (possibly outside the space) are repaired into it by the operators
    pool[5].append((build_baseline("unipc_bh2_3", noise, 5), 0.0))
    pool[4].append((build_baseline("dpm_solver_3s", noise, 4), 0.0))
    parents = [s for v in pool.values() for s, _ in v]
    keep = ops.model_copy(update=NO_ADD_DELETE)
    for _ in range(30):
        a, b = (parents[int(j)] for j in rng.choice(len(parents), size=2, replace=False))
        a_in = repair(a.model_dump(), noise, dec)
        m = mutate(rng, a_in, noise, dec, keep)
        check(m, noise, dec)
        assert m.nfe() == a_in.nfe()
        m2 = mutate(rng, a, noise, dec, ops)
        check(m2, noise, dec)
        c = crossover(rng, a, b, noise, dec, ops)
        check(c, noise, dec)
        assert len(c.steps) in (len(a.steps), len(b.steps))
        target = int(rng.choice(nfes))
        p = propose(rng, pool, target, noise, dec, ops, set(nfes))
        check(p, noise, dec)
        assert p.nfe() in nfes
        made["mutate"] += [m.schedule_hash(), m2.schedule_hash()]
        made["crossover"].append(c.schedule_hash())
        made["propose"].append(p.schedule_hash())
    # the checks above ran on new schedules, not on the same few again and again (x 6 cases: ~1,000)
    distinct = {k: len(set(v)) for k, v in made.items()}
    print(case, distinct)
    assert distinct["random"] >= 45 and distinct["mutate"] >= 50 and distinct["propose"] >= 25, distinct
    assert distinct["crossover"] >= 15, distinct


def test_random_schedule_at_nfe_every_nfe_and_infeasible():
    rng = np.random.default_rng(0)
    for noise, dec, ops in CASES:
        for n in range(0 if set(dec.afs) - {"none"} else 1, dec.max_steps + 1):
            assert random_schedule_at_nfe(rng, noise, n, dec, ops).nfe() == n
    dec = DecisionSpace(afs=("none",), max_steps=4)
    with pytest.raises(ValueError, match="NFE"):
        random_schedule_at_nfe(rng, VP, 0, dec)
    with pytest.raises(ValueError, match="NFE"):
        random_schedule_at_nfe(rng, VP, 5, dec)
    dec = dec.model_copy(update={"correctors": ("none", "implicit")})  # implicit buys NFE beyond the steps
    ops = OperatorConfig(corrector_probs={"none": 0.5, "implicit": 0.5})
    assert random_schedule_at_nfe(rng, VP, 7, dec, ops).nfe() == 7


def test_no_config_random_schedule_draws_every_feature():
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(300):
        s = random_schedule(rng, VP, int(rng.integers(1, 8)))
        seen |= {f"afs:{s.afs}"}
        for i, st in enumerate(s.steps):
            seen |= {f"pred:{st.prediction}", f"order:{st.order}", f"combine:{st.combine}"}
            seen |= {"singlestep"} if st.start < -1 else set()
            if st.corrector is not None:
                seen |= {f"corr:{st.corrector.kind}"} | ({"last_corrector"} if i == len(s.steps) - 1 else set())
    assert {"afs:none", "afs:zero_x0", "afs:mean_x0", "pred:noise", "pred:data", "order:4", "combine:bh1",
            "combine:bh2", "singlestep", "corr:pseudo", "corr:implicit", "last_corrector"} <= seen


def _run(seed):
    noise, dec, ops = CASES[4]
    rng = np.random.default_rng(seed)
    pool = {n: [(random_schedule_at_nfe(rng, noise, n, dec, ops), float(rng.random())) for _ in range(4)]
            for n in (4, 5, 6)}
    a, b = pool[5][0][0], pool[5][1][0]
    out = [s for v in pool.values() for s, _ in v]
    out += [mutate(rng, a, noise, dec, ops), crossover(rng, a, b, noise, dec, ops),
            random_schedule(rng, noise, 6, dec, ops), random_schedule(rng, noise, 6)]
    out += [propose(rng, pool, 5, noise, dec, ops, {4, 5, 6}) for _ in range(5)]
    return [s.schedule_hash() for s in out]


def test_deterministic_per_seed():
    assert _run(7) == _run(7)
    assert _run(7) != _run(8)


def test_repair_keeps_valid_schedules_in_space():
    rng = np.random.default_rng(3)
    for noise, dec, ops in CASES:
        for _ in range(10):
            s = random_schedule_at_nfe(rng, noise, int(rng.integers(2, 8)), dec, ops)
            assert repair(s.model_dump(), noise, dec).schedule_hash() == s.schedule_hash()


def test_repair_fixes_broken_dicts():
    dec = DecisionSpace()
    base = build_baseline("dpm_solver_pp_2m", VP, 6)
    d = base.model_dump()
    d["steps"][1]["t"], d["steps"][3]["t"] = d["steps"][3]["t"], d["steps"][1]["t"]  # non-monotone
    d["steps"][1]["order"] = 4  # order above the history (2) and max_order (3)
    d["steps"][2]["derivatives"] = [{"points": [0, -7, 3, -2, -2]}]  # invalid indices and duplicates
    d["steps"][3]["start"] = -9  # start older than the history
    d["steps"][4]["prediction"] = "sde"  # not a prediction type
    d["steps"][-1]["corrector"] = {"kind": "implicit", "order": 3, "derivatives": [{"points": [-1]}] * 2}
    d["afs"] = "bogus"
    s = repair(d, VP, dec)
    check(s, VP, dec)
    assert s.times == base.times  # sorted back (logSNR-uniform gaps are far above min_dlambda)
    assert s.steps[1].order == 2 and len(s.steps[1].derivatives) == 1
    assert s.steps[2].derivatives[0].points == (-2,)
    assert s.steps[3].start == -1 and s.steps[4].prediction == "noise"
    assert s.steps[-1].corrector is None and s.afs == "none"

    # implicit on the last step becomes pseudo where a last-step corrector is allowed
    full = DecisionSpace(max_order=4, correctors=("none", "pseudo", "implicit"))
    s = repair(d, VP, full, last_corrector=True)
    assert s.steps[-1].corrector.kind == "pseudo"
    assert any(-1 in c.points for c in s.steps[-1].corrector.derivatives)

    # times too close, out of range, non-finite; too many steps; t_end outside its range
    d = base.model_dump()
    ts = [0.5, 0.5 + 1e-9, 3.0, float("nan"), -1.0, 1e-6]
    d["steps"] = [{**d["steps"][1], "t": t} for t in ts] * 3
    dec = DecisionSpace(t_end_range=(1e-3, 2e-3), max_steps=10, min_dlambda=0.3)
    s = repair(d, VP, dec)
    check(s, VP, dec)
    assert len(s.steps) == 10 and s.t_end == 1e-3

    # order raised by an edit: the derivative specs are re-derived, bh keeps its shared point set
    d = build_baseline("unipc_bh2", VP, 6).model_dump()
    d["steps"][3]["order"] = 3
    s = repair(d, VP, DecisionSpace())
    st = s.steps[3]
    assert st.combine == "bh2" and [x.points for x in st.derivatives] == [(-2, -3)] * 2
    assert st.corrector.order == 3 and st.corrector.derivatives[0].points == (-1, -3)

    # empty / junk input still gives a valid schedule
    s = repair({"steps": [{"t": "x"}]}, EDM_, DecisionSpace())
    check(s, EDM_, DecisionSpace())


def test_mutation_changes_and_crossover_mixes():
    noise, (dec, ops) = VP, DEFAULT
    rng = np.random.default_rng(11)
    parents = [random_schedule_at_nfe(rng, noise, 6, dec, ops) for _ in range(20)]
    changed = sum(mutate(rng, p, noise, dec, ops).schedule_hash() != p.schedule_hash() for p in parents * 5)
    assert changed >= 95
    nfe_moves = [mutate(rng, p, noise, dec, ops).nfe() - 6 for p in parents * 5]
    assert set(nfe_moves) <= {-1, 0, 1} and {-1, 0, 1} <= set(nfe_moves)

    a, b = parents[0], parents[1]
    assert len(a.steps) != len(b.steps) or a.times != b.times
    kinds = set()
    for _ in range(100):
        c = crossover(rng, a, b, noise, dec, ops)
        grid = a if c.times == a.times else b if c.times == b.times else None
        assert grid is not None  # the time grid is one parent's
        other = b if grid is a else a
        if c.schedule_hash() not in (a.schedule_hash(), b.schedule_hash()):
            kinds.add("new")
        if any(cs.prediction != gs.prediction or cs.derivatives != gs.derivatives
               for cs, gs in zip(c.steps, grid.steps)):
            kinds.add(f"decisions from {'b' if other is b else 'a'}")
        assert c.nfe() == (c.afs == "none") + len(c.steps) - 1 + sum(
            s.corrector is not None and s.corrector.kind == "implicit" for s in c.steps)
    assert kinds == {"new", "decisions from a", "decisions from b"}


def test_propose_falls_back():
    noise, (dec, ops) = EDM_, DEFAULT
    rng = np.random.default_rng(5)
    assert propose(rng, {}, 5, noise, dec, ops, {5}).nfe() == 5  # empty pool: random at the target
    other = {9: [(random_schedule_at_nfe(rng, noise, 9, dec, ops), 1.0)]}
    assert propose(rng, other, 5, noise, dec, ops, {5}).nfe() == 5  # parents from another NFE
    pool = {5: [(random_schedule_at_nfe(rng, noise, 5, dec, ops), s) for s in (3.0, math.nan, 1.0)]}
    for _ in range(10):
        assert propose(rng, pool, 5, noise, dec, ops.model_copy(update={"top_k": 1}), {5}).nfe() == 5


@pytest.mark.parametrize("kind", sorted(NAMED_SLOPE))
def test_named_relaxation_slopes_are_the_expansions_of_their_factors(kind):
    """A mutated named factor becomes linear with slope c where R(h~) = 1 + c h~ + O(h~^2): the
    slope of the docstring's closed forms at h~ -> 0 (dpmsolver2/unipc_bh2 1/6, unipc_bh1 -1/3)."""

    def closed_form(h):  # Relaxation docstring, with expm1 so that e^h - 1 - h keeps its digits
        em1 = math.expm1(h)
        return h * em1 / (2 * (em1 - h)) if kind != "unipc_bh1" else h * h / (2 * (em1 - h))

    for h in (1e-3, -1e-3):
        assert (closed_form(h) - 1.0) / h == pytest.approx(NAMED_SLOPE[kind], abs=2e-4)
    assert (closed_form(1e-3) - closed_form(-1e-3)) / 2e-3 == pytest.approx({"unipc_bh1": -1 / 3}.get(kind, 1 / 6), abs=1e-6)
    nudged = _nudge(np.random.default_rng(0), {"kind": kind}, 0.0)
    assert nudged == {"kind": "linear", "scale": 1.0, "slope": NAMED_SLOPE[kind]}


def test_default_search_space_digits_yaml():
    """`make search`'s space parses, and holds the values the README and the space's comments describe."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "search_spaces" / "digits.yaml")
    assert cfg.name == "digits"
    assert (cfg.model.kind, cfg.model.noise_schedule, cfg.model.output) == ("digits", "vp_linear", "eps")
    m = cfg.metric
    assert (m.kind, m.reference, m.samples, m.final_samples, m.final_seeds) == ("fid", "data", (1000,), 2000, 2)
    assert m.feature_extractor == "s3-digits"
    assert cfg.nfe == (3, 4, 5) and cfg.budget == 240 and cfg.stages == 3 and cfg.plan_ahead == 0
    assert cfg.random_init == 6 and cfg.final_top_k == 3 and cfg.concurrency == 2 and cfg.seed == 0
    assert cfg.baselines == ("ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh2", "dpm_solver_3s")
    assert cfg.discretizations == ("logsnr_uniform", "time_uniform", "time_quadratic", "edm")
    ops = cfg.operators  # the public release's values (USF spec 4.2)
    assert (ops.top_k, ops.crossover_prob, ops.deep_crossover_prob, ops.step_mutation_prob) == (15, 0.3, 0.5, 0.3)
    assert (ops.timestep_sigma, ops.relaxation_sd, ops.afs_prob) == (0.08, 0.03, 0.3)
    assert (ops.add_step_prob, ops.delete_step_prob) == (0.2, 0.2)
    assert ops.order_probs == {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1} and ops.first_derivative_points == (1, 2)
    assert ops.corrector_probs == {"none": 0.5, "pseudo": 0.5}
    d = cfg.decisions
    assert d.predictions == ("noise", "data") and d.max_order == 3 and d.correctors == ("none", "pseudo")
    assert d.afs == ("none", "zero_x0", "mean_x0") and d.min_dlambda == 0.05 and d.max_steps == 12
    assert d.t_end_range is None
    assert cfg.predictor.hidden == (64, 64) and cfg.predictor.epochs == 300 and cfg.predictor.candidates == 1600
    assert (cfg.resources.cpu, cfg.resources.gpu) == (1, 0)
    # every NFE of the range is reachable in this decision space
    rng = np.random.default_rng(0)
    for n in cfg.nfe:
        s = random_schedule_at_nfe(rng, VP, n, d, ops)
        assert s.nfe() == n
        check(s, VP, d)

"""The S³ predictor: encoding, ranking fit, determinism, state round trip and the spec's
acceptance test (held-out Kendall tau > 0.5 on a real, cheap objective)."""

import json
import time

import numpy as np
import pytest
import torch

from s3_ray.config import DecisionSpace, PredictorConfig
from s3_ray.models.analytic import GaussianMixture
from s3_ray.search import predictor as P
from s3_ray.search.predictor import Predictor, encode, encoding_length, heldout_tau, kendall_tau
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import EDM, VPLinear
from s3_ray.usf.sampler import sample

F64 = torch.float64
NFES = (4, 5, 6)
PER_NFE = 100
BASELINES = ("ddim", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc_bh2", "dpm_solver_2m", "dpm_solver_3s")
DISCRETIZATIONS = ("logsnr_uniform", "time_uniform", "time_quadratic")


def _random_at_nfe(rng, noise, nfe):
    try:
        from s3_ray.search.space import random_schedule_at_nfe
    except ImportError:  # older space.py: draw and filter
        from s3_ray.search.space import random_schedule

        while True:
            s = random_schedule(rng, noise, int(rng.integers(max(1, nfe - 2), nfe + 3)))
            if s.nfe() == nfe:
                return s
    return random_schedule_at_nfe(rng, noise, nfe, DecisionSpace())


@pytest.fixture(scope="module")
def evaluated():
    """A few hundred random schedules at NFE 4-6 plus baselines, scored by log RMSE against the exact
    (DOP853) solution of a 6-D, 3-component Gaussian mixture from the same 64 starting points."""
    noise = VPLinear()
    r = np.random.default_rng(1)
    d, k = 6, 3
    means = r.normal(0.0, 1.0, (k, d))
    weights = r.dirichlet(np.ones(k) * 3)
    stds = r.uniform(0.2, 0.5, k)
    gm = GaussianMixture(noise, weights, means, stds)
    data_mean = torch.as_tensor(weights @ means)
    x_T = torch.randn(64, d, generator=torch.Generator().manual_seed(1), dtype=F64)
    ref = gm.solve(x_T, noise.T, noise.t_end_default, rtol=1e-9, atol=1e-9)  # once, reused
    rng = np.random.default_rng(101)
    pool = []
    for nfe in NFES:
        pool += [_random_at_nfe(rng, noise, nfe) for _ in range(PER_NFE)]
        pool += [build_baseline(b, noise, nfe, discretization=disc) for b in BASELINES for disc in DISCRETIZATIONS]
    scores = []
    for s in pool:
        out = sample(s, gm.eps, noise, x_T, data_mean=data_mean)
        rmse = float(((out - ref) ** 2).mean().sqrt())
        scores.append(np.log(rmse) if np.isfinite(rmse) and rmse > 0 else np.nan)  # NaN = failed: worst
    return noise, pool, np.array(scores)


# ---- encoding -------------------------------------------------------------------------------


def test_encoding_fixed_length_padding_and_distinct():
    noise = VPLinear()
    a = build_baseline("dpm_solver_pp_2m", noise, 5)
    b = build_baseline("unipc_bh2", noise, 5)
    c = build_baseline("dpm_solver_pp_2m", noise, 8)
    ea, eb, ec = (encode(s, noise, 12) for s in (a, b, c))
    assert ea.dtype == np.float32 and ea.shape == eb.shape == ec.shape == (encoding_length(12),)
    assert np.all(np.isfinite(ea)) and np.all(np.isfinite(eb))
    assert not np.array_equal(ea, eb) and not np.array_equal(ea, ec)
    n_step = len(P.STEP_FEATURES)
    blocks = ea[: 12 * n_step].reshape(12, n_step)
    assert np.all(blocks[:5, 0] == 1.0) and np.all(blocks[5:] == 0.0)  # mask flag, zero padding
    g = dict(zip(P.GLOBAL_FEATURES, ea[12 * n_step:]))
    assert g["nfe"] == 5 and g["n_steps"] == 5 and g["afs_none"] == 1.0
    # one decision changed -> the encoding changes
    s = a.model_dump()
    s["steps"][2]["prediction"] = "noise"
    assert not np.array_equal(encode(type(a).model_validate(s), noise, 12), ea)
    # the same steps padded further: the prefix (steps) is identical
    e16 = encode(a, noise, 16)
    assert np.array_equal(e16[: 5 * n_step], ea[: 5 * n_step]) and np.all(e16[5 * n_step: 16 * n_step] == 0)


def test_too_long_schedule_is_a_clear_error():
    noise = VPLinear()
    with pytest.raises(ValueError, match="max_steps=6"):
        encode(build_baseline("ddim", noise, 10), noise, 6)
    with pytest.raises(ValueError, match="max_steps=6"):
        Predictor(PredictorConfig(max_steps=6), noise).predict([build_baseline("ddim", noise, 10)])


def test_encoding_of_another_noise_schedule_is_refused():
    with pytest.raises(ValueError, match="noise schedule"):
        encode(build_baseline("ddim", EDM(), 5), VPLinear(), 12)


@pytest.mark.parametrize("noise", [VPLinear(), EDM()], ids=["vp_linear", "edm"])
def test_probe_errors_fall_with_nfe(noise):
    n_step = len(P.STEP_FEATURES)
    errs = []
    for nfe in (5, 10, 40):
        e = encode(build_baseline("dpm_solver_pp_3m", noise, nfe), noise, 48)
        errs.append(e[48 * n_step + len(P.GLOBAL_FEATURES) - len(P.PROBES):])
    assert np.all(errs[0] > errs[1]) and np.all(errs[1] > errs[2]), errs
    off = encode(build_baseline("dpm_solver_pp_3m", noise, 5), noise, 48, probes=False)
    assert np.all(off[-len(P.PROBES):] == 0)


# ---- pairs and tau -------------------------------------------------------------------------------


def test_ranking_pairs_only_within_an_nfe_ties_skipped_nan_worst():
    nfes = [4, 4, 4, 5, 5, 5]
    scores = [1.0, 3.0, 1.0, 100.0, np.nan, -5.0]
    bi, wi = P.ranking_pairs(nfes, scores)
    pairs = set(zip(bi.tolist(), wi.tolist()))
    assert pairs == {(0, 1), (2, 1), (3, 4), (5, 3), (5, 4)}


def test_kendall_tau_and_per_nfe_tau():
    x = np.arange(10.0)
    assert kendall_tau(x, x) == pytest.approx(1.0)
    assert kendall_tau(x, -x) == pytest.approx(-1.0)
    assert kendall_tau(np.ones(10), x) == 0.0
    assert kendall_tau(x, [*x[:-1], np.nan]) == pytest.approx(1.0)  # NaN counts as worst
    nfes = [4] * 6 + [5] * 3 + [6] * 2  # the 2-item group is skipped
    pred = [*range(6), 0, 1, 2, 0, 1]
    true = [*range(6), 2, 1, 0, 1, 0]
    assert P.per_nfe_tau(nfes, pred, true) == pytest.approx((6 * 1.0 + 3 * -1.0) / 9)


# ---- fitting ---------------------------------------------------------------------------------


def test_spec_acceptance_heldout_kendall_tau(evaluated):
    """USF spec 4.3: the predictor ranks held-out evaluated schedules (per-NFE Kendall tau > 0.5)."""
    noise, pool, scores = evaluated
    assert np.isfinite(scores).mean() > 0.9
    cfg = PredictorConfig()
    t0 = time.perf_counter()
    tau = heldout_tau(pool, scores, cfg, noise, seed=0)
    elapsed = time.perf_counter() - t0
    print(f"held-out per-NFE Kendall tau = {tau:.3f} ({len(pool)} schedules, fit+predict {elapsed:.2f} s)")
    assert tau > 0.5, f"held-out Kendall tau {tau:.3f} <= 0.5"


def test_fit_is_deterministic_and_ranks_training_data(evaluated):
    noise, pool, scores = evaluated
    cfg = PredictorConfig(epochs=100)
    a = Predictor(cfg, noise, seed=3).fit(pool, scores).predict(pool)
    b = Predictor(cfg, noise, seed=3).fit(pool, scores).predict(pool)
    c = Predictor(cfg, noise, seed=4).fit(pool, scores).predict(pool)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    nfes = np.array([s.nfe() for s in pool])
    assert P.per_nfe_tau(nfes, a, scores) > 0.6


def test_fit_only_uses_order_within_nfe(evaluated):
    """Per-NFE offsets and monotone rescaling of the scores change nothing."""
    noise, pool, scores = evaluated
    cfg = PredictorConfig(epochs=30)
    nfes = np.array([s.nfe() for s in pool])
    warped = np.exp(scores) * 1e3 + 50.0 * nfes  # monotone within each NFE, offsets differ by NFE
    a = Predictor(cfg, noise, seed=0).fit(pool, scores).predict(pool[:20])
    b = Predictor(cfg, noise, seed=0).fit(pool, warped).predict(pool[:20])
    assert np.array_equal(a, b)


def test_state_round_trip_through_json(evaluated):
    noise, pool, scores = evaluated
    p = Predictor(PredictorConfig(epochs=50, hidden=(32, 16)), noise, seed=1).fit(pool[::2], scores[::2])
    state = json.loads(json.dumps(p.state_dict()))
    q = Predictor.from_state(state, noise)
    assert np.array_equal(p.predict(pool), q.predict(pool))
    assert q.n_train == len(pool[::2]) and q.cfg == p.cfg
    with pytest.raises(ValueError, match="noise schedule"):
        Predictor.from_state(state, EDM())


def test_fit_without_pairs_and_with_failed_scores():
    noise = VPLinear()
    pool = [build_baseline("ddim", noise, n) for n in (4, 5, 6)]  # one per NFE: no pairs
    p = Predictor(PredictorConfig(epochs=5), noise).fit(pool, [1.0, 2.0, 3.0])
    assert p.n_pairs == 0 and np.all(np.isfinite(p.predict(pool)))
    pool += [build_baseline("dpm_solver_pp_2m", noise, n) for n in (4, 5, 6)]
    p.fit(pool, [np.nan, 2.0, np.inf, 0.5, 1.0, 3.0])
    assert p.n_pairs == 3 and np.all(np.isfinite(p.predict(pool)))


def test_encoding_cache_gives_the_same_predictor(evaluated):
    noise, pool, scores = evaluated
    cfg = PredictorConfig(epochs=40)
    cache: dict = {}
    plain = Predictor(cfg, noise, seed=1).fit(pool[:60], scores[:60])
    cached = Predictor(cfg, noise, seed=1, encoding_cache=cache).fit(pool[:60], scores[:60])
    assert len(cache) == len({s.schedule_hash() for s in pool[:60]})
    np.testing.assert_array_equal(plain.predict(pool[60:]), cached.predict(pool[60:]))
    assert len(cache) == len({s.schedule_hash() for s in pool})  # predict filled in the rest


def test_hand_written_adam_matches_torch_adam():
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, generator=g), torch.randn(5, generator=g)]
    x = torch.randn(7, 3, generator=g)

    def loss(w, b):
        return torch.tanh(x @ w.T + b).square().sum()

    ours_p = [t.clone().requires_grad_(True) for t in init]
    ref_p = [t.clone().requires_grad_(True) for t in init]
    ours = P._Adam(ours_p, lr=3e-3, weight_decay=0.03)
    ref = torch.optim.Adam(ref_p, lr=3e-3, weight_decay=0.03)
    for _ in range(50):
        ours.step(torch.autograd.grad(loss(*ours_p), ours_p))
        ref.zero_grad()
        loss(*ref_p).backward()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours_p[0].detach(), init[0])  # it did move


# ---- ensemble and acquisition ------------------------------------------------------------------


def test_one_member_ensemble_is_the_predictor(evaluated):
    noise, pool, scores = evaluated
    cfg = PredictorConfig(epochs=40)
    acq, mean = P.PredictorEnsemble(cfg, noise, seed=5).fit(pool, scores).acquire(pool)
    assert np.array_equal(acq, Predictor(cfg, noise, seed=5).fit(pool, scores).predict(pool)) and np.array_equal(acq, mean)


def test_ensemble_ranks_held_out_schedules_deterministically_and_knows_where_it_is_unsure(evaluated):
    """On the Gaussian-mixture objective (a known ranking: log RMSE against the exact solution), a
    4-member ensemble's mean ranks held-out schedules (per-NFE tau > 0.5, the spec's single-predictor
    threshold); the members disagree more on held-out schedules than on the ones they trained on;
    'ucb' is mean - kappa x spread; everything is a function of the seed."""
    noise, pool, scores = evaluated
    nfes = np.array([s.nfe() for s in pool])
    tr, te = P.heldout_split(nfes, 0.25, seed=0)
    cfg = PredictorConfig(ensemble=4, acquisition="ucb", kappa=0.5)
    train, test = [pool[i] for i in tr], [pool[i] for i in te]
    ens = P.PredictorEnsemble(cfg, noise, seed=0).fit(train, scores[tr])
    acq, mean = ens.acquire(test)
    tau = P.per_nfe_tau(nfes[te], mean, scores[te])
    z_test, z_train = ens.predict_members(test), ens.predict_members(train)
    print(f"ensemble held-out tau {tau:.3f}; member spread held-out {z_test.std(0).mean():.3f}, "
          f"training {z_train.std(0).mean():.3f}")
    assert tau > 0.5
    assert z_test.std(0).mean() > z_train.std(0).mean()
    assert np.allclose(acq, z_test.mean(0) - 0.5 * z_test.std(0), rtol=0, atol=1e-12)
    again, _ = P.PredictorEnsemble(cfg, noise, seed=0).fit(train, scores[tr]).acquire(test)
    other, _ = P.PredictorEnsemble(cfg, noise, seed=1).fit(train, scores[tr]).acquire(test)
    assert np.array_equal(acq, again) and not np.array_equal(acq, other)


def test_ucb_needs_an_ensemble():
    with pytest.raises(ValueError, match="ensemble >= 2"):
        PredictorConfig(acquisition="ucb")


def test_an_incremental_fit_starts_from_the_previous_predictor_and_still_ranks(evaluated):
    """predictor.refit_epochs: a fit with ``start_from`` begins at that predictor's weights and input
    scaling (after one epoch every weight is within one Adam step, lr, of them), is deterministic,
    and after refit_epochs on a larger training set ranks held-out schedules as the spec asks of a
    fit from scratch (per-NFE tau > 0.5)."""
    noise, pool, scores = evaluated
    nfes = np.array([s.nfe() for s in pool])
    tr, te = P.heldout_split(nfes, 0.25, seed=0)
    first, later = tr[: len(tr) // 2], tr
    base = PredictorConfig(epochs=150)
    prev = Predictor(base, noise, seed=0).fit([pool[i] for i in first], scores[first])
    one = Predictor(base.model_copy(update={"refit_epochs": 1}), noise, seed=1).fit(
        [pool[i] for i in later], scores[later], start_from=prev)
    assert np.array_equal(one.mean, prev.mean) and np.array_equal(one.std, prev.std)
    steps = [float((a - b).abs().max()) for a, b in zip(one.params, prev.params)]
    assert 0 < max(steps) <= base.lr * (1 + 1e-5)
    cfg = base.model_copy(update={"refit_epochs": 50})
    a = Predictor(cfg, noise, seed=1).fit([pool[i] for i in later], scores[later], start_from=prev)
    b = Predictor(cfg, noise, seed=1).fit([pool[i] for i in later], scores[later], start_from=prev)
    test = [pool[i] for i in te]
    assert np.array_equal(a.predict(test), b.predict(test))
    tau = P.per_nfe_tau(nfes[te], a.predict(test), scores[te])
    print(f"incremental fit (50 epochs from a 150-epoch fit on half the training set): held-out tau {tau:.3f}")
    assert tau > 0.5
    with pytest.raises(ValueError, match="start_from"):
        Predictor(PredictorConfig(hidden=(16,)), noise).fit(pool[:10], scores[:10], start_from=prev)


def test_an_ensemble_round_trips_through_json_and_refits_member_by_member(evaluated):
    noise, pool, scores = evaluated
    cfg = PredictorConfig(epochs=30, ensemble=2, refit_epochs=5)
    ens = P.PredictorEnsemble(cfg, noise, seed=2).fit(pool[::3], scores[::3])
    back = P.PredictorEnsemble.from_state(json.loads(json.dumps(ens.state_dict())), cfg, noise)
    assert np.array_equal(back.acquire(pool[:30])[0], ens.acquire(pool[:30])[0])
    a = P.PredictorEnsemble(cfg, noise, seed=3).fit(pool[1::3], scores[1::3], start_from=ens)
    b = P.PredictorEnsemble(cfg, noise, seed=3).fit(pool[1::3], scores[1::3], start_from=back)
    assert np.array_equal(a.acquire(pool[:30])[0], b.acquire(pool[:30])[0])
    assert all(np.array_equal(m.mean, n.mean) for m, n in zip(a.members, ens.members))
    with pytest.raises(ValueError, match="members"):
        P.PredictorEnsemble(cfg.model_copy(update={"ensemble": 3}), noise).fit(pool[:10], scores[:10], start_from=ens)


# ---- model 'forest' -------------------------------------------------------------------------


def test_forest_ranks_held_out_schedules_deterministically(evaluated):
    """predictor.model 'forest' passes the spec's acceptance test (held-out per-NFE tau > 0.5),
    is a function of its seed, and predicts the mean of its trees."""
    noise, pool, scores = evaluated
    cfg = PredictorConfig(model="forest", trees=100)
    tau = heldout_tau(pool, scores, cfg, noise, seed=0)
    print(f"forest held-out per-NFE Kendall tau = {tau:.3f}")
    assert tau > 0.5
    a = P.ForestPredictor(cfg, noise, seed=3).fit(pool, scores)
    b = P.ForestPredictor(cfg, noise, seed=3).fit(pool, scores)
    c = P.ForestPredictor(cfg, noise, seed=4).fit(pool, scores)
    assert np.array_equal(a.predict(pool), b.predict(pool)) and not np.array_equal(a.predict(pool), c.predict(pool))
    trees = a.predict_trees(pool)
    assert trees.shape == (100, len(pool)) and np.allclose(a.predict(pool), trees.mean(0), rtol=0, atol=1e-12)


def test_forest_target_is_a_monotone_log_score_with_failures_worst():
    s = np.array([0.5, 0.1, np.nan, 2.0, np.inf])
    y = P.ForestPredictor.target(s)
    assert np.allclose(y[[0, 1, 3]], np.log([0.5, 0.1, 2.0]))
    assert y[2] > y[3] and y[4] > y[3] and np.isfinite(y).all()
    kid = np.array([-0.002, 0.0, 0.004])  # KID can be negative: shifted, order kept
    yk = P.ForestPredictor.target(kid)
    assert np.isfinite(yk).all() and list(np.argsort(yk)) == [0, 1, 2]


def test_forest_ucb_uses_its_trees_spread(evaluated):
    """'ucb' with a forest: mean - kappa x the trees' spread; the trees disagree more on held-out
    schedules than on their training set."""
    noise, pool, scores = evaluated
    nfes = np.array([s.nfe() for s in pool])
    tr, te = P.heldout_split(nfes, 0.25, seed=0)
    cfg = PredictorConfig(model="forest", trees=60, acquisition="ucb", kappa=0.7)
    train, test = [pool[i] for i in tr], [pool[i] for i in te]
    ens = P.PredictorEnsemble(cfg, noise, seed=2).fit(train, scores[tr])
    acq, mean = ens.acquire(test)
    trees = ens.members[0].predict_trees(test)
    assert np.allclose(mean, trees.mean(0), atol=1e-12) and np.allclose(acq, mean - 0.7 * trees.std(0), atol=1e-12)
    assert trees.std(0).mean() > ens.members[0].predict_trees(train).std(0).mean()


@pytest.mark.parametrize("bad, field", [({"ensemble": 2}, "ensemble"), ({"refit_epochs": 10}, "refit_epochs"),
                                        ({"trees": 1}, "trees")])
def test_forest_settings_that_do_not_apply_are_refused(bad, field):
    with pytest.raises(ValueError, match=field):
        PredictorConfig(model="forest", **bad)
    with pytest.raises(ValueError, match="start_from"):
        P.ForestPredictor(PredictorConfig(model="forest"), VPLinear()).fit([], [], start_from=object())

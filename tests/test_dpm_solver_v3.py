"""DPM-Solver-v3 (usf/ems.py, prediction 'dpmsolver_v3'): EMS against their closed form on Gaussian data,
degenerate statistics = DPM-Solver++, convergence orders of the v3 predictor and corrector, release
schedules with v3 steps, refusals, and the EMS cache."""

import numpy as np
import pytest
import torch

from s3_ray.models.adapter import ModelAdapter
from s3_ray.models.analytic import GaussianData
from s3_ray.usf.baselines import build_baseline, dpm_solver_v3
from s3_ray.usf.ems import EMS, EMSError, cached_ems, compute_ems, ems_grid, load_ems, save_ems
from s3_ray.usf.noise import EDM, VPLinear
from s3_ray.usf.release import import_release
from s3_ray.usf.sampler import SamplerPlan, sample
from s3_ray.usf.schedule import ScheduleError, SolverSchedule

MEAN = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
VAR = torch.tensor([0.05, 0.5, 1.0, 2.0], dtype=torch.float64)


def _rotated_gaussian(noise):
    """Gaussian data with a full covariance (random rotation): f = (sigma eps - l x) / alpha then varies
    with x (with a diagonal covariance it would not, and s = Cov / Var would be 0 / 0)."""
    U, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    data = GaussianData(noise, MEAN, VAR, basis=U)
    return data, U, ModelAdapter(data.net, noise, output="x0")


def closed_form_ems(mean, var, U, lambdas):
    """l, s, b of x0 ~ N(mean, U diag(var) U^T) under a VP schedule, derived by hand, lambda-derivatives by
    autograd: along the axes y = U^T (x - alpha mean) ~ N(0, diag(v)), v = alpha^2 var + sigma^2,
    eps = U (sigma / v * y), so l = sigma^2 diag(U diag(1/v) U^T); f = A y - l mean with
    A = (U diag(sigma^2 / v) - diag(l) U) / alpha; y_m grows as sqrt(v_m), so f' = P y + q with
    P = dA/dlambda + A diag(v' / 2v), q = -l' mean; s = sum_m P A v / sum_m A^2 v, b = q + s l mean."""
    def parts(lam):
        a2, s2 = torch.sigmoid(2 * lam), torch.sigmoid(-2 * lam)
        v = a2 * var + s2
        ell = s2 * (U**2 / v).sum(1)
        return ell, (U * (s2 / v) - ell[:, None] * U) / torch.sqrt(a2), v

    out = []
    for lam in lambdas:
        lam = torch.tensor(float(lam), dtype=torch.float64)
        ell, A, v = parts(lam)
        dl, dA, dv = torch.autograd.functional.jacobian(parts, lam)
        P, q = dA + A * (0.5 * dv / v), -dl * mean
        s = (P * A * v).sum(1) / (A * A * v).sum(1)
        out.append((ell, s, q + s * ell * mean))
    return [torch.stack(z).numpy() for z in zip(*out)]


def test_ems_match_their_closed_form_on_gaussian_data():
    noise = VPLinear()
    data, U, model = _rotated_gaussian(noise)
    ems = compute_ems(model, noise, data.marginal(4096, noise.T, torch.Generator().manual_seed(2)), n_grid=80,
                      probes="exact")
    ell, s, b = closed_form_ems(MEAN, VAR, U, ems.lambdas)
    # l is a Jacobian diagonal: exact for a linear model, whatever the samples
    np.testing.assert_allclose(ems.l, ell, rtol=0, atol=1e-12)
    # s, b are sample moments (4096 samples) of a fourth-order difference along the trajectory
    for name, est, ref in (("s", ems.s, s), ("b", ems.b, b)):
        rel = np.abs(est - ref).max(1) / np.abs(ref).max(1)
        assert rel[1:-1].max() < 0.03 and rel.max() < 0.08, (name, rel.max(), rel[1:-1].max())
    # Hutchinson's estimator (Rademacher probes) is unbiased: 4 probes on 4096 samples
    ems4 = compute_ems(model, noise, data.marginal(4096, noise.T, torch.Generator().manual_seed(2)), n_grid=80, probes=4)
    assert np.abs(ems4.l - ell).max() < 0.02 * np.abs(ell).max()


@pytest.mark.parametrize("noise", [VPLinear(), EDM()], ids=lambda n: n.name)
def test_degenerate_ems_give_dpm_solver_pp(noise):
    """l = 1, s = b = 0: f = -x0 and the v3 update is the data-prediction update, step by step."""
    data = GaussianData(noise, MEAN, VAR)
    model = ModelAdapter(data.net, noise, output="x0")
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(noise.sigma(noise.T))
    ems = EMS.degenerate(noise.lambda_(ems_grid(noise, 40)), (4,), "data")
    for name, nfe in (("dpm_solver_v3", 5), ("dpm_solver_v3", 10), ("dpm_solver_v3_2", 6)):
        v3 = build_baseline(name, noise, nfe)
        d = v3.model_dump()
        for st in d["steps"]:
            st["prediction"] = "data"
        pp = SolverSchedule.model_validate(d)
        diff = float((sample(v3, model, noise, x_T, ems=ems) - sample(pp, model, noise, x_T)).abs().max())
        assert diff < 1e-12, (name, nfe, diff)


# (order, corrector, pseudo corrector) -> global order: the predictor of order p is order p, its full
# corrector one more; the pseudo corrector (derivative n from n points, as the paper's small-NFE default)
# estimates the first derivative from one point and is order 2.
ORDERS = {(3, False, False): 3, (3, True, False): 4, (3, True, True): 2, (2, False, False): 2, (2, True, False): 3}


@pytest.mark.parametrize("noise", [VPLinear(), EDM()], ids=lambda n: n.name)
def test_v3_predictor_and_corrector_convergence_orders(noise):
    data, _, model = _rotated_gaussian(noise)
    ems = compute_ems(model, noise, data.marginal(1024, noise.T, torch.Generator().manual_seed(2)), n_grid=40,
                      probes="exact")
    t_end = float(noise.inverse_lambda(1.0))
    x_T = data.marginal(16, noise.T, torch.Generator().manual_seed(0))
    nfes = [16, 32, 64, 128]
    for (order, corr, pseudo), want in ORDERS.items():
        errors = []
        for n in nfes:
            s = dpm_solver_v3(noise, n, order=order, corrector=corr, pseudo_corrector=pseudo, t_end=t_end)
            errors.append(float((sample(s, model, noise, x_T, ems=ems) - data.solve(x_T, s.t_start, s.t_end)).abs().max()))
        slope = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
        print(f"{noise.name} v3 order {order} corrector {corr} pseudo {pseudo}: slope {slope:.2f} {errors}")
        assert 1e-10 < min(errors) and abs(slope - want) <= 0.25, (order, corr, pseudo, slope, errors)


def test_release_schedule_with_v3_steps_runs_at_its_nfe():
    noise = EDM()
    data, _, model = _rotated_gaussian(noise)
    ems = compute_ems(model, noise, data.marginal(1024, noise.T, torch.Generator().manual_seed(2)), n_grid=60,
                      probes="exact")
    s = import_release("edm/cifar10_edm_nfe5")
    assert sum(st.prediction == "dpmsolver_v3" for st in s.steps) >= 1
    x_T = data.marginal(64, noise.T, torch.Generator().manual_seed(0))
    model.calls = 0
    out = sample(s, model, noise, x_T, ems=ems)
    assert model.calls == s.nfe() == 5
    exact = data.solve(x_T, s.t_start, s.t_end)
    ddim = sample(build_baseline("ddim", noise, 5, t_end=s.t_end), model, noise, x_T)
    err, err_ddim = float((out - exact).norm(dim=1).mean()), float((ddim - exact).norm(dim=1).mean())
    print(f"release edm nfe5 on the Gaussian: error {err:.3g}, DDIM at 5 NFE {err_ddim:.3g}")
    assert err < err_ddim


def test_v3_steps_without_ems_or_outside_their_grid_are_refused():
    noise = VPLinear()
    s = build_baseline("dpm_solver_v3", noise, 5)
    with pytest.raises(ScheduleError, match=r"steps\[0\]\.prediction: 'dpmsolver_v3' needs the model's empirical"):
        SamplerPlan(s, noise)
    narrow = EMS.degenerate(noise.lambda_(ems_grid(noise, 10, t_end=0.01)), (4,))
    with pytest.raises(ScheduleError, match=r"steps\[4\]\.t: t=0\.001 .* outside the EMS grid"):
        SamplerPlan(s, noise, narrow)
    ems = EMS.degenerate(noise.lambda_(ems_grid(noise, 10)), (4,))
    plan = SamplerPlan(s, noise, ems)
    with pytest.raises(ValueError, match=r"EMS are for samples of shape \(4,\), got \(3,\)"):
        plan.run(lambda x, t: x, torch.zeros(2, 3, dtype=torch.float64))
    # schedules without v3 steps ignore the statistics
    assert SamplerPlan(build_baseline("ddim", noise, 5), noise, ems).ems is None


@pytest.mark.parametrize("change, field", [
    ({"combine": "bh2"}, r"steps\[1\]\.combine: prediction 'dpmsolver_v3' uses combine 'taylor'"),
    ({"derivatives": [{"points": [-2], "relaxation": {"kind": "dpmsolver2"}}]},
     r"steps\[1\]\.derivatives\[0\]\.relaxation\.kind: 'dpmsolver2' is defined for noise/data"),
])
def test_v3_schedule_validation_names_the_field(change, field):
    d = build_baseline("dpm_solver_v3", VPLinear(), 4, corrector=False).model_dump()
    d["steps"][1].update(change)
    if change.get("combine"):
        d["steps"][1]["derivatives"] = [{"points": [-2]}]
    with pytest.raises(ScheduleError, match=field):
        SolverSchedule.from_dict(d)


def test_ems_file_round_trip_and_corrupt_files_are_refused(tmp_path):
    noise = VPLinear()
    lam = noise.lambda_(ems_grid(noise, 12))
    rng = np.random.default_rng(0)
    ems = EMS(lam, rng.random((13, 2, 2)), rng.random((13, 2, 2)) - 0.5, rng.random((13, 2, 2)), noise_spec=noise.spec())
    path = tmp_path / "e.safetensors"
    save_ems(ems, path, key={"model": "abc"})
    back = load_ems(path, key={"model": "abc"})
    assert np.array_equal(back.l, ems.l) and np.array_equal(back.b, ems.b) and back.noise_spec == noise.spec()
    with pytest.raises(EMSError, match="its key .* differs"):
        load_ems(path, key={"model": "other"})
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(EMSError, match="not a readable safetensors file"):
        load_ems(path)
    from safetensors.torch import save_file

    save_file({"lambdas": torch.from_numpy(lam), "l": torch.ones(13, 2)}, str(path), metadata={"format": "s3-ems-v1"})
    with pytest.raises(EMSError, match=r"missing tensors \['b', 's'\]"):
        load_ems(path)
    save_file({"lambdas": torch.from_numpy(lam[::-1].copy()), "l": torch.ones(13, 2, dtype=torch.float64),
               "s": torch.ones(13, 2, dtype=torch.float64), "b": torch.ones(13, 2, dtype=torch.float64)},
              str(path), metadata={"format": "s3-ems-v1"})
    with pytest.raises(EMSError, match="lambdas: not finite and strictly increasing"):
        load_ems(path)


def test_ems_cache_recomputes_for_another_model_and_for_a_corrupt_file(tmp_path):
    noise = VPLinear()
    data, _, model = _rotated_gaussian(noise)

    def x_T(n, seed):
        return data.marginal(n, noise.T, torch.Generator().manual_seed(seed))

    kw = dict(cache_dir=tmp_path, n_grid=8, samples=64, probes="exact")
    model.calls = 0
    first = cached_ems(model, noise, x_T, model_hash="m1", **kw)
    calls = model.calls
    assert calls > 0 and len(list(tmp_path.glob("ems-*.safetensors"))) == 1
    again = cached_ems(model, noise, x_T, model_hash="m1", **kw)
    assert model.calls == calls and np.array_equal(again.s, first.s)  # read, not recomputed
    cached_ems(model, noise, x_T, model_hash="m2", **kw)
    assert model.calls == 2 * calls and len(list(tmp_path.glob("ems-*.safetensors"))) == 2
    (f1,) = [p for p in tmp_path.glob("ems-*.safetensors") if p.stat().st_mtime <= min(
        q.stat().st_mtime for q in tmp_path.glob("ems-*.safetensors"))]
    f1.write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning, match="EMS cache not used"):
        cached_ems(model, noise, x_T, model_hash="m1", **kw)
    assert model.calls == 3 * calls
    assert np.array_equal(load_ems(f1).s, first.s)  # rewritten with the recomputed statistics


def test_search_space_with_v3_draws_mutates_and_repairs_valid_v3_steps():
    from s3_ray.config import DecisionSpace, OperatorConfig
    from s3_ray.search.space import crossover, mutate, random_schedule_at_nfe, repair

    noise = VPLinear()
    decisions = DecisionSpace(predictions=("data", "dpmsolver_v3"), max_order=3)
    ops = OperatorConfig(corrector_probs={"none": 0.5, "pseudo": 0.5})
    rng = np.random.default_rng(0)
    pool = [random_schedule_at_nfe(rng, noise, 5, decisions, ops) for _ in range(60)]
    pool += [mutate(rng, s, noise, decisions, ops) for s in pool[:30]]
    pool += [crossover(rng, a, b, noise, decisions, ops) for a, b in zip(pool[:20], pool[20:40])]
    v3 = [st for s in pool for st in s.steps if st.prediction == "dpmsolver_v3"]
    assert len(v3) > 50 and all(s.nfe() == 5 for s in pool[:60])
    assert all(st.combine == "taylor" and all(d.relaxation.kind == "linear" for d in st.derivatives) for st in v3)
    # a UniPC step or a named relaxation turned into v3 is repaired into what v3 takes
    d = build_baseline("unipc_bh2", noise, 5).model_dump()
    d["steps"][2]["prediction"] = "dpmsolver_v3"
    d["steps"][3].update(prediction="dpmsolver_v3", combine="taylor",
                         derivatives=[{"points": [-2], "relaxation": {"kind": "dpmsolver2"}}])
    fixed = repair(d, noise, decisions)
    assert fixed.steps[2].combine == "taylor" and fixed.steps[2].corrector.combine == "taylor"
    assert fixed.steps[3].derivatives[0].relaxation.model_dump() == {"kind": "linear", "scale": 1.0, "slope": 1 / 6}


def test_a_target_computes_its_ems_once_and_scores_v3_schedules(tmp_path, monkeypatch):
    from s3_ray.config import MetricConfig, ModelConfig
    from s3_ray.metrics.evaluate import Target, evaluate
    from s3_ray.search.predictor import encode

    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path))
    target = Target(ModelConfig(kind="gmm", noise_schedule="vp_linear"), MetricConfig(kind="rmse"))
    s = build_baseline("dpm_solver_v3", target.noise, 5)
    r = evaluate(s, target, n=64, seed=0)
    assert not r["failed"] and np.isfinite(r["score"]) and r["nfe"] == 5
    assert len(list((tmp_path / "ems").glob("ems-*.safetensors"))) == 1
    calls = target.model.calls
    again = Target(ModelConfig(kind="gmm", noise_schedule="vp_linear"), MetricConfig(kind="rmse"))
    assert evaluate(s, again, n=64, seed=0)["score"] == r["score"]  # same statistics, read from the cache
    from s3_ray.metrics.evaluate import EMS_SETTINGS
    from s3_ray.usf.ems import model_calls

    # not recomputed: the first target made exactly the EMS's calls more (120 trajectory + 61 JVP)
    assert calls - again.model.calls == model_calls(EMS_SETTINGS["n_grid"], EMS_SETTINGS["probes"]) == 181
    ddim = evaluate(build_baseline("ddim", target.noise, 5), target, n=64, seed=0)
    print(f"gmm rmse at 5 NFE: v3 {r['score']:.4f}, DDIM {ddim['score']:.4f}; EMS {calls - again.model.calls} model calls")
    assert r["score"] < ddim["score"]
    # the predictor encodes v3 steps without statistics (one-hot + data-prediction coefficients)
    enc = encode(s, target.noise, max_steps=8)
    assert np.all(np.isfinite(enc))

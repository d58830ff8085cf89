"""Flow matching (SD3/Flux): the FlowMatch noise schedule, output conversions, exactness and orders
under the flow path, equivalence with diffusers' FlowMatchEulerDiscreteScheduler, and noise
schedules from diffusers scheduler configs."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from scipy.integrate import quad

from s3_ray.config import ModelConfig
from s3_ray.models.adapter import (
    DIFFUSERS_PREDICTION_TYPES,
    OUTPUTS,
    ModelAdapter,
    output_for_prediction_type,
    time_label_fn,
    to_eps,
)
from s3_ray.models.analytic import GaussianData, GaussianMixture
from s3_ray.usf.baselines import BASELINES, build_baseline
from s3_ray.usf.ems import EMS, ems_grid
from s3_ray.usf.noise import (
    NOISE_SCHEDULES,
    FlowMatch,
    VPDiscrete,
    get_noise_schedule,
    noise_from_diffusers_config,
)
from s3_ray.usf.sampler import sample
from s3_ray.usf.schedule import Derivative, ScheduleError, SolverSchedule, Step

torch.set_num_threads(1)
F64 = torch.float64
FLOW = FlowMatch()

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ---------------------------------------------------------------------------------------------
# The noise schedule


def _times():
    return np.unique(np.concatenate([np.geomspace(1e-12, 1e-3, 40), np.linspace(1e-3, FLOW.T, 300),
                                     1.0 - np.geomspace(1e-3, 1e-9, 30)]))


def test_flow_schedule_alpha_sigma_lambda():
    t = _times()
    np.testing.assert_array_equal(FLOW.sigma(t), t)
    np.testing.assert_allclose(FLOW.alpha(t) + FLOW.sigma(t), 1.0, rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.exp(FLOW.log_alpha(t)), 1.0 - t, rtol=1e-14)
    # lambda against 50-digit arithmetic on the same float64 inputs
    mpmath.mp.dps = 50
    ref = np.array([float(mpmath.log((1 - mpmath.mpf(x)) / mpmath.mpf(x))) for x in t])
    np.testing.assert_allclose(FLOW.lambda_(t), ref, rtol=1e-14, atol=1e-14)
    assert np.all(np.diff(FLOW.lambda_(t)) < 0)
    # NOT the VP relation: alpha^2 + sigma^2 != 1 in the middle
    assert abs(float(FLOW.alpha(0.5) ** 2 + FLOW.sigma(0.5) ** 2) - 0.5) < 1e-15


def test_flow_schedule_inverse_roundtrip():
    t = _times()
    np.testing.assert_allclose(FLOW.inverse_lambda(FLOW.lambda_(t)), t, rtol=1e-13, atol=0)
    lam = np.concatenate([np.linspace(-30.0, 30.0, 601), [-700.0, -50.0, 50.0, 700.0]])
    with np.errstate(over="raise", invalid="raise"):
        t_of = FLOW.inverse_lambda(lam)
    mpmath.mp.dps = 50
    ref = np.array([float(1 / (1 + mpmath.exp(mpmath.mpf(x)))) for x in lam])
    np.testing.assert_allclose(t_of, ref, rtol=1e-14, atol=0)
    inner = (lam >= -9) & (lam <= 30)  # below, 1 - t < 1e-4 and lambda(t) loses digits to 1 - t
    np.testing.assert_allclose(FLOW.lambda_(t_of[inner]), lam[inner], rtol=1e-12, atol=1e-12)


def test_flow_schedule_constants_and_registry():
    assert FLOW.T == 0.999 and FLOW.t_end_default == 1e-3
    assert math.isfinite(float(FLOW.lambda_(FLOW.T))) and abs(float(FLOW.lambda_(FLOW.T)) + math.log(999)) < 1e-12
    assert NOISE_SCHEDULES["flow"] is FlowMatch and get_noise_schedule("flow").T == 0.999
    assert FLOW.spec() == {"name": "flow"}
    n500 = FlowMatch(num_train_timesteps=500)
    assert n500.T == 0.998 and n500.t_end_default == 0.002 and n500.spec()["num_train_timesteps"] == 500
    # diffusers' flow transformers take sigma * num_train_timesteps
    np.testing.assert_allclose(FLOW.time_label(np.array([FLOW.T, 0.5, 1e-3])), [999.0, 500.0, 1.0], rtol=1e-15)
    assert time_label_fn("discrete", FLOW)(0.25) == 250.0


def test_schedule_files_naming_flow_validate():
    s = build_baseline("dpm_solver_pp_2m", FLOW, 6)
    assert s.noise_schedule == "flow" and s.t_start == FLOW.T and s.t_end == FLOW.t_end_default
    assert SolverSchedule.from_json(s.to_json()) == s
    bad = {**s.model_dump(), "t_start": 0.9995}
    with pytest.raises(ScheduleError, match="t_start.*above T = 0.999 of noise schedule 'flow'"):
        SolverSchedule.from_dict(bad)


# ---------------------------------------------------------------------------------------------
# Output conversion


@pytest.mark.parametrize("alpha, sigma", [(0.8, 0.6), (0.3, 0.7), (1.0, 3.5), (0.001, 0.999), (0.999, 0.001)])
def test_to_eps_inverts_every_output_kind(alpha, sigma):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, generator=g, dtype=F64)
    eps = torch.randn(5, 3, 4, generator=g, dtype=F64)
    x = alpha * x0 + sigma * eps
    forward = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "score": -eps / sigma, "flow": eps - x0}
    assert set(forward) == set(OUTPUTS)
    for kind, out in forward.items():
        err = float((to_eps(kind, out, x, alpha, sigma) - eps).abs().max())
        # x0 at sigma = 0.001 amplifies round-off by |x| / sigma ~ 3e3
        assert err < (1e-12 if kind != "x0" else 1e-12 / sigma), (kind, err)
    with pytest.raises(ValueError, match="output must be one of"):
        to_eps("velocity", eps, x, alpha, sigma)


def test_adapter_flow_output_and_labels():
    seen = []

    def net(x, labels):
        seen.append(float(labels[0]))
        t = float(labels[0]) / 1000.0
        return 2.0 * x - 0.5 * t  # any function: adapter must return (x + alpha v) / (alpha + sigma)

    m = ModelAdapter(net, FLOW, output="flow", time_label="discrete")
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    for t in (0.999, 0.4, 0.002):
        v = 2.0 * x - 0.5 * t
        assert float((m(x, t) - (x + (1 - t) * v)).abs().max()) < 1e-14
    assert seen == pytest.approx([999.0, 400.0, 2.0], rel=1e-15) and m.calls == 3
    assert ModelConfig(output="flow").output == "flow"


def test_output_for_prediction_type():
    assert DIFFUSERS_PREDICTION_TYPES == {"epsilon": "eps", "v_prediction": "v", "sample": "x0",
                                          "flow_prediction": "flow"}
    assert output_for_prediction_type("epsilon", "DDIMScheduler") == "eps"
    assert output_for_prediction_type("v_prediction", "EulerDiscreteScheduler") == "v"
    assert output_for_prediction_type("sample", None) == "x0"
    assert output_for_prediction_type("flow_prediction", "UniPCMultistepScheduler") == "flow"
    assert output_for_prediction_type(None, "FlowMatchEulerDiscreteScheduler") == "flow"
    with pytest.raises(ValueError, match="'prediction_type': 'x_prev' is not supported"):
        output_for_prediction_type("x_prev", "DDPMScheduler")


# ---------------------------------------------------------------------------------------------
# Exactness under the flow path


MU = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=F64)
VAR = torch.tensor([0.05, 0.5, 1.0, 2.0], dtype=F64)


@pytest.mark.parametrize("t", [0.999, 0.7, 0.3, 0.01, 1e-4])
def test_gaussian_eps_is_tweedie_under_flow(t):
    torch.manual_seed(0)
    """eps = -sigma grad log p_t with p_t = N((1 - t) mu, (1 - t)^2 s^2 + t^2), by autograd."""
    data = GaussianData(FLOW, mean=MU, var=VAR)
    a, s = 1.0 - t, t
    marginal = torch.distributions.Normal(a * MU, torch.sqrt(a * a * VAR + s * s))
    x = marginal.sample((6,)).requires_grad_(True)
    (score,) = torch.autograd.grad(marginal.log_prob(x).sum(), x)
    x = x.detach()
    eps = (x - a * data.denoise(x, t)) / s
    # x - alpha x0 cancels: its round-off is ~1e-16 |x|, i.e. ~1e-16 |x| / sigma in eps
    tol = 1e-12 * float(eps.abs().max()) + 1e-14 * float(x.abs().max()) / s
    assert float((eps + s * score).abs().max()) < tol


def test_gaussian_oracle_solves_the_flow_ode():
    """d/dt of the closed-form solution equals the velocity E[eps | x_t] - E[x0 | x_t]."""
    data = GaussianData(FLOW, mean=MU, var=VAR)
    x_s = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    assert float((data.solve(x_s, 0.9, 0.9) - x_s).abs().max()) < 1e-15
    for t in (0.8, 0.4, 0.05):
        x_t = data.solve(x_s, 0.9, t)
        x0 = data.denoise(x_t, t)
        vel = (x_t - x0) / t  # eps - x0 with eps = (x - (1 - t) x0) / t
        d = 1e-5
        fd = (data.solve(x_s, 0.9, t + d) - data.solve(x_s, 0.9, t - d)) / (2 * d)
        assert float((fd - vel).abs().max()) < 1e-8 * float(vel.abs().max())


@pytest.mark.parametrize("afs", ["none", "mean_x0"])
def test_point_mass_every_builder_exact_under_flow(afs):
    """x0 a point mass: eps is constant along x_t = alpha_t mu + sigma_t eps_T, so every solver is exact."""
    data = GaussianData(FLOW, mean=MU, var=torch.zeros(4, dtype=F64))
    x_T = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * FLOW.T
    # DPM-Solver-v3 runs with statistics of its own (here l = 1, s = b = 0: exact for a point mass too)
    ems = EMS.degenerate(FLOW.lambda_(ems_grid(FLOW, 40)), (4,))
    for name in BASELINES:
        for disc in ("logsnr_uniform", "time_uniform", "time_quadratic", "edm"):
            s = build_baseline(name, FLOW, 6, discretization=disc, afs=afs)
            out = sample(s, ModelAdapter(data.net, FLOW, output="x0"), FLOW, x_T, data_mean=MU, ems=ems)
            eps_T = (x_T - (1 - s.t_start) * MU) / s.t_start
            exact = (1 - s.t_end) * MU + s.t_end * eps_T
            assert float((out - exact).abs().max()) < 1e-10, (name, disc)


def _gmm(noise, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(3, d, generator=g, dtype=F64)
    return GaussianMixture(noise, weights=[0.5, 0.3, 0.2], means=means, stds=[0.3, 0.5, 0.4])


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_ddim_is_euler_in_flow_time(prediction):
    """On the flow path a first-order step of either form is x_t = x_s + (t - s) v(x_s, s)."""
    gm = _gmm(FLOW)

    def vel(x, t):
        return gm.eps(x, t) - gm.denoise(x, t)

    x_T = torch.randn(8, 4, generator=torch.Generator().manual_seed(4), dtype=F64) * FLOW.T
    for disc in ("logsnr_uniform", "time_uniform"):
        s = build_baseline("ddim", FLOW, 9, discretization=disc, prediction=prediction)
        x = x_T.clone()
        times = s.times
        for t_s, t in zip(times[:-1], times[1:]):
            x = x + (t - t_s) * vel(x, t_s)
        out = sample(s, gm.eps, FLOW, x_T)
        assert float((out - x).abs().max()) < 1e-12 * float(x.abs().max()), disc


def _integral_reference(form, P, x_s, t_s, t):
    """data: x_t = s_t/s_s x_s + s_t int e^l P(l) dl; noise: x_t = a_t/a_s x_s - a_t int e^-l P(l) dl
    (integrals by adaptive quadrature, independent of the sampler's phi functions)."""
    ls, lt = float(FLOW.lambda_(t_s)), float(FLOW.lambda_(t))
    if form == "data":
        integral = quad(lambda lam: math.exp(lam) * P(lam), ls, lt, epsabs=0, epsrel=1e-13)[0]
        return t / t_s * x_s + t * integral
    integral = quad(lambda lam: math.exp(-lam) * P(lam), ls, lt, epsabs=0, epsrel=1e-13)[0]
    return (1 - t) / (1 - t_s) * x_s - (1 - t) * integral


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("form", ["data", "noise"])
def test_multistep_polynomial_exactness_under_flow(order, form):
    """A multistep order-p step is exact when x0 (data) or eps (noise) is a degree p-1 polynomial in
    lambda; the warm-up steps are order 1 (inexact), the last step is checked from its start state."""
    P = np.polynomial.Polynomial(np.random.default_rng(order).normal(size=order) * 0.3)

    def eps(x, t):
        lam = float(FLOW.lambda_(t))
        return torch.full_like(x, P(lam)) if form == "noise" else (x - (1 - t) * P(lam)) / t

    times = [float(t) for t in FLOW.inverse_lambda(np.array([-5.0, -3.9, -2.6, -1.2, 0.4]))]
    pts = tuple(range(-2, -order - 1, -1))
    warm = [Step(t=t, prediction=form, order=1) for t in times[1:-1]]
    last = Step(t=times[-1], prediction=form, order=order,
                derivatives=tuple(Derivative(points=pts) for _ in range(order - 1)))
    s = SolverSchedule(noise_schedule="flow", t_start=times[0], steps=(*warm, last))
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    prefix = SolverSchedule(noise_schedule="flow", t_start=times[0], steps=tuple(warm))
    x_s = sample(prefix, eps, FLOW, x_T)
    exact = _integral_reference(form, P, x_s, times[-2], times[-1])
    out = sample(s, eps, FLOW, x_T)
    assert float((out - exact).abs().max()) < 1e-10 * max(1.0, float(exact.abs().max()))
    if order > 1:  # one order less is not exact: the test has teeth
        lower = SolverSchedule(noise_schedule="flow", t_start=times[0], steps=(*warm, Step(
            t=times[-1], prediction=form, order=order - 1,
            derivatives=tuple(Derivative(points=pts[:-1]) for _ in range(order - 2)))))
        assert float((sample(lower, eps, FLOW, x_T) - exact).abs().max()) > 1e-6


# ---------------------------------------------------------------------------------------------
# Convergence orders under the flow path (float64, logSNR grid, T -> lambda = 1, as test_convergence)

FLOW_ORDERS = {"ddim": 1, "dpm_solver_pp_2m": 2, "dpm_solver_pp_3m_exact": 3, "unipc_bh2": 3}
STEPS = [32, 64, 128, 256]


@pytest.fixture(scope="module")
def problems():
    """The exact Gaussian (closed-form oracle) and a GMM (DOP853 reference, rtol 1e-12).

    The mixture is a soft one: with sharper components (stds 0.3, means 1.5 randn) 32..256 steps are
    pre-asymptotic under VP as well (2M 1.78 VP / 1.66 flow, 1.91 / 1.85 on 64..512)."""
    t_end = float(FLOW.inverse_lambda(1.0))
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * FLOW.T
    gauss = GaussianData(FLOW, mean=MU, var=VAR)
    means = 0.7 * torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    gm = GaussianMixture(FLOW, weights=[0.5, 0.3, 0.2], means=means, stds=[0.6, 0.8, 0.7])
    return {"gauss": (gauss, gauss.solve(x_T, FLOW.T, t_end)), "gmm": (gm, gm.solve(x_T, FLOW.T, t_end)),
            "x_T": x_T, "t_end": t_end}


@pytest.mark.parametrize("data", ["gauss", "gmm"])
@pytest.mark.parametrize("name", sorted(FLOW_ORDERS))
def test_global_order_under_flow(problems, name, data):
    model, ref = problems[data]
    x_T, t_end = problems["x_T"], problems["t_end"]
    errors = []
    for n in STEPS:
        s = build_baseline(name, FLOW, n, t_end=t_end)
        assert s.t_start == FLOW.T and s.t_end == t_end
        out = sample(s, ModelAdapter(model.net, FLOW, output="x0"), FLOW, x_T)
        errors.append(float((out - ref).abs().max()))
    assert 1e-9 < min(errors) and max(errors) < 0.5, errors
    slope = -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
    print(f"flow {data} {name}: slope {slope:.2f} errors {[f'{e:.1e}' for e in errors]}")
    assert abs(slope - FLOW_ORDERS[name]) <= 0.25, f"{name}: fitted slope {slope:.2f}"


# ---------------------------------------------------------------------------------------------
# Equivalence with diffusers' FlowMatchEulerDiscreteScheduler (float32 on both sides)

SHAPE = (8, 1, 4, 4)
TOL_EULER = 1e-6
# Our sampler keeps the state in x's dtype. In float32 its first step from alpha_T = 1e-3 loses about
# log10(alpha_t / alpha_s) digits (noise form: x_s (alpha_t / alpha_s) - ...; data form:
# x0 = (x - sigma eps) / alpha), which diffusers' x + dt v does not: on the 8-step time-uniform grid
# (alpha_t / alpha_s = 126) ours is 1.65e-6 (data) / 3.7e-6 (noise) from a float64 Euler solve,
# diffusers 5.9e-8. With a float64 state ours is within 1e-14 of it.
TOL_EULER_F32 = {"time_uniform": 5e-6, "logsnr_uniform": TOL_EULER}


@pytest.fixture(scope="module")
def flow_net():
    """An exact GMM velocity network: net(x, labels = 1000 sigma) in x's dtype, like a flow transformer."""
    gm = _gmm(FLOW, d=int(np.prod(SHAPE[1:])))

    def net(x, labels):
        t = float(labels[0].double()) / 1000.0
        x64 = x.to(F64)
        return (gm.eps(x64, t) - gm.denoise(x64, t)).float().to(x.dtype)  # float32 outputs

    return net


def _run_diffusers(sched, net, x_T, n_steps):
    """diffusers' loop for n_steps steps (set_timesteps was called; its grid has a terminal 0)."""
    x = x_T.clone()
    for ts in sched.timesteps[:n_steps]:
        x = sched.step(net(x, ts.expand(x.shape[0])), ts, x).prev_sample
    assert x.dtype == x_T.dtype
    return x


def _ours_on(times, prediction, net, x_T):
    s = SolverSchedule(noise_schedule="flow", t_start=times[0],
                       steps=tuple(Step(t=t, prediction=prediction, order=1) for t in times[1:]))
    m = ModelAdapter(net, FLOW, output="flow", time_label="discrete")
    out = sample(s, m, FLOW, x_T.clone())
    assert m.calls == len(times) - 1
    return out


def _rel(ours, ref):
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all()
    return float((ours - ref).abs().max() / ours.abs().max())


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("disc, n", [("time_uniform", 8), ("logsnr_uniform", 10)])
def test_first_order_equals_flow_match_euler(flow_net, prediction, disc, n):
    grid = np.asarray(build_baseline("ddim", FLOW, n, discretization=disc).times, dtype=np.float32)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=grid)
    assert sched.sigmas.dtype == torch.float32 and len(sched.sigmas) == n + 2 and float(sched.sigmas[-1]) == 0.0
    times = [float(v) for v in sched.sigmas[:-1]]  # the float32 grid both sides use
    assert times == [float(v) for v in grid]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float32) * times[0]
    ref = _run_diffusers(sched, flow_net, x_T, n)
    err = _rel(_ours_on(times, prediction, flow_net, x_T), ref)
    err64 = _rel(_ours_on(times, prediction, flow_net, x_T.double()), ref.double())
    print(f"\n[flow equivalence] FlowMatchEuler vs ddim({prediction}) [{disc}{n}]: "
          f"float32 state {err:.3e}, float64 state {err64:.3e}")
    assert err64 <= TOL_EULER and err <= TOL_EULER_F32[disc]


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_shift_only_changes_the_grid(flow_net, prediction):
    n = 8
    base = np.linspace(0.99, FLOW.t_end_default, n + 1).astype(np.float32)  # shifted: 0.9967 <= T
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    assert isinstance(noise_from_diffusers_config(sched.config), FlowMatch)
    sched.set_timesteps(sigmas=base)
    shifted = sched.sigmas[:-1].double().numpy()
    b = base.astype(np.float64)
    np.testing.assert_allclose(shifted, 3 * b / (1 + 2 * b), rtol=1e-6)
    assert np.max(np.abs(shifted - b)) > 0.1  # the shift moved the grid
    times = [float(v) for v in sched.sigmas[:-1]]
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float32) * times[0]
    ref = _run_diffusers(sched, flow_net, x_T, n)
    err = _rel(_ours_on(times, prediction, flow_net, x_T), ref)
    err64 = _rel(_ours_on(times, prediction, flow_net, x_T.double()), ref.double())
    print(f"\n[flow equivalence] FlowMatchEuler shift=3 vs ddim({prediction}): "
          f"float32 state {err:.3e}, float64 state {err64:.3e}")
    assert err64 <= TOL_EULER and err <= TOL_EULER


# ---------------------------------------------------------------------------------------------
# Noise schedules from diffusers scheduler configs


T_NODES = np.arange(1, 1001) / 1000


def test_sd_scaled_linear_table_equals_diffusers():
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ns = noise_from_diffusers_config(sched.config)
    assert isinstance(ns, VPDiscrete) and ns.N == 1000
    abar = sched.alphas_cumprod.double().numpy()  # float32 (cumprod in float32: measured 9.3e-7)
    np.testing.assert_allclose(ns.alpha(T_NODES) ** 2, abar, rtol=1e-6)


@pytest.mark.parametrize("cls", [DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
                                 EulerDiscreteScheduler])
def test_vp_scheduler_classes_give_vp_discrete(cls):
    sched = cls(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, use_karras_sigmas=False) \
        if cls is EulerDiscreteScheduler else cls(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ns = noise_from_diffusers_config(sched.config)
    assert isinstance(ns, VPDiscrete)
    np.testing.assert_allclose(ns.alpha(T_NODES) ** 2, sched.alphas_cumprod.double().numpy(), rtol=5e-5)


def test_trained_betas():
    betas = np.linspace(1e-3, 0.05, 200) ** 1.5
    sched = DDPMScheduler(num_train_timesteps=200, trained_betas=betas.tolist())
    ns = noise_from_diffusers_config(sched.config)
    t = np.arange(1, 201) / 200
    np.testing.assert_allclose(ns.alpha(t) ** 2, np.cumprod(1.0 - betas), rtol=1e-13)
    np.testing.assert_allclose(ns.alpha(t) ** 2, sched.alphas_cumprod.double().numpy(), rtol=1e-5)


def test_flow_configs_give_flow_match():
    for cfg in [FlowMatchEulerDiscreteScheduler(shift=3.0).config,
                FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, use_karras_sigmas=False).config,
                {"_class_name": "FlowMatchHeunDiscreteScheduler", "shift": 1.0},
                {"shift": 3.0, "num_train_timesteps": 1000}]:
        ns = noise_from_diffusers_config(cfg)
        assert isinstance(ns, FlowMatch) and ns.T == 0.999 and ns.spec() == {"name": "flow"}
    assert noise_from_diffusers_config({"_class_name": "FlowMatchEulerDiscreteScheduler",
                                        "num_train_timesteps": 500}).T == 0.998


def test_config_errors_name_the_field():
    with pytest.raises(ValueError) as e:
        noise_from_diffusers_config({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"})
    assert str(e.value) == ("scheduler_config.json field 'beta_schedule': 'sigmoid' is not supported "
                            "(linear, scaled_linear, squaredcos_cap_v2, trained_betas)")
    with pytest.raises(ValueError, match="field 'rescale_betas_zero_snr'.*lambda = -inf"):
        noise_from_diffusers_config(DDIMScheduler(rescale_betas_zero_snr=True).config)
    with pytest.raises(ValueError, match="field 'invert_sigmas'"):
        noise_from_diffusers_config(FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config)
    with pytest.raises(ValueError, match="field 'num_train_timesteps'"):
        noise_from_diffusers_config({"_class_name": "DDIMScheduler", "num_train_timesteps": "1000"})
    with pytest.raises(ValueError, match="field 'trained_betas'"):
        noise_from_diffusers_config({"trained_betas": [0.5, 1.5]})

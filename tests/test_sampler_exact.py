"""The sampler against exact answers: point-mass data, polynomial exactness, identities, NFE."""

import math

import numpy as np
import pytest
import torch

from s3_ray.models.adapter import ModelAdapter
from s3_ray.models.analytic import GaussianData, GaussianMixture
from s3_ray.search.space import random_schedule
from s3_ray.usf.baselines import BASELINES, build_baseline
from s3_ray.usf.ems import EMS, ems_grid
from s3_ray.usf.noise import EDM, VPCosine, VPLinear, get_noise_schedule
from s3_ray.usf.sampler import SamplerPlan, derivative_weights, phi, sample
from s3_ray.usf.schedule import Corrector, Derivative, SolverSchedule, Step

F64 = torch.float64


def test_phi_small_and_large_arguments():
    for z in [-30.0, -3.0, -1.0, -0.999, -1e-3, -1e-9, 0.0, 1e-9, 1e-3, 0.5, 0.999, 1.0, 4.0]:
        # phi_k(z) = sum_j z^j/(j+k)! computed with mpmath-free high-precision series in float128 is not
        # available: compare against the integral form phi_k(z) = int_0^1 e^{(1-u)z} u^{k-1}/(k-1)! du.
        for k in range(1, 6):
            u = np.linspace(0.0, 1.0, 20001)
            f = np.exp((1 - u) * z) * u ** (k - 1) / math.factorial(k - 1)
            ref = np.trapezoid(f, u) if abs(z) < 5 else None
            val = phi(k, z)
            if ref is not None:
                assert abs(val - ref) <= 1e-7 * max(1.0, abs(ref)), (k, z, val, ref)
            assert math.isfinite(val)
    assert phi(1, 0.0) == 1.0 and phi(2, 0.0) == 0.5
    assert abs(phi(2, 1e-6) - (0.5 + 1e-6 / 6 + 1e-12 / 24)) < 1e-16


def test_derivative_weights_exact_on_polynomials():
    rng = np.random.default_rng(0)
    for K in range(1, 5):
        deltas = -np.sort(rng.uniform(0.1, 2.0, size=K))
        coeffs = rng.normal(size=K + 1)  # degree-K polynomial, F(lambda_s + x) = sum c_k x^k
        F = np.polynomial.Polynomial(coeffs)
        for d in range(1, K + 1):
            w = derivative_weights(deltas, d)
            est = sum(wm * (F(dm) - F(0.0)) for wm, dm in zip(w, deltas))
            assert abs(est - math.factorial(d) * coeffs[d]) < 1e-9 * max(1, abs(coeffs[d]) * math.factorial(d))


NOISES = [VPLinear(), VPCosine(), EDM(), get_noise_schedule("vp_discrete")]


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: n.name)
@pytest.mark.parametrize("afs", ["none", "mean_x0"])
def test_point_mass_every_builder_exact(noise, afs):
    """With x0 a point mass, eps is constant along the exact trajectory: every consistent solver is exact."""
    mu = torch.tensor([0.5, -1.0, 2.0, 0.3], dtype=F64)
    data = GaussianData(noise, mean=mu, var=torch.zeros(4, dtype=F64))
    x_T = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=F64) * float(noise.sigma(noise.T))
    # DPM-Solver-v3 runs with statistics of its own (here l = 1, s = b = 0: exact for a point mass too)
    ems = EMS.degenerate(noise.lambda_(ems_grid(noise, 40)), (4,))
    for name in BASELINES:
        for disc in ("logsnr_uniform", "time_uniform", "time_quadratic", "edm"):
            s = build_baseline(name, noise, 6, discretization=disc, afs=afs)
            out = sample(s, ModelAdapter(data.net, noise, output="x0"), noise, x_T, data_mean=mu, ems=ems)
            exact = data.solve(x_T, s.t_start, s.t_end)
            assert float((out - exact).abs().max()) < 1e-10, (name, disc)


def _poly_model(noise, coeffs, form):
    """A model whose x0 (form='data') or eps (form='noise') is the polynomial P(lambda) for every x."""
    P = np.polynomial.Polynomial(coeffs)

    def eps(x, t):
        lam = float(noise.lambda_(t))
        a, s = float(noise.alpha(t)), float(noise.sigma(t))
        if form == "noise":
            return torch.full_like(x, P(lam))
        return (x - a * P(lam)) / s

    return eps, P


def _poly_exact(noise, P, form, x_s, t_s, t):
    """Closed forms: data: x_t = s_t/s_s x_s + s_t int e^l P dl with int e^l P = e^l (P - P' + P'' ...);
    noise: x_t = a_t/a_s x_s - a_t int e^-l P dl with int e^-l P = -e^-l (P + P' + P'' ...)."""
    ls, lt = float(noise.lambda_(t_s)), float(noise.lambda_(t))
    derivs = [P.deriv(k) for k in range(P.degree() + 1)]
    if form == "data":
        Q = sum(((-1) ** k) * d for k, d in enumerate(derivs))
        integral = math.exp(lt) * Q(lt) - math.exp(ls) * Q(ls)
        return float(noise.sigma(t) / noise.sigma(t_s)) * x_s + float(noise.sigma(t)) * integral
    Q = sum(derivs)
    integral = -math.exp(-lt) * Q(lt) + math.exp(-ls) * Q(ls)
    return float(noise.alpha(t) / noise.alpha(t_s)) * x_s - float(noise.alpha(t)) * integral


def _x_at(schedule: SolverSchedule, k: int, model, x_T):
    """The sampler's state at t_k (k = 0: x_T), by running the first k steps."""
    if k == 0:
        return x_T
    steps = schedule.model_dump()["steps"][:k]
    if steps[-1]["corrector"]:  # implicit and pseudo give the same state; only pseudo may end a schedule
        steps[-1]["corrector"]["kind"] = "pseudo"
    prefix = SolverSchedule(**{**schedule.model_dump(), "steps": steps})
    return sample(prefix, model, SamplerPlan(schedule, VPLinear()).noise, x_T)


LAMBDAS = np.array([-2.0, -1.6, -1.1, -0.7, 0.4])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize("start", ["multistep", "singlestep"])
def test_one_step_polynomial_exactness(order, form, start):
    """A Taylor step of order p is exact when F(lambda) is a polynomial of degree p - 1.

    The model ignores x, so the history's model outputs are exact even though the order-1 warm-up
    steps are not; the last (order-p) step is compared with the closed form from its start state."""
    noise = VPLinear()
    eps, P = _poly_model(noise, np.random.default_rng(order).normal(size=order) * 0.3, form)
    times = [float(t) for t in noise.inverse_lambda(LAMBDAS)]
    M = len(times) - 1
    st = -1 if start == "multistep" else -order
    avail = [-k for k in range(1, M + 1) if -k != st]
    derivs = tuple(Derivative(points=tuple(avail[: order - 1])) for _ in range(order - 1))
    steps = [Step(t=t, prediction=form, order=1) for t in times[1:-1]]
    steps.append(Step(t=times[-1], prediction=form, order=order, start=st, derivatives=derivs))
    s = SolverSchedule(noise_schedule="vp_linear", t_start=times[0], steps=tuple(steps))
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    k0 = M + st  # index of the start time
    exact = _poly_exact(noise, P, form, _x_at(s, k0, eps, x_T), times[k0], times[-1])
    assert float((sample(s, eps, noise, x_T) - exact).abs().max()) < 1e-11
    if order > 1:  # one order less is not exact: the test has teeth
        lower = SolverSchedule(**{**s.model_dump(), "steps": [*s.model_dump()["steps"][:-1], {
            **s.model_dump()["steps"][-1], "order": order - 1, "derivatives": [d.model_dump() for d in derivs[:-1]]}]})
        assert float((sample(lower, eps, noise, x_T) - exact).abs().max()) > 1e-6


@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize("kind", ["pseudo", "implicit"])
def test_corrector_polynomial_exactness(form, kind):
    """A corrector of order p_c (sets using the new point -1) reproduces degree p_c - 1 polynomials."""
    noise = VPLinear()
    eps, P = _poly_model(noise, [0.2, -0.5, 0.3], form)  # degree 2: order 3
    times = [float(t) for t in noise.inverse_lambda(np.array([-2.0, -1.0, 0.5, 1.0]))]
    pts = (-1, -3)
    s = SolverSchedule(noise_schedule="vp_linear", t_start=times[0], steps=(
        Step(t=times[1], prediction=form, order=1),
        Step(t=times[2], prediction=form, order=1,
             corrector=Corrector(kind=kind, order=3, derivatives=(Derivative(points=pts), Derivative(points=pts)))),
        Step(t=times[3], prediction=form, order=1),
    ))
    x_T = torch.randn(3, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x1 = _x_at(s, 1, eps, x_T)
    corrected = _x_at(s, 2, eps, x_T)
    assert float((corrected - _poly_exact(noise, P, form, x1, times[1], times[2])).abs().max()) < 1e-11
    uncorrected = SolverSchedule(**{**s.model_dump(), "steps": [st.model_dump() | {"corrector": None} for st in s.steps[:2]]})
    assert float((sample(uncorrected, eps, noise, x_T) - corrected).abs().max()) > 1e-4


def test_ddim_noise_form_equals_data_form():
    noise = VPLinear()
    gm = GaussianMixture(noise, [0.3, 0.7], [[1.0, -1.0, 0.5], [-1.0, 0.5, 0.0]], [0.2, 0.4])
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    a = sample(build_baseline("ddim", noise, 7, prediction="data"), gm.eps, noise, x_T)
    b = sample(build_baseline("ddim", noise, 7, prediction="noise"), gm.eps, noise, x_T)
    assert float((a - b).abs().max()) < 1e-12


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_unipc_bh2_predictor_equals_dpm_solver_2m(prediction):
    noise = EDM()
    gm = GaussianMixture(noise, [0.3, 0.7], [[1.0, -1.0, 0.5], [-1.0, 0.5, 0.0]], [0.2, 0.4])
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=F64) * 80.0
    u = build_baseline("unipc_bh2", noise, 8, prediction=prediction)
    predictor_only = SolverSchedule(**{**u.model_dump(), "steps": [
        {**st.model_dump(), "corrector": None} for st in u.steps]})
    dpm = build_baseline("dpm_solver_pp_2m" if prediction == "data" else "dpm_solver_2m", noise, 8)
    a, b = sample(predictor_only, gm.eps, noise, x_T), sample(dpm, gm.eps, noise, x_T)
    assert float((a - b).abs().max()) < 1e-11 * float(b.abs().max())
    # and the corrector changes the result (it is not a no-op)
    assert float((sample(u, gm.eps, noise, x_T) - b).abs().max()) > 1e-4


def test_nfe_matches_counted_calls_for_500_random_schedules():
    noise = VPLinear()
    gm = GaussianMixture(noise, [0.5, 0.5], [[1.0, 1.0], [-1.0, 0.5]], [0.2, 0.3])
    rng = np.random.default_rng(0)
    x_T = torch.randn(4, 2, dtype=F64)
    mean = torch.zeros(2, dtype=F64)
    seen_nfe = set()
    for _ in range(500):
        s = random_schedule(rng, noise, int(rng.integers(1, 10)))
        m = ModelAdapter(gm.net, noise, output="x0")
        out = sample(s, m, noise, x_T, data_mean=mean)
        assert m.calls == s.nfe(), s.to_json()
        assert torch.isfinite(out).all()
        seen_nfe.add(s.nfe())
    assert len(seen_nfe) >= 8


def test_any_tensor_rank_and_model_dtype():
    noise = VPLinear()
    gm = GaussianMixture(noise, [0.5, 0.5], [[1.0] * 12, [-1.0] * 12], [0.3, 0.3])
    s = build_baseline("unipc_bh2_3", noise, 6)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(0), dtype=F64)
    flat = sample(s, gm.eps, noise, x)
    img = sample(s, gm.eps, noise, x.reshape(5, 3, 2, 2))
    vol = sample(s, gm.eps, noise, x.reshape(5, 1, 3, 2, 2))
    assert img.shape == (5, 3, 2, 2) and vol.shape == (5, 1, 3, 2, 2)
    assert torch.equal(img.reshape(5, 12), flat) and torch.equal(vol.reshape(5, 12), flat)
    f32 = sample(s, lambda x, t: gm.eps(x, t).float(), noise, x.float())
    assert f32.dtype == torch.float32
    assert float((f32.double() - flat).abs().max()) < 1e-4


def test_schedule_for_another_noise_schedule_is_refused():
    from s3_ray.usf.schedule import ScheduleError

    s = build_baseline("ddim", VPLinear(), 4)
    with pytest.raises(ScheduleError, match="noise_schedule: the schedule is for 'vp_linear'"):
        SamplerPlan(s, EDM())


def test_mean_x0_needs_data_mean():
    noise = VPLinear()
    s = build_baseline("ddim", noise, 4, afs="mean_x0")
    with pytest.raises(ValueError, match="data_mean"):
        sample(s, lambda x, t: x, noise, torch.zeros(2, 3))


def test_zero_x0_is_consistent():
    """AFS zero_x0: x0 = 0 and eps = x_T / sigma_T together; the first DDIM step then equals a model
    that predicts x0 = 0 at T."""
    noise = VPLinear()
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    zero = GaussianData(noise, mean=torch.zeros(3, dtype=F64), var=torch.zeros(3, dtype=F64))
    for pred in ("data", "noise"):
        s_afs = build_baseline("ddim", noise, 3, afs="zero_x0", prediction=pred)
        s_model = SolverSchedule(**{**s_afs.model_dump(), "afs": "none"})
        a = sample(s_afs, ModelAdapter(zero.net, noise, output="x0"), noise, x_T)
        b = sample(s_model, ModelAdapter(zero.net, noise, output="x0"), noise, x_T)
        assert float((a - b).abs().max()) < 1e-12


def _relaxation_closed_form(kind: str, h_tilde: float, scale: float = 1.0, slope: float = 0.0) -> float:
    """R(h~) as the Relaxation docstring states it, written out with plain exponentials."""
    em1 = math.exp(h_tilde) - 1.0
    if kind == "linear":
        return scale + slope * h_tilde
    if kind in ("dpmsolver2", "unipc_bh2"):
        return h_tilde * em1 / (2.0 * (em1 - h_tilde))
    assert kind == "unipc_bh1"
    return h_tilde**2 / (2.0 * (em1 - h_tilde))


RELAXATIONS = [
    {"kind": "linear", "slope": 0.37},
    {"kind": "linear", "scale": 0.6, "slope": -0.25},
    {"kind": "dpmsolver2"},
    {"kind": "unipc_bh1"},
    {"kind": "unipc_bh2"},
]


@pytest.mark.parametrize("lambdas", [(-1.5, -0.5, 0.7), (-1.5, -1.0, -0.7)], ids=["h1.2", "h0.3"])
@pytest.mark.parametrize("form", ["data", "noise"])
@pytest.mark.parametrize("relax", RELAXATIONS, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_relaxation_factor_in_a_step_matches_closed_form(relax, form, lambdas):
    """An order-2 step whose first derivative is exact (F linear in lambda) and relaxed by R:
    data:  x_2 = s_2/s_1 x_1 + a_2 [(1 - e^-h) F_1 + (e^-h - 1 + h) R(-h) F'],
    noise: x_2 = a_2/a_1 x_1 - s_2 [(e^h - 1) F_1 + (e^h - 1 - h) R(h) F'],
    with R from the docstring's formulas at h~ = -h (data) or h (noise); x_1 is the DDIM step."""
    noise = VPLinear()
    c0, c1 = 0.3, -0.8
    eps, P = _poly_model(noise, [c0, c1], form)
    lam = np.array(lambdas)
    t = [float(v) for v in noise.inverse_lambda(lam)]
    a = [float(v) for v in noise.alpha(np.array(t))]
    sg = [float(v) for v in noise.sigma(np.array(t))]
    s = SolverSchedule(noise_schedule="vp_linear", t_start=t[0], steps=(
        Step(t=t[1], prediction=form, order=1),
        Step(t=t[2], prediction=form, order=2, derivatives=(Derivative(points=(-2,), relaxation=relax),)),
    ))
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    h0, h = lam[1] - lam[0], lam[2] - lam[1]
    F0, F1 = P(lam[0]), P(lam[1])
    if form == "data":
        R = _relaxation_closed_form(h_tilde=-h, **relax)
        x1 = sg[1] / sg[0] * x0 + a[1] * (1 - math.exp(-h0)) * F0
        x2 = sg[2] / sg[1] * x1 + a[2] * ((1 - math.exp(-h)) * F1 + (math.exp(-h) - 1 + h) * R * c1)
    else:
        R = _relaxation_closed_form(h_tilde=h, **relax)
        x1 = a[1] / a[0] * x0 - sg[1] * math.expm1(h0) * F0
        x2 = a[2] / a[1] * x1 - sg[2] * (math.expm1(h) * F1 + (math.exp(h) - 1 - h) * R * c1)
    assert abs(R - 1.0) > 0.02  # the relaxation matters in this step
    out = sample(s, eps, noise, x0)
    assert float((out - x2).abs().max()) < 1e-12 * float(x2.abs().max())

"""Baseline solvers as schedules: DDIM, DPM-Solver(++) multistep and singlestep, UniPC, iPNDM, DPM-Solver-v3.

Every builder returns a SolverSchedule; the sampler has one code path. Time grids come from
``discretize`` (time-uniform, logSNR-uniform, time-quadratic, EDM rho; the model-specific Align Your
Steps levels ``ays_sd15``/``ays_sdxl``) or are given explicitly with ``grid=`` (e.g. a GITS grid from
``s3_ray.usf.gits``, which needs a model and so is not a ``discretize`` kind).
"""

from __future__ import annotations

import math

import numpy as np

from .noise import NoiseSchedule
from .sampler import phi
from .schedule import Corrector, Derivative, Relaxation, SolverSchedule, Step

# Model-free grids for every noise schedule (what tables and search spaces iterate over).
DISCRETIZATIONS = ("time_uniform", "logsnr_uniform", "time_quadratic", "edm")
# Published Align Your Steps levels: only for Stable Diffusion's noise schedule (see usf/ays.py).
AYS_DISCRETIZATIONS = ("ays_sd15", "ays_sdxl")
# 'gits' is computed from a model (usf/gits.py) and passed to the builders as ``grid=``.
ALL_DISCRETIZATIONS = (*DISCRETIZATIONS, *AYS_DISCRETIZATIONS, "gits")
MIDPOINT = Relaxation(kind="dpmsolver2")


def discretize(noise: NoiseSchedule, n_steps: int, kind: str = "logsnr_uniform", t_end: float | None = None,
               t_start: float | None = None, rho: float = 7.0) -> np.ndarray:
    """n_steps + 1 decreasing times from t_start (default T) to t_end (default the schedule's)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    T = noise.T if t_start is None else t_start
    eps = noise.t_end_default if t_end is None else t_end
    u = np.linspace(0.0, 1.0, n_steps + 1)
    if kind == "time_uniform":
        t = T + u * (eps - T)
    elif kind == "time_quadratic":
        t = (math.sqrt(T) + u * (math.sqrt(eps) - math.sqrt(T))) ** 2
    elif kind == "logsnr_uniform":
        lam0, lam1 = float(noise.lambda_(T)), float(noise.lambda_(eps))
        t = noise.inverse_lambda(lam0 + u * (lam1 - lam0))
    elif kind == "edm":
        # Karras et al.: uniform in s^(1/rho) with s = sigma/alpha = e^-lambda.
        s0, s1 = math.exp(-float(noise.lambda_(T))), math.exp(-float(noise.lambda_(eps)))
        s = (s0 ** (1 / rho) + u * (s1 ** (1 / rho) - s0 ** (1 / rho))) ** rho
        t = noise.inverse_lambda(-np.log(s))
    elif kind in AYS_DISCRETIZATIONS:
        from .ays import ays_times

        if t_end is not None or t_start is not None:
            raise ValueError(f"discretization {kind!r}: the published levels fix both end points; "
                             "leave t_end and t_start unset")
        return ays_times(noise, kind, n_steps)
    elif kind == "gits":
        raise ValueError("discretization 'gits' is computed from a model: use s3_ray.usf.gits.gits_grid (or "
                         "`s3 baseline NAME --discretization gits --space FILE`) and pass the times as grid=")
    else:
        raise ValueError(f"unknown discretization {kind!r} (known: {', '.join(ALL_DISCRETIZATIONS)})")
    t = np.asarray(t, dtype=np.float64)
    t[0], t[-1] = T, eps  # exact end points (the inverse map may round)
    return t


def _times(noise: NoiseSchedule, n_steps: int, discretization: str, t_end: float | None,
           grid=None) -> np.ndarray:
    """The builder's n_steps + 1 times: ``grid`` if given (checked), else ``discretize``."""
    if grid is None:
        return discretize(noise, n_steps, discretization, t_end)
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or len(g) != n_steps + 1:
        raise ValueError(f"grid: this builder needs {n_steps + 1} times ({n_steps} steps), got {np.shape(grid)}")
    if not (np.all(np.isfinite(g)) and np.all(np.diff(g) < 0) and g[-1] > 0):
        raise ValueError("grid: times must be finite, positive and strictly decreasing")
    if t_end is not None and g[-1] != t_end:
        raise ValueError(f"grid: ends at {g[-1]!r}, but t_end = {t_end!r} was asked for")
    return g


def _ramp(n_steps: int, order: int, lower_order_final: bool) -> list[int]:
    orders = [min(order, i + 1) for i in range(n_steps)]
    if lower_order_final:
        orders = [min(o, n_steps - i) for i, o in enumerate(orders)]
    return orders


def _points(order: int, offset: int = 0) -> tuple[int, ...]:
    """Multistep history points {-2, ..., -order}, shifted by ``offset``."""
    return tuple(range(-2 + offset, -order - 1 + offset, -1))


def _dpm_multistep_step(t: float, order: int, prediction: str, d2_scale: float) -> Step:
    """DPM-Solver(++) multistep step: order 2 is the midpoint 2M formula; order 3 uses the
    two-point first and second derivative, the latter scaled by ``d2_scale`` (1/2 = published 3M)."""
    if order == 1:
        derivs = ()
    elif order == 2:
        derivs = (Derivative(points=(-2,), relaxation=MIDPOINT),)
    else:
        pts = _points(order)
        derivs = tuple(
            Derivative(points=pts, relaxation=Relaxation(scale=d2_scale) if n == 2 else Relaxation())
            for n in range(1, order)
        )
    return Step(t=t, prediction=prediction, order=order, derivatives=derivs)


def _unipc_step(t: float, order: int, prediction: str, variant: str, corrector: bool) -> Step:
    pts = _points(order)
    derivs = tuple(Derivative(points=pts) for _ in range(order - 1))
    corr = None
    if corrector:
        cpts = tuple(sorted(set(_points(order, offset=-1)) | {-1}, reverse=True))
        corr = Corrector(kind="pseudo", order=order + 1, combine=variant,
                         derivatives=tuple(Derivative(points=cpts) for _ in range(order)))
    return Step(t=t, prediction=prediction, order=order, derivatives=derivs, combine=variant, corrector=corr)


def _n_steps(nfe: int, afs: str) -> int:
    # NFE = [afs == none] + (M - 1) for schedules without a last-step corrector.
    n = nfe if afs == "none" else nfe + 1
    if n < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    return n


def _schedule(noise, times, steps, afs) -> SolverSchedule:
    return SolverSchedule(noise_schedule=noise.name, t_start=float(times[0]), afs=afs, steps=tuple(steps))


def ddim(noise, nfe, *, discretization="logsnr_uniform", t_end=None, afs="none", prediction="data", grid=None, **_):
    return dpm_solver_multistep(noise, nfe, order=1, prediction=prediction, discretization=discretization,
                                t_end=t_end, afs=afs, grid=grid)


def dpm_solver_multistep(noise: NoiseSchedule, nfe: int, *, order: int = 2, prediction: str = "data",
                         discretization: str = "logsnr_uniform", t_end: float | None = None, afs: str = "none",
                         lower_order_final: bool = False, exact_third_order: bool = False, grid=None) -> SolverSchedule:
    """DPM-Solver-kM (prediction='noise') / DPM-Solver++(kM) (prediction='data'), k = 1..3.

    The published 3M is the third-order multistep with a factor 1/2 on the second derivative
    (measured order ~2); ``exact_third_order`` drops the factor (order 3)."""
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver multistep order must be 1, 2 or 3, got {order}")
    n = _n_steps(nfe, afs)
    times = _times(noise, n, discretization, t_end, grid)
    d2 = 1.0 if exact_third_order else 0.5
    steps = [_dpm_multistep_step(float(times[i + 1]), o, prediction, d2)
             for i, o in enumerate(_ramp(n, order, lower_order_final))]
    return _schedule(noise, times, steps, afs)


def unipc(noise: NoiseSchedule, nfe: int, *, order: int = 2, variant: str = "bh2", prediction: str = "data",
          discretization: str = "logsnr_uniform", t_end: float | None = None, afs: str = "none",
          lower_order_final: bool = False, grid=None) -> SolverSchedule:
    """UniPC-k: order-k UniP predictor + UniC corrector (B(h) = h for bh1, e^h - 1 for bh2) on every
    step but the last."""
    if order not in (1, 2, 3, 4) or variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC needs order 1..4 and variant bh1/bh2, got {order}, {variant!r}")
    n = _n_steps(nfe, afs)
    times = _times(noise, n, discretization, t_end, grid)
    orders = _ramp(n, order, lower_order_final)
    steps = [_unipc_step(float(times[i + 1]), o, prediction, variant, corrector=i < n - 1) for i, o in enumerate(orders)]
    return _schedule(noise, times, steps, afs)


def _singlestep_orders(nfe: int, order: int, lower_order_final: bool) -> list[int]:
    """Macro-step orders summing to nfe: ``order`` throughout plus a final remainder, or with
    ``lower_order_final`` DPM-Solver's 'fast' plan (third order ends with 2, 1)."""
    if order == 1:
        return [1] * nfe
    if order == 2 or not lower_order_final:
        return [order] * (nfe // order) + ([nfe % order] if nfe % order else [])
    k = nfe // 3 + 1
    if nfe % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if nfe % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


def dpm_solver_singlestep(noise: NoiseSchedule, nfe: int, *, order: int = 3, prediction: str = "noise",
                          discretization: str = "logsnr_uniform", t_end: float | None = None, afs: str = "none",
                          lower_order_final: bool = False, grid=None) -> SolverSchedule:
    """Singlestep DPM-Solver-2/3 (noise) or DPM-Solver++(2S/3S) (data): each macro step of order k
    inserts k - 1 intermediate times (lambda fractions 1/2, or 1/3 and 2/3) and expands from its
    start point (start = -k). The macro grid follows ``discretization``."""
    if order not in (1, 2, 3):
        raise ValueError(f"singlestep order must be 1, 2 or 3, got {order}")
    budget = nfe if afs == "none" else nfe + 1
    macro = _singlestep_orders(budget, order, lower_order_final)
    grid = _times(noise, len(macro), discretization, t_end, grid)
    lam = noise.lambda_(grid)
    steps = []
    for k, o in enumerate(macro):
        la, lb = float(lam[k]), float(lam[k + 1])

        def at(r, la=la, lb=lb) -> float:  # the time at lambda fraction r of this macro step
            return float(noise.inverse_lambda(la + r * (lb - la)))

        if o == 1:
            steps.append(Step(t=float(grid[k + 1]), prediction=prediction, order=1))
        elif o == 2:
            steps.append(Step(t=at(0.5), prediction=prediction, order=1))
            steps.append(Step(t=float(grid[k + 1]), prediction=prediction, order=2, start=-2,
                              derivatives=(Derivative(points=(-1,), relaxation=MIDPOINT),)))
        else:
            steps.append(Step(t=at(1 / 3), prediction=prediction, order=1))
            steps.append(Step(t=at(2 / 3), prediction=prediction, order=2, start=-2,
                              derivatives=(Derivative(points=(-1,)),)))
            steps.append(Step(t=float(grid[k + 1]), prediction=prediction, order=2, start=-3,
                              derivatives=(Derivative(points=(-1,)),)))
    return _schedule(noise, grid, steps, afs)


# Adams-Bashforth weights for equal steps, newest model output first (iPNDM, DEIS paper).
AB_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ipndm_step(t: float, order: int, lams: list[float]) -> Step:
    """The iPNDM step of ``order`` to time t, as a noise-prediction Taylor step whose derivative
    estimates carry per-step scales: ``lams`` are the lambdas of the start point (last) and of the
    order - 1 points before it (newest first), plus lambda_t.

    iPNDM (x~ = x / alpha, s~ = sigma / alpha = e^-lambda): x~_t = x~_s + (s~_t - s~_s) sum_q w_q eps_q
    with the fixed AB weights w. Our update in x~ is x~_s + (s~_t - s~_s) eps_s + sum_n c_n R_n D_n with
    c_n = -s~_t h^(n+1) phi_{n+1}(h) and D_n = sum_q a^(n)_q (eps_q - eps_s), a^(n) = M^-1 e_n,
    M_kq = delta_q^k / k! (delta_q = lambda_q - lambda_s). Matching the eps_q - eps_s terms gives
    c R = (s~_t - s~_s) M w, i.e. R_n = expm1(h) (M w)_n / (h^(n+1) phi_{n+1}(h))."""
    if order == 1:
        return Step(t=t, prediction="noise", order=1)
    *hist, lam_s, lam_t = lams
    h = lam_t - lam_s
    w = AB_WEIGHTS[order][1:]
    deltas = [lam - lam_s for lam in reversed(hist)]  # newest first, as w
    pts = _points(order)
    derivs = []
    for n in range(1, order):
        mw = sum(d**n / math.factorial(n) * wq for d, wq in zip(deltas, w))
        r = math.expm1(h) * mw / (h ** (n + 1) * phi(n + 1, h))
        derivs.append(Derivative(points=pts, relaxation=Relaxation(scale=r)))
    return Step(t=t, prediction="noise", order=order, derivatives=tuple(derivs))


def ipndm(noise: NoiseSchedule, nfe: int, *, order: int = 4, prediction: str = "noise",
          discretization: str = "logsnr_uniform", t_end: float | None = None, afs: str = "none",
          lower_order_final: bool = False, grid=None) -> SolverSchedule:
    """iPNDM (Zhang & Chen, DEIS paper; the GITS/AMED authors' ``ipndm`` sampler): Adams-Bashforth of
    order min(order, i + 1) on d x~ / d s~ = eps with the fixed equal-step weights, whatever the grid.

    Exactly a schedule: each step's fixed weights become scales on its derivative estimates (see
    ``_ipndm_step``), so the scales belong to this grid; moving a time (search mutation) keeps them and
    gives a neighbouring solver, no longer iPNDM."""
    if order not in AB_WEIGHTS:
        raise ValueError(f"iPNDM order must be 1..4, got {order}")
    if prediction != "noise":
        raise ValueError(f"prediction: iPNDM is Adams-Bashforth on the noise prediction, got {prediction!r}")
    n = _n_steps(nfe, afs)
    times = _times(noise, n, discretization, t_end, grid)
    lam = [float(v) for v in noise.lambda_(times)]
    steps = [_ipndm_step(float(times[i + 1]), o, lam[i - o + 1:i + 2])
             for i, o in enumerate(_ramp(n, order, lower_order_final))]
    return _schedule(noise, times, steps, afs)


def _v3_step(t: float, order: int, corrector: bool, pseudo_corrector: bool) -> Step:
    """DPM-Solver-v3 multistep step: order-p predictor on g from the p - 1 previous points, then (if
    ``corrector``) its corrector of order p + 1 from the step's start (-2) with the new point -1 first;
    ``pseudo_corrector``: derivative n from the first n of (-1, -3, -4, ...) (the paper's pseudo-order
    divided differences), else from all of them."""
    derivs = tuple(Derivative(points=_points(order)) for _ in range(order - 1))
    corr = None
    if corrector:
        cpts = (-1, *range(-3, -order - 2, -1))
        corr = Corrector(kind="pseudo", order=order + 1, derivatives=tuple(
            Derivative(points=cpts[:n] if pseudo_corrector else cpts) for n in range(1, order + 1)))
    return Step(t=t, prediction="dpmsolver_v3", order=order, derivatives=derivs, corrector=corr)


def dpm_solver_v3(noise: NoiseSchedule, nfe: int, *, order: int = 3, discretization: str = "logsnr_uniform",
                  t_end: float | None = None, afs: str = "none", lower_order_final: bool = False,
                  corrector: bool = True, pseudo_corrector: bool = True, grid=None, prediction=None) -> SolverSchedule:
    """DPM-Solver-v3 (Zheng, Lu, Chen, Zhu; NeurIPS 2023): the multistep predictor of order
    min(order, i + 1) in the EMS parameterisation (usf/ems.py) and, on every step but the last, its
    pseudo corrector of one order more. Running it needs the model's EMS (``SamplerPlan(..., ems=)``)."""
    if order not in (1, 2, 3, 4):
        raise ValueError(f"DPM-Solver-v3 order must be 1..4, got {order}")
    if prediction not in (None, "dpmsolver_v3"):
        raise ValueError(f"prediction: DPM-Solver-v3 predicts in its own parameterisation, got {prediction!r}")
    n = _n_steps(nfe, afs)
    times = _times(noise, n, discretization, t_end, grid)
    orders = _ramp(n, order, lower_order_final)
    steps = [_v3_step(float(times[i + 1]), o, corrector and i < n - 1, pseudo_corrector) for i, o in enumerate(orders)]
    return _schedule(noise, times, steps, afs)


# name -> (builder, fixed keyword arguments). Options (nfe, order, discretization, t_end, afs,
# lower_order_final, prediction) are passed through.
BASELINES = {
    "ddim": (ddim, {}),
    "dpm_solver_2m": (dpm_solver_multistep, {"order": 2, "prediction": "noise"}),
    "dpm_solver_3m": (dpm_solver_multistep, {"order": 3, "prediction": "noise"}),
    "dpm_solver_3m_exact": (dpm_solver_multistep, {"order": 3, "prediction": "noise", "exact_third_order": True}),
    "dpm_solver_pp_2m": (dpm_solver_multistep, {"order": 2, "prediction": "data"}),
    "dpm_solver_pp_3m": (dpm_solver_multistep, {"order": 3, "prediction": "data"}),
    "dpm_solver_pp_3m_exact": (dpm_solver_multistep, {"order": 3, "prediction": "data", "exact_third_order": True}),
    "dpm_solver_2s": (dpm_solver_singlestep, {"order": 2, "prediction": "noise"}),
    "dpm_solver_3s": (dpm_solver_singlestep, {"order": 3, "prediction": "noise"}),
    "dpm_solver_pp_2s": (dpm_solver_singlestep, {"order": 2, "prediction": "data"}),
    "dpm_solver_pp_3s": (dpm_solver_singlestep, {"order": 3, "prediction": "data"}),
    "unipc_bh1": (unipc, {"variant": "bh1", "order": 2}),
    "unipc_bh2": (unipc, {"variant": "bh2", "order": 2}),
    "unipc_bh1_3": (unipc, {"variant": "bh1", "order": 3}),
    "unipc_bh2_3": (unipc, {"variant": "bh2", "order": 3}),
    "ipndm": (ipndm, {"order": 4}),
    "dpm_solver_v3": (dpm_solver_v3, {"order": 3}),  # needs the model's EMS
    "dpm_solver_v3_2": (dpm_solver_v3, {"order": 2}),
}
NEEDS_EMS = ("dpm_solver_v3", "dpm_solver_v3_2")


def build_baseline(name: str, noise: NoiseSchedule, nfe: int, **options) -> SolverSchedule:
    """Build baseline ``name`` (see BASELINES) at ``nfe``; ``options`` override its defaults."""
    try:
        fn, fixed = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})") from None
    kwargs = {**fixed, **{k: v for k, v in options.items() if v is not None}}
    if kwargs.get("discretization") == "gits" and kwargs.get("grid") is not None:
        kwargs.pop("discretization")  # the GITS times come as grid=
    return fn(noise, nfe, **kwargs)


def grid_steps(name: str, nfe: int, **options) -> int:
    """How many grid intervals baseline ``name`` at ``nfe`` needs (its ``grid=`` has one more time):
    the steps of a multistep solver, the macro steps of a singlestep one."""
    try:
        fn, fixed = BASELINES[name]
    except KeyError:
        raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})") from None
    kw = {**fixed, **{k: v for k, v in options.items() if v is not None}}
    afs = kw.get("afs", "none")
    if fn is dpm_solver_singlestep:
        budget = nfe if afs == "none" else nfe + 1
        return len(_singlestep_orders(budget, kw.get("order", 3), kw.get("lower_order_final", False)))
    return _n_steps(nfe, afs)

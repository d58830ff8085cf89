"""The unified sampler: one code path for every SolverSchedule (USF spec section 3).

All scalar work (phi-functions, derivative weights, relaxations, UniPC B(h) weights) is done once
per (schedule, noise schedule) in float64 and folded into plain linear combinations:

    x_t = a * x_start + sum_j b_j * F_j,   F_j = eps_j (noise prediction) or x0_j (data prediction)

so running a schedule costs one fused multiply-add per history term and step, in the model's dtype.
DPM-Solver-v3 steps (prediction ``dpmsolver_v3``, usf/ems.py) fold the same way, with per-dimension
coefficients and a constant: x_t = a * x_start + sum_j b_j * f_j + c, f_j = (sigma_j eps_j - l_j x_j) / alpha_j.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .ems import EMS
from .noise import NoiseSchedule
from .schedule import Corrector, Derivative, Relaxation, ScheduleError, SolverSchedule

EpsModel = Callable[[torch.Tensor, float], torch.Tensor]  # (x, t) -> eps prediction

# ---------------------------------------------------------------------------------------------
# scalar math (float64)


def phi(k: int, z: float) -> float:
    """phi_k(z): phi_0 = e^z, phi_k(z) = (phi_{k-1}(z) - 1/(k-1)!) / z; series for small |z|."""
    if k == 0:
        return math.exp(z)
    if abs(z) < 1.0:
        # phi_k(z) = sum_j z^j / (j + k)!; 30 terms reach double precision for |z| < 1.
        term, total = 1.0 / math.factorial(k), 0.0
        for j in range(30):
            total += term
            term *= z / (j + k + 1)
        return total
    val = math.expm1(z) / z  # phi_1
    for m in range(2, k + 1):
        val = (val - 1.0 / math.factorial(m - 1)) / z
    return val


def relaxation_factor(r: Relaxation, h_tilde: float) -> float:
    """The factor R(h~) of a Relaxation (see schedule.Relaxation)."""
    if r.kind == "linear":
        return r.scale + r.slope * h_tilde
    em1 = math.expm1(h_tilde)
    denom = h_tilde * h_tilde * phi(2, h_tilde)  # e^h~ - 1 - h~ without cancellation
    if r.kind in ("dpmsolver2", "unipc_bh2"):
        return 0.5 * h_tilde * em1 / denom
    if r.kind == "unipc_bh1":
        return 0.5 * h_tilde * h_tilde / denom
    raise ValueError(f"unknown relaxation {r.kind!r}")


def derivative_weights(deltas: np.ndarray, d: int) -> np.ndarray:
    """Weights a with F^(d)(lambda_s) ~= sum_m a_m (F_m - F_s), for points at lambda_s + deltas.

    Solves M a = e_d with M_km = deltas_m^k / k!, k = 1..K: the d-th derivative of the degree-K
    interpolating polynomial through the start point and the K points."""
    deltas = np.asarray(deltas, dtype=np.float64)
    K = len(deltas)
    k = np.arange(1, K + 1, dtype=np.float64)[:, None]
    fact = np.array([math.factorial(int(i)) for i in k[:, 0]], dtype=np.float64)[:, None]
    M = deltas[None, :] ** k / fact
    e = np.zeros(K)
    e[d - 1] = 1.0
    return np.linalg.solve(M, e)


# ---------------------------------------------------------------------------------------------
# the plan: per-step linear combinations


@dataclass(frozen=True, eq=False)
class Update:
    """x_new = a * x[start] + sum(b * F[j]) over (j, b) in terms (+ bias); F = eps or x0 by ``use_x0``,
    or f with ``use_f`` (DPM-Solver-v3: then a, b and bias are float64 tensors of one sample's shape).
    Indices are absolute history positions."""

    start: int
    a: float | torch.Tensor
    use_x0: bool
    terms: tuple[tuple[int, float | torch.Tensor], ...]
    use_f: bool = False
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class PlannedStep:
    t: float
    predictor: Update
    corrector: Update | None
    implicit: bool
    evaluate: bool  # evaluate the model at the end of this step (needed by later steps / corrector)
    release: tuple[int, ...] = ()  # history entries no later update reads: freed after this step


def _update(pred: str, order: int, derivs: tuple[Derivative, ...], combine: str, start: int,
            n_hist: int, target: int, lams, alphas, sigmas) -> Update:
    """Coefficients of one predictor/corrector update to time index ``target``, starting from
    relative history index ``start`` among the ``n_hist`` oldest entries (absolute indices)."""
    s = n_hist + start  # absolute index of the start point
    lam_s = lams[s]
    h = lams[target] - lam_s
    alpha_t, sigma_t = alphas[target], sigmas[target]
    coef: dict[int, float] = {}

    def add(j: int, v: float):
        coef[j] = coef.get(j, 0.0) + v

    if pred == "data":
        h_tilde, c_t = -h, alpha_t
    else:
        h_tilde, c_t = h, -sigma_t
    # Taylor coefficient of the n-th lambda-derivative: data: +alpha_t h^{n+1} phi_{n+1}(-h);
    # noise: -sigma_t h^{n+1} phi_{n+1}(h). Both are c_t * h^{n+1} * phi_{n+1}(h~).
    taylor = [c_t * h ** (n + 1) * phi(n + 1, h_tilde) for n in range(order)]
    add(s, taylor[0])

    if combine == "taylor":
        for n, d in enumerate(derivs, start=1):
            idx = [n_hist + p for p in d.points]
            deltas = np.array([lams[j] - lam_s for j in idx])
            w = derivative_weights(deltas, n)
            scale = taylor[n] * relaxation_factor(d.relaxation, h_tilde)
            for j, wj in zip(idx, w):
                add(j, scale * wj)
            add(s, -scale * float(w.sum()))
    elif derivs:
        # UniPC: x_t = base - c B(h~) sum_m rho_m (F_m - F_s) / r_m, c = alpha_t (data) or sigma_t
        # (noise), r_m = (lambda_m - lambda_s) / h, rho solving R rho = b with R_km = r_m^(k-1),
        # b_k = k! h~ phi_{k+1}(h~) / B(h~), k = 1..K; with one point rho = 1/2 (as UniPC does).
        idx = [n_hist + p for p in derivs[0].points]
        r = np.array([(lams[j] - lam_s) / h for j in idx])
        K = len(idx)
        B = h_tilde if combine == "bh1" else math.expm1(h_tilde)
        if K == 1:
            rho = np.array([0.5])
        else:
            R = r[None, :] ** np.arange(K, dtype=np.float64)[:, None]
            b = np.array([math.factorial(k) * h_tilde * phi(k + 1, h_tilde) / B for k in range(1, K + 1)])
            rho = np.linalg.solve(R, b)
        # -c equals c_t * h / h~ for both prediction types (taylor[0] = -c expm1(h~)).
        sign_c = c_t * (h / h_tilde)
        for j, rj, rhoj in zip(idx, r, rho):
            v = sign_c * B * rhoj / rj
            add(j, v)
            add(s, -v)
    a = sigma_t / sigmas[s] if pred == "data" else alpha_t / alphas[s]
    terms = tuple((j, float(b)) for j, b in sorted(coef.items()))
    return Update(start=s, a=float(a), use_x0=(pred == "data"), terms=terms)


def _update_v3(order: int, derivs: tuple[Derivative, ...], start: int, n_hist: int, target: int,
               lams, alphas, ems: EMS) -> Update:
    """Coefficients of one DPM-Solver-v3 update (usf/ems.py): y = x / alpha,
    y_t = e^(L_s - L_t) [y_s - sum_n J_n R_n g^(n)(lambda_s) - K], J_n = int_s^t e^(Phi - Phi_s) (u - lambda_s)^n / n!,
    K = int_s^t e^(Phi - Phi_s) beta, with g_j = e^(S_s - S_j) f_j - beta(lambda_j) and g^(n) estimated from
    the g_j as any other derivative (R: linear relaxation with h~ = h)."""
    s = n_hist + start
    lam_s, lam_t = lams[s], lams[target]
    h = lam_t - lam_s
    L_s, L_t, S_s = ems.L(lam_s), ems.L(lam_t), ems.S(lam_s)
    phi_s = L_s + S_s

    def growth(u):  # e^(Phi(u) - Phi_s)
        return np.exp(ems.L(u) + ems.S(u) - phi_s)

    B_s = ems.B(lam_s)

    def beta(u):  # int_s^u e^(S_s - S) b = e^S_s (B(u) - B_s)
        return np.exp(S_s) * (ems.B(u) - B_s)

    def J(n: int):
        return ems.integrate(lambda u: growth(u) * ems._bc((u - lam_s) ** n / math.factorial(n)), lam_s, lam_t)

    P = alphas[target] * np.exp(L_s - L_t)
    cg: dict[int, np.ndarray] = {s: -P * J(0)}  # coefficients of g_j
    for n, d in enumerate(derivs, start=1):
        idx = [n_hist + p for p in d.points]
        w = derivative_weights(np.array([lams[j] - lam_s for j in idx]), n)
        scale = -P * J(n) * relaxation_factor(d.relaxation, h)
        for j, wj in zip(idx, w):
            cg[j] = cg.get(j, 0.0) + scale * wj
        cg[s] = cg[s] - scale * float(w.sum())
    bias = -P * ems.integrate(lambda u: growth(u) * beta(u), lam_s, lam_t)
    terms = []
    for j in sorted(cg):
        terms.append((j, torch.from_numpy(cg[j] * np.exp(S_s - ems.S(lams[j])))))
        if j != s:
            bias = bias - cg[j] * beta(lams[j])
    a = torch.from_numpy(alphas[target] / alphas[s] * np.exp(L_s - L_t))
    return Update(start=s, a=a, use_x0=False, terms=tuple(terms), use_f=True, bias=torch.from_numpy(bias))


def uses_v3(schedule: SolverSchedule) -> int | None:
    """Index of the first dpmsolver_v3 step, or None."""
    return next((i for i, st in enumerate(schedule.steps) if st.prediction == "dpmsolver_v3"), None)


class SamplerPlan:
    """A schedule compiled against a noise schedule: per-step coefficients, ready to run.

    ``eval_entries`` gives, for each model call in order, its history entry (index into ``times``):
    0 for the call at t_start (absent with AFS), i + 1 after step i, twice for an implicit
    corrector; ``len(eval_entries) == nfe()``."""

    def __init__(self, schedule: SolverSchedule, noise: NoiseSchedule, ems: EMS | None = None):
        if schedule.noise_schedule != noise.name:
            raise ScheduleError(
                f"noise_schedule: the schedule is for {schedule.noise_schedule!r}, the model uses {noise.name!r}"
            )
        self.schedule = schedule
        self.noise = noise
        times = schedule.times
        lam = [float(v) for v in noise.lambda_(np.array(times))]
        for i in range(len(schedule.steps)):
            if not lam[i + 1] > lam[i]:
                raise ScheduleError(f"steps[{i}].t: logSNR does not increase from t={times[i]!r} to t={times[i + 1]!r} under {noise.name}")
        if not all(math.isfinite(v) for v in lam):
            raise ScheduleError(f"t_start/steps: a time is outside the range of {noise.name}")
        self.times = times
        self.lambdas = lam
        self.alphas = [float(v) for v in noise.alpha(np.array(times))]
        self.sigmas = [float(v) for v in noise.sigma(np.array(times))]
        first_v3 = uses_v3(schedule)
        self.ems = ems if first_v3 is not None else None
        if first_v3 is not None and ems is None:
            raise ScheduleError(f"steps[{first_v3}].prediction: 'dpmsolver_v3' needs the model's empirical "
                                "model statistics (EMS, usf/ems.py); none were given for this model")
        if self.ems is not None:
            for i, v in enumerate(lam):
                if not self.ems.covers(v):
                    where = "t_start" if i == 0 else f"steps[{i - 1}].t"
                    raise ScheduleError(f"{where}: t={times[i]!r} (lambda {v:.6g}) is outside the EMS grid "
                                        f"[{self.ems.lambdas[0]:.6g}, {self.ems.lambdas[-1]:.6g}]")
            # l at every history entry, for f_j = (sigma_j eps_j - l_j x_j) / alpha_j
            self.l_at = [torch.from_numpy(np.ascontiguousarray(self.ems.at("l", v))) for v in lam]
        last = len(schedule.steps) - 1
        steps = []
        coeffs = (self.lambdas, self.alphas, self.sigmas)

        def update(pred, order, derivs, combine, start, n_hist, target):
            if pred == "dpmsolver_v3":
                return _update_v3(order, derivs, start, n_hist, target, self.lambdas, self.alphas, self.ems)
            return _update(pred, order, derivs, combine, start, n_hist, target, *coeffs)

        for i, st in enumerate(schedule.steps):
            # Before step i the history holds entries 0..i; its corrector also sees entry i + 1.
            pred = update(st.prediction, st.order, st.derivatives, st.combine, st.start, i + 1, i + 1)
            corr, implicit = None, False
            if st.corrector is not None:
                c: Corrector = st.corrector
                corr = update(st.prediction, c.order, c.derivatives, c.combine, st.start - 1, i + 2, i + 1)
                implicit = c.kind == "implicit"
            steps.append(PlannedStep(t=st.t, predictor=pred, corrector=corr, implicit=implicit,
                                     evaluate=(i < last) or st.corrector is not None))
        # Free history entries after their last use, so long schedules and big batches keep only
        # the few tensors they still need (and the allocator recycles memory).
        last_use = {}
        for i, ps in enumerate(steps):
            for u in (ps.predictor, ps.corrector):
                if u is not None:
                    for j in (u.start, *(j for j, _ in u.terms)):
                        last_use[j] = i
        self.steps = tuple(
            PlannedStep(ps.t, ps.predictor, ps.corrector, ps.implicit, ps.evaluate,
                        tuple(j for j, last in last_use.items() if last == i))
            for i, ps in enumerate(steps))
        updates = [u for ps in steps for u in (ps.predictor, ps.corrector) if u is not None]
        self.needs_x0 = any(u.use_x0 for u in updates)
        self.needs_f = any(u.use_f for u in updates)
        # The history entry (index into ``times``) of each model call, in call order.
        calls = [0] if schedule.afs == "none" else []
        for i, ps in enumerate(self.steps):
            if ps.evaluate:
                calls += [i + 1] * (2 if ps.implicit else 1)
        self.eval_entries: tuple[int, ...] = tuple(calls)

    def nfe(self) -> int:
        return self.schedule.nfe()

    @property
    def eval_times(self) -> tuple[float, ...]:
        """The time of each model call, in call order (duplicates for implicit correctors)."""
        return tuple(self.times[j] for j in self.eval_entries)

    def start(self, x_T: torch.Tensor, data_mean: torch.Tensor | None = None) -> PlanRun:
        """A resumable run from x_T (see PlanRun)."""
        return PlanRun(self, x_T, data_mean)

    def run(self, model: EpsModel, x_T: torch.Tensor, data_mean: torch.Tensor | None = None) -> torch.Tensor:
        """Solve from x_T at t_start to the schedule's last time. ``model(x, t)`` returns eps."""
        r = PlanRun(self, x_T, data_mean)
        x = r.first_input()
        while not r.done:
            x = r.advance(model(x, r.pending_time))
        return x

    def _x0(self, x: torch.Tensor, eps: torch.Tensor, j: int) -> torch.Tensor | None:
        """x0 = (x - sigma eps) / alpha at history entry j (skipped when no update uses it)."""
        if not self.needs_x0:
            return None
        return torch.add(x, eps, alpha=-self.sigmas[j]).mul_(1.0 / self.alphas[j])

    def _f(self, x: torch.Tensor, eps: torch.Tensor, j: int) -> torch.Tensor | None:
        """DPM-Solver-v3's f = (sigma eps - l x) / alpha at history entry j (None when unused)."""
        if not self.needs_f:
            return None
        if tuple(x.shape[1:]) != tuple(self.ems.shape):
            raise ValueError(f"the EMS are for samples of shape {tuple(self.ems.shape)}, got {tuple(x.shape[1:])}")
        return (eps * self.sigmas[j] - x * self.l_at[j].to(x)).mul_(1.0 / self.alphas[j])


class PlanRun:
    """One run of a SamplerPlan as a resumable state machine, so that a caller who owns the model
    loop (a diffusers pipeline) runs exactly what ``SamplerPlan.run`` runs:

        x = run.first_input()          # the first model input (x_T, or x_{t1} with AFS)
        while not run.done:
            x = run.advance(model(x, run.pending_time))   # next model input, or the final sample

    ``advance`` takes eps at the pending input. The history is kept (and freed after its last use)
    as in ``run``; ``pending_input`` is the state the pending model call is evaluated at."""

    def __init__(self, plan: SamplerPlan, x_T: torch.Tensor, data_mean: torch.Tensor | None = None):
        self.plan = plan
        self.x_T = x_T
        self.data_mean = data_mean
        self.calls = 0  # model outputs received so far
        self.done = False
        self.pending_input: torch.Tensor | None = None
        self._xs: list = []
        self._epss: list = []
        self._x0s: list = []
        self._fs: list = []
        self._step = -1  # the step whose model call is pending (-1: the call at t_start)
        self._implicit = False  # the pending call re-evaluates an implicit corrector's state
        self._started = False

    @property
    def pending_entry(self) -> int:
        """History entry (index into ``plan.times``) of the pending model call."""
        return self._step + 1

    @property
    def pending_time(self) -> float:
        return self.plan.times[self._step + 1]

    def first_input(self) -> torch.Tensor:
        """Start the run: the first model input, or the final sample if the plan needs no call."""
        if self._started:
            raise RuntimeError("PlanRun.first_input: the run has already started")
        self._started = True
        plan, x_T = self.plan, self.x_T
        self._xs = [x_T]
        afs = plan.schedule.afs
        if afs == "none":
            self.pending_input = x_T
            return x_T
        a0, s0 = plan.alphas[0], plan.sigmas[0]
        if afs == "zero_x0":
            eps = x_T / s0
            x0 = torch.zeros_like(x_T)
        else:
            if self.data_mean is None:
                raise ValueError("afs='mean_x0' needs the data mean (pass data_mean)")
            x0 = self.data_mean.to(x_T).expand_as(x_T)
            eps = (x_T - a0 * x0) / s0
        self._epss, self._x0s, self._fs = [eps], [x0], [plan._f(x_T, eps, 0)]
        return self._predict(0)

    def advance(self, eps: torch.Tensor) -> torch.Tensor:
        """Take eps at ``pending_input``; return the next model input, or the final sample (then
        ``done`` is True)."""
        if not self._started or self.done:
            raise RuntimeError("PlanRun.advance: " + ("call first_input() first" if not self._started
                                                      else "the run is finished"))
        plan = self.plan
        x = self.pending_input
        self.calls += 1
        i = self._step
        j = i + 1  # history index of the pending entry
        if i < 0:  # the model call at t_start
            self._epss, self._x0s, self._fs = [eps], [plan._x0(x, eps, 0)], [plan._f(x, eps, 0)]
            return self._predict(0)
        xs, epss, x0s, fs = self._xs, self._epss, self._x0s, self._fs
        ps = plan.steps[i]
        if self._implicit:
            epss[j] = eps
            x0s[j] = plan._x0(x, eps, j)
            fs[j] = plan._f(x, eps, j)
            self._implicit = False
        else:
            xs.append(x)
            epss.append(eps)
            x0s.append(plan._x0(x, eps, j))
            fs.append(plan._f(x, eps, j))
            if ps.corrector is not None:
                x = _apply(ps.corrector, xs, epss, x0s, fs)
                xs[j] = x
                if ps.implicit:
                    self._implicit = True
                    self.pending_input = x
                    return x
        for k in ps.release:
            xs[k] = epss[k] = x0s[k] = fs[k] = None
        if i + 1 == len(plan.steps):  # a corrector on the last step: its corrected state is the result
            return self._finish(x)
        return self._predict(i + 1)

    def _predict(self, i: int) -> torch.Tensor:
        ps = self.plan.steps[i]
        x = _apply(ps.predictor, self._xs, self._epss, self._x0s, self._fs)
        if not ps.evaluate:
            return self._finish(x)
        self._step = i
        self.pending_input = x
        return x

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        self.done = True
        self.pending_input = None
        self._xs = self._epss = self._x0s = self._fs = []
        return x


def _apply(u: Update, xs, epss, x0s, fs=None) -> torch.Tensor:
    if u.use_f:  # DPM-Solver-v3: per-dimension coefficients
        out = xs[u.start] * u.a.to(xs[u.start])
        for j, b in u.terms:
            out.addcmul_(fs[j], b.to(out))
        return out.add_(u.bias.to(out))
    F = x0s if u.use_x0 else epss
    out = torch.mul(xs[u.start], u.a)  # a fresh tensor: safe to accumulate in place
    for j, b in u.terms:
        out.add_(F[j], alpha=b)
    return out


def sample(schedule: SolverSchedule, model: EpsModel, noise: NoiseSchedule, x_T: torch.Tensor,
           data_mean: torch.Tensor | None = None, ems: EMS | None = None) -> torch.Tensor:
    """Convenience: compile ``schedule`` against ``noise`` (and ``ems`` for v3 steps) and run it from ``x_T``."""
    return SamplerPlan(schedule, noise, ems).run(model, x_T, data_mean)

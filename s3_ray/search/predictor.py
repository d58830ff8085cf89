"""The S³ predictor (USF spec section 4.3): a small network that ranks solver schedules.

``encode`` turns a schedule into a fixed-length float32 vector: per-step blocks (the spec's
decisions plus derived numerical-analysis features of the compiled update) padded to
``max_steps``, then global features (AFS, NFE, M and, by default, the schedule's errors on six
cheap 1-D "probe" diffusion problems with known solutions, see ``probe_errors``).

``Predictor`` maps encodings to a scalar where lower means better: a deep-sets MLP (one MLP shared
by all steps, sum- and max-pooled, then a small head with the global features). It is trained from
scratch on every ``fit`` with a pairwise logistic ranking loss over pairs of schedules *with the
same NFE* (only the relative order within an NFE matters; metric offsets differ between NFEs, so
raw scores are never regressed and their scale is irrelevant), pairs weighted by their rank gap.
Training is full-batch Adam, seeded and deterministic; inputs are standardised with training
statistics kept in the model state. ``state_dict`` is JSON-safe (plain lists and numbers).

Measured (tests/test_predictor.py and the module's development runs, analytic Gaussian-mixture
objective, ~265 training / ~90 held-out schedules at NFE 4-6): held-out Kendall tau 0.6-0.86
with probes, 0.4-0.5 without (``probes=False``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.stats import kendalltau, rankdata

from s3_ray.config import PredictorConfig
from s3_ray.usf.noise import NoiseSchedule
from s3_ray.usf.sampler import SamplerPlan, phi, relaxation_factor
from s3_ray.usf.schedule import MAX_ORDER, SolverSchedule

STATE_VERSION = 2  # 2: the dpmsolver_v3 prediction one-hot
LAMBDA_SCALE = 10.0  # lambda values are divided by this (VP/EDM logSNR spans roughly -10..10)
_PREDICTIONS = ("noise", "data", "dpmsolver_v3")
_RELAX_KINDS = ("linear", "dpmsolver2", "unipc_bh1", "unipc_bh2")
_COMBINES = ("taylor", "bh1", "bh2")
_CORRECTORS = ("none", "pseudo", "implicit")
_AFS = ("none", "zero_x0", "mean_x0")
_MAX_DERIVS = MAX_ORDER - 1  # K is recorded for derivatives 1..3

# Per-step block layout (documented so a reader can decode a vector):
STEP_FEATURES = (
    ["present", "lambda_s", "lambda_t", "h", "log_h"]
    + [f"order_{o}" for o in range(1, MAX_ORDER + 1)]
    + [f"prediction_{p}" for p in _PREDICTIONS]
    + [f"k_deriv_{n}" for n in range(1, _MAX_DERIVS + 1)]
    + [f"relax_{k}" for k in _RELAX_KINDS] + ["relax_scale", "relax_slope", "relax_factor"]
    + [f"combine_{c}" for c in _COMBINES]
    + [f"corrector_{c}" for c in _CORRECTORS] + ["corrector_order"]
    + [f"corrector_combine_{c}" for c in _COMBINES]
    + ["start", "h_from_start"]
    + ["pred_amp", "corr_amp", "local_order"]
    + [f"pred_err_{k}" for k in range(1, 6)] + [f"corr_err_{k}" for k in range(1, 6)]
)
# Probe problems (global features, see ``probe_errors``): 1-D data distributions
# 1/2 N(mu - m, s^2) + 1/2 N(mu + m, s^2), one per tensor column: Gaussians (m = 0) over a range of
# variances, and two bimodal ones (the nonlinear denoiser that makes real data hard).
PROBES = (  # (mu, m, s)
    (0.5, 0.0, 0.1), (-0.3, 0.0, 0.05 ** 0.5), (0.2, 0.0, 0.2 ** 0.5), (0.0, 0.0, 1.0),
    (0.0, 1.0, 0.2), (0.0, 1.0, 0.5),
)
PROBE_BATCH = 16
GLOBAL_FEATURES = ([f"afs_{a}" for a in _AFS] + ["nfe", "n_steps", "lambda_start", "lambda_end"]
                   + [f"probe_log_err_{k}" for k in range(len(PROBES))])


def encoding_length(max_steps: int) -> int:
    return max_steps * len(STEP_FEATURES) + len(GLOBAL_FEATURES)


def _onehot(value, choices) -> list[float]:
    return [1.0 if value == c else 0.0 for c in choices]


def encode(schedule: SolverSchedule, noise: NoiseSchedule, max_steps: int, probes: bool = True) -> np.ndarray:
    """Fixed-length float32 encoding of ``schedule`` (see STEP_FEATURES / GLOBAL_FEATURES).

    Step i goes s = t_i -> t = t_{i+1}; lambda_s/lambda_t are the logSNR at those times (divided by
    LAMBDA_SCALE), h = lambda_t - lambda_s (unscaled). ``start`` is the history offset of the
    expansion point (1 = multistep, p = singlestep), ``h_from_start`` the step measured from it.
    Relaxation features are those of the first derivative (zeros for order 1); ``relax_factor`` is
    the effective factor R(h~) it applies at this step. Steps beyond the schedule are zeros
    (``present`` = 0). Global features: AFS one-hot, NFE, M, lambda at both ends and, with
    ``probes``, the schedule's log errors on the probe problems (zeros without).
    Raises ValueError for schedules longer than ``max_steps``.
    """
    m = len(schedule.steps)
    if m > max_steps:
        raise ValueError(f"schedule has {m} steps, more than the predictor's max_steps={max_steps} "
                         "(raise predictor.max_steps or keep decisions.max_steps below it)")
    if schedule.noise_schedule != noise.name:
        raise ValueError(f"schedule is for noise schedule {schedule.noise_schedule!r}, the predictor uses {noise.name!r}")
    lam = np.asarray(noise.lambda_(np.asarray(schedule.times, dtype=np.float64)), dtype=np.float64)
    plan = SamplerPlan(_without_v3(schedule), noise)
    n_step = len(STEP_FEATURES)
    out = np.zeros(max_steps * n_step + len(GLOBAL_FEATURES), dtype=np.float64)
    for i, st in enumerate(schedule.steps):
        lam_s, lam_t = float(lam[i]), float(lam[i + 1])
        h = lam_t - lam_s
        start_idx = i + 1 + st.start  # absolute time index of the expansion point
        h_start = lam_t - float(lam[start_idx])
        ks = [float(len(d.points)) for d in st.derivatives[:_MAX_DERIVS]]
        ks += [0.0] * (_MAX_DERIVS - len(ks))
        if st.derivatives:
            r = st.derivatives[0].relaxation
            h_tilde = h_start if st.prediction == "noise" else -h_start
            relax = _onehot(r.kind, _RELAX_KINDS) + [r.scale, r.slope, _safe(relaxation_factor(r, h_tilde))]
        else:
            relax = [0.0] * (len(_RELAX_KINDS) + 3)
        c = st.corrector
        corr = _onehot(c.kind if c else "none", _CORRECTORS) + [float(c.order) if c else 0.0]
        corr += _onehot(c.combine, _COMBINES) if c else [0.0] * len(_COMBINES)
        block = ([1.0, lam_s / LAMBDA_SCALE, lam_t / LAMBDA_SCALE, h, math.log(max(h, 1e-8))]
                 + _onehot(st.order, range(1, MAX_ORDER + 1)) + _onehot(st.prediction, _PREDICTIONS)
                 + ks + relax + _onehot(st.combine, _COMBINES) + corr + [float(-st.start), h_start]
                 + [_amp(plan.steps[i].predictor), _amp(plan.steps[i].corrector), _local_order(st)]
                 + _poly_errors(plan.steps[i].predictor, plan, i + 1) + _poly_errors(plan.steps[i].corrector, plan, i + 1))
        out[i * n_step:(i + 1) * n_step] = block
    g = _onehot(schedule.afs, _AFS) + [float(schedule.nfe()), float(m), lam[0] / LAMBDA_SCALE, lam[-1] / LAMBDA_SCALE]
    g += probe_errors(plan) if probes else [0.0] * len(PROBES)
    out[max_steps * n_step:] = g
    return out.astype(np.float32)


def _without_v3(schedule: SolverSchedule) -> SolverSchedule:
    """The schedule with DPM-Solver-v3 steps read as data-prediction steps (v3 with l = 1, s = b = 0):
    the coefficient and probe features need no model statistics; the step's one-hot says it is v3."""
    if all(st.prediction != "dpmsolver_v3" for st in schedule.steps):
        return schedule
    d = schedule.model_dump()
    for st in d["steps"]:
        if st["prediction"] == "dpmsolver_v3":
            st["prediction"] = "data"
    return SolverSchedule.model_validate(d)


def _amp(u) -> float:
    """log of sum|b| / |sum b| over the update's model-output coefficients: how much the
    extrapolation amplifies model errors (0 for a plain DDIM step, large for ill-posed sets)."""
    if u is None:
        return 0.0
    b = np.array([v for _, v in u.terms], dtype=np.float64)
    tot = abs(float(b.sum()))
    return _safe(math.log(float(np.abs(b).sum()) / tot), 50.0) if tot > 0 else 50.0


_POLY_K = 5
_NO_ERR = -10.0  # log10 of a vanishing error


def _poly_errors(u, plan: SamplerPlan, target: int) -> list[float]:
    """log10 relative local errors of one compiled update on F(lambda) = (lambda - lambda_s)^k / k!,
    k = 1..5: |sum_j b_j F(lambda_j) - exact| / |exact for F = 1|, where exact is the
    exponential integral c_t H^(k+1) phi_(k+1)(h~). Measures order and error constant of the
    update as the schedule's times actually place its history points."""
    if u is None:
        return [0.0] * _POLY_K
    lams = plan.lambdas
    lam_s = lams[u.start]
    H = lams[target] - lam_s
    h_tilde = -H if u.use_x0 else H
    c_t = plan.alphas[target] if u.use_x0 else -plan.sigmas[target]
    js = np.array([j for j, _ in u.terms])
    b = np.array([v for _, v in u.terms], dtype=np.float64) / c_t
    d = np.array([lams[j] for j in js]) - lam_s
    i0 = abs(H * phi(1, h_tilde))
    out = []
    for k in range(1, _POLY_K + 1):
        exact = H ** (k + 1) * phi(k + 1, h_tilde)
        approx = float((b * d**k).sum()) / math.factorial(k)
        e = abs(approx - exact) / i0
        out.append(float(np.clip(math.log10(e), _NO_ERR, 10.0)) if e > 0 and math.isfinite(e) else (_NO_ERR if e == 0 else 10.0))
    return out


def _local_order(st) -> float:
    """Order of the local error of the predictor: h^(p+1) truncation; a derivative from K points
    adds h^(K+2)."""
    orders = [st.order + 1] + [len(d.points) + 2 for d in st.derivatives]
    return float(min(orders))


def _safe(v: float, bound: float = 1e3) -> float:
    return float(np.clip(v, -bound, bound)) if math.isfinite(v) else bound


def _probe_x0(x, a: float, sg: float, mu, m, s2):
    """Posterior mean E[x0 | x_t = x] of the probe mixtures, elementwise per column (works on
    torch tensors and numpy arrays): x0 = c + a s^2 / v (x - a c), c = mu + m tanh(a m (x - a mu) / v)."""
    v = a * a * s2 + sg * sg
    u = a * m * (x - a * mu) / v
    c = mu + m * (u.tanh() if isinstance(u, torch.Tensor) else np.tanh(u))
    return c + a * s2 / v * (x - a * c)


def _probe_arrays():
    mu, m, s = (np.array(v, dtype=np.float64) for v in zip(*PROBES))
    return mu, m, s * s


def _probe_start(noise: NoiseSchedule, t_start: float) -> np.ndarray:
    """Fixed-seed draw from each probe's exact marginal at t_start, [PROBE_BATCH, n_probes]."""
    mu, m, s2 = _probe_arrays()
    a, sg = float(noise.alpha(t_start)), float(noise.sigma(t_start))
    rng = np.random.default_rng(0)
    sign = np.where(rng.random((PROBE_BATCH, len(PROBES))) < 0.5, -1.0, 1.0)
    z = rng.standard_normal((PROBE_BATCH, len(PROBES)))
    return a * (mu + sign * m) + np.sqrt(a * a * s2 + sg * sg) * z


_PROBE_REFERENCE: dict = {}  # (noise spec, t_start) -> (lambda_hi, dense ODE solution of x / alpha)


def _probe_reference(noise: NoiseSchedule, t_start: float, t_end: float) -> np.ndarray:
    """Reference solution of the probes' probability-flow ODE at t_end: DOP853 in lambda (tight
    tolerances) with dense output, computed once per (noise schedule, t_start) and extended only
    when a schedule ends beyond the solved range."""
    key = (json.dumps(noise.spec(), sort_keys=True, default=str), float(t_start))
    lam_end = float(noise.lambda_(t_end))
    hit = _PROBE_REFERENCE.get(key)
    if hit is None or lam_end > hit[0]:
        mu, m, s2 = _probe_arrays()
        lam0 = float(noise.lambda_(t_start))
        lam_hi = max(lam_end, float(noise.lambda_(noise.t_end_default))) + 1.0
        if getattr(noise, "t_min", 0.0) > 0:
            lam_hi = max(min(lam_hi, float(noise.lambda_(noise.t_min))), lam_end)
        x_T = _probe_start(noise, t_start)
        shape = x_T.shape

        def rhs(lam, y):
            t = float(noise.inverse_lambda(lam))
            a, sg = float(noise.alpha(t)), float(noise.sigma(t))
            x = y.reshape(shape) * a
            eps = (x - a * _probe_x0(x, a, sg, mu, m, s2)) / sg
            return (-math.exp(-lam) * eps).reshape(-1)

        y0 = (x_T / float(noise.alpha(t_start))).reshape(-1)
        sol = solve_ivp(rhs, (lam0, lam_hi), y0, method="DOP853", rtol=1e-10, atol=1e-10, dense_output=True)
        if not sol.success:
            raise RuntimeError(f"probe reference solve failed: {sol.message}")
        hit = _PROBE_REFERENCE[key] = (lam_hi, sol.sol)
    return hit[1](lam_end).reshape(PROBE_BATCH, len(PROBES)) * float(noise.alpha(t_end))


def probe_errors(plan: SamplerPlan) -> list[float]:
    """log relative RMSE of the compiled schedule on each probe problem (see PROBES).

    x_T is a fixed-seed draw from each probe's exact marginal at t_start; the reference is a
    tight-tolerance ODE solve to the schedule's last time (cached); the data mean is passed for AFS
    mean_x0. A cheap, model-independent measure of the schedule's accuracy and stability on real
    (if simple) diffusion ODEs: one sampler run on a 16x6 tensor. The RMSE is relative to each
    probe's data std; results are clipped to [-30, 30] (non-finite -> 30)."""
    noise = plan.noise
    mu, m, s2 = (torch.from_numpy(v) for v in _probe_arrays())

    def eps_model(x, t):
        a, sg = float(noise.alpha(t)), float(noise.sigma(t))
        return (x - a * _probe_x0(x, a, sg, mu, m, s2)) / sg

    x_T = torch.from_numpy(_probe_start(noise, plan.times[0]))
    exact = torch.from_numpy(_probe_reference(noise, plan.times[0], plan.times[-1]))
    with np.errstate(all="ignore"):
        out = plan.run(eps_model, x_T, data_mean=mu)
        rmse = ((out - exact) ** 2).mean(0).sqrt() / (m * m + s2).sqrt()
    return [float(np.clip(math.log(r), -30.0, 30.0)) if math.isfinite(r) and r > 0 else (-30.0 if r == 0 else 30.0)
            for r in rmse.tolist()]


def encode_many(schedules: Sequence[SolverSchedule], noise: NoiseSchedule, max_steps: int,
                probes: bool = True) -> np.ndarray:
    n = encoding_length(max_steps)
    if len(schedules) == 0:
        return np.zeros((0, n), dtype=np.float32)
    return np.stack([encode(s, noise, max_steps, probes) for s in schedules])


# ---------------------------------------------------------------------------------------------
# scores -> same-NFE ordered pairs


def clean_scores(scores) -> np.ndarray:
    """float64 scores with NaN/+-Inf replaced by a value worse than every finite one."""
    s = np.asarray(scores, dtype=np.float64).copy()
    bad = ~np.isfinite(s)
    if bad.any():
        finite = s[~bad]
        worst = (float(finite.max()) + 1.0 + abs(float(finite.max()))) if finite.size else 1.0
        s[bad] = worst
    return s


def _group_ranks(nfes, scores) -> np.ndarray:
    """Rank of each score within its NFE group, scaled to [0, 1] (ties share the mean rank)."""
    nfes, s = np.asarray(nfes), clean_scores(scores)
    out = np.zeros(s.size)
    for v in np.unique(nfes):
        idx = np.flatnonzero(nfes == v)
        out[idx] = (rankdata(s[idx]) - 1) / max(idx.size - 1, 1)
    return out


def ranking_pairs(nfes, scores, max_pairs: int | None = None, rng: np.random.Generator | None = None):
    """Index arrays (better, worse) of all pairs with equal NFE and strictly lower score first
    (ties give no pair). With ``max_pairs`` a seeded uniform subsample is drawn."""
    nfes = np.asarray(nfes)
    s = clean_scores(scores)
    better, worse = [], []
    for v in np.unique(nfes):
        idx = np.flatnonzero(nfes == v)
        if idx.size < 2:
            continue
        a, b = np.meshgrid(idx, idx, indexing="ij")
        sel = s[a] < s[b]
        better.append(a[sel])
        worse.append(b[sel])
    if not better:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    bi, wi = np.concatenate(better), np.concatenate(worse)
    if max_pairs is not None and bi.size > max_pairs:
        rng = rng or np.random.default_rng(0)
        keep = np.sort(rng.choice(bi.size, size=max_pairs, replace=False))
        bi, wi = bi[keep], wi[keep]
    return bi.astype(np.int64), wi.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# the model


class _Adam:
    """Adam with L2 weight decay, the update of ``torch.optim.Adam(params, lr, weight_decay=wd)``.
    Written out because constructing ``torch.optim.Adam`` first imports ``torch._dynamo``
    (measured: 1.1-1.3 s on an idle machine, 3.3 s under load, on the search driver's first stage
    while every worker waits), and its step took 1.7-1.9x as long as this one (334-378 vs 201 us
    for the predictor's 8 tensors, one thread)."""

    def __init__(self, params: list[torch.Tensor], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.wd, self.betas, self.eps = params, lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self, grads) -> None:
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if self.wd:
                g = g.add(p, alpha=self.wd)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v / c2).sqrt_().add_(self.eps), value=-self.lr / c1)


class Predictor:
    """Ranks schedules: ``predict`` returns a score where lower = predicted better."""

    max_pairs = 50_000  # pairs per fit (subsampled, seeded, beyond this)

    def __init__(self, cfg: PredictorConfig, noise: NoiseSchedule, seed: int = 0, probes: bool | None = None,
                 encoding_cache: dict | None = None):
        """``encoding_cache`` (schedule hash -> input vector) may be shared by predictors with the
        same noise schedule, ``max_steps`` and probes setting, e.g. across a search's stages."""
        self.cfg = cfg
        self.encoding_cache = encoding_cache
        self.noise = noise
        self.seed = int(seed)
        self.probes = cfg.probes if probes is None else bool(probes)
        self.input_dim = encoding_length(cfg.max_steps)
        self.mean = np.zeros(self.input_dim, dtype=np.float32)
        self.std = np.ones(self.input_dim, dtype=np.float32)
        self.fitted = False
        self.n_train = 0
        self.n_pairs = 0
        self.final_loss = float("nan")
        self.params = self._init_params()

    def __getstate__(self):  # to a planning process: without the (shared, large) encoding cache
        return {**self.__dict__, "encoding_cache": None}

    # ---- network ----------------------------------------------------------------------------
    # Deep-sets over steps: phi (an MLP with ``cfg.hidden``) maps every present step block to a
    # vector; the vectors are summed (errors accumulate over steps) and, with the global
    # features, fed to a one-hidden-layer head giving the scalar. Sharing phi across positions is
    # what makes it work from a few hundred evaluated schedules.
    def _sizes(self) -> list[tuple[int, int]]:
        n_step, n_glob = len(STEP_FEATURES), len(GLOBAL_FEATURES)
        h = list(self.cfg.hidden) or [32]
        sizes = list(zip([n_step, *h[:-1]], h))
        sizes += [(2 * h[-1] + n_glob, h[-1]), (h[-1], 1)]
        return sizes

    def _shapes(self) -> list[tuple[int, ...]]:
        """The parameter shapes ``_init_params`` makes: [W, b] per layer."""
        return [shape for fan_in, fan_out in self._sizes() for shape in ((fan_out, fan_in), (fan_out,))]

    def _init_params(self) -> list[torch.Tensor]:
        """[W, b] per layer with PyTorch's default Linear init, from a seeded generator."""
        g = torch.Generator().manual_seed(self.seed)
        params = []
        for fan_in, fan_out in self._sizes():
            bound = 1.0 / math.sqrt(fan_in)
            params.append((torch.rand(fan_out, fan_in, generator=g, dtype=torch.float32) * 2 - 1) * bound)
            params.append((torch.rand(fan_out, generator=g, dtype=torch.float32) * 2 - 1) * bound)
        return params

    def _forward(self, inputs, params: list[torch.Tensor]) -> torch.Tensor:
        steps, owner, glob = inputs
        silu, linear = torch.nn.functional.silu, torch.nn.functional.linear
        z = steps
        for k in range(len(params) // 2 - 2):
            z = silu(linear(z, params[2 * k], params[2 * k + 1]))
        n, width = glob.shape[0], z.shape[1]
        total = torch.zeros(n, width, dtype=z.dtype).index_add(0, owner, z)
        worst = torch.zeros(n, width, dtype=z.dtype).scatter_reduce(
            0, owner[:, None].expand(-1, width), z, "amax", include_self=False)
        z = silu(linear(torch.cat([total, worst, glob], 1), params[-4], params[-3]))
        return linear(z, params[-2], params[-1])[:, 0]

    def _inputs(self, x: np.ndarray):
        """(present step blocks [P, F], their schedule index [P], global features [B, G]), standardised."""
        n_step, S = len(STEP_FEATURES), self.cfg.max_steps
        xs = ((x - self.mean) / self.std).astype(np.float32)
        blocks = xs[:, :S * n_step].reshape(-1, n_step)
        present = x[:, :S * n_step].reshape(-1, n_step)[:, 0] > 0
        owner = np.repeat(np.arange(x.shape[0]), S)[present]
        return (torch.from_numpy(np.ascontiguousarray(blocks[present])), torch.from_numpy(owner.astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(xs[:, S * n_step:])))

    def _standardise_from(self, x: np.ndarray) -> None:
        """Input statistics from training encodings: step features share one mean/std over all
        present steps (whatever their position); global features have their own."""
        n_step, S = len(STEP_FEATURES), self.cfg.max_steps
        steps = x[:, :S * n_step].reshape(-1, n_step).astype(np.float64)
        steps = steps[steps[:, 0] > 0]
        glob = x[:, S * n_step:].astype(np.float64)

        def stats(a, n):
            if a.shape[0] == 0:
                return np.zeros(n), np.ones(n)
            sd = a.std(0)
            return a.mean(0), np.where(sd > 1e-6, sd, 1.0)

        sm, ss = stats(steps, n_step)
        gm, gs = stats(glob, len(GLOBAL_FEATURES))
        self.mean = np.concatenate([np.tile(sm, S), gm]).astype(np.float32)
        self.std = np.concatenate([np.tile(ss, S), gs]).astype(np.float32)

    def _encode(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        if self.encoding_cache is None or not schedules:
            return encode_many(schedules, self.noise, self.cfg.max_steps, self.probes)
        keys = [s.schedule_hash() for s in schedules]
        missing = {k: s for k, s in zip(keys, schedules) if k not in self.encoding_cache}
        if missing:
            x = encode_many(list(missing.values()), self.noise, self.cfg.max_steps, self.probes)
            self.encoding_cache.update(zip(missing, x))
        return np.stack([self.encoding_cache[k] for k in keys])

    # ---- training ---------------------------------------------------------------------------
    def fit(self, schedules: Sequence[SolverSchedule], scores, start_from: Predictor | None = None) -> Predictor:
        """Train on (schedule, score) pairs; lower score = better. Deterministic. From scratch
        (``cfg.epochs``), or with ``start_from`` an incremental update: from that predictor's weights
        and input scaling, ``cfg.refit_epochs`` epochs (``cfg.epochs`` when unset)."""
        schedules = list(schedules)
        scores = np.asarray(scores, dtype=np.float64)
        if len(schedules) != scores.shape[0]:
            raise ValueError(f"{len(schedules)} schedules but {scores.shape[0]} scores")
        x = self._encode(schedules)
        if start_from is None:
            self._standardise_from(x)
            self.params, epochs = self._init_params(), self.cfg.epochs
        else:
            if [tuple(t.shape) for t in start_from.params] != self._shapes():
                raise ValueError("start_from: a predictor with another network shape")
            self.mean, self.std = start_from.mean.copy(), start_from.std.copy()
            self.params, epochs = [p.clone() for p in start_from.params], self.cfg.refit_epochs or self.cfg.epochs
        rng = np.random.default_rng(self.seed)
        nfes = np.array([s.nfe() for s in schedules], dtype=np.int64)
        bi, wi = ranking_pairs(nfes, scores, self.max_pairs, rng)
        self.n_train, self.n_pairs, self.fitted = len(schedules), int(bi.size), True
        self.final_loss = float("nan")
        if bi.size == 0:
            return self
        inputs = self._inputs(x)
        bt, wt = torch.from_numpy(bi), torch.from_numpy(wi)
        # Pairs far apart in rank weigh more: near-ties are mostly evaluation noise.
        r = _group_ranks(nfes, scores)
        pw = torch.from_numpy(np.abs(r[wi] - r[bi]).astype(np.float32))
        pw = pw / pw.mean()
        params = [p.clone().requires_grad_(True) for p in self.params]
        adam = _Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        for _ in range(epochs):
            f = self._forward(inputs, params)
            # want f[better] < f[worse]: logistic loss on the margin
            lp = torch.nn.functional.softplus(f[bt] - f[wt])
            loss = (lp * pw).mean()
            adam.step(torch.autograd.grad(loss, params))
        self.final_loss = float(loss.detach())
        self.params = [p.detach().clone() for p in params]
        return self

    # ---- inference --------------------------------------------------------------------------
    def predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        """Predicted scores (float64, lower = better); comparable only within one NFE."""
        schedules = list(schedules)
        if not schedules:
            return np.zeros(0, dtype=np.float64)
        with torch.no_grad():
            x = self._encode(schedules)
            return self._forward(self._inputs(x), self.params).double().numpy()

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-safe state (plain lists/numbers); ``Predictor.from_state(state, noise)`` restores it."""
        return {
            "version": STATE_VERSION,
            "cfg": self.cfg.model_dump(mode="json"),
            "noise_schedule": self.noise.name,
            "seed": self.seed,
            "probes": self.probes,
            "input_dim": self.input_dim,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "params": [p.tolist() for p in self.params],
            "fitted": self.fitted,
            "n_train": self.n_train,
            "n_pairs": self.n_pairs,
            "final_loss": None if math.isnan(self.final_loss) else self.final_loss,
        }

    @classmethod
    def from_state(cls, state: dict, noise: NoiseSchedule) -> Predictor:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"predictor state version {state.get('version')!r} is not supported (expected {STATE_VERSION})")
        if state["noise_schedule"] != noise.name:
            raise ValueError(f"predictor state is for noise schedule {state['noise_schedule']!r}, not {noise.name!r}")
        cfg = PredictorConfig.model_validate(state["cfg"])
        p = cls(cfg, noise, state["seed"], probes=state["probes"])
        if state["input_dim"] != p.input_dim:
            raise ValueError(f"predictor state has input_dim {state['input_dim']}, this encoding has {p.input_dim}")
        p.mean = np.asarray(state["mean"], dtype=np.float32)
        p.std = np.asarray(state["std"], dtype=np.float32)
        params = [torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in state["params"]]
        if [tuple(t.shape) for t in params] != [tuple(t.shape) for t in p.params]:
            raise ValueError("predictor state parameter shapes do not match its configuration")
        p.params = params
        p.fitted = bool(state["fitted"])
        p.n_train = int(state["n_train"])
        p.n_pairs = int(state["n_pairs"])
        p.final_loss = float("nan") if state["final_loss"] is None else float(state["final_loss"])
        return p


class ForestPredictor:
    """``predictor.model: forest``: a random forest (scikit-learn) regressing the log score on the
    schedules' encodings. Unlike the network it needs no input scaling and no pairs, and its trees
    vote independently: it ranks a stage's proposals better than the network (it cannot extrapolate
    past its training scores, where the network's top picks are its most optimistic errors), but a
    search with it finds worse schedules (README, "predictor.model"). ``predict_trees`` is the
    spread for 'ucb'."""

    def __init__(self, cfg: PredictorConfig, noise: NoiseSchedule, seed: int = 0, probes: bool | None = None,
                 encoding_cache: dict | None = None):
        self.cfg, self.noise, self.seed, self.encoding_cache = cfg, noise, int(seed), encoding_cache
        self.probes = cfg.probes if probes is None else bool(probes)
        self.forest = None
        self.fitted, self.n_train, self.n_pairs, self.final_loss = False, 0, 0, float("nan")

    __getstate__ = Predictor.__getstate__
    _encode = Predictor._encode

    @staticmethod
    def target(scores) -> np.ndarray:
        """What the trees regress: log score (a failed schedule is worse than every finite one);
        scores that are not all positive (KID) are shifted to start at a small positive value."""
        s = clean_scores(scores)
        if s.size and s.min() <= 0:
            spread = float(s.max() - s.min())
            s = s - s.min() + (1e-3 * spread if spread > 0 else 1.0)
        return np.log(s)

    def fit(self, schedules: Sequence[SolverSchedule], scores, start_from=None) -> ForestPredictor:
        """Train on (schedule, score) pairs; lower score = better. Deterministic (seeded, one thread)."""
        from sklearn.ensemble import RandomForestRegressor

        if start_from is not None:
            raise ValueError("start_from: incremental fits are for model 'net'")
        schedules, scores = list(schedules), np.asarray(scores, dtype=np.float64)
        if len(schedules) != scores.shape[0]:
            raise ValueError(f"{len(schedules)} schedules but {scores.shape[0]} scores")
        self.n_train, self.fitted = len(schedules), True
        if not schedules:
            return self
        self.forest = RandomForestRegressor(self.cfg.trees, min_samples_leaf=self.cfg.min_leaf,
                                            random_state=self.seed % 2**32, n_jobs=1)
        self.forest.fit(self._encode(schedules), self.target(scores))
        return self

    def predict(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        """Predicted log scores (float64, lower = better)."""
        return self.predict_trees(schedules).mean(0)

    def predict_trees(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        """[trees, schedules]: every tree's prediction (an unfitted forest predicts 0)."""
        schedules = list(schedules)
        if self.forest is None or not schedules:
            return np.zeros((self.cfg.trees, len(schedules)))
        x = self._encode(schedules).astype(np.float32)
        return np.stack([t.predict(x) for t in self.forest.estimators_]).astype(np.float64)


def make_predictor(cfg: PredictorConfig, noise: NoiseSchedule, seed: int = 0, probes: bool | None = None,
                   encoding_cache: dict | None = None) -> Predictor | ForestPredictor:
    """The predictor ``cfg.model`` names."""
    kind = ForestPredictor if cfg.model == "forest" else Predictor
    return kind(cfg, noise, seed, probes=probes, encoding_cache=encoding_cache)


class PredictorEnsemble:
    """``cfg.ensemble`` predictors: member i is trained from seed ``seed + 1000 i`` on a seeded
    bootstrap resample of the training schedules (one member: all of them, exactly ``Predictor``).
    ``acquire`` ranks candidates by ``cfg.acquisition``; a member's outputs have no unit, so each is
    standardised over the candidates of each NFE before the members are combined."""

    def __init__(self, cfg: PredictorConfig, noise: NoiseSchedule, seed: int = 0, encoding_cache: dict | None = None):
        self.cfg, self.noise, self.seed, self.encoding_cache = cfg, noise, int(seed), encoding_cache
        self.members: list[Predictor] = []

    def __getstate__(self):
        return {**self.__dict__, "encoding_cache": None}

    def fit(self, schedules: Sequence[SolverSchedule], scores,
            start_from: PredictorEnsemble | None = None) -> PredictorEnsemble:
        """Train every member; with ``start_from`` (an ensemble of the same size) member i is an
        incremental update of its member i (``Predictor.fit``)."""
        schedules, scores = list(schedules), np.asarray(scores, dtype=np.float64)
        if start_from is not None and len(start_from.members) != self.cfg.ensemble:
            raise ValueError(f"start_from has {len(start_from.members)} members, this ensemble {self.cfg.ensemble}")
        rng = np.random.default_rng(self.seed)
        self.members = []
        for i in range(self.cfg.ensemble):
            idx = np.arange(len(schedules)) if self.cfg.ensemble == 1 else np.sort(rng.integers(0, len(schedules), len(schedules)))
            member = make_predictor(self.cfg, self.noise, seed=self.seed + 1000 * i, encoding_cache=self.encoding_cache)
            self.members.append(member.fit([schedules[j] for j in idx], scores[idx],
                                           start_from.members[i] if start_from is not None else None))
        return self

    def state_dict(self) -> dict:
        """JSON-safe: the seed and every member's ``Predictor.state_dict`` (model 'net' only)."""
        return {"seed": self.seed, "members": [m.state_dict() for m in self.members]}

    @classmethod
    def from_state(cls, state: dict, cfg: PredictorConfig, noise: NoiseSchedule,
                   encoding_cache: dict | None = None) -> PredictorEnsemble:
        e = cls(cfg, noise, seed=state["seed"], encoding_cache=encoding_cache)
        e.members = [Predictor.from_state(m, noise) for m in state["members"]]
        for m in e.members:
            m.encoding_cache = encoding_cache
        return e

    def predict_members(self, schedules: Sequence[SolverSchedule]) -> np.ndarray:
        """[members, candidates]: each member's predictions, standardised within each NFE (one member:
        its raw predictions; a forest: its trees' raw predictions, which share one unit)."""
        if self.cfg.model == "forest":
            return self.members[0].predict_trees(list(schedules))
        raw = np.stack([m.predict(schedules) for m in self.members]) if schedules else np.zeros((len(self.members), 0))
        if len(self.members) == 1:
            return raw
        nfes = np.array([s.nfe() for s in schedules])
        for v in np.unique(nfes):
            sel = nfes == v
            block = raw[:, sel]
            sd = block.std(1, keepdims=True)
            raw[:, sel] = (block - block.mean(1, keepdims=True)) / np.where(sd > 0, sd, 1.0)
        return raw

    def acquire(self, schedules: Sequence[SolverSchedule]) -> tuple[np.ndarray, np.ndarray]:
        """(acquisition value: lower = evaluate first, the members' mean prediction), per candidate."""
        z = self.predict_members(list(schedules))
        mean = z.mean(0)
        if self.cfg.acquisition == "ucb":
            return mean - self.cfg.kappa * z.std(0), mean
        return mean, mean


# ---------------------------------------------------------------------------------------------
# quality


def kendall_tau(predicted, true) -> float:
    """Kendall tau-b between predicted and true scores (non-finite true scores count as worst).
    0.0 where it is undefined (fewer than 2 items or a constant input)."""
    p = np.asarray(predicted, dtype=np.float64)
    t = clean_scores(true)
    if p.size < 2:
        return 0.0
    tau = kendalltau(p, t).statistic
    return float(tau) if math.isfinite(tau) else 0.0


def heldout_split(nfes, holdout_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split stratified by NFE: (train indices, held-out indices)."""
    nfes = np.asarray(nfes)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for v in np.unique(nfes):
        idx = rng.permutation(np.flatnonzero(nfes == v))
        k = round(holdout_frac * idx.size)
        test.append(idx[:k])
        train.append(idx[k:])
    cat = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    return cat(train), cat(test)


def per_nfe_tau(nfes, predicted, true, min_group: int = 3) -> float:
    """Mean Kendall tau within each NFE group (weighted by group size; groups < min_group skipped).
    NaN when no group qualifies."""
    nfes = np.asarray(nfes)
    predicted, true = np.asarray(predicted), np.asarray(true)
    total, weight = 0.0, 0
    for v in np.unique(nfes):
        idx = np.flatnonzero(nfes == v)
        if idx.size < min_group:
            continue
        total += idx.size * kendall_tau(predicted[idx], true[idx])
        weight += idx.size
    return total / weight if weight else float("nan")


def heldout_tau(schedules: Sequence[SolverSchedule], scores, cfg: PredictorConfig, noise: NoiseSchedule,
                seed: int = 0, holdout_frac: float = 0.25, probes: bool | None = None,
                encoding_cache: dict | None = None) -> float:
    """Fit on a seeded NFE-stratified split; mean per-NFE Kendall tau on the held-out part
    (weighted by group size; groups with < 3 held-out items skipped; NaN if none qualifies)."""
    if not 0 < holdout_frac < 1:
        raise ValueError(f"holdout_frac must be in (0, 1), got {holdout_frac}")
    schedules = list(schedules)
    scores = np.asarray(scores, dtype=np.float64)
    nfes = np.array([s.nfe() for s in schedules], dtype=np.int64)
    tr, te = heldout_split(nfes, holdout_frac, seed)
    if te.size == 0:
        return float("nan")
    p = make_predictor(cfg, noise, seed, probes=probes, encoding_cache=encoding_cache).fit([schedules[i] for i in tr], scores[tr])
    pred = p.predict([schedules[i] for i in te])
    return per_nfe_tau(nfes[te], pred, scores[te])

"""DPM-Solver-v3's empirical model statistics (EMS) and the integrals its updates need.

DPM-Solver-v3 (Zheng, Lu, Chen, Zhu; NeurIPS 2023) rewrites the ODE d(x/alpha)/dlambda = -(sigma/alpha) eps
with three per-lambda, per-dimension statistics of the model:

    f(x, lambda) = (sigma eps(x) - l x) / alpha          (l: a diagonal Jacobian estimate)
    y = x / alpha,  dy/dlambda = -l y - f
    f' ~= s f + b along the model's own trajectories    (s, b: a per-dimension least-squares fit)

    l  = sigma E[diag(d eps / d x)]                       (Hutchinson: E_v[v * (J v)], v Rademacher)
    s  = Cov(f', f) / Var(f),   b = E[f'] - s E[f]         (f' = df/dlambda along the trajectory)

With L = int l, S = int s, B = int e^-S b (from the grid's first lambda) and
g(lambda) = e^(S_s - S(lambda)) f(lambda) - e^S_s (B(lambda) - B_s), the exact solution from s to t is

    y_t = e^(L_s - L_t) [ y_s - int_s^t e^(Phi - Phi_s) g dlambda - int_s^t e^(Phi - Phi_s) beta dlambda ],

Phi = L + S, beta(u) = e^S_s (B(u) - B_s); an order-p step expands g in a Taylor series around s.
What we follow and what we changed: the statistics are computed by our own script (``compute_ems``)
from trajectories of our sampler on a logSNR-uniform grid; l, s, b are interpolated between
grid nodes by quintic interpolating splines, and every integral is computed to double precision (exact for
L, S; composite Gauss-Legendre on each spline piece otherwise), so a step may start and end at any lambda inside the grid (the public code
rounds step times to grid nodes and integrates by trapezoid). f' is a central difference along the
trajectory (fourth-order differences on the grid; the paper differentiates by JVP). Degenerate statistics l = 1, s = b = 0 give exactly
DPM-Solver++ (data prediction).

``EMS`` holds the statistics; ``compute_ems`` makes them; ``cached_ems`` keeps them in a safetensors file
keyed by the model hash and every setting (a corrupt or mismatching file is recomputed, never trusted).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .noise import NoiseSchedule

CACHE_FORMAT = "s3-ems-v1"
_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)  # 8 nodes per grid cell: exact to degree 15


class EMSError(ValueError):
    """Statistics that are malformed or do not cover a schedule (the message names the field)."""


class EMS:
    """l, s, b ([N + 1, *shape], float64) on an increasing lambda grid ([N + 1])."""

    def __init__(self, lambdas, l, s, b, noise_spec: dict | None = None):  # noqa: E741 (the paper's names)
        lam = np.asarray(lambdas, dtype=np.float64)
        arrs = {k: np.asarray(v, dtype=np.float64) for k, v in (("l", l), ("s", s), ("b", b))}
        if lam.ndim != 1 or len(lam) < 6:
            raise EMSError("lambdas: expected a 1-D grid of at least 6 points (quintic splines)")
        if not (np.all(np.isfinite(lam)) and np.all(np.diff(lam) > 0)):
            raise EMSError("lambdas: not finite and strictly increasing")
        shape = arrs["l"].shape
        for k, v in arrs.items():
            if v.shape != shape or v.shape[:1] != lam.shape:
                raise EMSError(f"{k}: shape {v.shape}, expected ({len(lam)}, ...) like l {shape}")
            if not np.all(np.isfinite(v)):
                raise EMSError(f"{k}: not finite")
        self.lambdas, self.l, self.s, self.b = lam, arrs["l"], arrs["s"], arrs["b"]
        self.shape = shape[1:]
        self.noise_spec = noise_spec
        # Quintic interpolating splines (C^4): g stays smooth enough for Taylor orders up to 5; a
        # piecewise-linear l would put kinks into f at every node and stall convergence.
        from scipy.interpolate import make_interp_spline

        self._spl = {n: make_interp_spline(lam, v, k=5, axis=0) for n, v in arrs.items()}
        self._Lspl = self._spl["l"].antiderivative()
        self._Sspl = self._spl["s"].antiderivative()
        self._L00, self._S00 = self._Lspl(lam[0]), self._Sspl(lam[0])
        self.knots = np.unique(np.clip(self._spl["l"].t, lam[0], lam[-1]))  # polynomial pieces
        cells = [self._gauss(lambda u: np.exp(-self.S(u)) * self.at("b", u), lo, hi)
                 for lo, hi in zip(self.knots[:-1], self.knots[1:])]
        self._B0 = np.concatenate([np.zeros((1, *self.shape)), np.cumsum(np.stack(cells), 0)])

    @classmethod
    def degenerate(cls, lambdas, shape, kind: str = "data") -> EMS:
        """l = 1, s = b = 0 (``data``: DPM-Solver++) or l = s = b = 0 (``noise``)."""
        n = len(lambdas)
        one = np.ones((n, *shape)) if kind == "data" else np.zeros((n, *shape))
        return cls(lambdas, one, np.zeros((n, *shape)), np.zeros((n, *shape)))

    # ---- the interpolated statistics and their integrals --------------------------------
    def covers(self, lam: float, tol: float = 1e-6) -> bool:
        return self.lambdas[0] - tol <= lam <= self.lambdas[-1] + tol

    def _check(self, u):
        u = np.asarray(u, dtype=np.float64)
        if np.any(u < self.lambdas[0] - 1e-6) or np.any(u > self.lambdas[-1] + 1e-6):
            raise EMSError(f"lambda {float(np.min(u)):.6g}..{float(np.max(u)):.6g} is outside the statistics' grid "
                           f"[{self.lambdas[0]:.6g}, {self.lambdas[-1]:.6g}]")
        return np.clip(u, self.lambdas[0], self.lambdas[-1])

    def _bc(self, v):  # broadcast [M] against [M, *shape]
        return np.reshape(v, (*np.shape(v), *([1] * len(self.shape))))

    def at(self, name: str, u):
        """The statistic ``name`` ('l', 's' or 'b') at lambda u (its spline)."""
        return self._spl[name](self._check(u))

    def L(self, u):
        """int_{lambda_0}^u l (exact for the spline)."""
        return self._Lspl(self._check(u)) - self._L00

    def S(self, u):
        return self._Sspl(self._check(u)) - self._S00

    def B(self, u):
        """int_{lambda_0}^u e^-S b."""
        u = self._check(u)
        flat = np.atleast_1d(u)
        k = np.clip(np.searchsorted(self.knots, flat, side="right") - 1, 0, len(self.knots) - 2)
        part = np.stack([self._gauss(lambda r: np.exp(-self.S(r)) * self.at("b", r), self.knots[kk], uu)
                         for kk, uu in zip(k, flat)])
        out = self._B0[k] + part
        return out if u.ndim else out[0]

    def _gauss(self, fn, a: float, b: float):
        """int_a^b fn on one polynomial piece (8-point Gauss-Legendre)."""
        if b == a:
            return np.zeros(self.shape)
        u = 0.5 * (b - a) * _GL_X + 0.5 * (a + b)
        return 0.5 * (b - a) * np.tensordot(_GL_W, fn(u), axes=(0, 0))

    def integrate(self, fn, a: float, b: float):
        """int_a^b fn(u) du, fn: [M] -> [M, *shape], split at the spline's knots (a <= b)."""
        a, b = (float(v) for v in self._check(np.array([a, b])))
        inner = self.knots[(self.knots > a) & (self.knots < b)]
        edges = [a, *inner, b]
        return sum(self._gauss(fn, lo, hi) for lo, hi in zip(edges[:-1], edges[1:]))

    # ---- storage ----------------------------------------------------------------------
    def tensors(self) -> dict:
        return {"lambdas": torch.from_numpy(self.lambdas.copy()), "l": torch.from_numpy(self.l.copy()),
                "s": torch.from_numpy(self.s.copy()), "b": torch.from_numpy(self.b.copy())}


# ---------------------------------------------------------------------------------------------
# computing the statistics


def ems_grid(noise: NoiseSchedule, n: int, t_end: float | None = None, t_start: float | None = None) -> np.ndarray:
    """n + 1 logSNR-uniform times from t_start (default T) to t_end (default the schedule's)."""
    from .baselines import discretize

    return discretize(noise, n, "logsnr_uniform", t_end=t_end, t_start=t_start)


def _jvp(model, x: torch.Tensor, t: float, v: torch.Tensor):
    return torch.func.jvp(lambda z: model(z, t), (x,), (v,))


def jacobian_diagonal(model, x: torch.Tensor, t: float, probes, generator: torch.Generator | None = None):
    """(eps(x), estimate of diag(d eps / d x) per sample): ``probes`` Rademacher vectors (Hutchinson's
    diagonal estimator E[v * J v]), or ``"exact"``: one JVP per dimension (small models only)."""
    if probes == "exact":
        flat = x.reshape(len(x), -1)
        diag = torch.zeros_like(flat)
        eps = None
        for d in range(flat.shape[1]):
            e = torch.zeros_like(flat)
            e[:, d] = 1.0
            eps, jv = _jvp(model, x, t, e.reshape(x.shape))
            diag[:, d] = jv.reshape(len(x), -1)[:, d]
        return eps, diag.reshape(x.shape)
    acc, eps = torch.zeros_like(x), None
    for _ in range(int(probes)):
        v = torch.randint(0, 2, x.shape, generator=generator, dtype=torch.int64).to(x) * 2 - 1
        eps, jv = _jvp(model, x, t, v)
        acc += v * jv
    return eps, acc / int(probes)


def _d_dlambda(F: np.ndarray, h: float) -> np.ndarray:
    """dF/dlambda along axis 0 of a uniform grid: fourth-order central differences, fourth-order
    one-sided ones at the two nodes next to each end (needs >= 5 nodes)."""
    if len(F) < 5:
        raise ValueError("EMS: the grid needs at least 5 nodes (n_grid >= 4)")
    d = np.empty_like(F)
    d[2:-2] = (F[:-4] - 8 * F[1:-3] + 8 * F[3:-1] - F[4:]) / (12 * h)
    d[0] = (-25 * F[0] + 48 * F[1] - 36 * F[2] + 16 * F[3] - 3 * F[4]) / (12 * h)
    d[1] = (-3 * F[0] - 10 * F[1] + 18 * F[2] - 6 * F[3] + F[4]) / (12 * h)
    d[-1] = (25 * F[-1] - 48 * F[-2] + 36 * F[-3] - 16 * F[-4] + 3 * F[-5]) / (12 * h)
    d[-2] = (3 * F[-1] + 10 * F[-2] - 18 * F[-3] + 6 * F[-4] - F[-5]) / (12 * h)
    return d


def compute_ems(model, noise: NoiseSchedule, x_T: torch.Tensor, n_grid: int = 60, probes=1,
                t_end: float | None = None, seed: int = 0, refine: int = 2) -> EMS:
    """EMS of ``model`` (eps(x, t)) on ``n_grid + 1`` logSNR-uniform nodes, from trajectories of x_T.

    The trajectories are solved by third-order multistep DPM-Solver++ with ``refine`` sub-steps per
    grid cell; at each node the model is differentiated (``jacobian_diagonal``) for l. Cost: about
    ``n_grid * (refine + probes)`` batched model calls (``probes`` JVPs count as calls)."""
    from .baselines import build_baseline
    from .sampler import SamplerPlan

    times = ems_grid(noise, n_grid, t_end)
    fine = ems_grid(noise, n_grid * refine, t_end)
    plan = SamplerPlan(build_baseline("dpm_solver_pp_3m_exact", noise, n_grid * refine, grid=fine), noise)
    with torch.no_grad():
        run = plan.start(x_T)
        x = run.first_input()
        xs = [x]
        while not run.done:
            x = run.advance(model(x, run.pending_time))
            if not run.done:
                xs.append(x)
        xs.append(x)
    node_x = xs[::refine]  # the states at the grid nodes
    g = torch.Generator().manual_seed(int(seed))
    lam = noise.lambda_(times)
    alphas, sigmas = noise.alpha(times), noise.sigma(times)
    ls, fs = [], []
    for k, (x, t) in enumerate(zip(node_x, times)):
        eps, diag = jacobian_diagonal(model, x.detach(), float(t), probes, g)
        lk = float(sigmas[k]) * diag.mean(0)
        ls.append(lk.double())
        fs.append(((float(sigmas[k]) * eps - lk.to(x) * x) / float(alphas[k])).double())
    F = torch.stack(fs)  # [N + 1, B, ...]
    dF = torch.from_numpy(_d_dlambda(F.numpy(), float(lam[1] - lam[0])))
    Fm, dFm = F.mean(1), dF.mean(1)
    cov = ((F - Fm[:, None]) * (dF - dFm[:, None])).mean(1)
    var = ((F - Fm[:, None]) ** 2).mean(1)
    # A dimension the model never varies (Var f = 0, e.g. a digits corner pixel) gets s = 0, b = E f'.
    tiny = 1e-12 * float(var.mean()) + 1e-300
    s = torch.where(var > tiny, cov / var.clamp_min(tiny), torch.zeros_like(var))
    b = dFm - s * Fm
    return EMS(lam, torch.stack(ls).numpy(), s.numpy(), b.numpy(), noise_spec=noise.spec())


# ---------------------------------------------------------------------------------------------
# cache


def _cache_key(model_hash: str, noise: NoiseSchedule, settings: dict) -> dict:
    return {"format": CACHE_FORMAT, "model": str(model_hash), "noise": noise.spec(),
            **{k: settings[k] for k in sorted(settings)}}


def load_ems(path, key: dict | None = None) -> EMS:
    """Statistics from a safetensors file (EMSError naming the file and field if malformed, or if
    ``key`` is given and the file's differs)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = set(f.keys())
            missing = {"lambdas", "l", "s", "b"} - names
            if missing:
                raise EMSError(f"{path}: missing tensors {sorted(missing)}")
            t = {k: f.get_tensor(k) for k in ("lambdas", "l", "s", "b")}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        if isinstance(e, EMSError):
            raise
        raise EMSError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != CACHE_FORMAT:
        raise EMSError(f"{path}: metadata.format is {meta.get('format')!r}, expected {CACHE_FORMAT!r}")
    if key is not None:
        try:
            stored = json.loads(meta.get("key", ""))
        except ValueError:
            raise EMSError(f"{path}: metadata.key is not JSON") from None
        if stored != key:
            raise EMSError(f"{path}: its key (model hash / settings) differs")
    for k, v in t.items():
        if v.dtype != torch.float64:
            raise EMSError(f"{path}: {k} is {v.dtype}, expected float64")
    try:
        return EMS(t["lambdas"].numpy(), t["l"].numpy(), t["s"].numpy(), t["b"].numpy(),
                   noise_spec=json.loads(meta["noise"]) if "noise" in meta else None)
    except EMSError as e:
        raise EMSError(f"{path}: {e}") from None


def save_ems(ems: EMS, path, key: dict | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"format": CACHE_FORMAT}
    if key is not None:
        meta["key"] = json.dumps(key, sort_keys=True)
    if ems.noise_spec is not None:
        meta["noise"] = json.dumps(ems.noise_spec, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(ems.tensors(), str(tmp), metadata=meta)
    os.replace(tmp, path)


def ems_cache_path(noise: NoiseSchedule, *, model_hash: str, cache_dir, n_grid: int = 60, samples: int = 512,
                   probes=1, t_end: float | None = None, seed: int = 0, refine: int = 2) -> tuple[Path, dict]:
    """(file, key) under which ``cached_ems`` keeps these statistics."""
    settings = {"n_grid": int(n_grid), "samples": int(samples), "probes": probes, "seed": int(seed),
                "refine": int(refine), "t_end": None if t_end is None else float(t_end), "version": 1}
    key = json.loads(json.dumps(_cache_key(model_hash, noise, settings)))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"ems-{digest}.safetensors", key


def cached_ems(model, noise: NoiseSchedule, x_T_fn, *, model_hash: str, cache_dir, n_grid: int = 60,
               samples: int = 512, probes=1, t_end: float | None = None, seed: int = 0, refine: int = 2) -> EMS:
    """``compute_ems`` kept in ``cache_dir`` under a name from the model hash and every setting.
    ``x_T_fn(samples, seed)`` gives the starting states. A file that is unreadable, malformed or for
    another key is recomputed (with a warning), never trusted."""
    path, key = ems_cache_path(noise, model_hash=model_hash, cache_dir=cache_dir, n_grid=n_grid, samples=samples,
                               probes=probes, t_end=t_end, seed=seed, refine=refine)
    if path.exists():
        try:
            return load_ems(path, key)
        except EMSError as e:
            warnings.warn(f"EMS cache not used ({e}); recomputing", stacklevel=2)
    ems = compute_ems(model, noise, x_T_fn(samples, seed), n_grid=n_grid, probes=probes, t_end=t_end, seed=seed,
                      refine=refine)
    save_ems(ems, path, key)
    return ems


def model_calls(n_grid: int, probes, refine: int = 2, dims: int = 0) -> int:
    """Batched model calls ``compute_ems`` makes (a JVP counted as one call)."""
    per_node = dims if probes == "exact" else int(probes)
    return n_grid * refine + (n_grid + 1) * per_node

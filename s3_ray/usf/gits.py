"""GITS time grids (Chen, Zhou, Wang, Shen, Lyu, ICML 2024: "On the Trajectory Regularity of
ODE-based Diffusion Sampling"; public code zju-pi/diff-sampler, gits-main/gits_utils.py).

GITS picks a K-step grid out of N candidate times by dynamic programming over the accumulated
one-step error against a teacher trajectory. What we follow and what we changed:

- candidates: N times (default 61, EDM rho = 7 from T to t_end, as GITS's teacher grid);
- teacher: a few hundred samples solved with many steps through every candidate (default
  dpm_solver_pp_3m_exact with ``refine`` logSNR-uniform sub-steps per candidate interval; GITS uses
  iPNDM on the candidate grid itself); the states and model outputs at the candidates are kept;
- cost of a step (``cost='solver'``, default): the error of *the solver's own step* started from the
  teacher (``cost='euler'``: a DDIM step whatever the solver, which is what GITS does). History
  entries on grid nodes are the teacher's states and model outputs there (so a multistep solver's
  previous points lie on the teacher, and a corrector uses the teacher's model output at the step's
  end); entries between nodes (singlestep intermediates) are computed with real
  model calls. Error = mean over samples of || x_hat - x_teacher ||_2 in x~ = x / alpha (EDM's x, the
  'l2' metric of GITS), by default (``metric='scaled'``) times spread(t_end) / spread(t_j), the RMS
  spread of the teacher's x~ at the end over that at the step's end: the typical gain with which the
  flow carries an error at t_j to the end (exact for isotropic Gaussian data). Plain 'l2' lets the
  huge x~ of a VP model near T dominate (on the digits model it put all DDIM steps at s~ > 29 and one
  step to the end: FID 10.8 vs 0.86 scaled). We leave out GITS's 'dev' metric and its AFS step search;
- objective: sum_m coeff^m cost_m over the K steps (GITS's V[j][k] = cost + coeff V[i][k-1]; coeff
  1.0 here by default, GITS uses 1.15 with its 'dev' metric);
- the DP state is (previous node, current node), exact for solvers whose steps read at most one grid
  node before their start (DDIM, 2M multistep, UniPC-2, iPNDM-2, singlestep); a solver that reads
  more (3M, UniPC-3, iPNDM-3/4) is costed by its own order-2 member (``cost_options`` says so).

Measured (tests/test_peers.py, README "Peers"): teacher forcing flatters multistep solvers (their
previous point is exact), so their grids tend to a very short step before one long last step.

``gits_grid`` computes a grid; ``cached_gits_grid`` keeps it in a JSON file keyed by the model hash
and every option (a corrupt or mismatching file is recomputed, never trusted).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .baselines import BASELINES, build_baseline, discretize, grid_steps
from .noise import NoiseSchedule
from .sampler import EpsModel, SamplerPlan

CACHE_FORMAT = "s3-gits-v1"
GITS_VERSION = 2  # of the cost definition: a change recomputes every cached grid
TEACHER_SOLVER = "dpm_solver_pp_3m_exact"


@dataclass
class Teacher:
    """States ``x[q]`` and model outputs ``eps[q]`` ([N, B, ...]) of a teacher trajectory at the
    candidate times ``times[q]`` (decreasing, times[0] = the start)."""

    times: np.ndarray
    x: torch.Tensor
    eps: torch.Tensor


@dataclass
class GitsResult:
    times: np.ndarray  # the K + 1 chosen times
    path: list[int]  # their candidate indices
    cost: float  # the DP objective
    step_costs: list[float]  # cost of each step (unweighted)
    cost_options: dict  # options of the builder the costs were computed with


def candidate_times(noise: NoiseSchedule, n: int = 61, t_end: float | None = None) -> np.ndarray:
    """GITS's candidate grid: n times, EDM rho = 7 from T to t_end."""
    if n < 3:
        raise ValueError(f"n_candidates must be >= 3, got {n}")
    return discretize(noise, n - 1, "edm", t_end)


@torch.no_grad()
def teacher_trajectory(model: EpsModel, noise: NoiseSchedule, x_T: torch.Tensor, times, refine: int = 2,
                       solver: str = TEACHER_SOLVER) -> Teacher:
    """Solve from x_T through ``times`` with ``solver`` on a grid that splits every interval into
    ``refine`` logSNR-uniform sub-steps, recording the states and model outputs at ``times``."""
    times = np.asarray(times, dtype=np.float64)
    lam = noise.lambda_(times)
    fine = [float(times[0])]
    for a, b in zip(lam[:-1], lam[1:]):
        fine += [float(noise.inverse_lambda(a + (b - a) * r / refine)) for r in range(1, refine)]
        fine.append(float(noise.inverse_lambda(b)))
    fine[-1] = float(times[-1])
    for q in range(len(times)):  # exact candidate times (the inverse map may round)
        fine[q * refine] = float(times[q])
    n = len(fine) - 1
    sched = build_baseline(solver, noise, n, grid=np.array(fine))
    xs, es = [], []
    calls = [0]

    def recording(x, t):
        e = model(x, t)
        if calls[0] % refine == 0:
            xs.append(x.detach().clone())
            es.append(e.detach().clone())
        calls[0] += 1
        return e

    x_end = SamplerPlan(sched, noise).run(recording, x_T)
    xs.append(x_end)
    es.append(model(x_end, float(times[-1])))
    return Teacher(times=times, x=torch.stack(xs), eps=torch.stack(es))


def analytic_teacher(solve, model: EpsModel, x_T: torch.Tensor, times) -> Teacher:
    """A teacher from an exact solution ``solve(x_T, t_start, t)`` (e.g. GaussianData.solve)."""
    times = np.asarray(times, dtype=np.float64)
    xs = [x_T] + [solve(x_T, float(times[0]), float(t)).to(x_T) for t in times[1:]]
    return Teacher(times=times, x=torch.stack(xs), eps=torch.stack([model(x, float(t)) for x, t in zip(xs, times)]))


# ---------------------------------------------------------------------------------------------
# the solver's steps, from the teacher


def _strip(step) -> dict:
    """A step's structure without its times and relaxation values (iPNDM's depend on the grid)."""
    d = step.model_dump(mode="json")
    d.pop("t")
    for part in (d, d.get("corrector") or {}):
        for der in part.get("derivatives", ()):
            der["relaxation"].pop("scale", None)
            der["relaxation"].pop("slope", None)
    return d


class _Solver:
    """Baseline ``name`` at ``nfe`` on any K-step grid, split into macro steps (one per interval)."""

    def __init__(self, name: str, noise: NoiseSchedule, nfe: int, options: dict, n_candidates: int):
        self.name, self.noise, self.nfe = name, noise, nfe
        self.options = {k: v for k, v in options.items() if v is not None and k not in ("discretization", "grid")}
        self.K = grid_steps(name, nfe, **self.options)
        if n_candidates < self.K + 1:
            raise ValueError(f"gits: {self.K} steps need at least {self.K + 1} candidate times, got {n_candidates}")
        keys, depths = self._structure(self.options)
        if max(depths) > 1:  # read more than one node before the start: cost it by its order-2 member
            self.options = {**self.options, "order": 2}
            keys, depths = self._structure(self.options)
        self.keys, self.depths = keys, depths

    def build(self, grid):
        return build_baseline(self.name, self.noise, self.nfe, grid=np.asarray(grid), **self.options)

    def macro(self, sched, grid) -> list[list[int]]:
        """Schedule step indices of each macro step (the steps ending in (grid[m], grid[m+1]])."""
        out, m = [[] for _ in range(self.K)], 0
        for i, st in enumerate(sched.steps):
            out[m].append(i)
            if st.t == grid[m + 1]:
                m += 1
        if m != self.K:
            raise ValueError(f"gits: {self.name} does not end its steps on the grid nodes")
        return out

    def _structure(self, options):
        """(structure key, depth) per macro step: depth = grid nodes read before the macro step's start."""
        lam = np.linspace(0.0, 1.0, self.K + 1)
        l0, l1 = float(self.noise.lambda_(self.noise.T)), float(self.noise.lambda_(self.noise.t_end_default))
        grid = self.noise.inverse_lambda(l0 + lam * (l1 - l0))
        grid[0], grid[-1] = self.noise.T, self.noise.t_end_default
        sched = build_baseline(self.name, self.noise, self.nfe, grid=grid, **options)
        plan = SamplerPlan(sched, self.noise)
        node_entry = {}  # grid node m -> history entry
        for e, t in enumerate(sched.times):
            for m, g in enumerate(grid):
                if t == g:
                    node_entry[m] = e
        keys, depths = [], []
        for m, idx in enumerate(self.macro(sched, grid)):
            start = node_entry[m]
            read = {j for i in idx for u in (plan.steps[i].predictor, plan.steps[i].corrector) if u is not None
                    for j in (u.start, *(j for j, _ in u.terms)) if j < start}
            nodes = {e: m2 for m2, e in node_entry.items()}
            if any(j not in nodes for j in read):
                raise ValueError(f"gits: {self.name} reads a history entry between grid nodes before step {m}")
            d = m - min((nodes[j] for j in read), default=m)
            keys.append(json.dumps([d, [_strip(sched.steps[i]) for i in idx]], sort_keys=True))
            depths.append(d)
        return keys, depths


def _embed(tuple_t, m: int, d: int, K: int, noise, t_start: float, t_end: float) -> np.ndarray:
    """A K-step grid whose nodes m - d .. m + 1 are ``tuple_t``; the other nodes are fillers
    (logSNR-uniform between the ends and the tuple), with t_start first and t_end last."""
    before, after = m - d, K - (m + 1)
    la, lb = float(noise.lambda_(t_start)), float(noise.lambda_(tuple_t[0]))
    pre = [t_start] + [float(noise.inverse_lambda(la + (lb - la) * r / before)) for r in range(1, before)]
    lc, ld = float(noise.lambda_(tuple_t[-1])), float(noise.lambda_(t_end))
    post = [float(noise.inverse_lambda(lc + (ld - lc) * r / after)) for r in range(1, after)] + [t_end]
    return np.array((pre if before else []) + list(tuple_t) + (post if after else []), dtype=np.float64)


class _Costs:
    """Teacher-forced one-step errors of the solver's macro steps."""

    def __init__(self, solver: _Solver, teacher: Teacher, model: EpsModel | None, metric: str = "scaled"):
        self.s, self.tea, self.model = solver, teacher, model
        alpha = solver.noise.alpha(teacher.times)
        self.scale = 1.0 / alpha  # errors in x~ = x / alpha
        if metric == "scaled":  # times the spread ratio end / t_j: the typical gain of the flow from t_j
            n = len(alpha)
            xt = teacher.x.reshape(n, teacher.x.shape[1], -1).to(torch.float64).cpu()
            xt = xt / torch.as_tensor(alpha, dtype=torch.float64)[:, None, None]
            spread = (xt - xt.mean(1, keepdim=True)).pow(2).mean((1, 2)).sqrt().numpy()
            self.scale = self.scale * spread[-1] / spread

    def step_error(self, m: int, nodes: tuple[int, ...]) -> float:
        """Error of macro step m whose nodes m - d .. m + 1 are the candidates ``nodes``."""
        s, tea, noise = self.s, self.tea, self.s.noise
        d, K, times = s.depths[m], s.K, tea.times
        grid = _embed([float(times[q]) for q in nodes], m, d, K, noise, float(times[0]), float(times[-1]))
        sched = s.build(grid)
        plan = SamplerPlan(sched, noise)
        idx = s.macro(sched, grid)[m]
        first = idx[0]  # entry of the macro step's start node
        xs, eps, x0 = {}, {}, {}

        def put(e, x, ep):
            a, sg = plan.alphas[e], plan.sigmas[e]
            xs[e], eps[e], x0[e] = x, ep, (x - sg * ep) / a

        for k, q in enumerate(nodes[:-1]):  # nodes up to the start, on the teacher
            put(first - d + k, tea.x[q], tea.eps[q])
        for i in idx:
            ps = plan.steps[i]
            x = _apply(ps.predictor, xs, eps, x0)
            e = i + 1
            if i == idx[-1]:  # the step ends on node m + 1: a corrector sees the teacher's entry there
                q = nodes[-1]
                put(e, tea.x[q], tea.eps[q])
            else:
                if self.model is None:
                    raise ValueError(f"gits: {s.name} evaluates the model between grid nodes; pass the model")
                put(e, x, self.model(x, ps.t))
            if ps.corrector is not None:
                x = _apply(ps.corrector, xs, eps, x0)
                if i != idx[-1] and ps.implicit:
                    put(e, x, self.model(x, ps.t))
                else:
                    xs[e] = x
        q = nodes[-1]
        err = (x - tea.x[q]) * float(self.scale[q])
        return float(err.reshape(err.shape[0], -1).norm(dim=1).mean())

    def tensor(self, steps: list[int]) -> np.ndarray:
        """C[k, i, j] (depth 1) / C[i, j] broadcast to [1, N, N] (depth 0) for one structure class,
        over every candidate tuple some step of the class can take (others inf)."""
        N, K = len(self.tea.times), self.s.K
        d = self.s.depths[steps[0]]
        C = np.full((N, N, N) if d else (1, N, N), np.inf)
        for nodes in _tuples(N, d + 2):
            m = next((m for m in steps if (nodes[0] == 0) == (m - d == 0) and (nodes[-1] == N - 1) == (m + 1 == K)),
                     None)
            if m is None:
                continue
            C[(nodes if d else (0, *nodes))] = self.step_error(m, nodes)
        return C


def _tuples(N: int, r: int):
    """Strictly increasing r-tuples of 0..N-1."""
    from itertools import combinations

    return combinations(range(N), r)


def _apply(u, xs, eps, x0):
    F = x0 if u.use_x0 else eps
    out = u.a * xs[u.start]
    for j, b in u.terms:
        out = out + b * F[j]
    return out


# ---------------------------------------------------------------------------------------------
# dynamic programming


def dp_path(costs: list[np.ndarray], N: int, coeff: float = 1.0) -> tuple[list[int], float]:
    """Minimise sum_m coeff^m C_m[prev, cur, next] over paths 0 = p_0 < ... < p_K = N - 1.

    ``costs[m]`` is [N, N, N] (indexed prev, cur, next) or [1, N, N] (no previous node read)."""
    K = len(costs)
    # V[k, i]: best cost of m steps ending at node i with previous node k (k = i = 0 before step 0).
    V = np.full((N, N), np.inf)
    V[0, 0] = 0.0
    back = []
    r = np.arange(N)
    order = (r[:, None, None] < r[None, :, None]) & (r[None, :, None] < r[None, None, :])  # k < i < j
    for m, C in enumerate(costs):
        with np.errstate(invalid="ignore"):  # inf + inf
            total = V[:, :, None] + coeff**m * C  # [k, i, j]; C [1, N, N] broadcasts over k
        if m == 0:
            total[0, 0, 1:] = V[0, 0] + C[0, 0, 1:]  # the start state (0, 0)
            total[1:] = np.inf
            total[0, 1:] = np.inf
        else:
            total = np.where(order, total, np.inf)
        arg = np.argmin(total, axis=0)  # best k per (i, j)
        V = np.take_along_axis(total, arg[None], 0)[0]
        back.append(arg)
    i_best = int(np.argmin(V[:, N - 1]))
    best = float(V[i_best, N - 1])
    if not math.isfinite(best):
        raise ValueError(f"gits: no {K}-step path through {N} candidates")
    path = [N - 1, i_best]
    for m in range(K - 1, 0, -1):  # back[m][i, j] = k
        path.append(int(back[m][path[-1], path[-2]]))
    path = path[::-1]
    return path, best


def gits_grid(model: EpsModel, noise: NoiseSchedule, name: str, nfe: int, *, x_T: torch.Tensor | None = None,
              shape=None, n_samples: int = 256, seed: int = 0, dtype=torch.float64, device="cpu",
              n_candidates: int = 61, candidates=None, t_end: float | None = None, refine: int = 2,
              coeff: float = 1.0, cost: str = "solver", metric: str = "scaled", teacher: Teacher | None = None,
              data_mean: torch.Tensor | None = None, **options) -> GitsResult:
    """The GITS grid for baseline ``name`` at ``nfe`` (``options``: the builder's, e.g. afs, order).

    Noise: ``x_T``, or ``n_samples`` draws of shape ``shape`` from ``seed`` scaled by sigma_T.
    Candidates: ``candidates`` (times) or ``n_candidates`` EDM-rho times; a given ``teacher`` brings its own.
    ``cost``: 'solver' (the solver's own teacher-forced steps) or 'euler' (a DDIM step, as GITS does)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    if cost not in ("solver", "euler"):
        raise ValueError(f"cost: 'solver' or 'euler', got {cost!r}")
    if metric not in ("scaled", "l2"):
        raise ValueError(f"metric: 'scaled' or 'l2', got {metric!r}")
    if teacher is None:
        times = candidate_times(noise, n_candidates, t_end) if candidates is None else np.asarray(candidates, np.float64)
        if x_T is None:
            if shape is None:
                raise ValueError("gits_grid needs x_T or shape")
            g = torch.Generator().manual_seed(int(seed))
            x_T = torch.randn((n_samples, *shape), generator=g, dtype=dtype) * float(noise.sigma(times[0]))
        teacher = teacher_trajectory(model, noise, x_T.to(device), times, refine=refine)
    afs = options.get("afs") or "none"
    if afs != "none":  # the AFS model output at the start replaces the teacher's
        x_0 = teacher.x[0]
        a0, s0 = float(noise.alpha(teacher.times[0])), float(noise.sigma(teacher.times[0]))
        if afs == "zero_x0":
            e0 = x_0 / s0
        else:
            if data_mean is None:
                raise ValueError("afs='mean_x0' needs data_mean")
            e0 = (x_0 - a0 * data_mean.to(x_0)) / s0
        teacher = Teacher(teacher.times, teacher.x, torch.cat([e0[None], teacher.eps[1:]]))
    N = len(teacher.times)
    if cost == "euler":  # DDIM (= Euler in x~, s~) with as many steps as the solver's grid has intervals
        K = grid_steps(name, nfe, **options)
        solver = _Solver("ddim", noise, K if afs == "none" else K - 1, {"afs": afs}, N)
    else:
        solver = _Solver(name, noise, nfe, options, N)
    costs = _Costs(solver, teacher, model, metric)
    classes: dict[str, list[int]] = {}
    for m, k in enumerate(solver.keys):
        classes.setdefault(k, []).append(m)
    tensors = {k: costs.tensor(steps) for k, steps in classes.items()}
    per_step = [tensors[k] for k in solver.keys]
    path, best = dp_path(per_step, N, coeff)
    step_costs = [float(C[(path[m - 1] if C.shape[0] > 1 else 0), path[m], path[m + 1]]) for m, C in enumerate(per_step)]
    return GitsResult(times=teacher.times[path].copy(), path=path, cost=best, step_costs=step_costs,
                      cost_options=dict(solver.options))


_GITS_DEFAULTS = {k: p.default for k, p in inspect.signature(gits_grid).parameters.items()
                  if p.default is not inspect.Parameter.empty}  # part of the cache key

# ---------------------------------------------------------------------------------------------
# cache


def cache_key(model_hash: str, noise: NoiseSchedule, name: str, nfe: int, **settings) -> dict:
    """Everything the grid depends on (JSON data)."""
    return {"format": CACHE_FORMAT, "model": str(model_hash), "noise": noise.spec(), "solver": name, "nfe": int(nfe),
            **{k: settings[k] for k in sorted(settings) if settings[k] is not None}}


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return [float(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"gits cache key: {type(v).__name__} is not JSON data")


def _check_cached(data, key: dict, K: int) -> np.ndarray:
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        raise ValueError(f"not a {CACHE_FORMAT} file")
    if data.get("key") != key:
        raise ValueError("its key (model hash / settings) differs")
    t = data.get("times")
    if not (isinstance(t, list) and len(t) == K + 1 and all(isinstance(v, float) for v in t)):
        raise ValueError(f"times: expected {K + 1} numbers")
    t = np.array(t, dtype=np.float64)
    if not (np.all(np.isfinite(t)) and np.all(np.diff(t) < 0) and t[-1] > 0):
        raise ValueError("times: not finite, positive and strictly decreasing")
    return t


def cached_gits_grid(model: EpsModel, noise: NoiseSchedule, name: str, nfe: int, *, model_hash: str, cache_dir,
                     **kwargs) -> np.ndarray:
    """``gits_grid(...).times``, kept in ``cache_dir`` under a name from the hash of the model hash and
    every setting. A file that is unreadable, malformed or for another key is recomputed (warning)."""
    settings = {k: v for k, v in {**_GITS_DEFAULTS, **kwargs}.items()
                if k not in ("x_T", "teacher", "data_mean", "device", "dtype")}
    settings["dtype"] = str(kwargs.get("dtype", torch.float64))
    settings["version"] = GITS_VERSION
    key = json.loads(json.dumps(cache_key(model_hash, noise, name, nfe, **settings), default=_jsonable))
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"gits-{name}-nfe{nfe}-{digest}.json"
    K = grid_steps(name, nfe, **{k: v for k, v in kwargs.items() if k in ("afs", "order", "lower_order_final")})
    if path.exists():
        try:
            times = _check_cached(json.loads(path.read_text()), key, K)
            build_baseline(name, noise, nfe, grid=times,
                           **{k: v for k, v in kwargs.items() if k in ("afs", "order", "lower_order_final", "prediction")})
            return times
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            warnings.warn(f"{path}: GITS cache not used ({e}); recomputing", stacklevel=2)
    res = gits_grid(model, noise, name, nfe, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "key": key, "times": [float(v) for v in res.times],
                               "path": res.path, "cost": res.cost, "cost_options": res.cost_options}, indent=1) + "\n")
    os.replace(tmp, path)
    return res.times

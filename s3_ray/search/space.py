"""The USF decision space (spec sections 2 and 4.2): random schedules, repair, evolutionary operators.

Pure functions: every random choice comes from the ``numpy.random.Generator`` passed in, so equal
seeds give equal schedules. Operators edit a schedule as a plain dict; ``repair`` turns such a dict
into the nearest valid ``SolverSchedule`` inside a ``DecisionSpace`` and re-derives the dependent
fields (derivative specs when the order changes, corrector order and sets).

Conventions: times are sampled and moved in logSNR (lambda) with a gap of at least
``decisions.min_dlambda``; a step without corrector is always allowed (the search forces the last
step's corrector to none), so NFE = [afs == none] + (M - 1) + #implicit.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel

from s3_ray.config import DecisionSpace, OperatorConfig
from s3_ray.usf.noise import NoiseSchedule
from s3_ray.usf.schedule import MAX_CORRECTOR_ORDER, MAX_ORDER, SolverSchedule

# ``random_schedule`` without a DecisionSpace: every feature of the sampler, last-step correctors included.
FULL_SPACE = DecisionSpace(max_order=MAX_ORDER, correctors=("none", "pseudo", "implicit"), max_steps=64)
FULL_OPS = OperatorConfig(corrector_probs={"none": 1.0, "pseudo": 1.0, "implicit": 1.0})
SINGLESTEP_PROB = 0.1  # random steps: chance of a singlestep start point (-2 .. -history)
BH_PROB = 0.1  # random steps: chance of a UniPC bh1/bh2 combination (multistep start only)
SCATTER_PROB = 0.1  # random derivatives: chance of a random history subset instead of the nearest points
# Named first-derivative relaxations and the slope c of their expansion R = 1 + c h~ + O(h~^2).
NAMED_SLOPE = {"dpmsolver2": 1 / 6, "unipc_bh2": 1 / 6, "unipc_bh1": -1 / 3}
MUTATE_TRIES = 10  # a mutation that changed nothing is redrawn (bounded)
PROPOSE_TRIES = 20


# ---- small helpers --------------------------------------------------------------------------
def _as_dict(x) -> dict:
    if isinstance(x, BaseModel):
        return x.model_dump()
    return dict(x) if isinstance(x, dict) else {}


def _dump(s: SolverSchedule) -> dict:
    """An editable dict of a schedule (lists of step dicts)."""
    d = s.model_dump()
    d["steps"] = [dict(st) for st in d["steps"]]
    return d


def _finite(x, default: float) -> float:
    if isinstance(x, (int, float, np.number)) and not isinstance(x, bool) and math.isfinite(float(x)):
        return float(x)
    return default


def _int(x, default: int) -> int:
    v = _finite(x, math.nan)
    return int(v) if math.isfinite(v) and v.is_integer() else default


def _ints(xs) -> list[int]:
    vals = [_int(x, 0) for x in (xs if isinstance(xs, (list, tuple)) else ())]
    return list(dict.fromkeys(v for v in vals if v != 0))


def _draw(rng: np.random.Generator, probs: dict):
    keys = list(probs)
    w = np.array([probs[k] for k in keys], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


def _other(rng: np.random.Generator, values, current):
    """A value from ``values`` other than ``current`` where there is one."""
    choices = [v for v in values if v != current] or list(values)
    return choices[int(rng.integers(len(choices)))]


def _t_end_range(noise: NoiseSchedule, decisions: DecisionSpace) -> tuple[float, float]:
    lo, hi = decisions.t_end_range or (noise.t_end_default, noise.t_end_default)
    return float(lo), float(hi)


def _lam(noise: NoiseSchedule, t) -> float:
    return float(noise.lambda_(t))


def _span_steps(span: float, decisions: DecisionSpace) -> int:
    """Most steps that fit in a logSNR span with the minimum gap (at least one)."""
    return max(1, min(decisions.max_steps, int(span / decisions.min_dlambda + 1e-9)))


def max_steps(noise: NoiseSchedule, decisions: DecisionSpace) -> int:
    """Most steps a schedule can have for every final time in the range."""
    return _span_steps(_lam(noise, _t_end_range(noise, decisions)[1]) - _lam(noise, noise.T), decisions)


def _available(history: int, start: int) -> list[int]:
    return [-k for k in range(1, history + 1) if -k != start]


def _nearest(avail: list[int], start: int) -> list[int]:
    """History points ordered by distance from the start point (newer first on ties)."""
    return sorted(avail, key=lambda p: (abs(p - start), -p))


def _corrector_probs(decisions: DecisionSpace, ops: OperatorConfig, last: bool, last_corrector: bool = False,
                     implicit: bool = True) -> dict:
    """Corrector kinds a step may draw, weighted by ``ops.corrector_probs`` (uniform if all zero)."""
    if last and not last_corrector:
        return {"none": 1.0}
    keys = [k for k in decisions.correctors if not (k == "implicit" and (last or not implicit))]
    probs = {k: ops.corrector_probs.get(k, 0.0) for k in keys}
    if sum(probs.values()) <= 0:
        probs = dict.fromkeys(keys, 1.0)
    return probs or {"none": 1.0}


def _nfe(d: dict) -> int:
    steps = d["steps"]
    implicit = sum(1 for s in steps if (s.get("corrector") or {}).get("kind") == "implicit")
    return int(d["afs"] == "none") + len(steps) - 1 + int(steps[-1].get("corrector") is not None) + implicit


# ---- repair ---------------------------------------------------------------------------------
def _repair_times(noise: NoiseSchedule, ts: list, decisions: DecisionSpace) -> list[float]:
    """Decreasing times from ``ts`` (sorted, projected onto gaps >= min_dlambda, final time clipped
    to the t_end range, surplus steps dropped before the final one). Unmoved times are kept exactly."""
    lo, hi = _t_end_range(noise, decisions)
    lam0 = _lam(noise, noise.T)
    t = np.array([_finite(x, math.nan) for x in ts], dtype=np.float64)
    t[~(t > 0)] = math.nan
    t = np.minimum(t, noise.T)  # lambda need not be monotone beyond T (cosine); T itself is pushed on
    with np.errstate(all="ignore"):
        lam = np.asarray(noise.lambda_(t), dtype=np.float64)
    bad = ~np.isfinite(lam)
    t[bad] = math.nan
    n = len(ts)
    lam[bad] = (lam0 + (np.arange(1, n + 1) / n) * (_lam(noise, hi) - lam0))[bad]
    order = np.argsort(lam, kind="stable")
    lam, t = lam[order], t[order]
    t_end = float(np.clip(t[-1] if math.isfinite(t[-1]) else noise.inverse_lambda(lam[-1]), lo, hi))
    lam_end = _lam(noise, t_end)
    m = min(n, _span_steps(lam_end - lam0, decisions))
    g = min(decisions.min_dlambda, (lam_end - lam0) / m)
    old, new = lam[: m - 1], lam[: m - 1].copy()
    prev = lam0
    for k in range(m - 1):
        new[k] = prev = max(new[k], prev + g)
    nxt = lam_end
    for k in reversed(range(m - 1)):
        new[k] = nxt = min(new[k], nxt - g)
    out = [float(t[k]) if math.isfinite(t[k]) and abs(new[k] - old[k]) <= 1e-12 * max(1.0, abs(old[k]))
           else float(noise.inverse_lambda(new[k])) for k in range(m - 1)]
    return [*out, t_end]


def _relaxation(r) -> dict:
    r = _as_dict(r)
    kind = r.get("kind", "linear")
    if kind in NAMED_SLOPE:
        return {"kind": kind}
    return {"kind": "linear", "scale": _finite(r.get("scale"), 1.0), "slope": _finite(r.get("slope"), 0.0)}


def _fit(points, avail: list[int], start: int, n_min: int, n_max: int | None = None, must: int | None = None):
    """Valid points from ``points``, topped up with the nearest ones to ``n_min``, cut to ``n_max``."""
    near = _nearest(avail, start)
    pts = [p for p in _ints(points) if p in avail]
    if must is not None and must not in pts:
        pts.insert(0, must)
    pts += [p for p in near if p not in pts][: max(0, n_min - len(pts))]
    if n_max is not None and len(pts) > n_max:
        pts = sorted(pts, key=lambda p: (p != must, near.index(p)))[:n_max]
    return tuple(sorted(pts, reverse=True))


def _fit_derivatives(raw: list, count: int, start: int, history: int, combine: str, corrector: bool) -> list[dict]:
    """``count`` derivative specs from ``raw``: a missing spec n reuses spec n-1's points; bh1/bh2 share
    one set of exactly ``count`` points; a corrector uses the new point -1 somewhere."""
    avail = _available(history, start)
    raw = [_as_dict(d) for d in raw]
    if combine != "taylor":
        pts = _fit(raw[0].get("points") if raw else (), avail, start, count, count, -1 if corrector else None)
        return [{"points": pts} for _ in range(count)]
    out, prev = [], ()
    for n in range(1, count + 1):
        d = raw[n - 1] if n - 1 < len(raw) else {"points": prev}
        prev = _fit(d.get("points", prev), avail, start, n)
        out.append({"points": prev, "relaxation": _relaxation(d.get("relaxation"))})
    if corrector and out and not any(-1 in d["points"] for d in out):
        out[0]["points"] = tuple(sorted({-1, *out[0]["points"]}, reverse=True))
    return out


def _repair_corrector(c, step: dict, history: int, last: bool, decisions: DecisionSpace, last_corrector: bool):
    c = _as_dict(c)
    kind = c.get("kind")
    if last and not last_corrector:
        return None
    if kind == "implicit" and (last or "implicit" not in decisions.correctors):
        kind = "pseudo"
    if kind != "implicit" and (kind != "pseudo" or "pseudo" not in decisions.correctors):
        return None
    order = max(2, min(_int(c.get("order"), step["order"] + 1), step["order"] + 1, MAX_CORRECTOR_ORDER, history + 1))
    combine = c.get("combine") if c.get("combine") in ("taylor", "bh1", "bh2") else "taylor"
    if step["prediction"] == "dpmsolver_v3":
        combine = "taylor"
    raw = c.get("derivatives")
    if not isinstance(raw, (list, tuple)):  # default sets: {a - 1 : a in A_n} + {-1}
        raw = [{"points": (*(a - 1 for a in d["points"]), -1)} for d in step["derivatives"]]
    derivs = _fit_derivatives(list(raw), order - 1, step["start"] - 1, history + 1, combine, corrector=True)
    return {"kind": kind, "order": order, "combine": combine, "derivatives": derivs}


def _repair_step(s: dict, i: int, t: float, last: bool, decisions: DecisionSpace, last_corrector: bool) -> dict:
    history = i + 1
    start = _int(s.get("start"), -1)
    step = {
        "t": t,
        "prediction": s.get("prediction") if s.get("prediction") in decisions.predictions else decisions.predictions[0],
        "order": max(1, min(_int(s.get("order"), 1), history, decisions.max_order)),
        "start": start if -history <= start <= -1 else -1,
        "combine": s.get("combine") if s.get("combine") in ("taylor", "bh1", "bh2") else "taylor",
    }
    v3 = step["prediction"] == "dpmsolver_v3"
    if v3:
        step["combine"] = "taylor"  # v3 expands g in a Taylor series (no UniPC combination)
    raw = s.get("derivatives")
    raw = list(raw) if isinstance(raw, (list, tuple)) else []
    step["derivatives"] = _fit_derivatives(raw, step["order"] - 1, step["start"], history, step["combine"], False)
    step["corrector"] = _repair_corrector(s.get("corrector"), step, history, last, decisions, last_corrector)
    if v3:
        for d in step["derivatives"] + (step["corrector"]["derivatives"] if step["corrector"] else []):
            r = d.get("relaxation") or {}
            if r.get("kind", "linear") != "linear":  # a named factor becomes its linear expansion
                d["relaxation"] = {"kind": "linear", "slope": NAMED_SLOPE[r["kind"]]}
    return step


def repair(data, noise: NoiseSchedule, decisions: DecisionSpace | None = None, *,
           last_corrector: bool = False) -> SolverSchedule:
    """The nearest valid schedule inside ``decisions`` to ``data`` (a schedule dict, possibly broken).

    Times: sorted, final time clipped to the t_end range, gaps >= min_dlambda, at most max_steps
    (surplus steps before the final one are dropped). Per step (decisions stay with their position):
    order capped at i+1 and max_order, start/derivative points made valid (invalid indices dropped,
    nearest points added), disallowed predictions/correctors/AFS replaced, no implicit corrector on
    the last step and, unless ``last_corrector``, no corrector there at all."""
    decisions = decisions or DecisionSpace()
    data = _as_dict(data)
    steps = [_as_dict(s) for s in data.get("steps") or ()] or [{}]
    times = _repair_times(noise, [s.get("t") for s in steps], decisions)
    last = len(times) - 1
    fixed = [_repair_step(s, i, t, i == last, decisions, last_corrector) for i, (s, t) in enumerate(zip(steps, times))]
    afs = data.get("afs") if data.get("afs") in decisions.afs else decisions.afs[0]
    return SolverSchedule.model_validate(
        {"noise_schedule": noise.name, "t_start": float(noise.T), "afs": afs, "steps": fixed})


# ---- random schedules -----------------------------------------------------------------------
def _random_times(rng: np.random.Generator, noise: NoiseSchedule, n: int, decisions: DecisionSpace) -> list[float]:
    """n decreasing times: the final one log-uniform in the t_end range, the others sorted uniform in
    logSNR with gaps >= min_dlambda."""
    lo, hi = _t_end_range(noise, decisions)
    t_end = lo if lo == hi else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    lam0, lam1 = _lam(noise, noise.T), _lam(noise, t_end)
    g = min(decisions.min_dlambda, (lam1 - lam0) / n)
    u = np.sort(rng.uniform(0.0, max(0.0, lam1 - lam0 - n * g), size=n - 1))
    lams = lam0 + u + g * np.arange(1, n)
    return [*(float(v) for v in noise.inverse_lambda(lams)), t_end]


def _random_points(rng: np.random.Generator, avail: list[int], start: int, k: int) -> tuple[int, ...]:
    k = min(k, len(avail))
    if rng.random() < SCATTER_PROB:
        return tuple(int(p) for p in rng.choice(avail, size=k, replace=False))
    return tuple(_nearest(avail, start)[:k])


def _random_relaxation(rng: np.random.Generator, ops: OperatorConfig) -> dict:
    u = rng.random()
    if u < 0.2:
        return {"kind": "dpmsolver2"}
    if u < 0.5:
        return {"kind": "linear", "slope": float(rng.normal(0.0, ops.relaxation_sd))}
    return {}


def _random_step(rng, i: int, t: float, kind: str, decisions: DecisionSpace, ops: OperatorConfig) -> dict:
    """One step dict (``repair`` completes the corrector's order and sets)."""
    history = i + 1
    order = min(_draw(rng, ops.order_probs), history, decisions.max_order)
    start = -int(rng.integers(2, history + 1)) if history >= 2 and rng.random() < SINGLESTEP_PROB else -1
    step = {"t": t, "prediction": str(rng.choice(decisions.predictions)), "order": order, "start": start,
            "combine": "taylor", "derivatives": []}
    if start == -1 and rng.random() < BH_PROB:
        step["combine"] = str(rng.choice(["bh1", "bh2"]))  # repair derives the shared point set
    else:
        avail, k1 = _available(history, start), int(rng.choice(ops.first_derivative_points))
        step["derivatives"] = [
            {"points": _random_points(rng, avail, start, max(n, k1)),
             "relaxation": _random_relaxation(rng, ops) if n == 1 else {}}
            for n in range(1, order)]
    step["corrector"] = None if kind == "none" else {"kind": kind, "combine": step["combine"]}
    return step


def _build(rng, noise, times, afs, kinds, decisions, ops, last_corrector=False) -> SolverSchedule:
    steps = [_random_step(rng, i, t, k, decisions, ops) for i, (t, k) in enumerate(zip(times, kinds))]
    return repair({"afs": afs, "steps": steps}, noise, decisions, last_corrector=last_corrector)


def random_schedule(rng: np.random.Generator, noise: NoiseSchedule, n_steps: int,
                    decisions: DecisionSpace | None = None, ops: OperatorConfig | None = None) -> SolverSchedule:
    """A random valid schedule of ``n_steps`` steps; its NFE follows from the decisions.

    Without ``decisions`` every sampler feature is drawn (FULL_SPACE/FULL_OPS: orders to 4, pseudo and
    implicit correctors, a corrector on the last step); with them the last step has no corrector."""
    full = decisions is None
    decisions = FULL_SPACE if full else decisions
    ops = ops or (FULL_OPS if full else OperatorConfig())
    if not 1 <= n_steps <= max_steps(noise, decisions):
        raise ValueError(f"n_steps must be in 1..{max_steps(noise, decisions)} for this decision space, got {n_steps}")
    times = _random_times(rng, noise, n_steps, decisions)
    kinds = [_draw(rng, _corrector_probs(decisions, ops, i == n_steps - 1, full)) for i in range(n_steps)]
    return _build(rng, noise, times, str(rng.choice(decisions.afs)), kinds, decisions, ops, last_corrector=full)


def random_schedule_at_nfe(rng: np.random.Generator, noise: NoiseSchedule, nfe: int,
                           decisions: DecisionSpace | None = None, ops: OperatorConfig | None = None) -> SolverSchedule:
    """A random valid schedule with ``nfe()`` exactly ``nfe``: AFS uniform among those that can reach
    it, then the step count M weighted by the chance of drawing the implied number of implicit
    correctors (NFE = [afs == none] + M - 1 + #implicit; the last step has no corrector)."""
    decisions, ops = decisions or DecisionSpace(), ops or OperatorConfig()
    probs = _corrector_probs(decisions, ops, last=False)
    p = probs.get("implicit", 0.0) / sum(probs.values())
    options: dict[str, dict[int, float]] = {}
    for afs in decisions.afs:
        rest = nfe - int(afs == "none")  # = (M - 1) + #implicit
        w = {m: math.comb(m - 1, rest - m + 1) * p ** (rest - m + 1) * (1 - p) ** (2 * m - 2 - rest)
             for m in range(1, max_steps(noise, decisions) + 1) if 0 <= rest - m + 1 <= m - 1}
        if sum(w.values()) > 0:
            options[afs] = w
    if not options:
        raise ValueError(f"no schedule in this decision space costs exactly {nfe} NFE")
    afs = list(options)[int(rng.integers(len(options)))]
    m = _draw(rng, options[afs])
    n_implicit = nfe - int(afs == "none") - (m - 1)
    implicit = set(rng.choice(m - 1, size=n_implicit, replace=False).tolist()) if n_implicit else set()
    others = _corrector_probs(decisions, ops, last=False, implicit=False)
    kinds = ["none" if i == m - 1 else "implicit" if i in implicit else _draw(rng, others) for i in range(m)]
    return _build(rng, noise, _random_times(rng, noise, m, decisions), afs, kinds, decisions, ops)


# ---- evolutionary operators -----------------------------------------------------------------
def _lams(noise: NoiseSchedule, d: dict) -> np.ndarray:
    return np.asarray(noise.lambda_(np.array([noise.T, *(s["t"] for s in d["steps"])], dtype=np.float64)))


def _add_step(rng, d: dict, noise: NoiseSchedule, decisions: DecisionSpace) -> bool:
    """Split a step (longer ones more likely) at 30-70% of its logSNR span; the new step copies the
    split step's decisions without an implicit corrector, so the NFE grows by one."""
    steps, lam = d["steps"], _lams(noise, d)
    if len(steps) + 1 > _span_steps(lam[-1] - lam[0], decisions):
        return False
    h = np.diff(lam)
    i = int(rng.choice(len(steps), p=h / h.sum()))
    new = {**steps[i], "t": float(noise.inverse_lambda(lam[i] + h[i] * rng.uniform(0.3, 0.7)))}
    if (new.get("corrector") or {}).get("kind") == "implicit":
        new["corrector"] = None
    steps.insert(i, new)
    return True


def split_longest_step(schedule: SolverSchedule, noise: NoiseSchedule,
                       decisions: DecisionSpace | None = None) -> SolverSchedule | None:
    """The schedule with its longest step (in logSNR) split at the middle: the new first half
    copies that step's decisions (no implicit corrector), so the NFE grows by one. None where the
    result, repaired into ``decisions``, does not have NFE + 1 (e.g. no room for another step)."""
    decisions = decisions or DecisionSpace()
    d = _dump(schedule)
    steps, lam = d["steps"], _lams(noise, d)
    if len(steps) + 1 > _span_steps(lam[-1] - lam[0], decisions):
        return None
    i = int(np.argmax(np.diff(lam)))
    new = {**steps[i], "t": float(noise.inverse_lambda(0.5 * (lam[i] + lam[i + 1])))}
    if (new.get("corrector") or {}).get("kind") == "implicit":
        new["corrector"] = None
    steps.insert(i, new)
    out = repair(d, noise, decisions)
    return out if out.nfe() == schedule.nfe() + 1 else None


def _delete_step(rng, d: dict) -> bool:
    """Remove one time before the final one (preferring steps without an implicit corrector)."""
    steps = d["steps"]
    cands = list(range(len(steps) - 1))
    plain = [j for j in cands if (steps[j].get("corrector") or {}).get("kind") != "implicit"]
    if not cands:
        return False
    pick = plain or cands
    del steps[pick[int(rng.integers(len(pick)))]]
    return True


def _set_nfe(rng, d: dict, target: int, noise: NoiseSchedule, decisions: DecisionSpace) -> bool:
    """Bring a valid schedule dict to ``target`` NFE by adding/deleting steps (or, where that is not
    possible, switching implicit correctors); bounded. True when the NFE is ``target``."""
    for _ in range(2 * decisions.max_steps + 4):
        diff = _nfe(d) - target
        if diff == 0:
            return True
        steps = d["steps"]
        if diff > 0 and not _delete_step(rng, d):
            imp = [s for s in steps if (s.get("corrector") or {}).get("kind") == "implicit"]
            if not imp:
                return False
            imp[0]["corrector"] = {**imp[0]["corrector"], "kind": "pseudo"} if "pseudo" in decisions.correctors else None
        elif diff < 0 and not _add_step(rng, d, noise, decisions):
            plain = [s for s in steps[:-1] if (s.get("corrector") or {}).get("kind") != "implicit"]
            if "implicit" not in decisions.correctors or not plain:
                return False
            plain[0]["corrector"] = {**(plain[0].get("corrector") or {}), "kind": "implicit"}
    return _nfe(d) == target


def _with_kind(c, kind: str):
    """A corrector of ``kind`` (None for none), keeping an existing corrector's order and sets."""
    if kind == "none":
        return None
    return {**c, "kind": kind} if c else {"kind": kind}


def _reset(c):
    """After the predictor order changed: the same corrector kind with default order and sets."""
    return {"kind": c["kind"]} if c else None


def _nudge(rng, r: dict, sd: float) -> dict:
    """Relaxation slope += N(0, sd^2); a named factor becomes its linear expansion first."""
    r = _relaxation(r)
    slope = NAMED_SLOPE.get(r["kind"], r.get("slope", 0.0))
    return {"kind": "linear", "scale": r.get("scale", 1.0), "slope": slope + float(rng.normal(0.0, sd))}


def _mutate_steps(rng, d: dict, noise: NoiseSchedule, decisions: DecisionSpace, ops: OperatorConfig):
    p, lam = ops.step_mutation_prob, _lams(noise, d)
    steps = d["steps"]
    for i, s in enumerate(steps):
        if rng.random() < p:  # timestep: the step size h_i, log-normally in logSNR
            h = lam[i + 1] - lam[i]
            s["t"] = float(noise.inverse_lambda(lam[i] + h * math.exp(rng.normal(0.0, ops.timestep_sigma))))
        if rng.random() < p:  # order
            order = min(_draw(rng, ops.order_probs), i + 1, decisions.max_order)
            if order != s["order"]:
                s["order"], s["corrector"] = order, _reset(s["corrector"])
        if rng.random() < p:  # prediction type
            s["prediction"] = _other(rng, decisions.predictions, s["prediction"])
        if rng.random() < p and s["order"] >= 2:  # first derivative: K nearest points and relaxation slope
            k = int(rng.choice(ops.first_derivative_points))
            derivs = list(s["derivatives"]) or [{}]
            pts = _nearest(_available(i + 1, s["start"]), s["start"])[:k]
            derivs[0] = {"points": pts, "relaxation": _nudge(rng, derivs[0].get("relaxation"), ops.relaxation_sd)}
            s["derivatives"], s["combine"] = derivs, "taylor"
        if rng.random() < p and i < len(steps) - 1:  # corrector (the last step keeps none)
            s["corrector"] = _with_kind(s["corrector"], _draw(rng, _corrector_probs(decisions, ops, last=False)))
    if rng.random() < ops.afs_prob:
        d["afs"] = _other(rng, decisions.afs, d["afs"])


def _mutate_once(rng, schedule, noise, decisions, ops, target) -> SolverSchedule:
    d = _dump(schedule)
    _mutate_steps(rng, d, noise, decisions, ops)
    d = _dump(repair(d, noise, decisions))
    if not _set_nfe(rng, d, target, noise, decisions) and schedule.afs in decisions.afs:
        d["afs"] = schedule.afs  # the new AFS cannot be paid for by steps here: keep the parent's
        _set_nfe(rng, d, target, noise, decisions)
    if rng.random() < ops.add_step_prob:
        _add_step(rng, d, noise, decisions)
    if rng.random() < ops.delete_step_prob:
        _delete_step(rng, d)
    return repair(d, noise, decisions)


def mutate(rng: np.random.Generator, schedule: SolverSchedule, noise: NoiseSchedule,
           decisions: DecisionSpace | None = None, ops: OperatorConfig | None = None, *,
           nfe: int | None = None) -> SolverSchedule:
    """Spec 4.2 mutation, then repair. Per step (each with ``ops.step_mutation_prob``): timestep, order,
    prediction type, first derivative (K, relaxation), corrector; AFS with ``ops.afs_prob``. These keep
    the NFE at ``nfe`` (default: the parent's) by adding/deleting steps where AFS or implicit
    correctors changed it; then add a step (+1 NFE) / delete one (-1) with their probabilities.
    A draw that changed nothing is redrawn (bounded)."""
    decisions, ops = decisions or DecisionSpace(), ops or OperatorConfig()
    target = schedule.nfe() if nfe is None else nfe
    for _ in range(MUTATE_TRIES):
        child = _mutate_once(rng, schedule, noise, decisions, ops, target)
        if child.schedule_hash() != schedule.schedule_hash():
            break
    return child


def crossover(rng: np.random.Generator, a: SolverSchedule, b: SolverSchedule, noise: NoiseSchedule,
              decisions: DecisionSpace | None = None, ops: OperatorConfig | None = None) -> SolverSchedule:
    """Per key from parent A or B: the time grid (so the step count), the per-step decisions (aligned
    from the first step; positions beyond that parent come from the grid's parent) and AFS. With
    ``ops.deep_crossover_prob`` each step both parents have takes (prediction, order, start,
    derivative specs, combine) from a random parent. Then repair."""
    decisions, ops = decisions or DecisionSpace(), ops or OperatorConfig()
    pa, pb = _dump(a), _dump(b)
    grid, dec, afs = (pa, pb)[int(rng.integers(2))], (pa, pb)[int(rng.integers(2))], (pa, pb)[int(rng.integers(2))]
    steps = [{**(dec["steps"][i] if i < len(dec["steps"]) else s), "t": s["t"]} for i, s in enumerate(grid["steps"])]
    if rng.random() < ops.deep_crossover_prob:
        for i in range(min(len(pa["steps"]), len(pb["steps"]))):
            src = (pa, pb)[int(rng.integers(2))]["steps"][i]
            s = steps[i]
            if src["order"] != s["order"]:
                s["corrector"] = _reset(s["corrector"])
            s.update({k: src[k] for k in ("prediction", "order", "start", "derivatives", "combine")})
    return repair({"afs": afs["afs"], "steps": steps}, noise, decisions)


def _top(entries, k: int) -> list[SolverSchedule]:
    key = [(score if math.isfinite(score) else math.inf) for _, score in entries]
    return [entries[j][0] for j in sorted(range(len(entries)), key=key.__getitem__)[:k]]


def propose(rng: np.random.Generator, pool: dict[int, list[tuple[SolverSchedule, float]]], target_nfe: int,
            noise: NoiseSchedule, decisions: DecisionSpace | None = None, ops: OperatorConfig | None = None,
            allowed_nfe: set[int] | None = None) -> SolverSchedule:
    """One candidate for ``target_nfe``: parents uniform from the top-k (lowest score) of
    ``pool[target_nfe]`` (else of the whole pool; else a random schedule at that NFE), crossover with
    ``ops.crossover_prob``, then mutation towards ``target_nfe``. The result's NFE is in
    ``allowed_nfe`` (default {target_nfe}): bounded retries, then a mutation without add/delete,
    then a random schedule at ``target_nfe``."""
    decisions, ops = decisions or DecisionSpace(), ops or OperatorConfig()
    allowed = set(allowed_nfe) if allowed_nfe else {target_nfe}
    top = _top(pool.get(target_nfe, []), ops.top_k) or _top([e for v in pool.values() for e in v], ops.top_k)
    if not top:
        return random_schedule_at_nfe(rng, noise, target_nfe, decisions, ops)
    for _ in range(PROPOSE_TRIES):
        ia = int(rng.integers(len(top)))
        child = top[ia]
        if rng.random() < ops.crossover_prob:
            others = [s for j, s in enumerate(top) if j != ia] or top
            child = crossover(rng, child, others[int(rng.integers(len(others)))], noise, decisions, ops)
        child = mutate(rng, child, noise, decisions, ops, nfe=target_nfe)
        if child.nfe() in allowed:
            return child
    fixed = ops.model_copy(update={"add_step_prob": 0.0, "delete_step_prob": 0.0})
    child = mutate(rng, top[int(rng.integers(len(top)))], noise, decisions, fixed, nfe=target_nfe)
    return child if child.nfe() in allowed else random_schedule_at_nfe(rng, noise, target_nfe, decisions, ops)


def restrict_decisions(decisions: DecisionSpace, unsupported: dict[str, tuple[str, ...]], where: str) -> DecisionSpace:
    """``decisions`` without the values a target cannot run (``unsupported``: field -> values). A
    field left at its default loses them quietly; a field the space sets to something else that
    holds one is refused (ValueError naming decisions.<field> and ``where``)."""
    update = {}
    for field, bad in unsupported.items():
        values = getattr(decisions, field)
        keep = tuple(v for v in values if v not in bad)
        if keep == values:
            continue
        if values != DecisionSpace.model_fields[field].default or not keep:
            raise ValueError(f"decisions.{field}: {where} cannot run {[v for v in values if v in bad]} (through "
                             f"S3Scheduler); allow only {[v for v in values if v not in bad] or 'other values'}")
        update[field] = keep
    return decisions.model_copy(update=update) if update else decisions

"""The USF decision space: random schedules, valid by construction (pure functions, seeded rng)."""

from __future__ import annotations

import numpy as np

from s3_ray.usf.noise import NoiseSchedule
from s3_ray.usf.schedule import MAX_ORDER, Corrector, Derivative, Relaxation, SolverSchedule, Step

ORDER_PROBS = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}


def _random_points(rng: np.random.Generator, available: list[int], n: int) -> tuple[int, ...]:
    k = int(rng.integers(n, len(available) + 1))
    return tuple(int(p) for p in rng.choice(available, size=k, replace=False))


def _random_derivatives(rng, available: list[int], order: int, relax_sd: float) -> tuple[Derivative, ...]:
    out = []
    for n in range(1, order):
        slope = float(rng.normal(0.0, relax_sd)) if n == 1 and rng.random() < 0.5 else 0.0
        out.append(Derivative(points=_random_points(rng, available, n), relaxation=Relaxation(slope=slope)))
    return tuple(out)


def _random_times(rng, noise: NoiseSchedule, n_steps: int, t_end: float) -> list[float]:
    lam0, lam1 = float(noise.lambda_(noise.T)), float(noise.lambda_(t_end))
    # Sorted uniform logSNR points with a minimum gap, ending exactly at t_end.
    while True:
        inner = np.sort(rng.uniform(lam0, lam1, size=n_steps - 1))
        lams = np.concatenate([[lam0], inner, [lam1]])
        if np.all(np.diff(lams) > 1e-3 * (lam1 - lam0)):
            break
    t = [float(v) for v in noise.inverse_lambda(lams[1:])]
    t[-1] = float(t_end)
    return t


def random_schedule(rng: np.random.Generator, noise: NoiseSchedule, n_steps: int, *, t_end: float | None = None,
                    predictions=("noise", "data"), max_order: int = MAX_ORDER, correctors=("none", "pseudo", "implicit"),
                    afs=("none", "zero_x0", "mean_x0"), singlestep_prob: float = 0.1, bh_prob: float = 0.1,
                    relax_sd: float = 0.1) -> SolverSchedule:
    """A random valid schedule of ``n_steps`` steps (its NFE follows from the decisions)."""
    t_end = noise.t_end_default if t_end is None else t_end
    times = _random_times(rng, noise, n_steps, t_end)
    orders_all = np.array(sorted(ORDER_PROBS))
    steps = []
    for i, t in enumerate(times):
        history = i + 1
        allowed = orders_all[orders_all <= min(history, max_order)]
        probs = np.array([ORDER_PROBS[o] for o in allowed])
        order = int(rng.choice(allowed, p=probs / probs.sum()))
        start = -1
        if history >= 2 and rng.random() < singlestep_prob:
            start = -int(rng.integers(2, history + 1))
        pred = str(rng.choice(predictions))
        available = [-k for k in range(1, history + 1) if -k != start]
        if order > len(available) + 1:  # the start point took a slot the order needed
            start = -1
            available = [-k for k in range(2, history + 1)]
        combine = "taylor"
        if order >= 2 and start == -1 and rng.random() < bh_prob:
            combine = str(rng.choice(["bh1", "bh2"]))
            pts = tuple(range(-2, -order - 1, -1))
            derivs = tuple(Derivative(points=pts) for _ in range(order - 1))
        else:
            derivs = _random_derivatives(rng, available, order, relax_sd)
        corr = None
        kinds = [c for c in correctors if not (i == n_steps - 1 and c == "implicit")]
        kind = str(rng.choice(kinds))
        if kind != "none":
            c_order = int(min(order + 1, MAX_ORDER + 1, history + 1))
            c_avail = [-k for k in range(1, history + 2) if -k != start - 1]
            c_derivs = []
            for n in range(1, c_order):
                pts = set(_random_points(rng, c_avail, n)) | {-1}
                c_derivs.append(Derivative(points=tuple(pts)))
            corr = Corrector(kind=kind, order=max(c_order, 2), derivatives=tuple(c_derivs))
        steps.append(Step(t=t, prediction=pred, order=order, start=start, derivatives=derivs, combine=combine,
                          corrector=corr))
    return SolverSchedule(noise_schedule=noise.name, t_start=float(noise.T), afs=str(rng.choice(afs)), steps=tuple(steps))

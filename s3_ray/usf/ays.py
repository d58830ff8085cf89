"""Align Your Steps (Sabour, Fidler, Kreis, ICML 2024): published noise levels as time grids.

AYS optimised 10-step noise levels for particular models; other step counts use the authors'
log-linear interpolation (log sigma, linear at n + 1 uniformly spaced positions). The levels are
diffusers' sigma = sqrt((1 - alphabar) / alphabar) = exp(-lambda), so they apply only to a model with
that noise schedule: a ``vp_discrete`` table equal to Stable Diffusion's scaled_linear betas
(0.00085 .. 0.012, 1000 steps; SD 1.5 and SDXL share it). Anything else is refused.
Data and citation: ``s3_ray/assets/ays_schedules.json``.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from .noise import NoiseSchedule, VPDiscrete

DATA_FORMAT = "s3-ays-v1"


def data_path() -> Path:
    return Path(__file__).resolve().parents[1] / "assets" / "ays_schedules.json"


@lru_cache(maxsize=1)
def _data() -> dict:
    data = json.loads(data_path().read_text())
    if data.get("format") != DATA_FORMAT:
        raise ValueError(f"{data_path()}: format {data.get('format')!r}, expected {DATA_FORMAT!r}")
    return data


def ays_names() -> tuple[str, ...]:
    return tuple(_data()["schedules"])


def published_sigmas(name: str) -> list[float]:
    """The published 10-step noise levels of ``name`` (11 values, decreasing)."""
    try:
        return list(_data()["schedules"][name]["sigmas"])
    except KeyError:
        raise ValueError(f"unknown AYS schedule {name!r} (known: {', '.join(ays_names())})") from None


def loglinear_interp(sigmas, n_points: int) -> np.ndarray:
    """``n_points`` decreasing values: log(sigmas) interpolated linearly at uniformly spaced positions
    (the same positions 0..1 carry the published points). n_points = len(sigmas) returns them as given."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2, got {n_points}")
    if n_points == len(sigmas):
        return sigmas.copy()
    xs = np.linspace(0.0, 1.0, len(sigmas))
    new = np.interp(np.linspace(0.0, 1.0, n_points), xs, np.log(sigmas))
    return np.exp(new)


@lru_cache(maxsize=1)
def _reference_spec() -> dict:
    cfg = _data()["noise_schedule"]
    return VPDiscrete.from_diffusers_config({k: v for k, v in cfg.items() if k != "kind"}).spec()


def check_noise(name: str, noise: NoiseSchedule) -> None:
    """ValueError unless ``noise`` is the noise schedule the AYS levels ``name`` were made for."""
    published_sigmas(name)  # known name
    if noise.spec() != _reference_spec():
        raise ValueError(
            f"discretization {name!r}: the Align Your Steps levels are for Stable Diffusion's noise schedule "
            f"(vp_discrete, scaled_linear betas 0.00085..0.012, 1000 steps), not for noise schedule "
            f"{noise.name!r} ({noise.spec()}); use another discretization for this model")


def ays_times(noise: NoiseSchedule, name: str, n_steps: int) -> np.ndarray:
    """n_steps + 1 decreasing times of the AYS levels ``name`` under ``noise`` (checked to match).

    sigma = exp(-lambda), so t = noise.inverse_lambda(-log sigma). The published end levels are SD's
    sigma_max and sigma_min rounded to 3 decimals; they map to the table's ends T and 1/N exactly."""
    check_noise(name, noise)
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    sig = loglinear_interp(published_sigmas(name), n_steps + 1)
    t = np.asarray(noise.inverse_lambda(-np.log(sig)), dtype=np.float64)
    t[0], t[-1] = noise.T, noise.t_end_default
    if not np.all(np.diff(t) < 0) or not all(math.isfinite(v) for v in t):
        raise ValueError(f"discretization {name!r}: {n_steps} steps give times that do not decrease strictly")
    return t

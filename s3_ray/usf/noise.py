"""Noise schedules q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) in float64.

Every schedule gives log alpha_t, sigma_t, the half-log-SNR lambda_t = log alpha_t - log sigma_t
and its inverse t(lambda). Inputs may be Python floats or numpy arrays; outputs are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def _f64(x):
    return np.asarray(x, dtype=np.float64)


class NoiseSchedule:
    """Base class. Subclasses define ``log_alpha`` and ``inverse_lambda``; the rest follows."""

    name: str = "base"
    T: float = 1.0  # sampling starts here
    t_end_default: float = 1e-3  # usual end of sampling
    t_min: float = 0.0  # smallest time the schedule is defined at (exclusive for VP continuous)

    def log_alpha(self, t):
        raise NotImplementedError

    def alpha(self, t):
        return np.exp(self.log_alpha(t))

    def sigma(self, t):
        # sigma^2 = 1 - alpha^2 for VP: -expm1(2 log alpha) avoids cancellation near t = 0.
        return np.sqrt(-np.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t):
        la = self.log_alpha(t)
        return la - 0.5 * np.log(-np.expm1(2.0 * la))

    def inverse_lambda(self, lam):
        raise NotImplementedError

    def spec(self) -> dict:
        """A JSON-able description (name + parameters) that rebuilds this schedule."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


def _vp_log_alpha_from_lambda(lam):
    # alpha^2 = 1 / (1 + e^{-2 lambda})  =>  log alpha = -1/2 log1p(e^{-2 lambda})
    return -0.5 * np.logaddexp(0.0, -2.0 * _f64(lam))


@dataclass(repr=False)
class VPLinear(NoiseSchedule):
    """VP SDE with linear beta(t) = beta_0 + t (beta_1 - beta_0), t in (0, 1] (ScoreSDE, DPM-Solver)."""

    beta_0: float = 0.1
    beta_1: float = 20.0
    name: str = field(default="vp_linear", init=False)
    T: float = field(default=1.0, init=False)
    t_end_default: float = field(default=1e-3, init=False)

    def log_alpha(self, t):
        t = _f64(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lam):
        # Solve 1/4 db t^2 + 1/2 b0 t = L with L = -log alpha, in the cancellation-free form.
        four_l = -4.0 * _vp_log_alpha_from_lambda(lam)
        db = self.beta_1 - self.beta_0
        return four_l / (self.beta_0 + np.sqrt(self.beta_0**2 + db * four_l))

    def spec(self) -> dict:
        return {"name": self.name, "beta_0": self.beta_0, "beta_1": self.beta_1}


@dataclass(repr=False)
class VPCosine(NoiseSchedule):
    """Improved-DDPM cosine schedule in continuous time, alpha_t = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2)."""

    s: float = 0.008
    name: str = field(default="vp_cosine", init=False)
    t_end_default: float = field(default=1e-3, init=False)

    def __post_init__(self):
        # Keep alpha_T away from 0 (as DPM-Solver does): T = 0.9946 for s = 0.008.
        self.T = 0.9946 if self.s == 0.008 else 1.0 - 1e-3
        self._log_c0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t):
        t = _f64(t)
        return np.log(np.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_c0

    def inverse_lambda(self, lam):
        la = _vp_log_alpha_from_lambda(lam)
        return 2.0 * (1.0 + self.s) / math.pi * np.arccos(np.exp(la + self._log_c0)) - self.s

    def spec(self) -> dict:
        return {"name": self.name, "s": self.s}


class VPDiscrete(NoiseSchedule):
    """Discrete-time VP (DDPM/ADM/LDM/Stable Diffusion): t_n = (n+1)/N for training step n,
    log alpha interpolated piecewise-linearly in t between the nodes 1/2 log(alphabar_n).

    The network's own time label for time t is N t - 1 (the integer training step at the nodes).
    """

    name = "vp_discrete"
    T = 1.0

    def __init__(self, betas=None, alphas_cumprod=None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("VPDiscrete needs exactly one of betas or alphas_cumprod")
        if betas is not None:
            betas = _f64(betas)
            if betas.ndim != 1 or len(betas) < 2 or np.any(betas <= 0) or np.any(betas >= 1):
                raise ValueError("betas must be a 1-D table with values in (0, 1)")
            log_abar = np.cumsum(np.log1p(-betas))
        else:
            abar = _f64(alphas_cumprod)
            if abar.ndim != 1 or len(abar) < 2 or np.any(abar <= 0) or np.any(abar >= 1):
                raise ValueError("alphas_cumprod must be a 1-D table with values in (0, 1)")
            if np.any(np.diff(abar) >= 0):
                raise ValueError("alphas_cumprod must be strictly decreasing")
            log_abar = np.log(abar)
        self.N = len(log_abar)
        self.t_nodes = np.arange(1, self.N + 1, dtype=np.float64) / self.N
        self.log_alpha_nodes = 0.5 * log_abar
        self.t_min = 1.0 / self.N
        self.t_end_default = 1.0 / self.N
        self._betas = betas

    @classmethod
    def from_diffusers_config(cls, config) -> VPDiscrete:
        """Build from a diffusers scheduler config (dict or FrozenDict): ``num_train_timesteps``,
        ``beta_schedule`` (linear, scaled_linear, squaredcos_cap_v2), ``beta_start``, ``beta_end``,
        or ``trained_betas``."""
        cfg = dict(config)
        n = int(cfg.get("num_train_timesteps", 1000))
        trained = cfg.get("trained_betas")
        if trained is not None:
            return cls(betas=np.asarray(trained, dtype=np.float64))
        kind = cfg.get("beta_schedule", "linear")
        b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 2e-2))
        if kind == "linear":
            betas = np.linspace(b0, b1, n, dtype=np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(b0**0.5, b1**0.5, n, dtype=np.float64) ** 2
        elif kind == "squaredcos_cap_v2":
            f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
        else:
            raise ValueError(f"beta_schedule {kind!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")
        return cls(betas=betas)

    def log_alpha(self, t):
        return np.interp(_f64(t), self.t_nodes, self.log_alpha_nodes)

    def inverse_lambda(self, lam):
        la = _vp_log_alpha_from_lambda(lam)
        # log alpha decreases with t: interpolate on the reversed (increasing) table.
        return np.interp(la, self.log_alpha_nodes[::-1], self.t_nodes[::-1])

    def time_label(self, t):
        """The network's time input (training step index, fractional between nodes)."""
        return self.N * _f64(t) - 1.0

    def spec(self) -> dict:
        return {"name": self.name, "log_alpha_nodes_sha": _table_hash(self.log_alpha_nodes), "N": self.N}


@dataclass(repr=False)
class EDM(NoiseSchedule):
    """EDM / VE parameterisation: alpha = 1, sigma_t = t, lambda = -log t."""

    sigma_max: float = 80.0
    sigma_min: float = 0.002
    name: str = field(default="edm", init=False)

    def __post_init__(self):
        self.T = self.sigma_max
        self.t_end_default = self.sigma_min
        self.t_min = 0.0

    def log_alpha(self, t):
        return np.zeros_like(_f64(t))

    def alpha(self, t):
        return np.ones_like(_f64(t))

    def sigma(self, t):
        return _f64(t).copy()

    def lambda_(self, t):
        return -np.log(_f64(t))

    def inverse_lambda(self, lam):
        return np.exp(-_f64(lam))

    def spec(self) -> dict:
        return {"name": self.name, "sigma_max": self.sigma_max, "sigma_min": self.sigma_min}


@dataclass(repr=False)
class FlowMatch(NoiseSchedule):
    """Rectified flow (SD3, Flux): x_t = (1 - t) x_0 + t eps, so alpha = 1 - t, sigma = t,
    lambda = log((1 - t) / t). Time t is diffusers' flow ``sigma``; its ``shift`` only moves the
    time grid, so it is not a parameter here.

    lambda is infinite at t = 1, so sampling starts at T = 1 - 1/N (N = num_train_timesteps; 0.999,
    label 999, the last training step with finite lambda) and ends by default at 1/N (diffusers'
    sigma_min for shift 1).
    """

    num_train_timesteps: int = 1000
    name: str = field(default="flow", init=False)

    def __post_init__(self):
        n = int(self.num_train_timesteps)
        if n < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps!r}")
        self.T = 1.0 - 1.0 / n
        self.t_end_default = 1.0 / n
        self.t_min = 0.0

    def log_alpha(self, t):
        return np.log1p(-_f64(t))

    def alpha(self, t):
        return 1.0 - _f64(t)

    def sigma(self, t):
        return _f64(t).copy()

    def lambda_(self, t):
        t = _f64(t)
        return np.log1p(-t) - np.log(t)

    def inverse_lambda(self, lam):
        # t = 1 / (1 + e^lambda) = sigmoid(-lambda), without overflow for large |lambda|.
        lam = _f64(lam)
        e = np.exp(-np.abs(lam))
        return np.where(lam >= 0, e / (1.0 + e), 1.0 / (1.0 + e))

    def time_label(self, t):
        """The flow transformer's time input, N t (diffusers: sigma * num_train_timesteps)."""
        return self.num_train_timesteps * _f64(t)

    def spec(self) -> dict:
        if self.num_train_timesteps == 1000:
            return {"name": self.name}
        return {"name": self.name, "num_train_timesteps": self.num_train_timesteps}


def _table_hash(a) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float64).tobytes()).hexdigest()[:16]


NOISE_SCHEDULES = {"vp_linear": VPLinear, "vp_cosine": VPCosine, "edm": EDM, "flow": FlowMatch}


def get_noise_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a named schedule. ``vp_discrete`` takes ``betas``/``alphas_cumprod`` or a diffusers
    ``config``; with no argument it is the DDPM linear table (1e-4 .. 2e-2, 1000 steps)."""
    if name == "vp_discrete":
        if "config" in kwargs:
            return VPDiscrete.from_diffusers_config(kwargs["config"])
        if not kwargs:
            return VPDiscrete.from_diffusers_config({})
        return VPDiscrete(**kwargs)
    try:
        cls = NOISE_SCHEDULES[name]
    except KeyError:
        known = ", ".join(sorted([*NOISE_SCHEDULES, "vp_discrete"]))
        raise ValueError(f"unknown noise schedule {name!r} (known: {known})") from None
    return cls(**kwargs)


_BETA_SCHEDULES = "linear, scaled_linear, squaredcos_cap_v2, trained_betas"


def noise_from_diffusers_config(config) -> NoiseSchedule:
    """The noise schedule of a diffusers scheduler config (dict or FrozenDict, as in
    scheduler_config.json): FlowMatch for ``FlowMatch*`` schedulers (or a config with ``shift`` and
    no betas), VPDiscrete from the beta table otherwise. Grid options (shift, dynamic shifting,
    karras sigmas, timestep spacing, ...) do not change the noise schedule and are ignored."""
    cfg = dict(config)
    cls_name = str(cfg.get("_class_name") or "")
    has_betas = any(k in cfg for k in ("beta_schedule", "beta_start", "beta_end", "trained_betas"))
    n = cfg.get("num_train_timesteps", 1000)
    if not isinstance(n, int) or isinstance(n, bool) or n < 2:
        raise ValueError(f"scheduler_config.json field 'num_train_timesteps': {n!r} is not an integer >= 2")
    if cls_name.startswith("FlowMatch") or ("shift" in cfg and not has_betas):
        if cfg.get("invert_sigmas"):
            raise ValueError("scheduler_config.json field 'invert_sigmas': true (Mochi's reversed flow "
                             "time) is not supported")
        return FlowMatch(num_train_timesteps=n)
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler_config.json field 'rescale_betas_zero_snr': true is not supported "
                         "(alphas_cumprod reaches 0 at the last step, so lambda = -inf at T)")
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is None and kind not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise ValueError(f"scheduler_config.json field 'beta_schedule': {kind!r} is not supported ({_BETA_SCHEDULES})")
    try:
        return VPDiscrete.from_diffusers_config(cfg)
    except ValueError as e:
        field_name = "trained_betas" if cfg.get("trained_betas") is not None else "beta_schedule"
        raise ValueError(f"scheduler_config.json field {field_name!r}: {e}") from None

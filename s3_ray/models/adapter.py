"""Model adapters: any network output (eps, x0, v, score) -> eps(x, t) for one noise schedule.

The adapter maps continuous time t to the network's own time label, converts the output to the
noise prediction eps, derives nothing else (the sampler computes x0 = (x - sigma eps) / alpha), and
counts calls so NFE accounting can be checked against reality.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from s3_ray.usf.noise import NoiseSchedule

OUTPUTS = ("eps", "x0", "v", "score", "flow")

# diffusers' ``prediction_type`` -> our output kind.
DIFFUSERS_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def to_eps(output: str, out, x, alpha: float, sigma: float):
    """The noise prediction eps from a network output of kind ``output`` at x = alpha x0 + sigma eps.

    eps: eps; x0: x0; v: alpha eps - sigma x0; score: -eps / sigma; flow: the velocity
    eps - x0 of flow transformers (any alpha, sigma; alpha + sigma = 1 on the flow path)."""
    if output == "eps":
        return out
    if output == "x0":
        return (x - alpha * out) / sigma
    if output == "v":
        # x = alpha x0 + sigma eps, v = alpha eps - sigma x0  =>  eps = (alpha v + sigma x) / (alpha^2 + sigma^2)
        return (alpha * out + sigma * x) / (alpha**2 + sigma**2)
    if output == "score":
        return -sigma * out
    if output == "flow":
        # x = alpha x0 + sigma eps, v = eps - x0  =>  eps = (x + alpha v) / (alpha + sigma)
        return (x + alpha * out) / (alpha + sigma)
    raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")


def output_for_prediction_type(prediction_type, scheduler_class: str | None = None) -> str:
    """Our output kind for a diffusers scheduler's ``prediction_type``; FlowMatch* schedulers'
    models predict the flow velocity whatever the field says (they have no such field)."""
    if scheduler_class and str(scheduler_class).startswith("FlowMatch"):
        return "flow"
    try:
        return DIFFUSERS_PREDICTION_TYPES[prediction_type]
    except (KeyError, TypeError):
        known = ", ".join(DIFFUSERS_PREDICTION_TYPES)
        raise ValueError(f"scheduler_config.json field 'prediction_type': {prediction_type!r} is not "
                         f"supported ({known})") from None


def time_label_fn(kind, noise: NoiseSchedule) -> Callable[[float], float]:
    """Map t to the network's time input: ``t``, ``scale:K`` (K t, e.g. 999 or 1000), ``discrete``
    (the schedule's own ``time_label``: N t - 1, the training step, for discrete VP; N t for flow),
    ``sigma`` (sigma_t / alpha_t, EDM), or a callable."""
    if callable(kind):
        return kind
    if kind == "t":
        return lambda t: t
    if isinstance(kind, str) and kind.startswith("scale:"):
        k = float(kind.split(":", 1)[1])
        return lambda t: k * t
    if kind == "discrete":
        if not hasattr(noise, "time_label"):
            raise ValueError(f"time label 'discrete' needs a noise schedule with its own time labels "
                             f"(vp_discrete, flow), not {noise.name}")
        return lambda t: float(noise.time_label(t))
    if kind == "sigma":
        return lambda t: float(noise.sigma(t) / noise.alpha(t))
    raise ValueError(f"unknown time label {kind!r} (t, scale:K, discrete, sigma, or a callable)")


class ModelAdapter:
    """eps(x, t) from ``net(x, labels)`` where labels is a [batch] tensor of time labels.

    ``output``: what the network predicts (eps, x0, v, score, flow; see ``to_eps``). ``calls`` counts
    evaluations (NFE). A class-conditional network (``n_classes > 0``) is called ``net(x, labels, y)``
    with class ids ``y`` (``None``: its unconditional branch); ``guidance_scale > 1`` samples with
    classifier-free guidance (``cfg_eps``: both branches in one batched call, one NFE)."""

    def __init__(self, net: Callable, noise: NoiseSchedule, output: str = "eps", time_label="t",
                 data_mean: torch.Tensor | None = None, n_classes: int = 0, guidance_scale: float = 1.0):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if guidance_scale != 1.0 and not n_classes:
            raise ValueError("guidance_scale: classifier-free guidance needs a class-conditional network")
        self.net = net
        self.noise = noise
        self.output = output
        self.label = time_label_fn(time_label, noise)
        self.data_mean = data_mean
        self.n_classes = int(n_classes)
        self.guidance_scale = float(guidance_scale)
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: float, classes: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        labels = torch.full((x.shape[0],), self.label(t), dtype=x.dtype, device=x.device)
        if classes is None:
            out = self.net(x, labels)
        elif not self.n_classes:
            raise ValueError("class labels given to an unconditional network")
        elif self.guidance_scale == 1.0:
            out = self.net(x, labels, classes)
        else:
            out = cfg_eps(self.net, x, labels, classes, self.n_classes, self.guidance_scale)
        if self.output == "eps":
            return out
        return to_eps(self.output, out, x, float(self.noise.alpha(t)), float(self.noise.sigma(t)))

    @property
    def batch_factor(self) -> int:
        """Network batch per sample: 2 under classifier-free guidance (both branches in one call)."""
        return 2 if self.n_classes and self.guidance_scale != 1.0 else 1

    def with_classes(self, classes: torch.Tensor) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """eps(x, t) of samples whose class ids are ``classes`` (calls counted on this adapter)."""
        return lambda x, t: self(x, t, classes)


def cfg_eps(net: Callable, x: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor, null_class: int,
            scale: float) -> torch.Tensor:
    """Classifier-free guidance, out_u + scale (out_c - out_u): the conditional (``classes``) and
    unconditional (class id ``null_class``) outputs from one network call on the doubled batch."""
    null = torch.full_like(classes, null_class)
    both = net(torch.cat([x, x]), torch.cat([labels, labels]), torch.cat([classes, null]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


def balanced_classes(start: int, n: int, n_classes: int) -> torch.Tensor:
    """The class id of samples start..start+n-1: round-robin, so every class is equally represented and
    a sample's class depends on its index only (common random numbers across schedules)."""
    return torch.arange(start, start + n) % n_classes

"""ModelAdapter: every network output (eps, x0, v, score) and time label (t, scale:K, sigma) against
exact conversions for Gaussian data, whose eps, x0, v and score are known in closed form.

For x0 ~ N(mu, diag(var)) and x_t = alpha x0 + sigma eps, with m = alpha^2 var + sigma^2:
score = -(x - alpha mu) / m, eps = E[eps | x] = sigma (x - alpha mu) / m,
x0 = E[x0 | x] = mu + alpha var (x - alpha mu) / m, v = alpha eps - sigma x0.
The formulas below are written out here, not taken from the package.
"""

import math

import pytest
import torch

from s3_ray.models.adapter import ModelAdapter, time_label_fn
from s3_ray.models.analytic import GaussianData
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import EDM, VPCosine, VPLinear
from s3_ray.usf.sampler import sample

F64 = torch.float64
MU = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
VAR = torch.tensor([0.05, 0.5, 2.0], dtype=F64)


def vp_linear_alpha_sigma(t: float) -> tuple[float, float]:
    """VP linear (beta_0 = 0.1, beta_1 = 20): log alpha = -t^2 (beta_1 - beta_0) / 4 - t beta_0 / 2."""
    log_alpha = -0.25 * t * t * (20.0 - 0.1) - 0.5 * t * 0.1
    alpha = math.exp(log_alpha)
    return alpha, math.sqrt(1.0 - alpha * alpha)


def alpha_sigma(noise, t: float) -> tuple[float, float]:
    if isinstance(noise, EDM):
        return 1.0, t
    if isinstance(noise, VPLinear):
        return vp_linear_alpha_sigma(t)
    # VP cosine (s = 0.008): alpha = cos((t + s) / (1 + s) pi/2) / cos(s / (1 + s) pi/2)
    s = 0.008
    alpha = math.cos((t + s) / (1 + s) * math.pi / 2) / math.cos(s / (1 + s) * math.pi / 2)
    return alpha, math.sqrt(1.0 - alpha * alpha)


def exact(noise, x: torch.Tensor, t: float) -> dict:
    a, s = alpha_sigma(noise, t)
    m = a * a * VAR + s * s
    r = x - a * MU
    eps = s * r / m
    x0 = MU + a * VAR * r / m
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -r / m}


def exact_net(noise, output: str, label_to_t):
    """A 'network' emitting the exact ``output`` at the time it decodes from its label."""
    seen = []

    def net(x, labels):
        assert labels.shape == (x.shape[0],) and labels.dtype == x.dtype
        assert torch.all(labels == labels[0])
        seen.append(float(labels[0]))
        return exact(noise, x, label_to_t(float(labels[0])))[output]

    net.seen = seen
    return net


NOISES = [VPLinear(), VPCosine(), EDM()]
TIMES = {"vp_linear": [1.0, 0.5, 0.1, 1e-3], "vp_cosine": [0.99, 0.5, 0.02], "edm": [80.0, 5.0, 0.3, 0.002]}


def points(noise, t):
    a, s = alpha_sigma(noise, t)
    x0 = MU + VAR.sqrt() * torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    return a * x0 + s * torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=F64)


@pytest.mark.parametrize("noise", NOISES, ids=lambda n: n.name)
@pytest.mark.parametrize("output", ["eps", "x0", "v", "score"])
def test_output_converted_to_exact_eps_and_x0(noise, output):
    adapter = ModelAdapter(exact_net(noise, output, lambda label: label), noise, output=output, time_label="t")
    for t in TIMES[noise.name]:
        x = points(noise, t)
        want = exact(noise, x, t)
        eps = adapter(x, t)
        a, s = alpha_sigma(noise, t)
        # x0 -> eps divides by sigma: round-off of x grows by 1/sigma at small t
        scale = float(want["eps"].abs().max()) + float(x.abs().max()) / s
        assert float((eps - want["eps"]).abs().max()) <= 1e-12 * scale, (output, t)
        x0 = (x - s * eps) / a  # what the sampler derives from the adapter's eps
        assert float((x0 - want["x0"]).abs().max()) <= 1e-9 * max(1.0, float(x.abs().max())), (output, t)
    assert adapter.calls == len(TIMES[noise.name])


def test_v_and_score_differ_from_eps_so_the_conversion_matters():
    noise = VPLinear()
    x, t = points(noise, 0.3), 0.3
    want = exact(noise, x, t)
    for wrong in ("v", "score", "x0"):  # treating these outputs as eps would be far off
        assert float((want[wrong] - want["eps"]).abs().max()) > 0.1


@pytest.mark.parametrize("kind, k", [("scale:999", 999.0), ("scale:1000", 1000.0), ("scale:0.5", 0.5)])
def test_time_label_scale(kind, k):
    noise = VPLinear()
    label = time_label_fn(kind, noise)
    for t in (1.0, 0.37, 1e-3):
        assert label(t) == k * t
    net = exact_net(noise, "v", lambda lab: lab / k)
    adapter = ModelAdapter(net, noise, output="v", time_label=kind)
    x = points(noise, 0.37)
    eps = adapter(x, 0.37)
    assert net.seen == [pytest.approx(k * 0.37, rel=1e-15)]
    assert float((eps - exact(noise, x, 0.37)["eps"]).abs().max()) <= 1e-12


def test_time_label_sigma_vp_linear():
    """sigma label = sigma_t / alpha_t = sqrt(exp(-2 log alpha_t) - 1) (the EDM noise level)."""
    noise = VPLinear()
    label = time_label_fn("sigma", noise)
    for t in (1.0, 0.5, 0.1, 1e-3):
        log_alpha = -0.25 * t * t * 19.9 - 0.05 * t
        want = math.sqrt(math.expm1(-2.0 * log_alpha))
        assert label(t) == pytest.approx(want, rel=1e-12), t
    assert label(1.0) == pytest.approx(152.167, rel=1e-5)  # sqrt(e^{2 * 5.025} - 1)

    def label_to_t(sig):  # invert sigma/alpha = sqrt(e^{2L} - 1), L = 4.975 t^2 + 0.05 t
        L = 0.5 * math.log1p(sig * sig)
        return (-0.05 + math.sqrt(0.05**2 + 4 * 4.975 * L)) / (2 * 4.975)

    net = exact_net(noise, "score", label_to_t)
    adapter = ModelAdapter(net, noise, output="score", time_label="sigma")
    for t in (0.8, 0.05):
        x = points(noise, t)
        assert float((adapter(x, t) - exact(noise, x, t)["eps"]).abs().max()) <= 1e-9


def test_time_label_sigma_edm_is_t():
    noise = EDM()
    label = time_label_fn("sigma", noise)
    for t in (80.0, 1.0, 0.002):
        assert label(t) == t


def test_time_label_errors_and_callable():
    noise = VPLinear()
    assert time_label_fn(lambda t: 3.0 * t + 1.0, noise)(0.5) == 2.5
    with pytest.raises(ValueError, match="unknown time label"):
        time_label_fn("sqrt", noise)
    with pytest.raises(ValueError, match="its own time labels"):
        time_label_fn("discrete", noise)
    with pytest.raises(ValueError, match="output must be one of"):
        ModelAdapter(lambda x, lab: x, noise, output="velocity")


@pytest.mark.parametrize("noise", [VPLinear(), EDM()], ids=lambda n: n.name)
@pytest.mark.parametrize("output", ["v", "score"])
def test_sampling_through_v_and_score_nets_matches_the_exact_ode(noise, output):
    """A UniPC solve through a v- or score-network adapter is the solve with the exact eps (to
    round-off), and both land near the exact Gaussian flow (solver error ~1.5e-4 at 60 NFE)."""
    data = GaussianData(noise, mean=MU, var=VAR)
    x_T = torch.randn(5, 3, generator=torch.Generator().manual_seed(2), dtype=F64) * float(noise.sigma(noise.T))
    s = build_baseline("unipc_bh2", noise, 60)
    adapter = ModelAdapter(exact_net(noise, output, lambda label: label), noise, output=output)
    out = sample(s, adapter, noise, x_T)
    with_eps = sample(s, lambda x, t: exact(noise, x, t)["eps"], noise, x_T)
    ref = data.solve(x_T, s.t_start, s.t_end)
    assert adapter.calls == 60
    assert float((out - with_eps).abs().max()) < 1e-12 * float(ref.abs().max())
    assert float((out - ref).abs().max()) < 5e-4 * float(ref.abs().max())

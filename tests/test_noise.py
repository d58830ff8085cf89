import numpy as np
import pytest

from s3_ray.usf.noise import EDM, FlowMatch, VPCosine, VPDiscrete, VPLinear, get_noise_schedule

SCHEDULES = [VPLinear(), VPCosine(), EDM(), FlowMatch(), get_noise_schedule("vp_discrete"),
             VPDiscrete.from_diffusers_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})]


@pytest.mark.parametrize("ns", SCHEDULES, ids=lambda n: n.name)
def test_lambda_inverse_roundtrip(ns):
    t = np.linspace(max(ns.t_min, ns.t_end_default), ns.T, 101)
    lam = ns.lambda_(t)
    assert np.all(np.diff(lam) < 0), "lambda must decrease with t"
    np.testing.assert_allclose(ns.inverse_lambda(lam), t, rtol=1e-10, atol=1e-13)
    if ns.name not in ("edm", "flow"):  # VP only
        np.testing.assert_allclose(ns.alpha(t) ** 2 + ns.sigma(t) ** 2, 1.0, rtol=1e-13)
    np.testing.assert_allclose(lam, np.log(ns.alpha(t)) - np.log(ns.sigma(t)), rtol=1e-12, atol=1e-12)


def test_vp_linear_closed_form():
    ns = VPLinear()
    t = np.array([1e-3, 0.3, 1.0])
    np.testing.assert_allclose(ns.log_alpha(t), -0.25 * t**2 * 19.9 - 0.05 * t, rtol=1e-15)


def test_vp_discrete_matches_diffusers_table():
    from diffusers import DDPMScheduler

    for cfg in [{"beta_schedule": "linear"}, {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
                {"beta_schedule": "squaredcos_cap_v2"}]:
        sched = DDPMScheduler(num_train_timesteps=1000, **cfg)
        ns = VPDiscrete.from_diffusers_config(sched.config)
        abar = sched.alphas_cumprod.double().numpy()
        t_nodes = (np.arange(1000) + 1) / 1000
        # diffusers keeps the table in float32
        np.testing.assert_allclose(ns.alpha(t_nodes) ** 2, abar, rtol=5e-5)
        np.testing.assert_allclose(ns.time_label(t_nodes), np.arange(1000), atol=1e-9)


def test_bad_inputs_named():
    with pytest.raises(ValueError, match="beta_schedule"):
        VPDiscrete.from_diffusers_config({"beta_schedule": "nope"})
    with pytest.raises(ValueError, match="unknown noise schedule"):
        get_noise_schedule("vp_nonsense")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPDiscrete(alphas_cumprod=[0.5, 0.9])

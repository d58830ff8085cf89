"""Equivalence of our sampler with diffusers 0.42 schedulers (DPM-Solver(++) multi- and singlestep,
UniPC, DDIM).

Same model (an exact Gaussian-mixture eps in float32), same time grid, same x_T, float32 on both
sides; the max absolute difference of the results, relative to max |x| of our result, is bounded
per scheduler family by the figures the README quotes, with a small margin (measured here:
UniPC 5.3e-5, singlestep 6.8e-6, DDIM 7.4e-7, DPMSolverMultistep 5.8e-7; run ``pytest -s`` to
see every value).

diffusers' multistep schedulers are driven on OUR grid: after ``set_timesteps(n)`` we overwrite
``sigmas`` (N + 1 values, terminal included: sigma_d = sigma_t / alpha_t = exp(-lambda(t_i))) and
``timesteps`` (N unique integers, only used to find the step index). ``step()`` reads nothing
else of the grid: alpha_t, sigma_t and lambda_t all come from ``sigmas`` through
``_sigma_to_alpha_sigma_t``, and the state (``model_outputs``, ``lower_order_nums``,
``step_index``, UniPC's ``last_sample``/``this_order``) is reset by ``set_timesteps``. Inside the
diffusers loop the model is evaluated at our t_i (the time whose noise level is ``sigmas[i]``);
VP samples are not scaled (``init_noise_sigma == 1``, ``scale_model_input`` is the identity).

DDIM indexes ``alphas_cumprod`` by integer timesteps, so there we use diffusers' own grid and
build our order-1 schedule on the same times (training step k -> t = (k + 1) / N; the final
``alphas_cumprod[0]`` -> t = 1 / N). diffusers' table is float32, ours float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    UniPCMultistepScheduler,
)

from s3_ray.models.analytic import GaussianMixture
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import VPDiscrete
from s3_ray.usf.sampler import sample
from s3_ray.usf.schedule import SolverSchedule, Step

torch.set_num_threads(1)

# diffusers' own warnings: algorithm_type 'dpmsolver' is deprecated; numpy 2 __array__ copy keyword
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*algorithm_type dpmsolver.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*algorithm_types=dpmsolver. is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

TOL = 6e-5  # UniPC (noise prediction carries it: diffusers' float32 scalar math, see test_unipc)
TOL_SINGLESTEP = 1e-5
TOL_DPM = 1e-6  # DDIM and DPMSolverMultistep
CONFIG = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
N_TRAIN = CONFIG["num_train_timesteps"]
SHAPE = (8, 1, 4, 4)  # batch 8, d = 16

# (discretization, steps, t_end): our grids for the multistep schedulers
GRIDS = {
    "logsnr10": ("logsnr_uniform", 10, 1.0 / N_TRAIN),
    "quad8": ("time_quadratic", 8, 3.0 / N_TRAIN),
}


@pytest.fixture(scope="module")
def noise():
    return VPDiscrete.from_diffusers_config(CONFIG)


@pytest.fixture(scope="module")
def model(noise):
    g = torch.Generator().manual_seed(0)
    d = int(np.prod(SHAPE[1:]))
    means = 1.5 * torch.randn(3, d, generator=g, dtype=torch.float64)
    gm = GaussianMixture(noise, weights=[0.5, 0.3, 0.2], means=means, stds=[0.3, 0.5, 0.4])

    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        # exact eps (float64), returned in the sample's dtype (float32, like a network)
        return gm.eps(x.to(torch.float64), float(t)).to(x.dtype)

    return eps


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float32)


def rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all()
    return float((ours - ref).abs().max() / ours.abs().max())


def check(label: str, ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> float:
    err = rel_diff(ours, ref)
    print(f"\n[diffusers equivalence] {label}: max relative difference {err:.3e}")
    assert err <= tol, f"{label}: max relative difference {err:.3e} > {tol:.0e}"
    return err


def run_diffusers_on_grid(sched, noise, times, model, x_T: torch.Tensor,
                          sigma_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run a diffusers multistep scheduler (DPMSolverMultistep / UniPCMultistep) on our time grid
    ``times`` = t_0 > ... > t_M; the model is evaluated at t_i on step i. diffusers keeps
    ``sigmas`` in float32 (so all its scalar math is float32); ``sigma_dtype`` can change that."""
    times = np.asarray(times, dtype=np.float64)
    n = len(times) - 1
    assert sched.init_noise_sigma == 1.0
    sched.set_timesteps(n)  # resets model_outputs, lower_order_nums, step_index, last_sample
    sigmas_d = np.exp(-noise.lambda_(times))  # sigma_t / alpha_t
    sched.sigmas = torch.from_numpy(sigmas_d).to(sigma_dtype)
    # Only used to look up step_index: any N unique integers (descending, like diffusers').
    sched.timesteps = torch.arange(n, 0, -1, dtype=torch.int64) * 10
    sched.num_inference_steps = n
    x = x_T.clone()
    for i, ts in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, ts)
        assert x_in is x or torch.equal(x_in, x)  # VP: no input scaling
        eps = model(x_in, float(times[i]))
        x = sched.step(eps, ts, x).prev_sample
        assert sched.step_index == i + 1
    assert x.dtype == x_T.dtype
    return x


# ---------------------------------------------------------------------------------------------
# DPM-Solver(++) multistep


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize(
    "ours_name, algorithm_type, order",
    [
        ("dpm_solver_pp_2m", "dpmsolver++", 2),
        ("dpm_solver_pp_3m", "dpmsolver++", 3),
        ("dpm_solver_2m", "dpmsolver", 2),
        ("dpm_solver_3m", "dpmsolver", 3),
    ],
)
def test_dpm_solver_multistep(noise, model, x_T, ours_name, algorithm_type, order, grid):
    disc, n, t_end = GRIDS[grid]
    ours_sched = build_baseline(ours_name, noise, n, discretization=disc, t_end=t_end, lower_order_final=False)
    assert len(ours_sched.steps) == n
    ours = sample(ours_sched, model, noise, x_T.clone())

    sched = DPMSolverMultistepScheduler(
        **CONFIG, solver_order=order, algorithm_type=algorithm_type, solver_type="midpoint",
        prediction_type="epsilon", lower_order_final=False, euler_at_final=False, final_sigmas_type="sigma_min",
    )
    ref = run_diffusers_on_grid(sched, noise, ours_sched.times, model, x_T)
    check(f"DPMSolverMultistep {algorithm_type} order {order} vs {ours_name} [{grid}]", ours, ref, tol=TOL_DPM)


# ---------------------------------------------------------------------------------------------
# UniPC


UNIPC_CASES = [
    ("unipc_bh1", "bh1", 2, True),
    ("unipc_bh2", "bh2", 2, True),
    ("unipc_bh1_3", "bh1", 3, True),
    ("unipc_bh2_3", "bh2", 3, True),
    ("unipc_bh1", "bh1", 2, False),
    ("unipc_bh2", "bh2", 2, False),
    ("unipc_bh1_3", "bh1", 3, False),
    ("unipc_bh2_3", "bh2", 3, False),
]


def _unipc_pair(noise, model, x_T, ours_name, solver_type, order, predict_x0, grid, sigma_dtype):
    disc, n, t_end = GRIDS[grid]
    prediction = "data" if predict_x0 else "noise"
    ours_sched = build_baseline(ours_name, noise, n, discretization=disc, t_end=t_end, lower_order_final=False,
                                prediction=prediction)
    assert len(ours_sched.steps) == n and all(s.prediction == prediction for s in ours_sched.steps)
    ours = sample(ours_sched, model, noise, x_T.clone())

    sched = UniPCMultistepScheduler(
        **CONFIG, solver_order=order, solver_type=solver_type, predict_x0=predict_x0, prediction_type="epsilon",
        lower_order_final=False, disable_corrector=[], final_sigmas_type="sigma_min",
    )
    ref = run_diffusers_on_grid(sched, noise, ours_sched.times, model, x_T, sigma_dtype=sigma_dtype)
    label = (f"UniPCMultistep {solver_type} order {order} predict_x0={predict_x0} vs {ours_name}"
             f"(prediction={prediction}) [{grid}]")
    return label, ours, ref


@pytest.mark.parametrize("grid", list(GRIDS))
@pytest.mark.parametrize("ours_name, solver_type, order, predict_x0", UNIPC_CASES)
def test_unipc(noise, model, x_T, ours_name, solver_type, order, predict_x0, grid):
    # The noise-prediction cases carry most of the float32 difference (up to ~5e-5 on quad8):
    # it is diffusers' float32 scalar math (lambda from float32 sigmas, phi recurrences, rho
    # solve); with float64 sigmas diffusers lands within ~1e-5 of the float64 solution, as we do.
    label, ours, ref = _unipc_pair(noise, model, x_T, ours_name, solver_type, order, predict_x0, grid, torch.float32)
    check(label, ours, ref)


@pytest.mark.parametrize("ours_name, solver_type, order, predict_x0", UNIPC_CASES)
def test_unipc_float64(noise, model, x_T, ours_name, solver_type, order, predict_x0):
    """UniPC's step() does not upcast to float32: with float64 sigmas and samples both sides are
    the same algorithm to rounding (measured ~1e-14)."""
    label, ours, ref = _unipc_pair(noise, model, x_T.to(torch.float64), ours_name, solver_type, order, predict_x0,
                                   "quad8", torch.float64)
    assert ours.dtype == ref.dtype == torch.float64
    check("float64 " + label, ours, ref, tol=1e-12)


# ---------------------------------------------------------------------------------------------
# DDIM (diffusers' own integer grid)


def ddim_times(sched: DDIMScheduler) -> list[float]:
    """Our times for diffusers' DDIM grid: its timesteps and, after the last, the step it goes to."""
    ts = [int(k) for k in sched.timesteps]
    stride = sched.config.num_train_timesteps // sched.num_inference_steps
    prev = [k - stride for k in ts]
    assert prev[:-1] == ts[1:], "diffusers' DDIM steps to timestep - stride; the grid must be equally spaced"
    assert prev[-1] < 0, "the last DDIM step must go to final_alpha_cumprod"
    # final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one=False): training step 0 -> t = 1/N
    assert torch.equal(sched.final_alpha_cumprod, sched.alphas_cumprod[0])
    labels = ts + [0]
    return [(k + 1) / N_TRAIN for k in labels]


@pytest.mark.parametrize(
    "spacing, n, steps_offset",
    [("trailing", 10, 0), ("trailing", 8, 0), ("leading", 10, 1)],
)
@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_ddim(noise, model, x_T, spacing, n, steps_offset, prediction):
    sched = DDIMScheduler(**CONFIG, timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=False,
                          clip_sample=False, prediction_type="epsilon")
    sched.set_timesteps(n)
    times = ddim_times(sched)
    assert sched.init_noise_sigma == 1.0

    x = x_T.clone()
    for i, ts in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, ts)
        assert torch.equal(x_in, x)
        x = sched.step(model(x_in, times[i]), ts, x, eta=0.0).prev_sample
    ref = x

    ours_sched = SolverSchedule(noise_schedule=noise.name, t_start=times[0],
                                steps=tuple(Step(t=t, prediction=prediction, order=1) for t in times[1:]))
    # the same steps as our DDIM baseline, on diffusers' times
    base = build_baseline("ddim", noise, n, prediction=prediction)
    assert [b.model_copy(update={"t": s.t}) for b, s in zip(base.steps, ours_sched.steps)] == list(ours_sched.steps)
    ours = sample(ours_sched, model, noise, x_T.clone())
    check(f"DDIM {spacing} n={n} steps_offset={steps_offset} vs order-1 {prediction} schedule", ours, ref, tol=TOL_DPM)



# ---------------------------------------------------------------------------------------------
# DPM-Solver(++) singlestep


def _singlestep_variant(s: SolverSchedule, solver_type: str) -> SolverSchedule:
    """Our singlestep builder is the official DPM-Solver-2/3 (the papers' algorithms). diffusers'
    DPMSolverSinglestepScheduler mixes the parts differently:
    - order 2: ``midpoint`` is our 2S (relaxation dpmsolver2); ``heun`` is the plain Taylor step;
    - order 3: the intermediate (second) sub-step is the order-2 formula of ``solver_type``, and the
      final sub-step is our DPM-Solver-3 one-point step for ``midpoint`` (D1_1), a full order-3
      Taylor step on both intermediate points for ``heun`` (D1, D2).
    So the builder's 3S is heun's intermediate sub-step followed by midpoint's final one."""
    d = s.model_dump()
    midpoint = {"kind": "dpmsolver2", "scale": 1.0, "slope": 0.0}
    plain = {"kind": "linear", "scale": 1.0, "slope": 0.0}
    for st in d["steps"]:
        if st["start"] == -2:  # the order-2 sub-step of a macro step (2S: its last; 3S: its second)
            st["derivatives"][0]["relaxation"] = midpoint if solver_type == "midpoint" else plain
        elif st["start"] == -3 and solver_type == "heun":
            st["order"] = 3
            st["derivatives"] = [{"points": (-1, -2), "relaxation": plain}] * 2
    return SolverSchedule.model_validate(d)


def _singlestep_pair(noise, model, x_T, ours_name, order, solver_type, sigma_dtype):
    built = build_baseline(ours_name, noise, 12, t_end=1.0 / N_TRAIN, lower_order_final=False)
    prediction = "data" if "_pp_" in ours_name else "noise"
    # the builder: macro steps of [order 1, order 2 from -2 (, order 2 from -3)], the papers' formulas
    expected = {2: [(1, -1, None), (2, -2, "dpmsolver2")],
                3: [(1, -1, None), (2, -2, "linear"), (2, -3, "linear")]}[order] * (12 // order)
    assert [(st.order, st.start, st.derivatives[0].relaxation.kind if st.derivatives else None)
            for st in built.steps] == expected
    assert all(st.prediction == prediction for st in built.steps)
    variant = _singlestep_variant(built, solver_type)
    ours = sample(variant, model, noise, x_T.clone())
    sched = DPMSolverSinglestepScheduler(
        **CONFIG, solver_order=order, algorithm_type="dpmsolver++" if prediction == "data" else "dpmsolver",
        solver_type=solver_type, prediction_type="epsilon", lower_order_final=False, final_sigmas_type="sigma_min",
    )
    ref = run_diffusers_on_grid(sched, noise, variant.times, model, x_T, sigma_dtype=sigma_dtype)
    assert sched.order_list == [1, 2, 3][:order] * (12 // order)
    label = f"DPMSolverSinglestep order {order} {solver_type} vs {ours_name}"
    return label, variant == built, ours, ref


SINGLESTEP_CASES = [(name, order, solver_type)
                    for name, order in [("dpm_solver_2s", 2), ("dpm_solver_pp_2s", 2), ("dpm_solver_3s", 3),
                                        ("dpm_solver_pp_3s", 3)]
                    for solver_type in ("midpoint", "heun")]


@pytest.mark.parametrize("ours_name, order, solver_type", SINGLESTEP_CASES)
def test_dpm_solver_singlestep(noise, model, x_T, ours_name, order, solver_type):
    label, unchanged, ours, ref = _singlestep_pair(noise, model, x_T, ours_name, order, solver_type, torch.float32)
    assert unchanged == (order == 2 and solver_type == "midpoint")  # 2S is diffusers' midpoint as built
    check(label + ("" if unchanged else " (variant)"), ours, ref, tol=TOL_SINGLESTEP)


@pytest.mark.parametrize("ours_name, order, solver_type", SINGLESTEP_CASES)
def test_dpm_solver_singlestep_float64(noise, model, x_T, ours_name, order, solver_type):
    """The singlestep step() keeps the sample's dtype: in float64 both sides agree to rounding."""
    label, _, ours, ref = _singlestep_pair(noise, model, x_T.to(torch.float64), ours_name, order, solver_type,
                                           torch.float64)
    assert ours.dtype == ref.dtype == torch.float64
    check("float64 " + label, ours, ref, tol=1e-12)

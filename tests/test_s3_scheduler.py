"""S3Scheduler inside real diffusers pipelines (tiny random-weight DDPM, Stable Diffusion and flow
pipelines from tests/tiny_pipelines.py; CPU, float32).

- Stock schedulers: in the same pipeline from the same latents, S3Scheduler holding our DDIM,
  DPM-Solver++(2M) and UniPC-bh2 schedules on the stock scheduler's own time grid reproduces
  DDIMScheduler, DPMSolverMultistepScheduler and UniPCMultistepScheduler (relative max difference
  <= 1e-5; measured ~7e-7, the stock schedulers' float32 table and scalar math).
- Random schedules of the full search space run through the pipeline equal our sampler
  (SamplerPlan + ModelAdapter over the same network, CFG applied the same way), with the denoiser
  called exactly schedule.nfe() times.
- Round trips, refusals, v-prediction and flow models.
Run with ``-s`` to see every measured value.
"""

from __future__ import annotations

import functools
import inspect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.utils.torch_utils import randn_tensor

from s3_ray import S3Scheduler
from s3_ray.models.adapter import ModelAdapter
from s3_ray.pipelines import check_expressible
from s3_ray.search.space import random_schedule
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import VPLinear
from s3_ray.usf.sampler import SamplerPlan
from s3_ray.usf.schedule import ScheduleError, SolverSchedule
from tests.tiny_pipelines import build_sd

torch.set_num_threads(1)

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

TOL = 1e-5
GUIDANCE = 5.0
SD_SHAPE = (2, 4, 8, 8)  # two prompts, latents 4 x 8 x 8
N = 1000


# ---- fixtures and helpers -------------------------------------------------------------------
def _load(cls, path):
    pipe = cls.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return _load(StableDiffusionPipeline, tiny_sd)


@pytest.fixture(scope="module")
def ddpm(tiny_ddpm):
    return _load(DDPMPipeline, tiny_ddpm)


@pytest.fixture(scope="module")
def flow(tiny_flow):
    return _load(DDPMPipeline, tiny_flow)


@pytest.fixture(scope="module")
def sd_v(tmp_path_factory):
    return _load(StableDiffusionPipeline, build_sd(tmp_path_factory.mktemp("pipelines") / "sd-v", seed=1,
                                                   prediction_type="v_prediction"))


@pytest.fixture(scope="module")
def prompts():
    """Prompt and negative-prompt embeddings for two prompts (the CLIP encoder's output shape)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)


def sd_latents(seed: int = 5) -> torch.Tensor:
    return torch.randn(SD_SHAPE, generator=torch.Generator().manual_seed(seed))


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float32
    assert torch.isfinite(ours).all() and torch.isfinite(ref).all()
    return float((ours - ref).abs().max() / ref.abs().max())


def report(label: str, err: float, tol: float = TOL) -> float:
    print(f"\n[S3Scheduler] {label}: max relative difference {err:.3e}")
    assert err <= tol, f"{label}: {err:.3e} > {tol:.0e}"
    return err


class CallCounter:
    """Counts forward calls of a denoiser (one per batched call, so CFG counts once)."""

    def __init__(self, module):
        self.calls = 0
        self._module, self._forward = module, module.forward

        @functools.wraps(self._forward)
        def counted(*args, **kwargs):
            self.calls += 1
            return self._forward(*args, **kwargs)

        module.forward = counted

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._module.forward = self._forward


def on_grid(schedule: SolverSchedule, times) -> SolverSchedule:
    """The same decisions on the time grid ``times`` (t_start, then one time per step)."""
    d = schedule.model_dump()
    assert len(d["steps"]) == len(times) - 1
    d["t_start"] = float(times[0])
    for st, t in zip(d["steps"], times[1:]):
        st["t"] = float(t)
    return SolverSchedule.model_validate(d)


def stock_grid(sched, n: int) -> list[float]:
    """Our times for a VP stock scheduler's integer grid: training step k <-> t = (k + 1) / N; the
    final step goes to alphas_cumprod[0] (final_sigmas_type='sigma_min' / set_alpha_to_one=False),
    i.e. t = 1 / N."""
    sched.set_timesteps(n)
    ks = [int(k) for k in sched.timesteps]
    assert len(set(ks)) == n and all(a > b for a, b in zip(ks, ks[1:])) and ks[-1] > 0
    return [(k + 1) / N for k in ks] + [1.0 / N]


def run_sd(pipe, scheduler, n: int, prompts, latents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Latents from the SD pipeline with CFG (output_type='latent') and the denoiser call count."""
    pe, ne = prompts
    own, pipe.scheduler = pipe.scheduler, scheduler
    try:
        with CallCounter(pipe.unet) as c:
            out = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, guidance_scale=GUIDANCE, num_inference_steps=n,
                       latents=latents.clone(), output_type="latent", height=8, width=8).images
    finally:
        pipe.scheduler = own
    return out, c.calls


def run_ddpm(pipe, scheduler, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(returned image, final sample before the pipeline's clamp, denoiser calls) of a DDPMPipeline."""
    last = {}
    step = scheduler.step
    takes_generator = "generator" in inspect.signature(step).parameters

    @functools.wraps(step)
    def recording(*args, **kwargs):
        if not takes_generator:  # DDPMPipeline always passes one; UniPCMultistepScheduler takes none
            kwargs.pop("generator", None)
        out = step(*args, **kwargs)
        last["x"] = out.prev_sample if kwargs.get("return_dict", True) else out[0]
        return out

    own, pipe.scheduler = pipe.scheduler, scheduler
    scheduler.step = recording
    try:
        with CallCounter(pipe.unet) as c:
            image = pipe(batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=n,
                         output_type="pt").images
    finally:
        del scheduler.step
        pipe.scheduler = own
    return image, last["x"], c.calls


def ddpm_latents(pipe, seed: int) -> torch.Tensor:
    """The noise DDPMPipeline draws for batch 2 with this seed."""
    cfg = pipe.unet.config
    shape = (2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=pipe.unet.dtype)


def cfg_net(pipe, prompts):
    """The SD denoiser with classifier-free guidance, as the pipeline applies it, as net(x, labels)."""
    pe, ne = prompts
    emb = torch.cat([ne, pe])

    def net(x, labels):
        out = pipe.unet(torch.cat([x] * 2), labels[0], encoder_hidden_states=emb, return_dict=False)[0]
        uncond, text = out.chunk(2)
        return uncond + GUIDANCE * (text - uncond)

    return net


def unet_net(pipe):
    return lambda x, labels: pipe.unet(x, labels[0]).sample


def ours(schedule, scheduler: S3Scheduler, net, output: str, x_T: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Our sampler (SamplerPlan + ModelAdapter) on the scheduler's noise schedule."""
    model = ModelAdapter(net, scheduler.noise, output=output, time_label="discrete")
    with torch.no_grad():
        x = SamplerPlan(schedule, scheduler.noise).run(model, x_T.clone())
    return x, model.calls


# ---- stock schedulers ------------------------------------------------------------------------
STOCK = {
    # name: (stock scheduler class and options, our baseline and options, steps)
    "DDIM": (DDIMScheduler, {"timestep_spacing": "trailing", "set_alpha_to_one": False, "clip_sample": False},
             "ddim", {"prediction": "data"}, 10),
    "DPM-Solver++(2M)": (DPMSolverMultistepScheduler, {"final_sigmas_type": "sigma_min"},
                         "dpm_solver_pp_2m", {"lower_order_final": True}, 8),
    "UniPC-bh2": (UniPCMultistepScheduler, {"final_sigmas_type": "sigma_min", "disable_corrector": []},
                  "unipc_bh2", {"lower_order_final": True}, 8),
}


def stock_pair(base_config, name: str):
    """The stock scheduler and an S3Scheduler holding our schedule on its grid."""
    cls, options, baseline, kw, n = STOCK[name]
    stock = cls.from_config(base_config, **options)
    times = stock_grid(stock, n)
    noise = S3Scheduler.from_config(base_config).noise
    schedule = on_grid(build_baseline(baseline, noise, n, **kw), times)
    return stock, S3Scheduler.from_config(base_config, schedules=[schedule]), n


@pytest.mark.parametrize("name", list(STOCK))
def test_sd_cfg_matches_stock_scheduler(sd, prompts, name):
    stock, s3, n = stock_pair(sd.scheduler.config, name)
    x_T = sd_latents()
    ref, ref_calls = run_sd(sd, stock, n, prompts, x_T)
    got, calls = run_sd(sd, s3, n, prompts, x_T)
    assert calls == ref_calls == n
    assert not torch.equal(got, x_T)
    report(f"StableDiffusionPipeline CFG {GUIDANCE} {name} ({n} steps) vs stock", rel(got, ref))


@pytest.mark.parametrize("name", list(STOCK))
def test_ddpm_matches_stock_scheduler(ddpm, name):
    stock, s3, n = stock_pair(ddpm.scheduler.config, name)
    ref_img, ref, ref_calls = run_ddpm(ddpm, stock, n, seed=7)
    img, got, calls = run_ddpm(ddpm, s3, n, seed=7)
    assert calls == ref_calls == n
    report(f"DDPMPipeline {name} ({n} steps) vs stock: final sample", rel(got, ref))
    report(f"DDPMPipeline {name} ({n} steps) vs stock: returned image", rel(img, ref_img))


def test_sd_v_prediction_matches_stock_and_our_sampler(sd_v, prompts):
    """A v-prediction UNet: S3Scheduler in the pipeline equals our sampler with ModelAdapter(output='v')
    and the stock DPM-Solver++(2M) on the same grid."""
    assert sd_v.scheduler.config.prediction_type == "v_prediction"
    stock, s3, n = stock_pair(sd_v.scheduler.config, "DPM-Solver++(2M)")
    assert s3.output == "v"
    x_T = sd_latents(6)
    got, calls = run_sd(sd_v, s3, n, prompts, x_T)
    ref, _ = run_sd(sd_v, stock, n, prompts, x_T)
    mine, my_calls = ours(s3.schedule_for(n), s3, cfg_net(sd_v, prompts), "v", x_T)
    assert calls == my_calls == n
    report("v_prediction SD: pipeline vs our sampler", rel(got, mine))
    report("v_prediction SD: pipeline vs stock DPMSolverMultistep", rel(got, ref))


# ---- random schedules of the search space ----------------------------------------------------
def _features(s: SolverSchedule) -> set[str]:
    f = {f"order{st.order}" for st in s.steps} | {st.prediction for st in s.steps} | {f"afs:{s.afs}"}
    for i, st in enumerate(s.steps):
        if st.start < -1:
            f.add("singlestep")
        if st.combine != "taylor" or (st.corrector and st.corrector.combine != "taylor"):
            f.add("unipc_combine")
        if any(not d.relaxation.is_identity for d in st.derivatives):
            f.add("relaxation")
        if st.corrector:
            f.add(st.corrector.kind)
            if i == len(s.steps) - 1:
                f.add("last_step_corrector")
    return f


ALL_FEATURES = {"order1", "order2", "order3", "order4", "noise", "data", "singlestep", "unipc_combine", "relaxation",
                "pseudo", "implicit", "last_step_corrector"}


def random_schedules(noise, count: int, seed: int, afs: str | None) -> list[SolverSchedule]:
    """``count`` random schedules of the full space (search.space.random_schedule: orders 1-4,
    both predictions, singlestep starts, relaxations, UniPC combine, pseudo/implicit correctors,
    last-step correctors) with NFE 3..8. ``afs``: force it (None keeps the draw, mean_x0 -> zero_x0)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        s = random_schedule(rng, noise, int(rng.integers(2, 9)))
        want = afs or ("zero_x0" if s.afs == "mean_x0" else s.afs)
        if want != s.afs:
            s = SolverSchedule.model_validate({**s.model_dump(), "afs": want})
        if 3 <= s.nfe() <= 8:
            out.append(s)
    return out


def _one_per_nfe(schedules):
    groups: dict[int, list] = {}
    for s in schedules:
        groups.setdefault(s.nfe(), []).append(s)
    return groups


def test_random_schedules_in_sd_equal_our_sampler(sd, prompts):
    base = S3Scheduler.from_config(sd.scheduler.config)
    schedules = random_schedules(base.noise, 40, seed=11, afs=None)
    seen = set().union(*map(_features, schedules))
    assert ALL_FEATURES | {"afs:zero_x0", "afs:none"} <= seen, sorted(ALL_FEATURES - seen)
    net = cfg_net(sd, prompts)
    worst, nearest_miss = 0.0, []
    for k, s in enumerate(schedules):
        check_expressible(s, sd)
        s3 = S3Scheduler.from_config(sd.scheduler.config, schedules=[s])
        x_T = sd_latents(100 + k)
        got, calls = run_sd(sd, s3, s.nfe(), prompts, x_T)
        mine, my_calls = ours(s, s3, net, "eps", x_T)
        assert calls == my_calls == s.nfe(), (k, calls, my_calls, s.nfe())
        err = rel(got, mine)
        print(f"\n[S3Scheduler] SD random schedule {k}: NFE {s.nfe()}, {len(s.steps)} steps, afs {s.afs}, "
              f"calls {calls}: max relative difference {err:.3e}")
        assert err <= TOL, (k, err, s.to_json())
        worst = max(worst, err)
        if any(st.corrector for st in s.steps):
            # the comparison sees single decisions: the same schedule without its correctors is far off
            plain = SolverSchedule.model_validate({**s.model_dump(), "steps": [
                {**st.model_dump(), "corrector": None} for st in s.steps]})
            nearest_miss.append(rel(got, ours(plain, s3, net, "eps", x_T)[0]))
    print(f"\n[S3Scheduler] SD: {len(schedules)} random schedules, worst {worst:.3e}; without their correctors "
          f"({len(nearest_miss)} schedules) the smallest difference is {min(nearest_miss):.3e}")
    assert len(nearest_miss) >= 10 and min(nearest_miss) > 10 * TOL


def test_random_schedules_in_ddpm_equal_our_sampler(ddpm):
    base = S3Scheduler.from_config(ddpm.scheduler.config)
    schedules = random_schedules(base.noise, 10, seed=12, afs="none")
    groups = _one_per_nfe(schedules)
    net = unet_net(ddpm)
    worst = 0.0
    for nfe, group in sorted(groups.items()):
        # one scheduler holds a schedule per NFE; the pipeline's num_inference_steps picks it
        for s in group:
            s3 = S3Scheduler.from_config(ddpm.scheduler.config, schedules=[s])
            _, got, calls = run_ddpm(ddpm, s3, nfe, seed=nfe)
            mine, my_calls = ours(s, s3, net, "eps", ddpm_latents(ddpm, nfe))
            assert calls == my_calls == nfe
            err = rel(got, mine)
            worst = max(worst, err)
            assert err <= TOL, (err, s.to_json())
    print(f"\n[S3Scheduler] DDPM: {len(schedules)} random schedules (NFE {sorted(groups)}), worst {worst:.3e}")


def test_one_scheduler_holds_one_schedule_per_nfe(ddpm):
    """Several NFEs in one scheduler: each num_inference_steps runs its own schedule."""
    noise = S3Scheduler.from_config(ddpm.scheduler.config).noise
    held = [build_baseline("unipc_bh2", noise, 4), build_baseline("dpm_solver_pp_3m", noise, 6)]
    s3 = S3Scheduler.from_config(ddpm.scheduler.config, schedules=held)
    assert s3.nfes == (4, 6)
    for s in held:
        _, got, calls = run_ddpm(ddpm, s3, s.nfe(), seed=1)
        mine, _ = ours(s, s3, unet_net(ddpm), "eps", ddpm_latents(ddpm, 1))
        assert calls == s.nfe()
        report(f"DDPM scheduler holding NFE {s3.nfes}: NFE {s.nfe()}", rel(got, mine))


# ---- flow models -----------------------------------------------------------------------------
def test_flow_random_schedules_equal_our_sampler(flow):
    assert isinstance(flow.scheduler, FlowMatchEulerDiscreteScheduler)
    s3 = S3Scheduler.from_config(flow.scheduler.config)
    assert s3.noise.name == "flow" and s3.output == "flow"
    schedules = random_schedules(s3.noise, 6, seed=13, afs="none")
    worst = 0.0
    for s in schedules:
        s3 = S3Scheduler.from_config(flow.scheduler.config, schedules=[s])
        assert s3.timesteps is None
        _, got, calls = run_ddpm(flow, s3, s.nfe(), seed=2)
        assert torch.allclose(s3.timesteps.double(), torch.tensor([1000 * t for t in SamplerPlan(s, s3.noise).eval_times],
                                                                  dtype=torch.float64), rtol=1e-6)
        mine, my_calls = ours(s, s3, unet_net(flow), "flow", ddpm_latents(flow, 2))
        assert calls == my_calls == s.nfe()
        err = rel(got, mine)
        worst = max(worst, err)
        assert err <= TOL, (err, s.to_json())
    print(f"\n[S3Scheduler] flow: {len(schedules)} random schedules, worst {worst:.3e}")


def test_flow_first_order_equals_flow_match_euler(flow):
    """Our order-1 step is the flow Euler step x + (sigma_next - sigma) v. The stock grid starts at
    sigma = 1 and ends at sigma = 0, where lambda = log((1 - sigma) / sigma) is -inf / +inf: neither is
    a time a USF schedule can hold. So both run the stock grid with those two ends moved to T = 0.999
    and t_end = 1/N (the stock scheduler's sigmas overwritten)."""
    stock = FlowMatchEulerDiscreteScheduler.from_config(flow.scheduler.config)
    n = 8
    stock.set_timesteps(n)
    sig = [float(v) for v in stock.sigmas]
    assert sig[0] == 1.0 and sig[-1] == 0.0 and len(sig) == n + 1
    noise = S3Scheduler.from_config(flow.scheduler.config).noise
    times = [noise.T, *sig[1:-1], 1.0 / N]
    orig = stock.set_timesteps

    def on_our_grid(num_inference_steps=None, device=None, **kw):
        orig(num_inference_steps, device, **kw)
        stock.sigmas = torch.tensor(times, dtype=torch.float32)
        stock.timesteps = stock.sigmas[:-1] * N

    stock.set_timesteps = on_our_grid
    s = on_grid(build_baseline("ddim", noise, n, prediction="data"), times)
    s3 = S3Scheduler.from_config(flow.scheduler.config, schedules=[s])
    _, ref, _ = run_ddpm(flow, stock, n, seed=3)
    _, got, calls = run_ddpm(flow, s3, n, seed=3)
    assert calls == n
    report("flow: order-1 schedule vs FlowMatchEulerDiscreteScheduler (same sigmas)", rel(got, ref))


# ---- config, round trips, refusals -----------------------------------------------------------
def _schedules(noise):
    return [build_baseline("unipc_bh2", noise, 5), build_baseline("dpm_solver_pp_3m", noise, 7, afs="zero_x0"),
            random_schedule(np.random.default_rng(5), noise, 4)]


def test_save_and_load_restore_config_and_schedules_exactly(sd, tmp_path):
    noise = S3Scheduler.from_config(sd.scheduler.config).noise
    held = [s if s.afs != "mean_x0" else SolverSchedule.model_validate({**s.model_dump(), "afs": "none"})
            for s in _schedules(noise)]
    s3 = S3Scheduler.from_config(sd.scheduler.config, schedules=[held[0].to_json(), held[1], held[2]])
    assert s3.config.source_scheduler == "DDIMScheduler" and s3.config.beta_schedule == "scaled_linear"
    assert set(s3.config) == {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                              "prediction_type", "shift", "source_scheduler", "schedules"}  # no stray DDIM keys
    s3.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "S3Scheduler"
    loaded = S3Scheduler.from_pretrained(str(tmp_path))
    fields = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert fields(loaded.config) == fields(s3.config)
    by_nfe = {s.nfe(): s.schedule_hash() for s in held}
    assert {n: loaded.schedule_for(n).schedule_hash() for n in loaded.nfes} == by_nfe
    assert loaded.noise.spec() == s3.noise.spec()
    # from_config of its own config (and replacing the schedules) keeps the noise schedule
    again = S3Scheduler.from_config(loaded.config, schedules=held[:1])
    assert again.nfes == (held[0].nfe(),) and again.noise.spec() == s3.noise.spec()
    x_T = sd_latents(9)
    n = held[1].nfe()
    a, _ = run_sd(sd, s3, n, (torch.ones(2, 16, 32), torch.zeros(2, 16, 32)), x_T)
    b, _ = run_sd(sd, loaded, n, (torch.ones(2, 16, 32), torch.zeros(2, 16, 32)), x_T)
    assert torch.equal(a, b)


LOADER = """
import sys
import diffusers
path = sys.argv[1]
try:
    diffusers.DiffusionPipeline.from_pretrained(path)
except ValueError as e:
    assert "import s3_ray" in str(e), e
else:
    raise SystemExit("loaded without import s3_ray")
import s3_ray
assert "s3_ray.pipelines.scheduler" not in sys.modules
pipe = diffusers.DiffusionPipeline.from_pretrained(path)
print(type(pipe.scheduler).__name__, list(pipe.scheduler.nfes))
"""


def test_pipeline_folder_naming_s3_ray_loads_after_import(ddpm, tmp_path):
    noise = S3Scheduler.from_config(ddpm.scheduler.config).noise
    s3 = S3Scheduler.from_config(ddpm.scheduler.config, schedules=[build_baseline("unipc_bh2", noise, 5)])
    pipe = DDPMPipeline(unet=ddpm.unet, scheduler=s3)
    pipe.save_pretrained(str(tmp_path / "p"), safe_serialization=True)
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["scheduler"] == ["s3_ray", "S3Scheduler"]
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "p")], capture_output=True, text=True,
                       cwd=root, timeout=300, env={"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1",
                                                   "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split("\n")[-2] == "S3Scheduler [5]"
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "p"))
    assert isinstance(loaded.scheduler, S3Scheduler) and loaded.scheduler.nfes == (5,)


def test_import_s3_ray_does_not_import_diffusers():
    r = subprocess.run([sys.executable, "-c", "import sys, s3_ray; print('diffusers' in sys.modules)"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_unsupported_nfe_and_custom_grids_are_refused(ddpm):
    noise = S3Scheduler.from_config(ddpm.scheduler.config).noise
    s3 = S3Scheduler.from_config(ddpm.scheduler.config,
                                 schedules=[build_baseline("ddim", noise, 6), build_baseline("unipc_bh2", noise, 4)])
    with pytest.raises(ValueError, match=r"num_inference_steps=5; held NFEs: 4, 6"):
        s3.set_timesteps(5)
    with pytest.raises(ValueError, match="held NFEs: 4, 6"):
        run_ddpm(ddpm, s3, 1000, seed=0)  # DDPMPipeline's default num_inference_steps
    with pytest.raises(ValueError, match="custom timesteps cannot be used"):
        s3.set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="custom sigmas cannot be used"):
        s3.set_timesteps(sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="held NFEs: none"):
        S3Scheduler.from_config(ddpm.scheduler.config).set_timesteps(4)


def test_bad_configs_are_refused_naming_the_field(ddpm, flow):
    cfg = ddpm.scheduler.config
    noise = S3Scheduler.from_config(cfg).noise
    other = build_baseline("ddim", VPLinear(), 4)
    with pytest.raises(ScheduleError, match=r"schedules\[1\].noise_schedule: the schedule is for 'vp_linear'"):
        S3Scheduler.from_config(cfg, schedules=[build_baseline("ddim", noise, 5), other])
    flow_noise = S3Scheduler.from_config(flow.scheduler.config).noise
    with pytest.raises(ScheduleError, match=r"schedules\[0\].noise_schedule: the schedule is for 'vp_discrete'.*'flow'"):
        S3Scheduler.from_config(flow.scheduler.config, schedules=[build_baseline("ddim", noise, 5)])
    with pytest.raises(ScheduleError, match=r"schedules\[0\].noise_schedule: the schedule is for 'flow'"):
        S3Scheduler.from_config(cfg, schedules=[build_baseline("ddim", flow_noise, 5)])
    with pytest.raises(ScheduleError, match=r"schedules\[1\]: NFE 5 is already held by schedules\[0\]"):
        S3Scheduler.from_config(cfg, schedules=[build_baseline("ddim", noise, 5), build_baseline("unipc_bh2", noise, 5)])
    with pytest.raises(ScheduleError, match=r"schedules\[0\].afs: 'mean_x0'"):
        S3Scheduler.from_config(cfg, schedules=[build_baseline("ddim", noise, 5, afs="mean_x0")])
    with pytest.raises(ScheduleError, match=r"schedules\[0\]: .*steps\[0\]"):
        S3Scheduler.from_config(cfg, schedules=['{"noise_schedule": "vp_discrete", "t_start": 1.0, "steps": [{}]}'])
    with pytest.raises(ScheduleError, match=r"schedules\[0\].steps\[3\].t: .* below 0.001"):
        S3Scheduler.from_config(cfg, schedules=[build_baseline("ddim", noise, 4, t_end=5e-4)])
    with pytest.raises(ScheduleError, match=r"schedules\[0\].afs: .*NFE 0"):
        S3Scheduler.from_config(cfg, schedules=[build_baseline("ddim", noise, 0, afs="zero_x0")])
    with pytest.raises(ValueError, match="'prediction_type'"):
        S3Scheduler.from_config(cfg, prediction_type="eps")
    with pytest.raises(ValueError, match="'beta_schedule'"):
        S3Scheduler.from_config(cfg, beta_schedule="cosine")
    with pytest.raises(ValueError, match="'rescale_betas_zero_snr'"):
        S3Scheduler.from_config({**cfg, "rescale_betas_zero_snr": True})
    with pytest.raises(TypeError, match="unknown argument.*schedule\\b"):
        S3Scheduler.from_config(cfg, schedule=[])


def test_check_expressible_refuses_what_a_pipeline_cannot_run(ddpm, sd):
    noise = S3Scheduler.from_config(sd.scheduler.config).noise
    afs = build_baseline("dpm_solver_pp_2m", noise, 5, afs="zero_x0")
    plain = build_baseline("dpm_solver_pp_2m", noise, 5)
    mean = build_baseline("dpm_solver_pp_2m", noise, 5, afs="mean_x0")
    for pipe in ("DDPMPipeline", DDPMPipeline, ddpm):
        with pytest.raises(ScheduleError, match=r"afs: 'zero_x0' \(the analytical first step into steps\[0\]\).*"
                                                r"DDPMPipeline does not call scheduler.scale_model_input"):
            check_expressible(afs, pipe)
        check_expressible(plain, pipe)
    for pipe in ("StableDiffusionPipeline", "DDPMPipeline"):
        with pytest.raises(ScheduleError, match=r"afs: 'mean_x0' \(the analytical first step into steps\[0\]\) "
                                                "needs the data mean"):
            check_expressible(mean, pipe)
    check_expressible(afs, "StableDiffusionPipeline")
    check_expressible(afs, sd)
    with pytest.raises(ScheduleError, match="NoSuchPipeline is not a diffusers pipeline class"):
        check_expressible(afs, "NoSuchPipeline")


def test_afs_in_a_pipeline_without_scale_model_input_fails_at_the_first_step(ddpm):
    noise = S3Scheduler.from_config(ddpm.scheduler.config).noise
    s3 = S3Scheduler.from_config(ddpm.scheduler.config,
                                 schedules=[build_baseline("dpm_solver_pp_2m", noise, 5, afs="zero_x0")])
    with pytest.raises(ValueError, match="afs='zero_x0': the first model call must see x_t1.*scale_model_input"):
        run_ddpm(ddpm, s3, 5, seed=0)


def test_step_guards():
    s3 = S3Scheduler(schedules=[build_baseline("dpm_solver_pp_2m", S3Scheduler().noise, 3)])
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        s3.step(x, 999, x)
    s3.set_timesteps(3)
    labels = s3.timesteps.tolist()
    with pytest.raises(ValueError, match="timestep 500 is not timesteps\\[0\\]"):
        s3.step(x, 500, x)
    y = s3.step(x, labels[0], x).prev_sample
    with pytest.raises(ValueError, match="`sample` is not the latents returned by the previous step"):
        s3.step(x, labels[1], y + 1)
    y = s3.step(x, labels[1], y.clone()).prev_sample  # an equal copy is accepted
    y = s3.step(x, labels[2], y).prev_sample
    with pytest.raises(RuntimeError, match="called 4 times, but the schedule makes 3 model calls"):
        s3.step(x, labels[2], y)
    with pytest.raises(ValueError, match="cannot be truncated"):
        s3.set_begin_index(1)
    s3.set_begin_index(0)


def test_img2img_full_strength_matches_stock_and_partial_strength_is_refused(sd, prompts):
    pipe = StableDiffusionImg2ImgPipeline(**sd.components)
    pipe.set_progress_bar_config(disable=True)
    stock, s3, n = stock_pair(sd.scheduler.config, "DDIM")
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    pe, ne = prompts

    def run(sched, strength):
        pipe.scheduler = sched  # pipe is this test's own (it shares sd's modules, not its scheduler)
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, image=image, strength=strength,
                    guidance_scale=GUIDANCE, num_inference_steps=n, output_type="latent",
                    generator=torch.Generator().manual_seed(8)).images

    report("img2img strength 1.0 (add_noise at T), DDIM schedule vs DDIMScheduler", rel(run(s3, 1.0), run(stock, 1.0)))
    with pytest.raises(ValueError, match="cannot be truncated"):
        run(s3, 0.5)


def test_add_noise_at_the_labels_time(ddpm, flow):
    vp = S3Scheduler.from_config(ddpm.scheduler.config)
    x0, eps = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    ac = ddpm.scheduler.alphas_cumprod
    k = torch.tensor([0, 499, 999])
    want = ac[k].sqrt()[:, None, None] * x0 + (1 - ac[k]).sqrt()[:, None, None] * eps
    assert torch.allclose(vp.add_noise(x0, eps, k), want, rtol=1e-5, atol=1e-6)
    fl = S3Scheduler.from_config(flow.scheduler.config)
    sig = torch.tensor([0.25, 0.5, 0.9])
    want = (1 - sig)[:, None, None] * x0 + sig[:, None, None] * eps
    assert torch.allclose(fl.add_noise(x0, eps, sig * 1000), want, rtol=1e-6, atol=1e-7)

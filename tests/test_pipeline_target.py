"""``model.kind: diffusers_pipeline``: a search target that samples through the pipeline's own
``__call__`` with an ``S3Scheduler`` (tiny pipelines with random weights, tests/tiny_pipelines.py).

Checks: the target's samples are a direct ``pipe(...)`` call's, and our SamplerPlan + ModelAdapter's
over the same UNet with the same CFG; one denoiser call per NFE (a CFG pair is one); prompts encoded
once per process; the same latents for every schedule and batch size; RMSE against the reference
solve (0 for the reference itself), its disk cache and what invalidates it; the decisions a
pipeline cannot run are left out or refused; a real ``s3 search`` on local Ray over the tiny SD
pipeline with two prompts and CFG.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml

import s3_ray.models.pipeline as pl
from s3_ray.config import ConfigError, MetricConfig, ModelConfig, SearchConfig, parse_config
from s3_ray.metrics.evaluate import REFERENCE_SOLVER, AdapterSampler, Target, evaluate
from s3_ray.models.adapter import ModelAdapter
from s3_ray.search.preflight import check_files, search_decisions
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.schedule import load_schedule

from .search_helpers import ROOT, search_to_end, trial_runs

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
GUIDANCE = 3.0


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("a red cat\n\nblue dog on grass\n")  # the blank line is skipped: two prompts
    return p


def sd_cfg(tiny_sd, prompts, **kw) -> ModelConfig:
    return ModelConfig(kind="diffusers_pipeline", pipeline=str(tiny_sd), prompts=str(prompts),
                       guidance_scale=kw.pop("guidance_scale", GUIDANCE), **kw)


@pytest.fixture(scope="module")
def sd(tiny_sd, prompts) -> Target:
    return Target(sd_cfg(tiny_sd, prompts), MetricConfig(kind="rmse"))


def unet_calls(pipe):
    """A list that gets one entry (the batch size) per denoiser forward pass."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda _m, args, kwargs=None: seen.append(args[0].shape[0]))
    return seen, handle


def adapter_sampler(target: Target, n: int) -> AdapterSampler:
    """Our SamplerPlan + ModelAdapter over the pipeline's own UNet, CFG as the pipeline applies it."""
    p = target.producer
    model = ModelAdapter(p.guided_net(n), target.noise, output=p.output_kind(), time_label="discrete")
    return AdapterSampler(model, target.noise, target.shape, torch.float32, p.device, torch.zeros(target.shape))


@pytest.mark.parametrize("name,nfe", [("dpm_solver_pp_2m", 4), ("unipc_bh2", 5), ("dpm_solver_3s", 6)])
def test_samples_are_the_pipelines_own(sd, name, nfe):
    from s3_ray.pipelines import S3Scheduler

    p, n = sd.producer, 6
    s = build_baseline(name, sd.noise, nfe)
    seen, handle = unet_calls(p.pipe)
    try:
        ours = sd.sample(s, n, 0, space="latent")
        calls = list(seen)
        pipe = p.pipe
        original = pipe.scheduler
        pipe.scheduler = S3Scheduler.from_config(original.config, schedules=[s])
        pe, ne = p.conditioning(range(n))
        with torch.no_grad():
            direct = pipe(prompt_embeds=pe, negative_prompt_embeds=ne, latents=p.noise_batch(n, 0),
                          num_inference_steps=nfe, guidance_scale=GUIDANCE, output_type="latent",
                          return_dict=False)[0]
        pipe.scheduler = original
    finally:
        handle.remove()
    assert calls == [2 * n] * s.nfe()  # one call per NFE on the CFG-doubled batch
    assert (ours - direct).abs().max() <= 1e-6
    mine = adapter_sampler(sd, n).sample(s, n, 0, x_T=p.noise_batch(n, 0) * p.start_scale())
    scale = float(ours.abs().max())
    diff = float((mine - ours).abs().max())
    print(f"{name} NFE {nfe}: pipeline vs SamplerPlan + adapter max diff {diff:.2e} (max |x| {scale:.1f})")
    assert diff <= 1e-5


def test_prompts_are_encoded_once_per_process(tiny_sd, prompts, monkeypatch):
    monkeypatch.setattr(pl, "_LOADED", {})  # a fresh process's state
    target = Target(sd_cfg(tiny_sd, prompts), MetricConfig(kind="rmse"))
    pipe = target.producer.pipe
    encoded = []
    pipe.text_encoder.register_forward_pre_hook(lambda _m, args: encoded.append(args[0].shape[0]))
    for nfe in (3, 4):
        target.sample(build_baseline("ddim", target.noise, nfe), 5, nfe, chunk=2, space="latent")
    other = Target(sd_cfg(tiny_sd, prompts), MetricConfig(kind="rmse", samples=(8,)))  # another config, same pipeline
    other.sample(build_baseline("ddim", target.noise, 3), 4, 0, space="latent")
    assert other.producer.pipe is pipe
    assert encoded == [2, 2]  # once for every trial: the two prompts, then their negative prompts (CFG)


def test_common_random_numbers(sd):
    """The latents the denoiser first sees are the same for two schedules and two batch sizes."""
    p = sd.producer
    seen = []
    handle = p.pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    starts = []
    try:
        for s, chunk in ((build_baseline("ddim", sd.noise, 3), 6), (build_baseline("unipc_bh2", sd.noise, 5), 4)):
            seen.clear()
            sd.sample(s, 6, 11, chunk=chunk, space="latent")
            firsts = seen[:: s.nfe()]  # the first call of each pipeline call (batch)
            assert all(torch.equal(x[: len(x) // 2], x[len(x) // 2:]) for x in firsts)  # CFG: both halves
            starts.append(torch.cat([x[: len(x) // 2] for x in firsts]))
    finally:
        handle.remove()
    assert starts[0].shape == (6, *sd.shape) and torch.equal(starts[0], starts[1])
    assert torch.equal(starts[0], p.noise_batch(6, 11))
    assert not torch.equal(p.noise_batch(6, 11), p.noise_batch(6, 12))


def test_rmse_reference_and_its_cache(tiny_sd, prompts, tmp_path):
    cache = tmp_path / "cache"
    target = Target(sd_cfg(tiny_sd, prompts), MetricConfig(kind="rmse"))
    ref = build_baseline(REFERENCE_SOLVER[0], target.noise, REFERENCE_SOLVER[1])
    r0 = evaluate(ref, target, n=8, seed=0)
    r3 = evaluate(build_baseline("ddim", target.noise, 3), target, n=8, seed=0)
    print(f"RMSE (latents, 8 samples): reference vs itself {r0['rmse']}, 3-NFE DDIM {r3['rmse']:.4f}")
    assert r0["rmse"] == 0.0 and not r0["failed"]
    assert math.isfinite(r3["rmse"]) and r3["rmse"] > 0
    files = sorted(cache.glob("pipe-ref-*.npy"))
    assert len(files) == 1 and f"-latent-{REFERENCE_SOLVER[0]}-{REFERENCE_SOLVER[1]}-8-0.npy" in files[0].name

    def solves(cfg) -> tuple[int, float]:
        """(denoiser calls, RMSE) of a 3-NFE DDIM trial on a new Target (a new process: no in-memory cache)."""
        t = Target(cfg, MetricConfig(kind="rmse"))
        before = t.producer.calls
        r = evaluate(build_baseline("ddim", t.noise, 3), t, n=8, seed=0)
        return t.producer.calls - before, r["rmse"]

    assert solves(sd_cfg(tiny_sd, prompts)) == (3, r3["rmse"])  # the cached reference: only the trial's 3 calls
    changed = tmp_path / "prompts.txt"
    changed.write_text("a red cat\nblue dog on sand\n")
    calls, _ = solves(sd_cfg(tiny_sd, changed))
    assert calls == 3 + REFERENCE_SOLVER[1] and len(list(cache.glob("pipe-ref-*.npy"))) == 2
    calls, _ = solves(sd_cfg(tiny_sd, prompts, guidance_scale=2.0))
    assert calls == 3 + REFERENCE_SOLVER[1] and len(list(cache.glob("pipe-ref-*.npy"))) == 3
    img = Target(sd_cfg(tiny_sd, prompts, metric_space="image"), MetricConfig(kind="rmse"))
    r = evaluate(build_baseline("ddim", img.noise, 3), img, n=8, seed=0)
    assert 0 < r["rmse"] <= 2 and len(list(cache.glob("pipe-ref-*-image-*.npy"))) == 1  # images in [-1, 1]


@pytest.mark.parametrize("slope", [1e30, 1e300])  # NaN/Inf samples; a coefficient beyond float32
def test_a_blown_up_schedule_is_a_failed_trial(sd, slope):
    from s3_ray.usf.schedule import SolverSchedule

    d = json.loads(build_baseline("dpm_solver_pp_2m", sd.noise, 4).to_json())
    d["steps"][2]["derivatives"][0]["relaxation"] = {"kind": "linear", "scale": 1.0, "slope": slope}
    r = evaluate(SolverSchedule.from_dict(d), sd, n=4, seed=0)
    assert r["failed"] and r["score"] == r["rmse"] == MetricConfig().worst_score


@pytest.mark.parametrize("folder", ["tiny_ddpm", "tiny_flow"])
def test_unconditional_pipelines(folder, request):
    d = request.getfixturevalue(folder)
    target = Target(ModelConfig(kind="diffusers_pipeline", pipeline=str(d)), MetricConfig(kind="rmse"))
    assert target.noise.name == ("flow" if folder == "tiny_flow" else "vp_discrete")
    s = build_baseline("dpm_solver_pp_3m", target.noise, 5)
    ours = target.sample(s, 4, 0)
    mine = adapter_sampler(target, 4).sample(s, 4, 0, x_T=target.noise_batch(4, 0)).clamp(-1, 1)
    assert ours.shape == (4, 3, 8, 8) and (ours - mine).abs().max() <= 1e-5  # DDPMPipeline clamps its images
    r = evaluate(build_baseline("ddim", target.noise, 3), target, n=4, seed=0)
    assert not r["failed"] and r["rmse"] > 0


def build_dit(path: Path, seed: int = 0) -> Path:
    """A DiTPipeline folder: a one-layer DiT transformer (learned variance, 1000 classes + the null
    class), the tiny VAE of tests/tiny_pipelines.py, DDIM linear betas."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)
    DiTPipeline(transformer=net, vae=vae, scheduler=sched).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory) -> Path:
    return build_dit(tmp_path_factory.mktemp("pipelines") / "dit")


def test_class_conditional_pipeline(tiny_dit):
    """DiTPipeline with class labels and CFG: its images are our sampler's over the same transformer
    (CFG on the noise channels against the null class), decoded by its VAE; labels round-robin."""
    cfg = ModelConfig(kind="diffusers_pipeline", pipeline=str(tiny_dit), class_labels=[3, 7, 11], guidance_scale=4.0,
                      metric_space="image")
    target = Target(cfg, MetricConfig(kind="rmse"))
    p, n = target.producer, 6
    assert p.labels(range(n)) == [3, 7, 11, 3, 7, 11]
    s = build_baseline("unipc_bh2", target.noise, 5)
    before = p.calls
    ours = target.sample(s, n, 0)
    assert p.calls - before == s.nfe() and ours.shape == (n, 3, 8, 8)
    latents = adapter_sampler(target, n).sample(s, n, 0, x_T=target.noise_batch(n, 0))
    vae = p.pipe.vae
    with torch.no_grad():
        mine = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1) * 2 - 1
    assert (ours - mine).abs().max() <= 1e-5
    r = evaluate(build_baseline("ddim", target.noise, 3), target, n=n, seed=0)
    assert not r["failed"] and r["rmse"] > 0
    model = {"kind": "diffusers_pipeline", "pipeline": str(tiny_dit), "class_labels": [3], "metric_space": "image"}
    assert search_decisions(parse_config(space(model))).decisions.afs == ("none",)  # AFS: see SCALED_INPUT_TO_STEP
    with pytest.raises(ValueError, match="model.metric_space: DiTPipeline always decodes"):
        check_files(parse_config(space({**model, "metric_space": "latent"})))
    with pytest.raises(ValueError, match="model.class_labels: 1000 is not a class"):
        check_files(parse_config(space({**model, "class_labels": [1000]})))
    with pytest.raises(ValueError, match="model.prompts: DiTPipeline is class-conditional"):
        check_files(parse_config(space({**model, "class_labels": None, "prompts": "p.txt"})))


def space(model: dict, **kw) -> dict:
    return {"name": "p", "model": model, "metric": {"kind": "rmse", "samples": [8]}, "nfe": [3], **kw}


def test_decisions_a_pipeline_cannot_run(tiny_ddpm, tiny_sd, prompts):
    ddpm = {"kind": "diffusers_pipeline", "pipeline": str(tiny_ddpm)}
    sd = {**ddpm, "pipeline": str(tiny_sd), "prompts": str(prompts), "guidance_scale": GUIDANCE}
    assert search_decisions(parse_config(space(ddpm))).decisions.afs == ("none",)  # DDPMPipeline: no scale_model_input
    assert search_decisions(parse_config(space(sd))).decisions.afs == ("none", "zero_x0")  # mean_x0 nowhere
    for model, afs, cls in ((ddpm, ["none", "zero_x0"], "DDPMPipeline"), (sd, ["zero_x0", "mean_x0"], "StableDiffusion")):
        with pytest.raises(ValueError, match=f"decisions.afs: {cls}.*cannot run"):
            check_files(parse_config(space(model, decisions={"afs": afs})))
    from s3_ray.search.searcher import S3Searcher

    searcher = S3Searcher(parse_config(space(ddpm, random_init=6, budget=20)))
    assert {json.loads(q["schedule"])["afs"] for q in searcher.queue} == {"none"}


def test_pipeline_fields_are_checked(tiny_sd, tiny_ddpm, prompts, tmp_path):
    with pytest.raises(ConfigError, match="model.pipeline: required"):
        parse_config({"model": {"kind": "diffusers_pipeline"}}, "s.yaml")
    with pytest.raises(ConfigError, match="model.output: not used"):
        parse_config({"model": {"kind": "diffusers_pipeline", "pipeline": "x", "output": "v"}}, "s.yaml")
    with pytest.raises(ConfigError, match="model.prompts: only used with kind 'diffusers_pipeline'"):
        parse_config({"model": {"kind": "digits", "prompts": "p.txt"}}, "s.yaml")
    with pytest.raises(ConfigError, match="model.guidance_scale"):
        parse_config({"model": {"kind": "diffusers_pipeline", "pipeline": "x", "guidance_scale": 0.5}}, "s.yaml")
    with pytest.raises(ConfigError, match="metric.reference: 'data'"):
        parse_config({"model": {"kind": "diffusers_pipeline", "pipeline": "x"}, "metric": {"kind": "fid"}}, "s.yaml")

    def refused(model=None, metric=None, **kw) -> str:
        model = model or sd_cfg(tiny_sd, prompts, **kw)
        with pytest.raises(ValueError) as e:
            Target(model, metric or MetricConfig(kind="rmse"))
        return str(e.value)

    assert "model.image_size" in refused(image_size=(12, 12))
    assert "model.noise_schedule: 'flow' differs" in refused(noise_schedule="flow")
    assert "model.prompts: required" in refused(model=ModelConfig(kind="diffusers_pipeline", pipeline=str(tiny_sd)))
    assert "model.guidance_scale" in refused(model=ModelConfig(kind="diffusers_pipeline", pipeline=str(tiny_ddpm),
                                                               guidance_scale=2.0))
    assert "metric.feature_extractor:" in refused(metric=MetricConfig(kind="fid", reference="model"))
    missing = tmp_path / "inception.pth"
    fid = MetricConfig(kind="fid", reference="model", feature_extractor="inception-v3-compat",
                       feature_extractor_weights_path=str(missing))
    assert f"metric.feature_extractor_weights_path: {missing} does not exist" in refused(metric=fid)
    pickled = tmp_path / "pickled.pth"
    torch.save({"w": torch.zeros(1), "code": object}, pickled)  # needs unpickling of a class: refused
    assert "not a plain PyTorch state dict" in refused(metric=fid.model_copy(update={
        "feature_extractor_weights_path": str(pickled)}))
    assert parse_config(space({"kind": "diffusers_pipeline", "pipeline": str(tiny_sd), "prompts": str(prompts)}))


def example_space(tiny_sd, prompts, tmp_path) -> Path:
    """search_spaces/pipeline_example.yaml pointed at the tiny SD pipeline, made small."""
    data = yaml.safe_load((ROOT / "search_spaces" / "pipeline_example.yaml").read_text())
    data["model"].update(pipeline=str(tiny_sd), prompts=str(prompts), image_size=[8, 8], guidance_scale=GUIDANCE,
                         negative_prompt="blurry", batch_size=16)
    data.update(name="pipe", nfe=[3, 4], budget=10, stages=2, random_init=2, final_top_k=1,
                baselines=["dpm_solver_pp_2m", "unipc_bh2"], discretizations=["logsnr_uniform"],
                predictor={"epochs": 50, "candidates": 40}, resources={"cpu": 1, "gpu": 0}, concurrency=2,
                metric={"kind": "rmse", "samples": [16], "final_samples": 16, "final_seeds": 1})
    SearchConfig.model_validate(data)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_search_on_a_pipeline(tiny_sd, prompts, tmp_path):
    """`s3 search` on local Ray over the tiny SD pipeline: two prompts, CFG, RMSE, NFE 3 and 4."""
    from diffusers import StableDiffusionPipeline

    from s3_ray.pipelines import S3Scheduler

    start = time.perf_counter()
    r = search_to_end(example_space(tiny_sd, prompts, tmp_path), tmp_path, S3_CACHE_DIR=str(tmp_path / "cache"))
    print(r.stdout[-3000:])
    print(f"s3 search over the tiny SD pipeline: {time.perf_counter() - start:.1f} s")
    run_dir = tmp_path / "runs" / "pipe"
    runs = trial_runs(run_dir / "mlflow.db", "pipe")
    assert len(runs) == 10 and all(math.isfinite(r.data.metrics["rmse"]) for r in runs)
    assert all(r.data.metrics["failed"] == 0 for r in runs)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["nfe"] for row in summary["rows"]] == [3, 4] and math.isfinite(summary["rows"][0]["best_baseline_score"])
    assert json.loads((run_dir / "config.json").read_text())["decisions"]["afs"] == ["none", "zero_x0"]
    best = [load_schedule(run_dir / "best" / f"nfe{k}.json") for k in (3, 4)]
    assert [s.nfe() for s in best] == [3, 4] and all(s.noise_schedule == "vp_discrete" for s in best)
    assert (run_dir / "grids" / "nfe3.png").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = S3Scheduler.from_config(pipe.scheduler.config, schedules=best)
    seen, _ = unet_calls(pipe)
    with torch.no_grad():
        images = pipe(["a red cat", "blue dog on grass"], negative_prompt=["blurry"] * 2, height=8, width=8,
                      num_inference_steps=3, guidance_scale=GUIDANCE, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3) and bool(torch.isfinite(torch.as_tensor(images)).all())
    assert seen == [4, 4, 4]  # NFE 3, CFG-doubled batch of 2

    # `s3 export --diffusers OUT --pipeline PIPE`, loaded as the user would: the searched schedules' images.
    import subprocess
    import sys

    from diffusers import DiffusionPipeline

    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, "-m", "s3_ray.cli", "export", "--run", str(run_dir), "--diffusers", str(out),
                        "--pipeline", str(tiny_sd)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    exported = DiffusionPipeline.from_pretrained(str(out), use_safetensors=True, local_files_only=True)
    assert isinstance(exported.scheduler, S3Scheduler) and exported.scheduler.nfes == (3, 4)
    exported.set_progress_bar_config(disable=True)
    with torch.no_grad():
        again = exported(["a red cat", "blue dog on grass"], negative_prompt=["blurry"] * 2, height=8, width=8,
                         num_inference_steps=3, guidance_scale=GUIDANCE, output_type="np",
                         generator=torch.Generator().manual_seed(0)).images
    assert (again == images).all()  # the exported folder runs exactly the searched NFE-3 schedule

"""``model.kind: checkpoint``: a user's diffusers UNet2DModel in safetensors.

A small randomly initialised UNet2DModel is saved with ``save_pretrained`` (safetensors) and loaded
through the search's ``Target``. The checks: the adapter feeds the UNet the DDPM training step as
its time label; our DDIM on diffusers' grid reproduces ``DDIMScheduler`` driving the same UNet from
the same noise; a trial scores (RMSE, and FID against the model's own reference samples); a
malformed, pickled or mismatched checkpoint is refused with a message naming the field.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from s3_ray.config import ConfigError, MetricConfig, ModelConfig, parse_config
from s3_ray.metrics.evaluate import Target, evaluate
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import get_noise_schedule
from s3_ray.usf.sampler import sample
from s3_ray.usf.schedule import SolverSchedule, Step, load_schedule

from .search_helpers import search_to_end, trial_runs, write_space

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

DDPM = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def small_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A pipeline layout: unet/ (config.json + safetensors) and scheduler/ (DDPM linear)."""
    d = tmp_path_factory.mktemp("ckpt") / "ddpm-small"
    small_unet().save_pretrained(d / "unet", safe_serialization=True)
    (d / "scheduler").mkdir()
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **DDPM}))
    return d


def model_cfg(path, **kw) -> ModelConfig:
    return ModelConfig(kind="checkpoint", checkpoint=str(path), noise_schedule="vp_discrete", output="eps",
                       time_label="discrete", **kw)


def test_adapter_feeds_the_training_step(pipeline_dir):
    target = Target(model_cfg(pipeline_dir, image_shape=(1, 8, 8)), MetricConfig(kind="rmse"))
    assert target.shape == (1, 8, 8) and len(target.weights_sha) == 64
    unet = UNet2DModel.from_pretrained(pipeline_dir / "unet", use_safetensors=True)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for step in (0, 499, 999):
        ours = target.model(x, (step + 1) / 1000)
        with torch.no_grad():
            ref = unet(x, torch.full((4,), step)).sample
        assert torch.allclose(ours, ref, rtol=0, atol=1e-5), f"step {step}"


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_ddim_matches_diffusers_on_the_same_unet(pipeline_dir, prediction):
    target = Target(model_cfg(pipeline_dir), MetricConfig(kind="rmse"))
    sched = DDIMScheduler(**DDPM, timestep_spacing="trailing", set_alpha_to_one=False, clip_sample=False,
                          prediction_type="epsilon")
    sched.set_timesteps(10)
    times = [(int(k) + 1) / 1000 for k in sched.timesteps] + [1 / 1000]  # the last step goes to alphas_cumprod[0]
    unet = target.model.net.unet
    x_T = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    x = x_T.clone()
    with torch.no_grad():
        for ts in sched.timesteps:
            x = sched.step(unet(x, ts).sample, ts, x, eta=0.0).prev_sample
    ours_sched = SolverSchedule(noise_schedule="vp_discrete", t_start=times[0],
                                steps=tuple(Step(t=t, prediction=prediction, order=1) for t in times[1:]))
    with torch.no_grad():
        ours = sample(ours_sched, target.model, target.noise, x_T.clone())
    rel = float((ours - x).abs().max() / ours.abs().max())
    print(f"DDIM 10 steps on a UNet2DModel checkpoint, {prediction} prediction: max rel diff {rel:.2e}")
    assert torch.isfinite(ours).all() and rel <= 6e-7  # measured 4.6e-7 (data) / 3.2e-7 (noise), see README


def test_trials_score_on_a_checkpoint(pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path / "cache"))
    schedule = build_baseline("dpm_solver_pp_2m", get_noise_schedule("vp_discrete"), 4)
    r = evaluate(schedule, Target(model_cfg(pipeline_dir), MetricConfig(kind="rmse")), n=16, seed=0)
    assert not r["failed"] and r["nfe"] == 4 and math.isfinite(r["rmse"]) and r["rmse"] > 0  # an untrained UNet
    fid_target = Target(model_cfg(pipeline_dir), MetricConfig(kind="fid", reference="model", reference_samples=128))
    r = evaluate(schedule, fid_target, n=64, seed=0)
    assert not r["failed"] and r["fid"] >= 0 and r["score"] == r["fid"]
    assert len(list((tmp_path / "cache").glob("model-ref-*.npy"))) == 1  # the model's reference samples


def test_bad_checkpoints_are_refused_naming_the_field(pipeline_dir, tmp_path):
    rmse = MetricConfig(kind="rmse")

    def refused(cfg, metric=rmse) -> str:
        with pytest.raises(ValueError) as e:
            Target(cfg, metric)
        return str(e.value)

    assert "model.checkpoint" in refused(model_cfg(tmp_path / "nope")) and "does not exist" in refused(
        model_cfg(tmp_path / "nope"))
    weights = next((pipeline_dir / "unet").glob("*.safetensors"))
    assert "is a file" in refused(model_cfg(weights))
    pickled = tmp_path / "pickled"
    small_unet().save_pretrained(pickled, safe_serialization=False)
    msg = refused(model_cfg(pickled))
    assert "model.checkpoint" in msg and "refused" in msg and "diffusion_pytorch_model.bin" in msg
    cond = tmp_path / "cond"
    small_unet().save_pretrained(cond, safe_serialization=True)
    (cond / "config.json").write_text(json.dumps({**json.loads((cond / "config.json").read_text()),
                                                  "_class_name": "UNet2DConditionModel"}))
    assert "'_class_name' is 'UNet2DConditionModel'" in refused(model_cfg(cond))
    broken = tmp_path / "broken"
    small_unet().save_pretrained(broken, safe_serialization=True)
    next(broken.glob("*.safetensors")).write_bytes(b"not safetensors")
    assert "model.checkpoint: cannot load" in refused(model_cfg(broken))
    assert "model.image_shape" in refused(model_cfg(pipeline_dir, image_shape=(3, 32, 32)))
    assert "model.noise_schedule" in refused(model_cfg(pipeline_dir).model_copy(update={"noise_schedule": "vp_linear"}))
    assert "metric.reference" in refused(model_cfg(pipeline_dir), MetricConfig(kind="fid", reference="data"))
    with pytest.raises(ConfigError, match=r"space.yaml: metric.reference: 'data' needs the model's training set"):
        parse_config({"model": model_cfg(pipeline_dir).model_dump(), "metric": {"kind": "fid", "reference": "data"}},
                      "space.yaml")  # before any trial starts
    with pytest.raises(ValueError, match="checkpoint"):
        ModelConfig(kind="checkpoint")


@pytest.mark.slow
def test_search_on_a_checkpoint(pipeline_dir, tmp_path):
    """`s3 search` on the checkpoint: trials on local Ray workers load it, FID against its own samples."""
    model = {"kind": "checkpoint", "checkpoint": str(pipeline_dir), "noise_schedule": "vp_discrete", "output": "eps",
             "time_label": "discrete"}
    metric = {"kind": "fid", "reference": "model", "reference_samples": 128, "samples": [64], "final_samples": 96,
              "final_seeds": 1}
    space = write_space(tmp_path, name="ckpt", model=model, metric=metric, budget=8)
    search_to_end(space, tmp_path, S3_CACHE_DIR=str(tmp_path / "cache"))
    run_dir = tmp_path / "runs" / "ckpt"
    assert load_schedule(run_dir / "best" / "nfe4.json").noise_schedule == "vp_discrete"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["nfe"] for row in summary["rows"]] == [4] and math.isfinite(summary["rows"][0]["searched"])
    assert (run_dir / "grids" / "nfe4.png").is_file()
    runs = trial_runs(run_dir / "mlflow.db", "ckpt")
    assert len(runs) == 8 and all(math.isfinite(x.data.metrics["fid"]) for x in runs)
    assert list((tmp_path / "cache").glob("model-ref-*-128-*.npy"))


def test_cli_evaluates_and_samples_a_schedule_on_the_space_model(pipeline_dir, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"name": "ckpt", "model": model_cfg(pipeline_dir).model_dump(mode="json"),
                                     "metric": {"kind": "fid", "reference": "model", "reference_samples": 64}}))
    schedule = tmp_path / "ddim.json"
    build_baseline("ddim", get_noise_schedule("vp_discrete"), 5).save(schedule)
    env = {**os.environ, "S3_CACHE_DIR": str(tmp_path / "cache")}

    def s3(*args):
        return subprocess.run([sys.executable, "-m", "s3_ray.cli", *args], capture_output=True, text=True, env=env)

    r = s3("evaluate", "--space", str(space), "--schedule", str(schedule), "--samples", "32")
    assert r.returncode == 0, r.stderr
    assert "NFE 5  FID " in r.stdout and "model reference" in r.stdout
    r = s3("sample", "--space", str(space), "--schedule", str(schedule), "--n", "8", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 0 and (tmp_path / "g.png").is_file(), r.stderr
    r = s3("evaluate", "--space", str(space), "--schedule", str(schedule), "--reference", "data")
    assert r.returncode == 2 and "metric.reference: 'data' needs the model's training set" in r.stderr

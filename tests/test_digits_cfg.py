"""The guided embedded model: class-conditional digits UNet + classifier-free guidance in the adapter."""

import shutil

import numpy as np
import pytest
import torch

from s3_ray.config import ModelConfig
from s3_ray.metrics.evaluate import AdapterSampler, label_accuracy
from s3_ray.models.adapter import ModelAdapter, balanced_classes, cfg_eps
from s3_ray.models.digits import CFG_UNET_PATH, load_digits_cfg_model, load_digits_model
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import get_noise_schedule

torch.set_num_threads(1)
NOISE = get_noise_schedule("vp_linear")


@pytest.fixture(scope="module")
def net():
    return load_digits_cfg_model()


def _sampler(model):
    return AdapterSampler(model, NOISE, (1, 8, 8), torch.float32, torch.device("cpu"), torch.zeros(1, 8, 8))


class CountingNet:
    """The network, recording the batch size of each call."""

    def __init__(self, net):
        self.net, self.batches = net, []

    def __call__(self, x, t, y=None):
        self.batches.append(x.shape[0])
        return self.net(x, t, y)


def test_cfg_scale_one_equals_the_conditional_model(net):
    x, t = torch.randn(12, 1, 8, 8), torch.full((12,), 0.4)
    classes = balanced_classes(0, 12, 10)
    cond = net(x, t, classes)
    assert torch.allclose(cfg_eps(net, x, t, classes, 10, 1.0), cond, atol=1e-5)
    # scale 3 is the guided combination of the two separately computed branches
    uncond = net(x, t)
    assert torch.allclose(cfg_eps(net, x, t, classes, 10, 3.0), uncond + 3.0 * (cond - uncond), atol=1e-5)
    # the branches differ (guidance does something): the label embedding is trained
    assert float((cond - uncond).abs().mean()) > 1e-2


def test_one_batched_cfg_call_per_nfe(net):
    counting = CountingNet(net)
    model = ModelAdapter(counting, NOISE, n_classes=10, guidance_scale=3.0)
    for nfe in (3, 5):
        counting.batches.clear()
        model.calls = 0
        x = _sampler(model).sample(build_baseline("ddim", NOISE, nfe), 20, seed=0)
        assert x.shape == (20, 1, 8, 8)
        assert model.calls == nfe
        assert counting.batches == [40] * nfe  # conditional + unconditional halves in one call


def test_guided_labels_reach_the_classifier(net):
    model = ModelAdapter(net, NOISE, n_classes=10, guidance_scale=3.0)
    x = _sampler(model).sample(build_baseline("dpm_solver_pp_3m", NOISE, 20), 200, seed=3)
    intended = balanced_classes(0, 200, 10)
    right = label_accuracy(x, intended)
    wrong = label_accuracy(x, (intended + 1) % 10)
    assert right >= 0.9, right
    assert wrong <= 0.1, wrong


def test_evaluate_logs_label_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path))
    from s3_ray.config import MetricConfig
    from s3_ray.metrics.evaluate import Target, evaluate

    target = Target(ModelConfig(kind="digits_cfg", guidance_scale=3.0),
                    MetricConfig(reference="model", reference_samples=100))
    r = evaluate(build_baseline("ddim", target.noise, 8), target, n=100, seed=1)
    x = target.sample(build_baseline("ddim", target.noise, 8), 100, seed=1)
    assert r["label_accuracy"] == label_accuracy(x, balanced_classes(0, 100, 10))
    assert r["label_accuracy"] >= 0.8 and r["fid"] > 0


def test_guidance_is_part_of_the_target_key():
    a, b = ModelConfig(kind="digits_cfg", guidance_scale=2.0), ModelConfig(kind="digits_cfg", guidance_scale=3.0)
    assert a.model_dump()["guidance_scale"] == 2.0
    assert a.model_dump_json() != b.model_dump_json()
    assert "guidance_scale" not in ModelConfig(kind="digits").model_dump()


def test_refusals(net):
    with pytest.raises(ValueError, match="guidance_scale: only used with kind 'diffusers_pipeline' or 'digits_cfg'"):
        ModelConfig(kind="digits", guidance_scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        ModelConfig(kind="digits_cfg", guidance_scale=0.5)
    with pytest.raises(ValueError, match="guidance_scale: classifier-free guidance needs a class-conditional"):
        ModelAdapter(load_digits_model(), NOISE, guidance_scale=3.0)
    with pytest.raises(ValueError, match="unconditional"):
        load_digits_model()(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional network"):
        ModelAdapter(load_digits_model(), NOISE)(torch.zeros(2, 1, 8, 8), 0.5, torch.zeros(2, dtype=torch.long))


def test_loader_refuses_the_unconditional_checkpoint_and_vice_versa(tmp_path):
    uncond = tmp_path / "digits_unet.safetensors"
    from s3_ray.models.digits import UNET_PATH

    shutil.copy(UNET_PATH, uncond)
    shutil.copy(UNET_PATH.with_suffix(".json"), uncond.with_suffix(".json"))
    with pytest.raises(ValueError, match="arch.kind"):
        load_digits_cfg_model(uncond)
    cfg = tmp_path / "digits_cfg_unet.safetensors"
    shutil.copy(CFG_UNET_PATH, cfg)
    shutil.copy(CFG_UNET_PATH.with_suffix(".json"), cfg.with_suffix(".json"))
    with pytest.raises(ValueError, match="arch.kind"):
        load_digits_model(cfg)
    assert CFG_UNET_PATH.stat().st_size <= 2e6


def test_shipped_space_and_trial_report_label_accuracy(tmp_path, monkeypatch):
    from pathlib import Path

    from s3_ray.config import load_config
    from s3_ray.search.preflight import check_files
    from s3_ray.search.trial import run_trial

    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path))
    cfg = check_files(load_config(Path(__file__).resolve().parents[1] / "search_spaces" / "digits_cfg.yaml"))
    assert cfg.model.kind == "digits_cfg" and cfg.model.guidance_scale == 3.0 and cfg.metric.reference == "model"
    metric = cfg.metric.model_copy(update={"reference_samples": 100})
    schedule = build_baseline("ddim", NOISE, 6)
    r = run_trial({"schedule": schedule.to_json(), "model": cfg.model.model_dump_json(),
                   "metric": metric.model_dump_json(), "samples": 100, "seed": 2})
    assert 0.5 <= r["label_accuracy"] <= 1.0 and r["nfe"] == 6 and r["failed"] == 0


def test_gits_grid_of_the_guided_model_is_computed_on_its_guided_eps(tmp_path, monkeypatch):
    """A class-conditional target's GITS grid comes from its guided eps with balanced classes (the
    sampler's), not from the bare network (unconditional)."""
    from s3_ray.config import MetricConfig
    from s3_ray.metrics.baseline_table import gits_grid_for
    from s3_ray.metrics.evaluate import get_target
    from s3_ray.usf.gits import gits_grid

    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path))
    target = get_target(ModelConfig(kind="digits_cfg", guidance_scale=3.0).model_dump_json(),
                        MetricConfig(reference="model", reference_samples=100).model_dump_json())
    small = {"n_samples": 8, "n_candidates": 11}
    got = gits_grid_for(target, "ddim", 3, **small)
    guided = gits_grid(target.producer.model_for(0, 8), target.noise, "ddim", 3, shape=target.shape,
                       dtype=target.dtype, data_mean=target.data_mean, **small).times
    assert np.allclose(got, guided, rtol=0, atol=1e-12)
    unguided = gits_grid(target.model, target.noise, "ddim", 3, shape=target.shape, dtype=target.dtype,
                         data_mean=target.data_mean, **small).times  # what it was before the fix
    assert not np.allclose(got, unguided, rtol=0, atol=1e-3)  # (measured: 0.80 / 0.43 vs 0.71 / 0.23)
    assert list(tmp_path.glob("gits/gits-ddim-nfe3-*.json"))  # cached

"""The shipped digits UNet and classifier: loading, validation, accuracy, reproducible training."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from s3_ray.models.digits import (
    CLASSIFIER_PATH,
    UNET_PATH,
    load_digits_classifier,
    load_digits_data,
    load_digits_model,
)
from s3_ray.models.train import main as train_main

torch.set_num_threads(1)


@pytest.fixture
def unet_copy(tmp_path):
    dst = tmp_path / "digits_unet.safetensors"
    shutil.copy(UNET_PATH, dst)
    shutil.copy(UNET_PATH.with_suffix(".json"), dst.with_suffix(".json"))
    return dst


def test_loads_in_fresh_offline_subprocess():
    code = ("import torch; from s3_ray.models.digits import load_digits_model; net = load_digits_model(); "
            "print(tuple(net(torch.zeros(3, 1, 8, 8), torch.full((3,), 0.5)).shape), net.training)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 1, 8, 8) False"


def test_model_output_and_metadata():
    net = load_digits_model()
    x = torch.randn(5, 1, 8, 8)
    eps = net(x, torch.linspace(1e-3, 1.0, 5))
    assert eps.shape == (5, 1, 8, 8) and torch.isfinite(eps).all()
    assert torch.equal(net(x, torch.tensor(0.3)), net(x, torch.full((5,), 0.3)))  # scalar t broadcasts
    meta = net.meta
    assert meta["noise_schedule"] == {"name": "vp_linear", "beta_0": 0.1, "beta_1": 20.0}
    assert meta["n_params"] == sum(p.numel() for p in net.parameters())
    assert meta["data"]["sha256"] == load_digits_data()[2]
    assert UNET_PATH.stat().st_size + CLASSIFIER_PATH.stat().st_size < 5e6


def test_data_split():
    (x, y), (xh, yh), sha = load_digits_data()
    assert x.shape == (1400, 1, 8, 8) and xh.shape == (397, 1, 8, 8) and x.dtype == "float32"
    assert x.min() == -1.0 and x.max() == 1.0 and len(y) == 1400 and len(yh) == 397
    assert load_digits_data()[2] == sha and len(sha) == 64


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.safetensors"):
        load_digits_model(tmp_path / "nope.safetensors")


def test_corrupt_safetensors(unet_copy):
    unet_copy.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=r"digits_unet\.safetensors.*safetensors"):
        load_digits_model(unet_copy)


def test_corrupt_metadata(unet_copy):
    unet_copy.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match=r"digits_unet\.json"):
        load_digits_model(unet_copy)


def test_wrong_keys_and_shapes(unet_copy):
    state = load_file(str(unet_copy))
    k = "conv_in.weight"
    renamed = {("renamed" if n == k else n): v for n, v in state.items()}
    save_file(renamed, str(unet_copy))
    with pytest.raises(ValueError, match=r"digits_unet\.safetensors.*'keys'.*conv_in\.weight"):
        load_digits_model(unet_copy)
    save_file({**state, k: torch.zeros(3, 3)}, str(unet_copy))
    with pytest.raises(ValueError, match=r"digits_unet\.safetensors.*'conv_in\.weight'"):
        load_digits_model(unet_copy)


def test_arch_mismatch(unet_copy):
    meta_path = unet_copy.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["arch"]["base_ch"] = 32
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"digits_unet\.json.*arch\.base_ch"):
        load_digits_model(unet_copy)


def test_classifier_heldout_accuracy():
    net = load_digits_classifier()
    _, (xh, yh), _ = load_digits_data()
    with torch.no_grad():
        acc = (net(torch.from_numpy(xh)).argmax(1).numpy() == yh).mean()
    assert acc >= 0.95
    assert abs(acc - net.meta["heldout_accuracy"]) < 1e-6


def test_training_is_reproducible(tmp_path):
    for d in ("a", "b"):
        assert train_main(["diffusion", "--out", str(tmp_path / d), "--steps", "3", "--batch", "16"]) == 0
    a, b = (load_file(str(tmp_path / d / "digits_unet.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    net = load_digits_model(tmp_path / "a" / "digits_unet.safetensors")
    assert net.meta["training"]["steps"] == 3
    assert train_main(["classifier", "--out", str(tmp_path / "c"), "--steps", "3"]) == 0
    assert load_digits_classifier(tmp_path / "c" / "digits_classifier.safetensors").meta["n_params"] > 0

"""Evaluation of schedules on the embedded digits model: few-step gap, common random numbers,
NaN handling, the s3-digits extractor inside a Ray worker, and the `s3 evaluate` / `s3 sample`
commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from s3_ray.config import MetricConfig, ModelConfig
from s3_ray.metrics.evaluate import REFERENCE_SOLVER, Target, evaluate
from s3_ray.usf.baselines import build_baseline
from s3_ray.usf.noise import VPLinear
from s3_ray.usf.schedule import SolverSchedule


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def target():
    return Target(ModelConfig(), MetricConfig())


def _2m(noise, nfe=5):
    return build_baseline("dpm_solver_pp_2m", noise, nfe, discretization="logsnr_uniform")


def test_few_step_gap(target):
    """The shipped model leaves room for better schedules: NFE 5 is far from converged."""
    conv = evaluate(build_baseline(REFERENCE_SOLVER[0], target.noise, REFERENCE_SOLVER[1]), target, n=1000, seed=0)
    few = evaluate(_2m(target.noise), target, n=1000, seed=0)
    assert not conv["failed"] and not few["failed"]
    assert conv["nfe"] == REFERENCE_SOLVER[1] and few["nfe"] == 5
    assert few["fid"] > 3 * conv["fid"], (few["fid"], conv["fid"])


def test_common_random_numbers(target, monkeypatch):
    import s3_ray.metrics.evaluate as ev

    seen = []
    run = ev.SamplerPlan.run

    def spy(self, model, x, *args, **kwargs):
        seen.append(x.clone())
        return run(self, model, x, *args, **kwargs)

    monkeypatch.setattr(ev.SamplerPlan, "run", spy)
    a, b = _2m(target.noise, 4), build_baseline("unipc_bh2", target.noise, 6, discretization="time_quadratic")
    ra = evaluate(a, target, n=200, seed=7)
    rb = evaluate(b, target, n=200, seed=7)
    ra2 = evaluate(a, target, n=200, seed=7)
    rc = evaluate(a, target, n=200, seed=8)
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])  # same x_T for both schedules
    assert not torch.allclose(seen[0], seen[3])
    assert torch.equal(target.noise_batch(200, 7), seen[0])
    assert ra["schedule_hash"] != rb["schedule_hash"] and ra["fid"] != rb["fid"]
    for k in ("fid", "kid", "kid_std", "score", "schedule_hash"):
        assert ra[k] == ra2[k], k  # deterministic for a fixed seed
    assert ra["fid"] != rc["fid"] and ra["kid"] != rc["kid"]


def _relaxed(slope: float) -> SolverSchedule:
    d = json.loads(build_baseline("dpm_solver_pp_2m", VPLinear(), 4).to_json())
    d["steps"][2]["derivatives"][0]["relaxation"] = {"kind": "linear", "scale": 1.0, "slope": slope}
    return SolverSchedule.from_dict(d)


def test_chunked_sampling_equals_one_batch(target):
    """Samples are solved in chunks (cache-sized batches); each sample is independent of the
    others, so any chunking gives the same samples up to float32 rounding (the convolution
    algorithm depends on the batch size: measured up to 4e-5 on unit-scale data), in order."""
    s = build_baseline("unipc_bh2", target.noise, 5, discretization="time_quadratic")
    whole = target.sample(s, 300, 7, chunk=300)
    for chunk in (256, 100, 7):
        x = target.sample(s, 300, 7, chunk=chunk)
        assert x.shape == whole.shape == (300, *target.shape)
        assert torch.allclose(x, whole, rtol=0, atol=2e-4), (chunk, float((x - whole).abs().max()))
    # afs='mean_x0' uses the data mean in every chunk
    d = json.loads(s.to_json())
    d["afs"] = "mean_x0"
    afs = SolverSchedule.from_dict(d)
    assert torch.allclose(target.sample(afs, 300, 7, chunk=64), target.sample(afs, 300, 7, chunk=300), atol=2e-4)


def test_nan_schedule_gets_worst_score(target):
    worst = MetricConfig().worst_score
    s = _relaxed(1e30)
    x = target.sample(s, 32, 0)  # really NaN/Inf samples, not an exception
    assert not bool(torch.isfinite(x).all())
    r = evaluate(s, target, n=32, seed=0)
    assert r["failed"] is True and r["score"] == worst and r["fid"] == worst and r["nfe"] == 4


def test_coefficient_overflow_gets_worst_score(target):
    s = _relaxed(1e300)  # a valid (finite) float64 slope whose coefficient overflows float32
    with pytest.raises(RuntimeError, match="overflow"):
        target.sample(s, 32, 0)
    r = evaluate(s, target, n=32, seed=0)
    assert r["failed"] is True and r["score"] == MetricConfig().worst_score


def test_extractor_registered_in_ray_worker(monkeypatch):
    ray = pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="s3t-", dir="/tmp")  # Unix socket paths must stay < 107 bytes
    for k, v in {"RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                 "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)

    def check():  # defined here: pickled by value, runs in the worker
        import os

        import ray
        import torch
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor

        torch.set_num_threads(1)
        before = "s3-digits" in FEATURE_EXTRACTORS_REGISTRY
        import s3_ray.metrics.extractor  # noqa: F401  (registers at import)
        from s3_ray.metrics.fid import digits_reference, fid_kid

        fe = create_feature_extractor("s3-digits", ["features"], cuda=False)
        held = digits_reference("heldout")
        feats = fe(held[:8])[0]
        m = fid_kid(held[:100], held[100:300], backend="calculate_metrics")  # through torch-fidelity's registry
        return {"pid": os.getpid(), "worker_id": ray.get_runtime_context().get_worker_id(), "before": before,
                "registered": "s3-digits" in FEATURE_EXTRACTORS_REGISTRY, "feat_shape": tuple(feats.shape), **m}

    try:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        out = ray.get(ray.remote(num_cpus=1)(check).remote(), timeout=120)
        driver_worker = ray.get_runtime_context().get_worker_id()
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    assert out["pid"] != os.getpid() and out["worker_id"] != driver_worker
    assert out["registered"] and out["feat_shape"] == (8, 64)
    from s3_ray.metrics.fid import digits_reference, fid_kid

    held = digits_reference("heldout")
    direct = fid_kid(held[:100], held[100:300])
    assert out["fid"] == pytest.approx(direct["fid"], rel=1e-4) and out["fid"] > 0


# ---- the commands -------------------------------------------------------------------------------

def s3(*args, tmp):
    script = Path(sys.executable).with_name("s3")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "s3_ray.cli"]
    env = {**os.environ, "S3_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


def test_cli_evaluate_and_sample(tmp_path):
    from PIL import Image

    f = tmp_path / "s.json"
    _2m(VPLinear(), 5).save(f)
    r = s3("evaluate", "--schedule", str(f), "--samples", "200", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "NFE 5" in r.stdout and "FID" in r.stdout and "200 samples" in r.stdout and "FAILED" not in r.stdout
    png = tmp_path / "grid.png"
    r = s3("sample", "--schedule", str(f), "--out", str(png), "--n", "16", tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] >= 8 and im.size[1] >= 8


@pytest.mark.parametrize("cmd, text", [
    ("evaluate", '{"version": 1, "steps": "nope"'),  # not JSON
    ("sample", '{"version": 1, "steps": []}'),  # JSON, not a schedule
])
def test_cli_malformed_schedule(tmp_path, cmd, text):
    f = tmp_path / "bad.json"
    f.write_text(text)
    png = tmp_path / "g.png"
    args = ["--samples", "200"] if cmd == "evaluate" else ["--out", str(png), "--n", "4"]
    r = s3(cmd, "--schedule", str(f), *args, tmp=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and "bad.json" in r.stderr and "Traceback" not in r.stderr
    assert not png.exists()


@pytest.mark.parametrize("slope", [1e30, 1e300])
def test_cli_sample_of_blown_up_schedule(tmp_path, slope):
    f = tmp_path / "nan.json"
    f.write_text(_relaxed(slope).to_json())
    r = s3("sample", "--schedule", str(f), "--out", str(tmp_path / "g.png"), "--n", "4", tmp=tmp_path)
    assert r.returncode == 2 and "NaN/Inf" in r.stderr and "Traceback" not in r.stderr, r.stderr

"""Evaluation of one schedule: sample with common random numbers, score, time it.

``Target`` bundles what a score needs (the model as eps(x, t), its noise schedule, the sample
shape, the data mean for AFS, and the reference set); ``evaluate`` runs one schedule on it. The
noise for seed s is identical for every schedule (common random numbers). A schedule whose samples
contain NaN/Inf gets the configured worst score and ``failed = True`` instead of an exception.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from functools import lru_cache

import numpy as np
import torch

from s3_ray.config import MetricConfig, ModelConfig, check_reference
from s3_ray.metrics.fid import file_sha256
from s3_ray.models.adapter import ModelAdapter
from s3_ray.usf.noise import get_noise_schedule
from s3_ray.usf.sampler import SamplerPlan
from s3_ray.usf.schedule import SolverSchedule

REFERENCE_SOLVER = ("dpm_solver_pp_3m_exact", 100)  # high-accuracy reference solve: builder, NFE
MODEL_REFERENCE_SEED = 1_000_003  # noise seed of the 'model' reference set, distinct from search seeds
# Samples per network batch. Against one batch of 1,000, 1,000-sample trials ran 1.18x (one
# process) / 1.16x (two at once) as fast here and 1.26x / 1.10x on a 16-core machine
# (benchmarks/results/trial_throughput*.md; the digits UNet's activations for 256 samples take 1-2
# MB, about a core's L2 cache). Every sample is solved independently, so chunking does not change
# the result beyond float rounding.
SAMPLE_CHUNK = 256


class Target:
    """A model to sample from plus everything needed to score its samples."""

    def __init__(self, model_cfg: ModelConfig, metric_cfg: MetricConfig):
        self.model_cfg, self.metric_cfg = model_cfg, metric_cfg
        self.noise = get_noise_schedule(model_cfg.noise_schedule)
        self.device = torch.device("cpu")
        if model_cfg.kind == "digits":
            from s3_ray.models.digits import UNET_PATH, load_digits_data, load_digits_model

            net = load_digits_model()
            train, _, self.data_sha = load_digits_data()
            self.shape = tuple(train[0].shape[1:])
            self.data_mean = torch.from_numpy(train[0].mean(0))
            self.model = ModelAdapter(net, self.noise, output="eps", time_label="t")
            self.weights_sha = file_sha256(UNET_PATH)
            self.is_image = True
        elif model_cfg.kind == "gmm":
            from s3_ray.models.analytic import GaussianMixture

            g = torch.Generator().manual_seed(0)
            d = 8
            means = torch.randn(4, d, generator=g, dtype=torch.float64) * 1.5
            gmm = GaussianMixture(self.noise, [0.1, 0.2, 0.3, 0.4], means, [0.05, 0.1, 0.2, 0.3])
            self.shape, self.data_mean = (d,), (torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64) @ means)
            self.model = ModelAdapter(gmm.net, self.noise, output="x0", time_label="t")
            self.weights_sha, self.data_sha, self.is_image = "gmm-v1", "gmm-v1", False
        elif model_cfg.kind == "checkpoint":
            from s3_ray.models.checkpoint import check_scheduler, load_checkpoint

            check_reference(model_cfg, metric_cfg)
            check_scheduler(model_cfg.checkpoint, self.noise)
            net, self.shape, self.weights_sha = load_checkpoint(model_cfg.checkpoint, model_cfg.image_shape)
            if torch.cuda.is_available():  # a trial given a GPU by Ray sees it; noise stays on the CPU (seeds)
                self.device = torch.device("cuda")
                net.to(self.device)
            # AFS needs E[x0]; with no data set, 0 (the centre of images scaled to [-1, 1])
            self.data_mean = torch.zeros(self.shape)
            self.model = ModelAdapter(net, self.noise, output=model_cfg.output, time_label=model_cfg.time_label)
            self.data_sha, self.is_image = None, True
        else:
            raise ValueError(f"model.kind: {model_cfg.kind!r} is not supported (digits, checkpoint, gmm)")
        if metric_cfg.kind == "fid" and not self.is_image:
            raise ValueError(f"metric.kind: FID needs an image model, {model_cfg.kind!r} has vectors (use rmse)")
        self.dtype = torch.float64 if model_cfg.kind == "gmm" else torch.float32
        self._rmse_refs: dict = {}
        self._model_ref: torch.Tensor | None = None

    def noise_batch(self, n: int, seed: int) -> torch.Tensor:
        """x_T for seed ``seed``: the same for every schedule (common random numbers)."""
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, *self.shape), generator=g, dtype=self.dtype) * float(self.noise.sigma(self.noise.T))

    @torch.no_grad()
    def sample(self, schedule: SolverSchedule, n: int, seed: int, chunk: int | None = None,
               progress=None) -> torch.Tensor:
        """``n`` samples from noise seed ``seed``, solved ``chunk`` (default ``SAMPLE_CHUNK``) at a time;
        ``progress`` (an ``s3_ray.progress.Progress``) advances by each chunk's samples."""
        plan = SamplerPlan(schedule, self.noise)
        mean = self.data_mean.to(self.dtype)
        out = []
        for x in self.noise_batch(n, seed).split(chunk or SAMPLE_CHUNK):
            out.append(plan.run(self.model, x.to(self.device), data_mean=mean).cpu())
            if progress is not None:
                progress.update(len(x))
        return torch.cat(out)

    def reference_solution(self, n: int, seed: int) -> torch.Tensor:
        """High-accuracy solve from the same noise (for the RMSE proxy), cached per process."""
        key = (n, seed)
        if key not in self._rmse_refs:
            from s3_ray.usf.baselines import build_baseline

            ref = build_baseline(REFERENCE_SOLVER[0], self.noise, REFERENCE_SOLVER[1])
            self._rmse_refs[key] = self.sample(ref, n, seed)
        return self._rmse_refs[key]

    def reference_images(self) -> tuple[str, torch.Tensor | None]:
        """(cache kind, uint8 images) of the FID reference: the training data, or model samples of a
        high-accuracy solve (generated once, cached on disk and kept for this process's later trials)."""
        if self.metric_cfg.reference == "data":
            return "train", None
        if self._model_ref is None:
            self._model_ref = model_reference_images(self, self.metric_cfg.reference_samples)
        return "model", self._model_ref


def model_reference_images(target: Target, n: int) -> torch.Tensor:
    """``n`` samples of ``target`` from the reference solver, as uint8, cached by weights hash."""
    from s3_ray.metrics.fid import cache_dir, uint8_images
    from s3_ray.usf.baselines import build_baseline

    name, nfe = REFERENCE_SOLVER
    # same weights under another noise schedule, output or time label give other samples
    how = hashlib.sha256(target.model_cfg.model_dump_json(exclude={"checkpoint"}).encode()).hexdigest()[:8]
    path = cache_dir() / f"model-ref-{target.weights_sha[:16]}-{how}-{name}-{nfe}-{n}-{MODEL_REFERENCE_SEED}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path, allow_pickle=False))
    from s3_ray.progress import Progress

    with Progress(n, f"model reference set ({nfe}-NFE solve)", "samples") as progress:
        x = target.sample(build_baseline(name, target.noise, nfe), n, MODEL_REFERENCE_SEED, progress=progress)
    images = uint8_images(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, images.numpy())
    os.replace(tmp, path)
    return images


def evaluate(schedule: SolverSchedule, target: Target, metric: MetricConfig | None = None, n: int = 1000,
             seed: int = 0) -> dict:
    """Sample ``n`` images with noise seed ``seed`` and score them.

    Returns score (the metric's value; lower is better), fid/kid/kid_std or rmse, nfe, seconds,
    failed (NaN/Inf samples: score = metric.worst_score), schedule_hash, n, seed."""
    metric = metric or target.metric_cfg
    start = time.perf_counter()
    out = {"nfe": schedule.nfe(), "schedule_hash": schedule.schedule_hash(), "n": n, "seed": seed, "failed": False}
    try:
        x = target.sample(schedule, n, seed)
    except RuntimeError as e:
        if "overflow" not in str(e):  # a coefficient beyond the tensor dtype's range: the solve blew up
            raise
        x = torch.full((1,), float("nan"))
    if not bool(torch.isfinite(x).all()):
        out.update(score=metric.worst_score, failed=True)
        if metric.kind == "fid":
            out.update(fid=metric.worst_score, kid=metric.worst_score, kid_std=0.0)
        else:
            out.update(rmse=metric.worst_score)
    elif metric.kind == "rmse":
        ref = target.reference_solution(n, seed)
        rmse = float(((x - ref) ** 2).mean().sqrt())
        out.update(score=rmse, rmse=rmse)
    else:
        from s3_ray.metrics.fid import fid_kid, uint8_images

        kind, ref = target.reference_images()
        m = fid_kid(uint8_images(x), ref, reference_kind=kind if ref is None else "train", cuda=target.device.type == "cuda",
                    feature_extractor=metric.feature_extractor,
                    feature_extractor_weights_path=metric.feature_extractor_weights_path)
        score = m["fid"] if math.isfinite(m["fid"]) else metric.worst_score
        out.update(score=score, **m)
    out["seconds"] = time.perf_counter() - start
    return out


@lru_cache(maxsize=4)
def get_target(model_json: str, metric_json: str) -> Target:
    """One Target per process and configuration (workers reuse the loaded model across trials)."""
    return Target(ModelConfig.model_validate_json(model_json), MetricConfig.model_validate_json(metric_json))

"""Evaluation of one schedule: sample with common random numbers, score, time it.

``Target`` is about one job, schedule in, score out: it bundles the model's noise schedule, a
*sample producer* and the reference set; ``evaluate`` runs one schedule on it. A sample producer
(``SampleProducer``) turns (schedule, n, seed) into samples whose starting noise depends on (n, seed)
only, identical for every schedule (common random numbers). Two implementations:

- ``AdapterSampler``: our ``SamplerPlan`` over a ``ModelAdapter`` (digits, GMM, checkpoints);
- ``s3_ray.models.pipeline.PipelineSampler``: the user's diffusers pipeline ``__call__`` with an
  ``S3Scheduler`` holding the schedule (``model.kind: diffusers_pipeline``).

A schedule whose samples contain NaN/Inf gets the configured worst score and ``failed = True``
instead of an exception.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

from s3_ray.config import MetricConfig, ModelConfig, check_reference
from s3_ray.metrics.fid import file_sha256
from s3_ray.models.adapter import ModelAdapter, balanced_classes
from s3_ray.models.pipeline import noise_for
from s3_ray.usf.sampler import SamplerPlan, uses_v3
from s3_ray.usf.schedule import SolverSchedule

REFERENCE_SOLVER = ("dpm_solver_pp_3m_exact", 100)  # high-accuracy reference solve: builder, NFE
MODEL_REFERENCE_SEED = 1_000_003  # noise seed of the 'model' reference set, distinct from search seeds
# Network batch, in samples (half as many samples under classifier-free guidance, whose network call
# takes both branches: 1.13x as fast as 256 samples doubled, measured). Against one batch of 1,000,
# 1,000-sample trials ran 1.18x (one process) / 1.16x (two at once) as fast here and 1.26x / 1.10x on a 16-core machine
# (benchmarks/results/trial_throughput*.md; the digits UNet's activations for 256 samples take 1-2
# MB, about a core's L2 cache). Every sample is solved independently, so chunking does not change
# the result beyond float rounding.
SAMPLE_CHUNK = 256


class SampleProducer(Protocol):
    """Samples of a schedule. ``noise_batch(n, seed)`` is the starting noise of samples 0..n-1, the
    same for every schedule; ``sample`` returns float tensors on the CPU, in ``space`` ('image':
    model-space images in [-1, 1]; 'latent': a latent pipeline's final latents)."""

    shape: tuple[int, ...]

    def noise_batch(self, n: int, seed: int) -> torch.Tensor: ...

    def sample(self, schedule: SolverSchedule, n: int, seed: int, chunk: int | None = None, progress=None,
               space: str = "image") -> torch.Tensor: ...


# DPM-Solver-v3 statistics of a target: 60 logSNR-uniform nodes, 512 trajectories, one Hutchinson probe
# (181 batched model calls: 32 s for the digits model on one core); seed far from trial seeds.
EMS_SETTINGS = {"n_grid": 60, "samples": 512, "probes": 1, "seed": 987_654_321}


class AdapterSampler:
    """Our ``SamplerPlan`` over a ``ModelAdapter``: x_T = sigma_T z with z from seed ``seed``; a
    class-conditional model's sample i has class ``classes_of(i)`` (round-robin, balanced)."""

    def __init__(self, model: ModelAdapter, noise, shape: tuple[int, ...], dtype, device, data_mean: torch.Tensor,
                 ems=None):
        self.model, self.noise, self.shape, self.dtype, self.device = model, noise, shape, dtype, device
        self.data_mean = data_mean
        self.ems = ems  # () -> EMS: the model's DPM-Solver-v3 statistics, made when a schedule needs them

    def noise_batch(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((n, *self.shape), generator=g, dtype=self.dtype) * float(self.noise.sigma(self.noise.T))

    @torch.no_grad()
    def sample(self, schedule: SolverSchedule, n: int, seed: int, chunk: int | None = None, progress=None,
               space: str = "image", x_T: torch.Tensor | None = None) -> torch.Tensor:
        """(``x_T``: start from these states instead of ``noise_batch(n, seed)``.)"""
        needs_ems = uses_v3(schedule) is not None and self.ems is not None
        plan = SamplerPlan(schedule, self.noise, self.ems() if needs_ems else None)
        mean = self.data_mean.to(self.dtype)
        out = []
        start = 0
        chunk = chunk or SAMPLE_CHUNK // self.model.batch_factor  # the network's batch stays SAMPLE_CHUNK
        for x in (self.noise_batch(n, seed) if x_T is None else x_T).split(chunk):
            out.append(plan.run(self.model_for(start, len(x)), x.to(self.device), data_mean=mean.to(self.device)).cpu())
            start += len(x)
            if progress is not None:
                progress.update(len(x))
        return torch.cat(out)

    def classes(self, n: int, start: int = 0) -> torch.Tensor | None:
        """The class ids of samples start..start+n-1 (None: an unconditional model)."""
        if not self.model.n_classes:
            return None
        return balanced_classes(start, n, self.model.n_classes).to(self.device)

    def model_for(self, start: int, n: int):
        """eps(x, t) of samples start..start+n-1 (bound to their classes when conditional)."""
        classes = self.classes(n, start)
        return self.model if classes is None else self.model.with_classes(classes)


class Target:
    """A model to sample from plus everything needed to score its samples."""

    def __init__(self, model_cfg: ModelConfig, metric_cfg: MetricConfig):
        self.model_cfg, self.metric_cfg = model_cfg, metric_cfg
        check_reference(model_cfg, metric_cfg)
        self.noise = noise_for(model_cfg)
        self.device = torch.device("cpu")
        self.dtype = torch.float64 if model_cfg.kind == "gmm" else torch.float32
        self.model: ModelAdapter | None = None
        self.metric_space = "image"  # where evaluate() takes the samples it scores
        if model_cfg.kind == "digits":
            from s3_ray.models.digits import UNET_PATH, load_digits_data, load_digits_model

            net = load_digits_model()
            train, _, self.data_sha = load_digits_data()
            self.shape = tuple(train[0].shape[1:])
            self.data_mean = torch.from_numpy(train[0].mean(0))
            self.model = ModelAdapter(net, self.noise, output="eps", time_label="t")
            self.weights_sha = file_sha256(UNET_PATH)
            self.is_image = True
        elif model_cfg.kind == "digits_cfg":
            from s3_ray.models.digits import CFG_UNET_PATH, load_digits_cfg_model, load_digits_data

            net = load_digits_cfg_model()
            train, _, self.data_sha = load_digits_data()
            self.shape = tuple(train[0].shape[1:])
            self.data_mean = torch.from_numpy(train[0].mean(0))
            self.model = ModelAdapter(net, self.noise, output="eps", time_label="t", n_classes=net.n_classes,
                                      guidance_scale=model_cfg.guidance_scale)
            self.weights_sha = file_sha256(CFG_UNET_PATH)
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

            check_scheduler(model_cfg.checkpoint, self.noise)
            net, self.shape, self.weights_sha = load_checkpoint(model_cfg.checkpoint, model_cfg.image_shape)
            if torch.cuda.is_available():  # a trial given a GPU by Ray sees it; noise stays on the CPU (seeds)
                self.device = torch.device("cuda")
                net.to(self.device)
            # AFS needs E[x0]; with no data set, 0 (the centre of images scaled to [-1, 1])
            self.data_mean = torch.zeros(self.shape)
            self.model = ModelAdapter(net, self.noise, output=model_cfg.output, time_label=model_cfg.time_label)
            self.data_sha, self.is_image = None, True
        elif model_cfg.kind == "diffusers_pipeline":
            from s3_ray.models.pipeline import PipelineSampler, check_metric_space, check_pipeline

            check_pipeline_metric(metric_cfg)
            check_metric_space(check_pipeline(model_cfg).cls, model_cfg, metric_cfg)  # before loading weights
            self.producer = PipelineSampler(model_cfg)
            self.device, self.shape, self.weights_sha = self.producer.device, self.producer.shape, self.producer.weights_sha
            self.data_mean, self.data_sha, self.is_image = torch.zeros(self.shape), None, True
            self.metric_space = model_cfg.metric_space if metric_cfg.kind == "rmse" else "image"
        else:
            raise ValueError(f"model.kind: {model_cfg.kind!r} is not supported (digits, digits_cfg, checkpoint, "
                             "gmm, diffusers_pipeline)")
        if self.model is not None:
            self.producer = AdapterSampler(self.model, self.noise, self.shape, self.dtype, self.device, self.data_mean,
                                           ems=self.ems)
        self._ems = None
        if metric_cfg.kind == "fid" and not self.is_image:
            raise ValueError(f"metric.kind: FID needs an image model, {model_cfg.kind!r} has vectors (use rmse)")
        self._rmse_refs: dict = {}
        self._model_ref: torch.Tensor | None = None

    def noise_batch(self, n: int, seed: int) -> torch.Tensor:
        """x_T for seed ``seed``: the same for every schedule (common random numbers)."""
        return self.producer.noise_batch(n, seed)

    def ems(self):
        """The model's DPM-Solver-v3 statistics (usf/ems.py), computed once per model and settings
        (``EMS_SETTINGS``) and cached on disk by the target's cache key; loaded once per process."""
        if self._ems is None:
            from s3_ray.metrics.fid import cache_dir
            from s3_ray.usf.ems import cached_ems

            if self.model is None:
                raise ValueError("prediction 'dpmsolver_v3' needs the model as eps(x, t); model.kind "
                                 f"{self.model_cfg.kind!r} samples through its pipeline")
            # the EMS trajectories start from their own noise seed, never one a trial scores on
            model = self.producer.model_for(0, EMS_SETTINGS["samples"])  # a guided model's EMS: of its guided eps
            self._ems = cached_ems(model, self.noise, lambda n, seed: self.noise_batch(n, seed).to(self.device),
                                   model_hash=self.cache_key(), cache_dir=cache_dir() / "ems", **EMS_SETTINGS)
        return self._ems

    def sample(self, schedule: SolverSchedule, n: int, seed: int, chunk: int | None = None,
               progress=None, space: str = "image") -> torch.Tensor:
        """``n`` samples from noise seed ``seed``, solved ``chunk`` (default ``SAMPLE_CHUNK``; a
        pipeline: ``model.batch_size``) at a time; ``progress`` (an ``s3_ray.progress.Progress``)
        advances by each chunk's samples. ``space='latent'``: a latent pipeline's final latents."""
        return self.producer.sample(schedule, n, seed, chunk=chunk, progress=progress, space=space)

    def cache_key(self) -> str:
        """What this target's samples depend on besides schedule, n and seed (names disk caches)."""
        if self.model_cfg.kind == "diffusers_pipeline":
            return self.producer.sample_key()[:24]
        # same weights under another noise schedule, output or time label give other samples
        how = hashlib.sha256(self.model_cfg.model_dump_json(exclude={"checkpoint"}).encode()).hexdigest()[:8]
        return f"{self.weights_sha[:16]}-{how}"

    def reference_solution(self, n: int, seed: int) -> torch.Tensor:
        """High-accuracy solve from the same noise (for the RMSE proxy), in ``metric_space``; cached
        per process (and, for a pipeline, on disk: it costs 100 NFE per sample)."""
        key = (n, seed, self.metric_space)
        if key not in self._rmse_refs:
            from s3_ray.usf.baselines import build_baseline

            ref = build_baseline(REFERENCE_SOLVER[0], self.noise, REFERENCE_SOLVER[1])
            if self.model_cfg.kind == "diffusers_pipeline":
                name = f"pipe-ref-{self.cache_key()}-{self.metric_space}-{REFERENCE_SOLVER[0]}-{REFERENCE_SOLVER[1]}"
                self._rmse_refs[key] = cached_array(f"{name}-{n}-{seed}.npy", lambda: self.sample(
                    ref, n, seed, space=self.metric_space))
            else:
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


def check_pipeline_metric(metric_cfg: MetricConfig) -> None:
    """FID on a pipeline's images needs Inception weights the user has (never downloaded)."""
    if metric_cfg.kind != "fid":
        return
    if not metric_cfg.feature_extractor.startswith("inception"):
        raise ValueError(f"metric.feature_extractor: {metric_cfg.feature_extractor!r} reads the digits model's 8x8 "
                         "images; a pipeline's images need inception-v3-compat with feature_extractor_weights_path "
                         "(or use metric.kind: rmse, which needs no extractor)")
    from s3_ray.metrics.fid import check_weights_file

    check_weights_file(metric_cfg.feature_extractor_weights_path, "metric.feature_extractor_weights_path")


def cached_array(name: str, make) -> torch.Tensor:
    """``make()`` (a tensor), cached as ``<cache_dir>/<name>`` (np.save to a temporary, then an
    atomic rename; read without pickle)."""
    from s3_ray.metrics.fid import cache_dir

    path = cache_dir() / name
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError):
            pass  # unreadable entry: recompute and overwrite
    x = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, x.numpy(), allow_pickle=False)
    os.replace(tmp, path)
    return x


def model_reference_images(target: Target, n: int) -> torch.Tensor:
    """``n`` samples of ``target`` from the reference solver, as uint8, cached by weights hash."""
    from s3_ray.metrics.fid import uint8_images
    from s3_ray.progress import Progress
    from s3_ray.usf.baselines import build_baseline

    name, nfe = REFERENCE_SOLVER

    def make():
        with Progress(n, f"model reference set ({nfe}-NFE solve)", "samples") as progress:
            x = target.sample(build_baseline(name, target.noise, nfe), n, MODEL_REFERENCE_SEED, progress=progress)
        return uint8_images(x)

    return cached_array(f"model-ref-{target.cache_key()}-{name}-{nfe}-{n}-{MODEL_REFERENCE_SEED}.npy", make)


def evaluate(schedule: SolverSchedule, target: Target, metric: MetricConfig | None = None, n: int = 1000,
             seed: int = 0) -> dict:
    """Sample ``n`` images with noise seed ``seed`` and score them.

    Returns score (the metric's value; lower is better), fid/kid/kid_std or rmse, nfe, seconds,
    failed (NaN/Inf samples: score = metric.worst_score), schedule_hash, n, seed; a class-conditional
    digits model adds label_accuracy (the digits classifier's accuracy on the intended classes)."""
    metric = metric or target.metric_cfg
    start = time.perf_counter()
    out = {"nfe": schedule.nfe(), "schedule_hash": schedule.schedule_hash(), "n": n, "seed": seed, "failed": False}
    try:
        x = target.sample(schedule, n, seed, space=target.metric_space)
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
    if target.model_cfg.kind == "digits_cfg":
        out["label_accuracy"] = label_accuracy(x, target.producer.classes(n).cpu()) if not out["failed"] else 0.0
    out["seconds"] = time.perf_counter() - start
    return out


def label_accuracy(images: torch.Tensor, classes: torch.Tensor) -> float:
    """Fraction of digits images (in [-1, 1]) the shipped digits classifier assigns to ``classes``; the
    images are quantised to uint8 first, as FID sees them."""
    from s3_ray.metrics.fid import uint8_images

    with torch.no_grad():
        pred = _classifier()(uint8_images(images).float() / 127.5 - 1.0).argmax(1)
    return float((pred == classes).double().mean())


@lru_cache(maxsize=1)
def _classifier():
    from s3_ray.models.digits import load_digits_classifier

    return load_digits_classifier()


@lru_cache(maxsize=4)
def get_target(model_json: str, metric_json: str) -> Target:
    """One Target per process and configuration (workers reuse the loaded model across trials)."""
    return Target(ModelConfig.model_validate_json(model_json), MetricConfig.model_validate_json(metric_json))

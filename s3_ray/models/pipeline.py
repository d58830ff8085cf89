"""``model.kind: diffusers_pipeline``: a user's diffusers pipeline folder as a search target.

A trial runs the pipeline's own ``__call__`` with an ``S3Scheduler`` holding the schedule, so the
search measures what the user will export. Everything a trial does not need to pay for is done once
per process: loading, prompt embeddings (passed as ``prompt_embeds`` / ``negative_prompt_embeds``),
and the scheduler config. The initial latents of sample i under seed s come from its own generator
(``sample_seeds``): the same for every schedule and every batch size (common random numbers).
Samples take the prompts (or class labels) round-robin. Supported: StableDiffusionPipeline (prompts,
CFG; latents passed as ``latents=``), DiTPipeline (class labels, CFG) and DDPMPipeline
(unconditional; also with a flow-matching scheduler); the last two draw their own noise from the
per-sample generators we pass.

File checks (``check_pipeline``) read JSON and text only, so a search refuses a bad folder before
anything starts; weights are read with ``use_safetensors=True`` (pickled ``.bin`` weights are
refused: unpickling can run code). The noise schedule comes from ``scheduler/scheduler_config.json``
(``noise_for``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Pipeline class -> conditioning it takes. A flow folder (DDPMPipeline + FlowMatchEulerDiscreteScheduler)
# is a DDPMPipeline.
SUPPORTED_PIPELINES = {"DDPMPipeline": "unconditional", "StableDiffusionPipeline": "text", "DiTPipeline": "class"}
# Pipelines that hand step() the output of scale_model_input (DiT: latent_model_input is reassigned):
# there S3Scheduler's AFS start is applied twice (measured: 2e-4 relative off our sampler, vs 3e-7
# without AFS), so AFS is left out of their searches.
DENOISER = {"DDPMPipeline": "unet", "StableDiffusionPipeline": "unet", "DiTPipeline": "transformer"}
LIBRARIES = ("diffusers", "transformers", "s3_ray")  # component libraries a folder may name
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_PROMPTS = 10_000
MAX_PROMPT_CHARS = 1_000
PROMPT_FILE_BYTES = 4 * 2**20
SD_MULTIPLE = 8  # StableDiffusionPipeline.check_inputs: height and width divisible by 8


def _fail(msg: str):
    raise ValueError(msg)


def _read_json(path: Path, field: str = "model.pipeline") -> dict:
    from s3_ray.usf.schedule import read_json

    out = read_json(path, error=ValueError)  # bounded, UTF-8; names the file
    if not isinstance(out, dict):
        _fail(f"{field}: {path} holds {type(out).__name__}, not a JSON object")
    return out


def pipeline_dir(path) -> Path:
    """The pipeline folder (with ``model_index.json``); ValueError naming ``model.pipeline``."""
    p = Path(path)
    if not p.exists():
        _fail(f"model.pipeline: {p} does not exist")
    if not p.is_dir():
        _fail(f"model.pipeline: {p} is a file; give a diffusers pipeline folder (model_index.json and one "
              "folder per component, as written by save_pretrained)")
    if not (p / "model_index.json").is_file():
        _fail(f"model.pipeline: {p} has no model_index.json (not a diffusers pipeline folder)")
    return p


def model_index(d: Path) -> dict:
    """``model_index.json``, checked: a supported pipeline class, components from known libraries,
    safetensors weights in every component folder that holds weights."""
    index = _read_json(d / "model_index.json")
    cls = index.get("_class_name")
    if cls not in SUPPORTED_PIPELINES:
        _fail(f"model.pipeline: {d / 'model_index.json'} field '_class_name' is {cls!r}; supported: "
              f"{', '.join(SUPPORTED_PIPELINES)}")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry in ([None, None], [None]):
            continue
        if len(entry) != 2 or entry[0] not in LIBRARIES:
            _fail(f"model.pipeline: {d / 'model_index.json'} component {name!r} is {entry}; components must come "
                  f"from {', '.join(LIBRARIES)}")
        sub = d / name
        if not sub.is_dir():
            _fail(f"model.pipeline: {d} lacks the folder {name}/ that model_index.json names")
        pickled = sorted(f.name for f in sub.iterdir() if f.suffix in PICKLED)
        if pickled and not list(sub.glob("*.safetensors")):
            _fail(f"model.pipeline: no *.safetensors weights in {sub} (pickled weights {pickled} are refused: "
                  "unpickling can run code; convert them with save_pretrained(..., safe_serialization=True))")
    return index


def scheduler_config(d: Path) -> dict:
    path = d / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        _fail(f"model.pipeline: {d} has no scheduler/scheduler_config.json")
    return _read_json(path)


def pipeline_noise(d: Path):
    """The noise schedule of the folder's scheduler config (VP table or flow matching)."""
    from s3_ray.usf.noise import noise_from_diffusers_config

    path = d / "scheduler" / "scheduler_config.json"
    try:
        return noise_from_diffusers_config(scheduler_config(d))
    except ValueError as e:
        msg = str(e).removeprefix("scheduler_config.json ")
        raise ValueError(f"model.pipeline: {path}: {msg}") from None


def noise_for(model_cfg):
    """The noise schedule of ``model_cfg``: the pipeline's (``model.noise_schedule``, if given, must
    name the same one), else the named one. Random schedules are drawn in lambda, so every part of a
    search must use this one."""
    if model_cfg.kind != "diffusers_pipeline":
        from s3_ray.usf.noise import get_noise_schedule

        return get_noise_schedule(model_cfg.noise_schedule)
    d = pipeline_dir(model_cfg.pipeline)
    noise = _noise_cached(str(d.resolve()), _mtime(d / "scheduler" / "scheduler_config.json"))
    if model_cfg.noise_schedule is not None and model_cfg.noise_schedule != noise.name:
        _fail(f"model.noise_schedule: {model_cfg.noise_schedule!r} differs from the pipeline's {noise.name!r} "
              f"({d / 'scheduler' / 'scheduler_config.json'}); leave noise_schedule out for a pipeline")
    return noise


def _mtime(p: Path) -> int:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return -1


@lru_cache(maxsize=8)
def _noise_cached(d: str, _mtime_ns: int):
    return pipeline_noise(Path(d))


def read_prompts(path) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (blank lines skipped); ValueError naming
    ``model.prompts``, the file and the line."""
    from s3_ray.usf.schedule import read_text

    try:
        text = read_text(path, limit=PROMPT_FILE_BYTES, error=ValueError)
    except ValueError as e:
        raise ValueError(f"model.prompts: {e}") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        bad = next((c for c in line if ord(c) < 32 and c != "\t" or c == "\x7f"), None)
        if bad is not None:
            _fail(f"model.prompts: {path} line {i}: control character {bad!r} (binary data? one prompt per line)")
        if len(line) > MAX_PROMPT_CHARS:
            _fail(f"model.prompts: {path} line {i}: {len(line)} characters, more than {MAX_PROMPT_CHARS}")
        out.append(line)
        if len(out) > MAX_PROMPTS:
            _fail(f"model.prompts: {path} line {i}: more than {MAX_PROMPTS} prompts")
    if not out:
        _fail(f"model.prompts: {path} holds no prompt (one prompt per line)")
    return out


@dataclass(frozen=True)
class PipelineInfo:
    """What the folder and the config say, checked without loading weights."""

    dir: Path
    cls: str
    scheduler_config: dict
    noise: object
    image_size: tuple[int, int]
    shape: tuple[int, int, int]  # latents per sample (C, h, w)
    prompts: tuple[str, ...] | None
    class_labels: tuple[int, ...] | None


def _unet_factor(cfg: dict) -> int:
    return 2 ** (len(cfg.get("block_out_channels") or (0,)) - 1)


def _size(v, what: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(k, int) for k in v):
        return int(v[0]), int(v[1])
    _fail(f"model.pipeline: {what} field 'sample_size' is {v!r}, not an integer or [H, W]")


def _not_taken(model_cfg, cls: str, what: str, fields) -> None:
    for field in fields:
        if getattr(model_cfg, field) is not None:
            _fail(f"model.{field}: {cls} is {what} (it takes no {field.replace('_', ' ')})")


def check_pipeline(model_cfg) -> PipelineInfo:
    """Every check that needs only the folder's JSON files and the prompts file: class, component
    libraries, safetensors, the noise schedule, prompts / labels / guidance for this class, the
    image size the denoiser can take. ValueError names the field and file."""
    d = pipeline_dir(model_cfg.pipeline)
    index = model_index(d)
    cls = index["_class_name"]
    noise = noise_for(model_cfg)
    sched = scheduler_config(d)
    kind = SUPPORTED_PIPELINES[cls]
    net_path = d / DENOISER[cls] / "config.json"
    if not net_path.is_file():
        _fail(f"model.pipeline: {d} has no {DENOISER[cls]}/config.json")
    net = _read_json(net_path)
    sample = _size(net.get("sample_size"), str(net_path))
    vae_path = d / "vae" / "config.json"
    vae = 1
    if kind != "unconditional":
        if not vae_path.is_file():
            _fail(f"model.pipeline: {d} has no vae/config.json")
        vae = _unet_factor(_read_json(vae_path))
    prompts = labels = None
    if kind == "text":  # Stable Diffusion: any size the UNet and VAE can take
        _not_taken(model_cfg, cls, "text-conditional (give model.prompts)", ("class_labels",))
        if model_cfg.prompts is None:
            _fail(f"model.prompts: required for {cls} (a UTF-8 text file, one prompt per line)")
        size = tuple(model_cfg.image_size) if model_cfg.image_size is not None else (sample[0] * vae, sample[1] * vae)
        multiple = math.lcm(SD_MULTIPLE, vae * _unet_factor(net))
        if any(k % multiple for k in size):
            _fail(f"model.image_size: {list(size)} is not a multiple of {multiple} in both dimensions ({cls}: 8; "
                  f"VAE scale factor {vae} x the denoiser's down-sampling {_unet_factor(net)}, from {vae_path} "
                  f"and {net_path})")
        prompts = tuple(read_prompts(model_cfg.prompts))
    else:  # DDPM and DiT pipelines make images of their denoiser's sample size only
        size = (sample[0] * vae, sample[1] * vae)
        if model_cfg.image_size is not None and tuple(model_cfg.image_size) != size:
            _fail(f"model.image_size: {cls} makes images of one size only, {list(size)} (sample_size in "
                  f"{net_path}{' x the VAE scale factor' if vae > 1 else ''}), not {list(model_cfg.image_size)}")
        if kind == "unconditional":
            _not_taken(model_cfg, cls, "unconditional", ("prompts", "class_labels", "negative_prompt"))
            if model_cfg.guidance_scale != 1.0:
                _fail(f"model.guidance_scale: {cls} has no classifier-free guidance; use 1")
        else:
            _not_taken(model_cfg, cls, "class-conditional (give model.class_labels)", ("prompts", "negative_prompt"))
            if model_cfg.class_labels is None:
                _fail(f"model.class_labels: required for {cls} (a list of class ids)")
            n = net.get("num_embeds_ada_norm") or 1000
            if max(model_cfg.class_labels) >= n:
                _fail(f"model.class_labels: {max(model_cfg.class_labels)} is not a class of {cls}: ids are 0..{n - 1} "
                      f"(num_embeds_ada_norm in {net_path})")
            labels = tuple(model_cfg.class_labels)
    shape = (int(net.get("in_channels", 4)), size[0] // vae, size[1] // vae)
    return PipelineInfo(d, cls, sched, noise, (int(size[0]), int(size[1])), shape, prompts, labels)


def check_metric_space(cls: str, model_cfg, metric_cfg) -> None:
    """RMSE on latents needs a pipeline that can return them (``output_type='latent'``)."""
    if metric_cfg.kind == "rmse" and model_cfg.metric_space == "latent" and SUPPORTED_PIPELINES[cls] == "class":
        _fail(f"model.metric_space: {cls} always decodes its latents (it has no output_type 'latent'); "
              "use metric_space: image")


def weights_sha(d: Path) -> str:
    """sha256 over the sha256 of every component's safetensors file (as checkpoint.py hashes a UNet)."""
    from s3_ray.metrics.fid import file_sha256

    files = sorted(d.glob("*/*.safetensors"))
    return hashlib.sha256("".join(f"{f.parent.name}/{f.name}:{file_sha256(f)}" for f in files).encode()).hexdigest()


def scheduler_class() -> type:
    """``S3Scheduler`` (s3_ray/pipelines/scheduler.py)."""
    from s3_ray.pipelines.scheduler import S3Scheduler

    return S3Scheduler


# ---- decisions a pipeline can run ----------------------------------------------------------------

def _probes(noise) -> dict[tuple[str, str], object]:
    """One small schedule per (decision field, value) whose only unusual feature is that value."""
    from s3_ray.usf.baselines import build_baseline
    from s3_ray.usf.schedule import Corrector, Derivative, SolverSchedule, Step

    out = {("afs", a): build_baseline("ddim", noise, 3, afs=a) for a in ("zero_x0", "mean_x0")}
    base = build_baseline("ddim", noise, 3)
    t = base.times
    for kind in ("pseudo", "implicit"):
        c = Corrector(kind=kind, order=2, derivatives=(Derivative(points=(-1,)),))
        steps = (Step(t=t[1], prediction="data", order=1, corrector=c), *base.steps[1:])
        out[("correctors", kind)] = SolverSchedule(noise_schedule=noise.name, t_start=t[0], steps=steps)
    return out


def unsupported_decisions(cls: str, noise) -> dict[str, tuple[str, ...]]:
    """Decision values ``cls`` cannot run through ``S3Scheduler``, per DecisionSpace field
    ({'afs': (...), ...}), as its ``check_expressible`` answers for one probe schedule per value."""
    from s3_ray.pipelines import check_expressible
    from s3_ray.usf.schedule import ScheduleError

    out: dict[str, tuple[str, ...]] = {}
    for (field, value), s in _probes(noise).items():
        try:
            check_expressible(s, cls)
        except ScheduleError:
            out[field] = (*out.get(field, ()), value)
    return out


# ---- sampling ----------------------------------------------------------------------------------

def sample_seeds(seed: int, indices) -> list[int]:
    """The generator seed of each sample: CPU generators keep only 32 bits of a seed, so sample i of
    seed s gets (h(s) + i) mod 2^32 with h a hash of s: distinct within a seed, and two seeds'
    ranges of n samples overlap with probability about 2n / 2^32."""
    base = int.from_bytes(hashlib.sha256(f"s3-ray latents {int(seed)}".encode()).digest()[:4], "big")
    return [(base + int(i)) % 2**32 for i in indices]


def sample_generators(seed: int, indices) -> list:
    import torch

    return [torch.Generator().manual_seed(k) for k in sample_seeds(seed, indices)]


def initial_latents(shape: tuple[int, ...], indices, seed: int):
    """[len(indices), *shape] standard normal latents, sample i from its own generator (CRN), as
    diffusers' ``randn_tensor`` draws them from a list of generators."""
    import torch

    return torch.cat([torch.randn((1, *shape), generator=g) for g in sample_generators(seed, indices)])


class _Loaded:
    """A loaded pipeline and what is computed once per process (embeddings, the denoiser call counter)."""

    def __init__(self, info: PipelineInfo, device):
        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        import s3_ray  # noqa: F401  (an exported folder may name s3_ray.S3Scheduler)

        bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
        dlog.disable_progress_bar()  # "Loading pipeline components" in every worker's log otherwise
        tlog.disable_progress_bar()
        try:
            pipe = DiffusionPipeline.from_pretrained(str(info.dir), use_safetensors=True, local_files_only=True,
                                                     dtype=torch.float32, low_cpu_mem_usage=False)
        except Exception as e:  # noqa: BLE001 (diffusers raises many kinds for a bad folder; name it)
            raise ValueError(f"model.pipeline: cannot load {info.dir} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''})") from None
        finally:
            for on, lib in zip(bars, (dlog, tlog)):
                if on:
                    lib.enable_progress_bar()
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe, self.info, self.device = pipe, info, device
        self.original_scheduler = pipe.scheduler
        self.calls = 0  # denoiser forward passes (a CFG pair is one call)
        self.denoiser = getattr(pipe, DENOISER[info.cls])
        self.denoiser.register_forward_pre_hook(self._count)
        self._embeds: dict = {}

    def _count(self, *_):
        self.calls += 1

    def embeddings(self, negative: str | None, guided: bool):
        """(prompt_embeds [P, L, D], negative_prompt_embeds or None) of every prompt, encoded once."""
        import torch

        key = (negative, guided)
        if key not in self._embeds:
            prompts = list(self.info.prompts)
            with torch.no_grad():
                pe, ne = self.pipe.encode_prompt(prompts, self.device, 1, guided,
                                                 negative_prompt=[negative] * len(prompts) if negative else None)
            self._embeds[key] = (pe.detach(), None if ne is None else ne.detach())
        return self._embeds[key]


_LOADED: dict = {}  # (folder, weights sha, device) -> _Loaded, one per process


class PipelineSampler:
    """Samples of a schedule through the pipeline's ``__call__`` with an ``S3Scheduler`` (the
    sample-producer interface of s3_ray/metrics/evaluate.py)."""

    def __init__(self, model_cfg, device=None):
        import torch

        self.cfg = model_cfg
        self.info = check_pipeline(model_cfg)
        self.noise = self.info.noise
        self.shape = self.info.shape
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.weights_sha = weights_sha(self.info.dir)
        key = (str(self.info.dir.resolve()), self.weights_sha, str(self.device))
        if key not in _LOADED:
            _LOADED[key] = _Loaded(self.info, self.device)
        self.loaded = _LOADED[key]
        self.pipe = self.loaded.pipe
        self.guided = model_cfg.guidance_scale > 1.0
        self.kind = SUPPORTED_PIPELINES[self.info.cls]
        self.is_text = self.kind == "text"
        self.chunk = model_cfg.batch_size

    @property
    def calls(self) -> int:
        return self.loaded.calls

    def sample_key(self) -> str:
        """What the samples depend on besides the schedule, n and seed (a cache key)."""
        parts = [self.weights_sha, self.info.cls, self.info.prompts, self.info.class_labels, self.cfg.negative_prompt,
                 self.cfg.guidance_scale, self.info.image_size, self.noise.spec()]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def scheduler(self, schedule):
        """An ``S3Scheduler`` holding ``schedule``, built from the pipeline's own scheduler config."""
        return scheduler_class().from_config(self.loaded.original_scheduler.config, schedules=[schedule])

    def noise_batch(self, n: int, seed: int):
        """The initial latents of samples 0..n-1 (before the scheduler's init_noise_sigma)."""
        return initial_latents(self.shape, range(n), seed)

    def start_scale(self) -> float:
        """The factor the pipeline applies to its initial latents (SD: init_noise_sigma; DDPM, DiT: none)."""
        if not self.is_text:
            return 1.0
        from s3_ray.usf.baselines import build_baseline

        return float(self.scheduler(build_baseline("ddim", self.noise, 2)).init_noise_sigma)

    def conditioning(self, indices):
        """(prompt_embeds, negative_prompt_embeds) of these samples (round-robin over the prompts)."""
        pe, ne = self.loaded.embeddings(self.cfg.negative_prompt, self.guided)
        idx = [i % len(pe) for i in indices]
        return pe[idx], (None if ne is None else ne[idx])

    def labels(self, indices) -> list[int]:
        """The class label of each sample (round-robin over model.class_labels: balanced classes)."""
        labels = self.info.class_labels
        return [labels[i % len(labels)] for i in indices]

    def sample(self, schedule, n: int, seed: int, chunk: int | None = None, progress=None, space: str = "image"):
        """``n`` samples (float32, CPU) of ``schedule``: decoded images in [-1, 1] (``space='image'``)
        or the final latents (``'latent'``; an unconditional pipeline's latents are its images)."""
        import torch

        chunk = chunk or self.chunk
        pipe = self.pipe
        pipe.scheduler = self.scheduler(schedule)
        out = []
        try:
            with torch.no_grad():
                for lo in range(0, n, chunk):
                    idx = range(lo, min(n, lo + chunk))
                    out.append(self._call(schedule.nfe(), idx, seed, space).float().cpu())
                    if progress is not None:
                        progress.update(len(idx))
        finally:
            pipe.scheduler = self.loaded.original_scheduler
        return torch.cat(out)

    def _call(self, nfe: int, idx, seed: int, space: str):
        pipe = self.pipe
        if self.kind == "unconditional":  # DDPMPipeline: noise from per-sample generators; images clamped
            x = pipe(batch_size=len(idx), generator=sample_generators(seed, idx), num_inference_steps=nfe,
                     output_type="pt", return_dict=False)[0]
            return x * 2.0 - 1.0
        if self.kind == "class":  # DiTPipeline: as DDPM, with class labels and CFG; always decoded
            x = pipe(class_labels=self.labels(idx), guidance_scale=self.cfg.guidance_scale,
                     generator=sample_generators(seed, idx), num_inference_steps=nfe, output_type="pt",
                     return_dict=False)[0]
            return x * 2.0 - 1.0
        pe, ne = self.conditioning(idx)
        h, w = self.info.image_size
        kw = {"negative_prompt_embeds": ne} if self.guided else {}
        x = pipe(prompt_embeds=pe, latents=initial_latents(self.shape, idx, seed).to(self.device), height=h,
                 width=w, num_inference_steps=nfe, guidance_scale=self.cfg.guidance_scale,
                 output_type="latent" if space == "latent" else "pt", return_dict=False, **kw)[0]
        return x if space == "latent" else x * 2.0 - 1.0

    # ---- the same network through our own sampler (tests, benchmarks) ----
    def guided_net(self, n: int):
        """``net(x, labels)`` over the pipeline's denoiser for samples 0..n-1 in one batch, with
        classifier-free guidance applied as the pipeline applies it."""
        if self.kind == "class":
            import torch

            labels = torch.tensor(self.labels(range(n)), device=self.device)
            return GuidedClassDenoiser(self.loaded.denoiser, labels, self.cfg.guidance_scale, self.shape[0])
        pe, ne = self.conditioning(range(n)) if self.is_text else (None, None)
        return GuidedDenoiser(self.loaded.denoiser, pe, ne if self.guided else None, self.cfg.guidance_scale)

    def output_kind(self) -> str:
        from s3_ray.models.adapter import output_for_prediction_type

        sc = self.info.scheduler_config
        return output_for_prediction_type(sc.get("prediction_type", "epsilon"), sc.get("_class_name"))


class GuidedDenoiser:
    """``net(x, labels)``: the denoiser's output, with CFG (one call on the doubled batch)."""

    def __init__(self, unet, cond, uncond, guidance: float):
        self.unet, self.cond, self.uncond, self.guidance = unet, cond, uncond, guidance

    def __call__(self, x, labels):
        import torch

        if self.cond is None:
            return self.unet(x, labels).sample
        if self.uncond is None:
            return self.unet(x, labels, encoder_hidden_states=self.cond).sample
        out = self.unet(torch.cat([x, x]), torch.cat([labels, labels]),
                        encoder_hidden_states=torch.cat([self.uncond, self.cond])).sample
        uncond, cond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)


class GuidedClassDenoiser:
    """``net(x, labels)`` over a DiT transformer as DiTPipeline calls it: CFG against the null
    class 1000 on the noise channels only; a learned-variance output's extra channels dropped."""

    NULL_CLASS = 1000

    def __init__(self, transformer, classes, guidance: float, channels: int):
        self.net, self.classes, self.guidance, self.channels = transformer, classes, guidance, channels

    def __call__(self, x, labels):
        import torch

        if self.guidance <= 1.0:
            return self.net(x, timestep=labels, class_labels=self.classes).sample[:, : self.channels]
        null = torch.full_like(self.classes, self.NULL_CLASS)
        out = self.net(torch.cat([x, x]), timestep=torch.cat([labels, labels]),
                       class_labels=torch.cat([self.classes, null])).sample[:, : self.channels]
        cond, uncond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)

"""User checkpoints: an unconditional diffusers ``UNet2DModel`` saved in safetensors.

``model.checkpoint`` names a diffusers model directory (``config.json`` + ``*.safetensors``, as
written by ``save_pretrained``) or a pipeline directory holding one in ``unet/`` (as downloaded for
e.g. ``google/ddpm-cifar10-32``). Weights are read with ``use_safetensors=True`` only: pickled
``.bin`` weights are refused, since unpickling can run code. A pipeline's ``scheduler/`` config, if
present, must describe the same noise schedule as ``model.noise_schedule``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SUPPORTED_CLASSES = ("UNet2DModel",)


def model_dir(checkpoint: str | Path) -> Path:
    """The directory that holds the network's ``config.json`` and safetensors weights; raises
    ``ValueError`` naming ``model.checkpoint`` and what is wrong."""
    p = Path(checkpoint)
    if not p.exists():
        raise ValueError(f"model.checkpoint: {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"model.checkpoint: {p} is a file; give a diffusers model directory (config.json and "
                         "*.safetensors, as written by save_pretrained) or a pipeline directory with unet/")
    d = p if (p / "config.json").is_file() else p / "unet"
    if not (d / "config.json").is_file():
        raise ValueError(f"model.checkpoint: {p} has neither config.json nor unet/config.json")
    if not list(d.glob("*.safetensors")):
        pickled = [f.name for f in d.glob("*.bin")]
        raise ValueError(f"model.checkpoint: no *.safetensors weights in {d}"
                         + (f" (pickled weights {pickled} are refused: unpickling can run code; convert them "
                            "with save_pretrained(..., safe_serialization=True))" if pickled else ""))
    return d


def read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"model.checkpoint: {path} is not readable JSON ({e})") from None
    if not isinstance(out, dict):
        raise ValueError(f"model.checkpoint: {path} holds {type(out).__name__}, not a JSON object")
    return out


def check_scheduler(checkpoint: str | Path, noise) -> None:
    """A pipeline's ``scheduler/scheduler_config.json`` (if any) must match ``noise`` (a VP-discrete table)."""
    path = Path(checkpoint) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return
    from s3_ray.usf.noise import VPDiscrete

    try:
        theirs = VPDiscrete.from_diffusers_config(read_json(path)).spec()
    except ValueError as e:
        raise ValueError(f"model.checkpoint: {path}: {e}") from None
    if theirs != noise.spec():
        raise ValueError(f"model.noise_schedule: {noise.name!r} ({noise.spec()}) differs from the pipeline's "
                         f"scheduler {path} ({theirs}); use noise_schedule: vp_discrete for a DDPM linear table")


def check_complete(d: Path, cls: str, info: dict) -> None:
    """Refuse weights that leave some of the network's tensors at their random initialisation."""
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        names = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ValueError(f"model.checkpoint: the safetensors weights in {d} lack tensors of the {cls} that "
                         f"{d / 'config.json'} describes: {names}")


class CheckpointNet(torch.nn.Module):
    """``net(x, labels)`` over a diffusers UNet: its ``.sample`` output, the first C channels of a
    learned-variance model (2C outputs)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.channels = int(unet.config.in_channels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, labels).sample[:, : self.channels]


def load_checkpoint(checkpoint: str | Path, image_shape=None) -> tuple[CheckpointNet, tuple[int, ...], str]:
    """(net in eval mode, sample shape (C, H, W), sha256 of the weights) for ``model.checkpoint``."""
    d = model_dir(checkpoint)
    cfg = read_json(d / "config.json")
    cls = cfg.get("_class_name")
    if cls not in SUPPORTED_CLASSES:
        raise ValueError(f"model.checkpoint: {d / 'config.json'} field '_class_name' is {cls!r}; supported: "
                         f"{', '.join(SUPPORTED_CLASSES)} (unconditional image models)")
    import diffusers

    try:
        unet, info = getattr(diffusers, cls).from_pretrained(
            str(d), use_safetensors=True, local_files_only=True, output_loading_info=True,
            low_cpu_mem_usage=False)  # without accelerate, as installed
    except Exception as e:  # noqa: BLE001 (diffusers raises many kinds for a bad file; name the file)
        raise ValueError(f"model.checkpoint: cannot load {d} ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
                         ) from None
    check_complete(d, cls, info)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(unet.config.in_channels), int(h), int(w))
    if image_shape is not None and tuple(image_shape) != shape:
        raise ValueError(f"model.image_shape: {list(image_shape)} differs from the checkpoint's {list(shape)} "
                         f"(in_channels, sample_size in {d / 'config.json'})")
    from s3_ray.metrics.fid import file_sha256

    sha = hashlib.sha256("".join(file_sha256(f) for f in sorted(d.glob("*.safetensors"))).encode()).hexdigest()
    return CheckpointNet(unet).eval().requires_grad_(False), shape, sha

"""The embedded models: scikit-learn digits (8x8), a small ε-prediction UNet (unconditional, and a
class-conditional one for classifier-free guidance) and a digits classifier used as the FID feature
extractor and to check a guided sample's class. Weights are shipped as safetensors
with a JSON metadata file beside them (see ``s3_ray/models/train.py`` for how they were made).

Data split (fixed, documented): ``np.random.default_rng(0).permutation(1797)``; the first 397
indices are held out, the remaining 1,400 are the training set.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ASSETS = Path(__file__).resolve().parent.parent / "assets"
UNET_PATH = ASSETS / "digits_unet.safetensors"
CFG_UNET_PATH = ASSETS / "digits_cfg_unet.safetensors"
CLASSIFIER_PATH = ASSETS / "digits_classifier.safetensors"
N_HELDOUT = 397
SPLIT_SEED = 0

UNET_ARCH = {"kind": "digits_unet", "in_ch": 1, "base_ch": 16, "ch_mult": [1, 2], "temb_dim": 128,
             "time_scale": 1000.0}
# The class-conditional UNet: the same network plus a label embedding (label 10 = unconditional).
CFG_UNET_ARCH = {**UNET_ARCH, "kind": "digits_cfg_unet", "n_classes": 10}
CLASSIFIER_ARCH = {"kind": "digits_classifier", "in_ch": 1, "ch": [32, 64], "feat_dim": 64, "n_classes": 10}


# ----------------------------------------------------------------------------- data
@functools.cache
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    # scikit-learn's bundled digits.csv.gz read directly: importing sklearn.datasets costs ~2 s.
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        a = np.loadtxt(csv, delimiter=",")
        return a[:, :-1].reshape(-1, 8, 8), a[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def load_digits_data():
    """Return ``(train, heldout, sha256)``: ``train`` and ``heldout`` are ``(images, labels)`` with
    images float32 (N, 1, 8, 8) in [-1, 1] and int64 labels; ``sha256`` hashes the image and label
    bytes (train then held-out), so caches can key on it.
    """
    images, labels = _digits_raw()
    x = (images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]  # pixel values are 0..16
    y = labels.copy()
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    held, tr = perm[:N_HELDOUT], perm[N_HELDOUT:]
    h = hashlib.sha256()
    for a in (x[tr], y[tr], x[held], y[held]):
        h.update(np.ascontiguousarray(a).tobytes())
    return (x[tr], y[tr]), (x[held], y[held]), h.hexdigest()


# ----------------------------------------------------------------------------- UNet
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (scaled) time ``t`` [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time embedding, GroupNorm-SiLU-conv, with a residual skip."""

    def __init__(self, cin: int, cout: int, temb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, cin // 4) or 1, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class DigitsUNet(nn.Module):
    """ε-prediction UNet for 1x8x8 images: ``net(x [B,1,8,8], t [B] in (0,1]) -> eps [B,1,8,8]``.

    Two levels (8x8 with ``base_ch``, 4x4 with ``2*base_ch``), one residual block per level on the
    way down and up, two in the middle (4x4); no attention. With ``n_classes > 0`` it is
    class-conditional, ``net(x, t, y)``: a label embedding (``n_classes + 1`` entries, the last one
    meaning "no label") is added to the time embedding; ``y=None`` is the unconditional branch.
    """

    def __init__(self, in_ch=1, base_ch=16, ch_mult=(1, 2), temb_dim=128, time_scale=1000.0, n_classes=0, **_):
        super().__init__()
        c1, c2 = base_ch * ch_mult[0], base_ch * ch_mult[1]
        self.time_scale = float(time_scale)
        self.temb_dim = temb_dim
        self.n_classes = int(n_classes)
        self.temb = nn.Sequential(nn.Linear(temb_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.label_emb = nn.Embedding(self.n_classes + 1, temb_dim) if self.n_classes else None
        self.conv_in = nn.Conv2d(in_ch, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, temb_dim)
        self.downsample = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, temb_dim)
        self.mid1 = ResBlock(c2, c2, temb_dim)
        self.mid2 = ResBlock(c2, c2, temb_dim)
        self.up2 = ResBlock(c2 + c2, c2, temb_dim)
        self.upsample = nn.Conv2d(c2, c2, 3, padding=1)
        self.up1 = ResBlock(c2 + c1, c1, temb_dim)
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, in_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        emb = self.temb(timestep_embedding(t * self.time_scale, self.temb_dim).to(x.dtype))
        if self.label_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.n_classes, dtype=torch.long, device=x.device)
            emb = emb + self.label_emb(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional: it takes no class labels")
        h1 = self.down1(self.conv_in(x), emb)  # 8x8
        h2 = self.down2(self.downsample(h1), emb)  # 4x4
        h = self.mid2(self.mid1(h2, emb), emb)
        h = self.up2(torch.cat([h, h2], 1), emb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h1], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- classifier
class DigitsClassifier(nn.Module):
    """Two conv layers + a ``feat_dim`` penultimate layer + a linear 10-way head.

    ``features(x)`` returns the penultimate activations divided by ``feat_scale`` (a buffer set after
    training to their RMS over the train split, so features are O(1) as KID's kernel expects);
    ``forward`` returns the logits.
    """

    def __init__(self, in_ch=1, ch=(32, 64), feat_dim=64, n_classes=10, **_):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch[0], 3, padding=1)  # 8x8
        self.conv2 = nn.Conv2d(ch[0], ch[1], 3, padding=1, stride=2)  # 4x4
        self.fc = nn.Linear(ch[1] * 16, feat_dim)
        self.head = nn.Linear(feat_dim, n_classes)
        self.register_buffer("feat_scale", torch.ones(1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Raw penultimate activations."""
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return F.relu(self.fc(h.flatten(1)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x) / self.feat_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------- I/O
def save_weights(net: nn.Module, path, meta: dict) -> None:
    """Write ``path`` (safetensors) and ``path.with_suffix('.json')`` (metadata)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"kind": meta["arch"]["kind"]})
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _load(cls, expected_arch: dict, path) -> tuple[nn.Module, dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    for p in (path, meta_path):
        if not p.is_file():
            raise ValueError(f"{p}: file not found")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    arch = meta.get("arch") if isinstance(meta, dict) else None
    if not isinstance(arch, dict):
        raise ValueError(f"{meta_path}: field 'arch' missing")  # noqa: TRY004 (contract: ValueError)
    for k, v in expected_arch.items():
        if arch.get(k) != v:
            raise ValueError(f"{meta_path}: field 'arch.{k}' is {arch.get(k)!r}, expected {v!r}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    net = cls(**arch)
    want = net.state_dict()
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"{path}: field 'keys' mismatch (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(f"{path}: field '{k}' has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net.eval().requires_grad_(False), meta


def _load_unet(arch: dict, path) -> DigitsUNet:
    net, meta = _load(DigitsUNet, arch, path)
    sched = meta.get("noise_schedule")
    if not isinstance(sched, dict) or sched.get("name") != "vp_linear":
        raise ValueError(f"{Path(path).with_suffix('.json')}: field 'noise_schedule' is {sched!r}")
    net.meta = meta
    return net


def load_digits_model(path=None) -> DigitsUNet:
    """The shipped EMA UNet in eval mode (``net.meta`` holds its metadata). Raises ``ValueError``
    naming the file and field for a missing, corrupt or mismatched checkpoint."""
    return _load_unet(UNET_ARCH, path or UNET_PATH)


def load_digits_cfg_model(path=None) -> DigitsUNet:
    """The shipped class-conditional EMA UNet (labels 0..9, 10 = unconditional), as ``load_digits_model``."""
    return _load_unet(CFG_UNET_ARCH, path or CFG_UNET_PATH)


def load_digits_classifier(path=None) -> DigitsClassifier:
    """The shipped digits classifier in eval mode (``net.meta`` holds its metadata)."""
    net, meta = _load(DigitsClassifier, CLASSIFIER_ARCH, path or CLASSIFIER_PATH)
    net.meta = meta
    return net

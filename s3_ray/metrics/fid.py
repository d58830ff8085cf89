"""FID / KID with torch-fidelity and our ``s3-digits`` feature extractor.

Reference statistics (FID mean/cov and the features for KID) are cached as ``.npz`` in a directory
we own (``$S3_CACHE_DIR`` or ``~/.cache/s3_ray/metrics``), keyed by the sha256 of the reference
images and of the extractor's weights file. torch-fidelity's own cache ignores both, so it is off.

For ``s3-digits`` the default path (``backend="direct"``) extracts features once with the
extractor, calls torch-fidelity's ``fid_features_to_statistics`` / ``fid_statistics_to_metric``
directly, and computes KID with ``kid_fast`` (torch-fidelity's estimator and subsets, from the full
kernel matrices): the same numbers as ``calculate_metrics`` (KID to float32 rounding) in ~0.05 s
instead of ~0.9 s for 1,000 samples. ``backend="calculate_metrics"`` (and any other extractor, e.g. Inception) goes through
``torch_fidelity.calculate_metrics``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

DIGITS_EXTRACTOR = "s3-digits"
_EXTRACTORS: dict = {}  # weights path -> extractor (one per process)
_FILE_SHA: dict = {}  # (path, size, mtime) -> sha256


def cache_dir() -> Path:
    """Our metrics cache: ``$S3_CACHE_DIR`` or ``~/.cache/s3_ray/metrics``."""
    return Path(os.environ.get("S3_CACHE_DIR") or Path.home() / ".cache" / "s3_ray" / "metrics")


def uint8_images(x) -> torch.Tensor:
    """Model-space images in [-1, 1] (float tensor/array) -> uint8 0..255 (clamped, rounded)."""
    x = torch.as_tensor(x).detach().cpu().float()
    return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


class ImageDataset(Dataset):
    """In-memory uint8 images [N, C, H, W] as a Dataset of C x H x W uint8 tensors.

    ``channels=3`` repeats a single channel (for RGB-only extractors such as Inception).
    """

    def __init__(self, images, channels: int | None = None):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if channels and images.shape[1] != channels:
            images = images.expand(-1, channels, -1, -1)
        self.images = images.contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def images_sha256(images_u8: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images_u8.shape)).encode())
    h.update(images_u8.contiguous().numpy().tobytes())
    return h.hexdigest()


def file_sha256(path) -> str:
    """sha256 of a file, read in 1 MiB chunks; cached per process by (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_SHA[key] = h.hexdigest()
    return _FILE_SHA[key]


_CHECKED_WEIGHTS: set = set()  # sha256 of extractor weights files that passed check_weights_file


def check_weights_file(path, field: str = "feature_extractor_weights_path") -> None:
    """A local feature-extractor weights file that holds tensors only. torch-fidelity reads it with
    ``torch.load(weights_only=False)`` (which would run pickled code), so it is first read here with
    ``weights_only=True``; a file that needs more than tensors is refused. ValueError names ``field``."""
    if not path:
        raise ValueError(f"{field}: required (a local weights file; s3-ray never downloads weights)")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{field}: {p} does not exist or is not a file (s3-ray never downloads weights)")
    sha = file_sha256(p)
    if sha in _CHECKED_WEIGHTS:
        return
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle and zip errors of many kinds)
        raise ValueError(f"{field}: {p} is not a plain PyTorch state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{field}: {p} is not a state dict of tensors")
    _CHECKED_WEIGHTS.add(sha)


def _weights_path(path=None) -> Path:
    from s3_ray.models.digits import CLASSIFIER_PATH

    return Path(path) if path else CLASSIFIER_PATH


def digits_reference(kind: str = "train") -> torch.Tensor:
    """The digits ``train`` (1,400) or ``heldout`` (397) split as uint8 [N, 1, 8, 8]."""
    from s3_ray.models.digits import load_digits_data

    train, held, _ = load_digits_data()
    splits = {"train": train, "heldout": held}
    if kind not in splits:
        raise ValueError(f"unknown reference kind {kind!r} (known: train, heldout; or pass images)")
    return uint8_images(splits[kind][0])


@torch.no_grad()
def digits_features(images_u8, weights_path=None, cuda: bool = False, batch: int = 2048) -> torch.Tensor:
    """Penultimate-layer features [N, 64] of uint8 [N, 1, 8, 8] images (float32, on CPU)."""
    from s3_ray.metrics.extractor import NAME, DigitsFeatureExtractor

    wp = str(_weights_path(weights_path))
    if wp not in _EXTRACTORS:
        _EXTRACTORS[wp] = DigitsFeatureExtractor(NAME, ["features"], feature_extractor_weights_path=wp).eval()
    fe = _EXTRACTORS[wp].to("cuda" if cuda else "cpu")
    x = torch.as_tensor(images_u8)
    out = [fe(x[i : i + batch].to(fe.net.fc.weight.device))[0].cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


_KID_REFERENCE_TERMS: dict = {}


def kid_fast(features_1, features_2, kid_subsets: int = 100, kid_subset_size: int = 1000, rng_seed: int = 2020,
             **_) -> dict:
    """torch-fidelity's KID (default cubic polynomial kernel, unbiased MMD², same random subsets as
    ``metric_kid.kid_features_to_metric``) computed from the full kernel matrices once: each
    subset's kernel sums are quadratic forms of 0/1 indicator vectors. Float64; ~30x faster."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD

    x, y = (torch.as_tensor(f).cpu().double().numpy() for f in (features_1, features_2))
    (n1, d), n2, m = x.shape, len(y), int(kid_subset_size)
    if not 2 <= m <= min(n1, n2):
        raise ValueError(f"KID subset size {m} must be in [2, min({n1}, {n2})]")
    kxx, kxy = ((a @ b.T / d + 1.0) ** 3 for a, b in ((x, x), (x, y)))
    rng = np.random.RandomState(rng_seed)
    w1, w2 = np.zeros((kid_subsets, n1)), np.zeros((kid_subsets, n2))
    for i in range(kid_subsets):  # same draw order as torch-fidelity
        w1[i, rng.choice(n1, m, replace=False)] = 1.0
        w2[i, rng.choice(n2, m, replace=False)] = 1.0
    sxx = np.einsum("sn,sn->s", w1 @ kxx, w1) - w1 @ np.diag(kxx)
    # The reference's own term depends only on it and the subsets (fixed by n1, m, the count and the
    # seed): computed once per process for the reference every trial of a search compares with.
    key = (hashlib.sha1(np.ascontiguousarray(y).tobytes()).hexdigest(), n1, n2, m, kid_subsets, rng_seed)
    syy = _KID_REFERENCE_TERMS.get(key)
    if syy is None:
        kyy = (y @ y.T / d + 1.0) ** 3
        syy = np.einsum("sn,sn->s", w2 @ kyy, w2) - w2 @ np.diag(kyy)
        _KID_REFERENCE_TERMS.clear()  # one reference per process is the common case
        _KID_REFERENCE_TERMS[key] = syy
    sxy = np.einsum("sn,sn->s", w1 @ kxy, w2)
    mmd = (sxx + syy) / (m * (m - 1)) - 2.0 * sxy / (m * m)
    return {KEY_METRIC_KID_MEAN: float(mmd.mean()), KEY_METRIC_KID_STD: float(mmd.std())}


def reference_statistics(kind: str = "train", images=None, weights_path=None, cache: Path | str | None = None,
                         cuda: bool = False) -> dict:
    """FID statistics (``mu``, ``sigma``) and KID ``features`` of a reference set, cached on disk.

    ``images`` (uint8 [N, 1, 8, 8]) defaults to the digits split ``kind``; ``kind`` also names the
    cache file. The cache key is sha256(images) + sha256(extractor weights): changed data or weights
    recompute. Returns also ``key``, ``path`` and ``cached`` (whether it was read from disk).
    """
    from torch_fidelity.metric_fid import fid_features_to_statistics

    images = digits_reference(kind) if images is None else torch.as_tensor(images)
    wpath = _weights_path(weights_path)
    if not wpath.is_file():
        raise ValueError(f"{wpath}: feature extractor weights file not found")
    key = f"{images_sha256(images)[:20]}-{file_sha256(wpath)[:20]}"
    path = Path(cache or cache_dir()) / f"{kind}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {"mu": z["mu"], "sigma": z["sigma"], "features": torch.from_numpy(z["features"]),
                        "key": key, "path": path, "cached": True}
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache entry: recompute and overwrite
    feats = digits_features(images, wpath, cuda=cuda)
    stats = fid_features_to_statistics(feats)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, mu=stats["mu"], sigma=stats["sigma"], features=feats.numpy())
    os.replace(tmp, path)  # atomic: concurrent workers never read a partial file
    return {**stats, "features": feats, "key": key, "path": path, "cached": False}


def fid_kid(samples_uint8, reference_uint8=None, cuda: bool = False, feature_extractor: str = DIGITS_EXTRACTOR,
            feature_extractor_weights_path=None, kid_subsets: int = 100, kid_subset_size: int | None = None,
            seed: int = 2020, backend: str = "direct", reference_kind: str = "train") -> dict:
    """FID and KID of ``samples_uint8`` (uint8 [N, C, H, W]) against a reference set.

    ``reference_uint8`` defaults to the digits split ``reference_kind`` (cached statistics). The KID
    subset size is at most 1000 and never more than either set. Returns ``{"fid", "kid", "kid_std"}``.
    ``feature_extractor="inception-v3-compat"`` requires a local ``feature_extractor_weights_path``
    (never downloads) and always uses ``calculate_metrics``.
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD

    samples = torch.as_tensor(samples_uint8)
    if samples.dtype != torch.uint8 or samples.dim() != 4:
        raise ValueError(f"samples must be uint8 [N, C, H, W], got {samples.dtype} {tuple(samples.shape)}")
    if backend not in ("direct", "calculate_metrics"):
        raise ValueError(f"unknown backend {backend!r} (direct, calculate_metrics)")
    if feature_extractor != DIGITS_EXTRACTOR:
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {feature_extractor!r} needs feature_extractor_weights_path "
                             "(a local weights file; s3-ray never downloads weights)")
        if not Path(feature_extractor_weights_path).is_file():
            raise FileNotFoundError(f"{feature_extractor_weights_path}: feature extractor weights file not found "
                                    f"(needed by {feature_extractor!r}; s3-ray never downloads weights)")
        check_weights_file(feature_extractor_weights_path)
        backend = "calculate_metrics"
    reference = digits_reference(reference_kind) if reference_uint8 is None else torch.as_tensor(reference_uint8)
    sub = min(1000, len(samples), len(reference)) if kid_subset_size is None else int(kid_subset_size)
    kid_kw = {"kid_subsets": kid_subsets, "kid_subset_size": sub, "rng_seed": seed, "verbose": False}

    if backend == "direct":
        ref = reference_statistics(reference_kind if reference_uint8 is None else "custom", reference,
                                   feature_extractor_weights_path, cuda=cuda)
        feats = digits_features(samples, feature_extractor_weights_path, cuda=cuda)
        fid = fid_statistics_to_metric(fid_features_to_statistics(feats), ref, verbose=False)[KEY_METRIC_FID]
        kid = kid_fast(feats, ref["features"], **kid_kw)
    else:
        import torch_fidelity

        if feature_extractor == DIGITS_EXTRACTOR:
            import s3_ray.metrics.extractor  # noqa: F401  (registers s3-digits)
        channels = 3 if feature_extractor != DIGITS_EXTRACTOR else None
        m = torch_fidelity.calculate_metrics(
            input1=ImageDataset(samples, channels), input2=ImageDataset(reference, channels), cuda=cuda,
            fid=True, kid=True, feature_extractor=feature_extractor,
            feature_extractor_weights_path=None if feature_extractor_weights_path is None
            else str(feature_extractor_weights_path),
            cache=False, save_cpu_ram=True, batch_size=2048 if feature_extractor == DIGITS_EXTRACTOR else 64,
            **kid_kw)
        fid, kid = m[KEY_METRIC_FID], m
    return {"fid": float(fid), "kid": float(kid[KEY_METRIC_KID_MEAN]), "kid_std": float(kid[KEY_METRIC_KID_STD])}

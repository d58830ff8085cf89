"""FID/KID with the shipped s3-digits extractor: sanity ordering, determinism, caching, errors."""

import numpy as np
import pytest
import torch
from torch_fidelity.metric_kid import kid_features_to_metric

from s3_ray.metrics.fid import (
    ImageDataset,
    digits_reference,
    fid_kid,
    kid_fast,
    reference_statistics,
    uint8_images,
)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("S3_CACHE_DIR", str(tmp_path / "cache"))


def _noised(x_u8, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    return uint8_images(x_u8.float() / 127.5 - 1 + std * torch.randn(x_u8.shape, generator=g))


def _shuffled(x_u8, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = x_u8.flatten(1)
    idx = torch.argsort(torch.rand(flat.shape, generator=g), dim=1)  # per-image pixel shuffle
    return flat.gather(1, idx).reshape(x_u8.shape)


def test_uint8_images_and_dataset():
    u = uint8_images(torch.tensor([-1.0, 1.0, -2.0, 2.0, 0.0, -0.5]))
    assert u.dtype == torch.uint8 and u.tolist() == [0, 255, 0, 255, 128, 64]
    ds = ImageDataset(digits_reference("heldout"))
    assert len(ds) == 397 and ds[0].shape == (1, 8, 8) and ds[0].dtype == torch.uint8
    assert ImageDataset(digits_reference("heldout"), channels=3)[0].shape == (3, 8, 8)
    with pytest.raises(ValueError):
        ImageDataset(torch.zeros(2, 1, 8, 8))


def test_fid_ordering_and_determinism():
    train, held = digits_reference("train"), digits_reference("heldout")
    m_held = fid_kid(held)
    m_noise = fid_kid(_noised(train[:397], 0.3))
    m_shuf = fid_kid(_shuffled(train[:397]))
    assert m_held["fid"] < m_noise["fid"] < m_shuf["fid"]
    assert m_held["kid"] < m_noise["kid"] < m_shuf["kid"]
    assert fid_kid(held) == m_held


def test_direct_matches_calculate_metrics():
    samples, ref = _noised(digits_reference("heldout")[:200], 0.2), digits_reference("train")[:300]
    a = fid_kid(samples, ref, kid_subsets=10)
    b = fid_kid(samples, ref, kid_subsets=10, backend="calculate_metrics")
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-9)
    assert a["kid"] == pytest.approx(b["kid"], abs=1e-5) and a["kid_std"] == pytest.approx(b["kid_std"], abs=1e-5)


def test_kid_fast_matches_torch_fidelity():
    g = torch.Generator().manual_seed(1)
    f1, f2 = torch.rand(120, 16, generator=g), torch.rand(150, 16, generator=g) + 0.1
    ref = kid_features_to_metric(f1, f2, kid_subsets=7, kid_subset_size=100, rng_seed=3, verbose=False)
    got = kid_fast(f1, f2, kid_subsets=7, kid_subset_size=100, rng_seed=3)
    assert got == pytest.approx(ref, rel=1e-4)
    # the reference's own kernel term is kept between calls: other samples, the same reference, and
    # another subset size or reference, each against torch-fidelity
    f3 = torch.rand(130, 16, generator=g) * 1.2
    for a, b, m in ((f3, f2, 100), (f1, f2, 90), (f3, f1, 100), (f1, f2, 100)):
        ref = kid_features_to_metric(a, b, kid_subsets=7, kid_subset_size=m, rng_seed=3, verbose=False)
        assert kid_fast(a, b, kid_subsets=7, kid_subset_size=m, rng_seed=3) == pytest.approx(ref, rel=1e-4)


def test_kid_subset_size_follows_sample_count():
    m = fid_kid(digits_reference("heldout")[:20])
    assert np.isfinite(m["fid"]) and np.isfinite(m["kid"])


def test_reference_cache_keyed_by_data_and_weights(tmp_path):
    from s3_ray.models.digits import load_digits_classifier, save_weights

    imgs = digits_reference("heldout")
    a = reference_statistics("custom", imgs)
    b = reference_statistics("custom", imgs)
    assert not a["cached"] and b["cached"] and a["key"] == b["key"] and a["path"].is_file()
    np.testing.assert_array_equal(a["sigma"], b["sigma"])
    changed = imgs.clone()
    changed[0, 0, 0, 0] ^= 1
    c = reference_statistics("custom", changed)
    assert not c["cached"] and c["key"] != a["key"]
    net = load_digits_classifier()
    with torch.no_grad():
        net.fc.bias.add_(0.01)
    save_weights(net, tmp_path / "clf.safetensors", net.meta)
    d = reference_statistics("custom", imgs, weights_path=tmp_path / "clf.safetensors")
    assert not d["cached"] and d["key"] != a["key"]


def test_inception_requires_local_weights(tmp_path):
    x = digits_reference("heldout")[:10]
    with pytest.raises(ValueError, match="feature_extractor_weights_path"):
        fid_kid(x, x, feature_extractor="inception-v3-compat")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        fid_kid(x, x, feature_extractor="inception-v3-compat", feature_extractor_weights_path=tmp_path / "missing.pth")


def test_extractor_registered_and_isc():
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    import s3_ray.metrics.extractor  # noqa: F401

    assert "s3-digits" in FEATURE_EXTRACTORS_REGISTRY
    m = torch_fidelity.calculate_metrics(input1=ImageDataset(digits_reference("heldout")), isc=True, cuda=False,
                                         feature_extractor="s3-digits", cache=False, save_cpu_ram=True,
                                         verbose=False, isc_splits=2)
    assert m["inception_score_mean"] > 5.0  # confident, class-balanced predictions on real digits

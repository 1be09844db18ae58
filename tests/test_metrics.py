"""Metrics: Fréchet math, streaming statistics, PR/IS/KID, reference files, torch-fidelity Inception path."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tfi
from PIL import Image
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.metric_prc import calculate_precision_recall_full

from sit_atconv.errors import MetricInputError, UnsafeCheckpointError
from sit_atconv.metrics import (
    INCEPTION_FILENAME,
    INCEPTION_NAME,
    FeatureStats,
    Images,
    InceptionV3Features,
    InceptionWeightsError,
    compute_metrics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_reference,
    precision_recall,
    save_reference,
)
from sit_atconv.metrics import inception as inception_module


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    """The classic TTUR/ADM formula with scipy's sqrtm, real part taken."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_matches_scipy_on_well_conditioned_statistics():
    rng = np.random.default_rng(0)
    d = 32
    a, b = rng.standard_normal((d, 3 * d)), rng.standard_normal((d, 3 * d))
    s1, s2 = a @ a.T / (3 * d) + 0.1 * np.eye(d), b @ b.T / (3 * d) + 0.05 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(ours, float)
    assert ours == pytest.approx(_scipy_fid(mu1, s1, mu2, s2), rel=1e-9)


def test_frechet_rank_deficient_is_real_and_exact():
    """S1 = A A^T, S2 = B B^T of ranks 4 and 6 in 64 dims: tr (S1 S2)^1/2 = nuclear norm of A^T B exactly."""
    rng = np.random.default_rng(1)
    d = 64
    a, b = rng.standard_normal((d, 4)), rng.standard_normal((d, 6))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2)
    exact -= 2 * np.linalg.svd(a.T @ b, compute_uv=False).sum()
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(ours) and ours >= 0
    assert ours == pytest.approx(exact, rel=1e-8)
    # scipy's sqrtm goes through a complex Schur form here; where it is finite, ours agrees with its real part
    theirs = _scipy_fid(mu1, s1, mu2, s2)
    if np.isfinite(theirs):
        assert ours == pytest.approx(theirs, rel=1e-5)


def test_frechet_identical_rank_deficient_sets_give_zero():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 256)) * rng.uniform(0.1, 3.0, 256)  # 20 samples in 256 dims: rank 19
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert _scipy_fid(mu, sigma, mu, sigma) != 0.0  # scipy's rounding noise (can be negative)
    ours = frechet_distance(mu, sigma, mu, sigma)
    assert 0.0 <= ours < 1e-9 * np.trace(sigma)


def test_frechet_diagonal_closed_form_with_zero_variances():
    rng = np.random.default_rng(3)
    d = 50
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    std1, std2 = rng.uniform(0.0, 2.0, d), rng.uniform(0.0, 2.0, d)
    std1[:10], std2[5:15] = 0.0, 0.0  # singular, with overlapping and disjoint null directions
    expected = np.sum((m1 - m2) ** 2) + np.sum((std1 - std2) ** 2)
    assert frechet_distance(m1, np.diag(std1**2), m2, np.diag(std2**2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="expected mu"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


# -------------------------------------------------------------------------------- streaming statistics


def test_feature_stats_match_numpy_and_merge():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((103, 7)) * 3 + 5
    whole, first, second = FeatureStats(), FeatureStats(), FeatureStats()
    for start, size in ((0, 1), (1, 40), (41, 62)):
        whole.update(torch.from_numpy(x[start : start + size]))
    first.update(x[:50])
    second.update(x[50:])
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)
    for merged in (
        FeatureStats().merge(first).merge(second),
        FeatureStats.from_tensor(first.to_tensor() + second.to_tensor()),  # what an all-reduce(SUM) gives
    ):
        assert merged.count == 103
        for got, want in zip(merged.mean_cov(), (mu, sigma)):
            np.testing.assert_allclose(got, want, rtol=1e-10)
    one = FeatureStats()
    one.update(x[:1])
    with pytest.raises(ValueError, match="at least 2"):
        one.mean_cov()


# -------------------------------------------------------------------------------------- PR, IS and KID


def test_precision_recall_sanity_and_agreement_with_torch_fidelity():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((60, 8))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    two_modes = np.concatenate([real[:30], real[30:] + 50.0])
    precision, recall = precision_recall(two_modes, two_modes[:30])  # a model that drops one mode
    assert (precision, recall) == (1.0, 0.5)
    fake = rng.standard_normal((50, 8)) * 0.8 + 0.6
    precision, recall = precision_recall(real, fake)
    theirs = calculate_precision_recall_full(
        torch.from_numpy(fake).float(), torch.from_numpy(real).float(), 3
    )
    assert 0 < precision < 1 and 0 < recall < 1
    assert (precision, recall) == pytest.approx(theirs, abs=1e-6)


def test_inception_score_known_values():
    assert inception_score(torch.zeros(30, 1008)) == pytest.approx((1.0, 0.0))
    confident = torch.full((40, 20), -1e4)
    confident[torch.arange(20), torch.arange(20) % 2] = 0  # first split: 2 classes equally often
    confident[torch.arange(20, 40), torch.arange(20) % 5] = 0  # second split: 5 classes
    mean, std = inception_score(confident, split_size=20)
    assert mean == pytest.approx(3.5) and std == pytest.approx(1.5)


def test_kid_equals_unbiased_polynomial_mmd():
    rng = np.random.default_rng(6)
    x, y = (
        rng.standard_normal((12, 5)).astype(np.float32),
        (rng.standard_normal((12, 5)) + 0.7).astype(np.float32),
    )

    def k(a, b):
        return (a.astype(np.float64) @ b.T.astype(np.float64) / a.shape[1] + 1.0) ** 3

    n = len(x)
    off = ~np.eye(n, dtype=bool)
    expected = k(x, x)[off].mean() + k(y, y)[off].mean() - 2 * k(x, y).mean()
    mean, std = kernel_inception_distance(x, y, subsets=5, subset_size=1000)  # subset = whole set (permuted)
    assert mean == pytest.approx(expected, rel=1e-4) and std == pytest.approx(0.0, abs=1e-5)
    a, b = rng.standard_normal((2, 300, 5)).astype(np.float32)
    same, _ = kernel_inception_distance(a, b, subsets=10, subset_size=100)
    shifted, _ = kernel_inception_distance(a, b + 0.7, subsets=10, subset_size=100)
    assert abs(same) < 0.05 * shifted


# ------------------------------------------------------------------------------- images and references


def _images(n: int, seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _mean_color(images: torch.Tensor) -> torch.Tensor:
    """A tiny custom extractor: per-image mean colour and 2x2 block means (15 dims)."""
    x = images.double().permute(0, 3, 1, 2)
    return torch.cat([x.mean((2, 3)), torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)], 1)


@pytest.mark.parametrize("savez", [np.savez, np.savez_compressed])
def test_npz_images_are_streamed_in_batches(tmp_path, savez):
    x = _images(10, 0)
    savez(tmp_path / "s.npz", arr_0=x)
    images = Images(tmp_path / "s.npz")
    batches = list(images.batches(3))
    assert len(images) == 10 and [len(b) for b in batches] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), x)


def test_image_folder_is_read(tmp_path):
    x = _images(3, 1)
    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    np.testing.assert_array_equal(np.concatenate(list(Images(tmp_path).batches(2))), x)


def test_bad_inputs_fail_with_one_clear_line(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=_images(2, 0).astype(np.float32))
    np.savez(tmp_path / "gray.npz", arr_0=_images(2, 0)[..., 0])
    np.savez(tmp_path / "badstats.npz", mu=np.zeros(4), sigma=np.zeros((3, 3)))
    cases = [
        (tmp_path / "missing.npz", MetricInputError, "no such"),
        (tmp_path / "float.npz", ValueError, r"uint8 images \(N, H, W, 3\); got float32"),
        (tmp_path / "gray.npz", ValueError, r"uint8 images \(N, H, W, 3\); got uint8 \(2, 8, 8\)"),
    ]
    for path, error, message in cases:
        with pytest.raises(error, match=message) as info:
            Images(path)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="expected mu") as info:
        load_reference(tmp_path / "badstats.npz", _named(INCEPTION_NAME))
    assert "\n" not in str(info.value)
    with pytest.raises(MetricInputError, match="no such reference"):
        compute_metrics(_images(4, 0), tmp_path / "missing.npz", extractor=_mean_color)


class _named:
    """An extractor stub with a given name that counts calls (and can refuse to be called)."""

    def __init__(self, name: str, allow: bool = True):
        self.name, self.allow, self.calls = name, allow, 0

    def __call__(self, images):
        assert self.allow, "extractor should not have been called"
        self.calls += 1
        return {"pool": _mean_color(images), "spatial": _mean_color(images)[:, :3]}


def test_adm_reference_batch_with_stored_statistics(tmp_path):
    rng = np.random.default_rng(7)
    stored = {
        "mu": rng.standard_normal(15),
        "sigma": np.eye(15) * 2,
        "mu_s": rng.standard_normal(3),
        "sigma_s": np.eye(3),
    }
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, arr_0=_images(6, 2), **stored)

    ref = load_reference(path, _named(INCEPTION_NAME, allow=False))  # stored stats only: no extraction
    assert ref.count == 6 and ref.extractor == INCEPTION_NAME
    for key, value in stored.items():
        np.testing.assert_array_equal(getattr(ref, key), value)

    extractor = _named(INCEPTION_NAME)
    ref = load_reference(path, extractor, need_pool=True, batch_size=4)  # per-image features for PR/KID
    assert extractor.calls == 2 and ref.pool.shape == (6, 15)
    np.testing.assert_array_equal(ref.sigma, stored["sigma"])

    other = load_reference(path, _named("digits-attnet"))  # other extractors cannot use TF-Inception stats
    expected = _mean_color(torch.from_numpy(_images(6, 2))).numpy()
    np.testing.assert_allclose(other.mu, expected.mean(0))
    np.testing.assert_allclose(other.sigma, np.cov(expected, rowvar=False), atol=1e-10)


def test_reference_cache_round_trip_and_reuse(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    for i, image in enumerate(_images(6, 3)):
        Image.fromarray(image).save(folder / f"{i}.png")
    cache = tmp_path / "cache" / "ref_stats.npz"
    extractor = _named("mean-color")
    first = load_reference(folder, extractor, need_pool=True, cache=cache)
    assert cache.is_file() and extractor.calls == 1
    again = load_reference(folder, extractor, need_pool=True, cache=cache)
    direct = load_reference(cache, extractor, need_pool=True)  # the cache file is itself a reference
    assert extractor.calls == 1
    for ref in (again, direct):
        assert ref.count == 6
        for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
            np.testing.assert_array_equal(getattr(ref, key), getattr(first, key))
    with pytest.raises(ValueError, match="from extractor 'mean-color'"):
        load_reference(cache, _named("another"))
    Image.fromarray(_images(1, 9)[0]).save(folder / "new.png")  # the folder changed: the cache is stale
    assert load_reference(folder, extractor, need_pool=True, cache=cache).count == 7 and extractor.calls == 2
    stats_only = tmp_path / "stats_only.npz"
    save_reference(stats_only, replace(first, pool=None))
    out = compute_metrics(_images(5, 4), stats_only, extractor=_named("mean-color"))  # default metrics
    assert set(out) == {"fid", "sfid", "extractor", "num_samples", "num_reference"}
    with pytest.raises(ValueError, match="no per-image features"):
        compute_metrics(_images(5, 4), stats_only, ["precision"], extractor=_named("mean-color"))
    adm_batch = tmp_path / "adm.npz"
    np.savez(adm_batch, arr_0=_images(2, 0))
    with pytest.raises(ValueError, match="not a statistics file"):  # never overwrite someone's data
        load_reference(folder, extractor, cache=adm_batch)
    save_reference(cache, first)  # rewriting in place stays atomic (no temp files left behind)
    assert sorted(p.name for p in cache.parent.iterdir()) == ["ref_stats.npz"]


def test_custom_extractor_pipeline_matches_direct_statistics():
    x, y = _images(30, 4), _images(25, 5)
    fx, fy = _mean_color(torch.from_numpy(x)).numpy(), _mean_color(torch.from_numpy(y)).numpy()
    out = compute_metrics(x, y, extractor=_mean_color, batch_size=7, device="cpu", kid_subset_size=20)
    assert set(out) == {
        "fid",
        "kid",
        "kid_std",
        "precision",
        "recall",
        "extractor",
        "num_samples",
        "num_reference",
    }
    assert out["extractor"] == "_mean_color" and (out["num_samples"], out["num_reference"]) == (30, 25)
    expected = frechet_distance(fx.mean(0), np.cov(fx, rowvar=False), fy.mean(0), np.cov(fy, rowvar=False))
    assert out["fid"] == pytest.approx(expected, rel=1e-7) and out["fid"] > 0  # streamed vs np.cov sums
    assert (out["precision"], out["recall"]) == precision_recall(fy, fx)
    assert set(compute_metrics(x, y, ["FID"], extractor=_mean_color)) == {
        "fid",
        "extractor",
        "num_samples",
        "num_reference",
    }
    with pytest.raises(ValueError, match=r"cannot compute \['is'\]"):
        compute_metrics(x, y, ["is"], extractor=_mean_color)


# ------------------------------------------------------------------- the torch-fidelity Inception path


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """torch-fidelity's InceptionV3 with He-initialised random weights, saved as a local weights file."""
    real_load = tfi.FeatureExtractorInceptionV3.load_state_dict
    real_url = tfi.load_state_dict_from_url
    try:
        tfi.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
        tfi.load_state_dict_from_url = lambda *args, **kwargs: {}
        model = tfi.FeatureExtractorInceptionV3("random", ["2048"])
    finally:
        tfi.FeatureExtractorInceptionV3.load_state_dict = real_load
        tfi.load_state_dict_from_url = real_url
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME
    torch.save(model.state_dict(), path)
    return path


def test_inception_features_are_torch_fidelity_pool_logits_and_mixed_6d_spatial(inception_file):
    images = torch.from_numpy(_images(2, 8, size=32))
    ours = InceptionV3Features(inception_file)(images)
    theirs = tfi.FeatureExtractorInceptionV3(
        INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=str(inception_file)
    )
    pool, logits = theirs(images.permute(0, 3, 1, 2).contiguous())
    torch.testing.assert_close(ours["pool"], pool)
    torch.testing.assert_close(ours["logits"], logits)
    # ADM's mixed_6/conv:0 = ReLU(BN(conv)) of Mixed_6d's 1x1 branch; 7 channels, flattened as (H, W, C).
    x = interpolate_bilinear_2d_like_tensorflow1x(
        images.permute(0, 3, 1, 2).float(), size=(299, 299), align_corners=False
    )
    x = (x - 128) / 128
    with torch.no_grad():
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                     "Mixed_6b", "Mixed_6c"):  # fmt: skip
            x = getattr(theirs, name)(x)
        spatial = theirs.Mixed_6d.branch1x1(x)
    assert spatial.shape == (2, 192, 17, 17) and ours["spatial"].shape == (2, 2023)
    torch.testing.assert_close(ours["spatial"], spatial[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert ours["spatial"].std() > 0


def test_compute_metrics_end_to_end_with_local_inception_weights(inception_file, tmp_path):
    x = _images(8, 9, size=32)
    np.savez(tmp_path / "samples.npz", arr_0=x)
    np.savez(tmp_path / "ref.npz", arr_0=x)  # an ADM-style batch without stored statistics
    out = compute_metrics(
        tmp_path / "samples.npz",
        tmp_path / "ref.npz",
        inception_weights=inception_file,
        device="cpu",
        batch_size=5,
        reference_cache=tmp_path / "ref_stats.npz",
    )
    assert out["extractor"] == INCEPTION_NAME and (out["num_samples"], out["num_reference"]) == (8, 8)
    assert set(out) >= {"fid", "sfid", "is", "is_std", "kid", "kid_std", "precision", "recall"}
    assert all(np.isfinite(v) for k, v in out.items() if k != "extractor")
    assert out["fid"] == pytest.approx(0.0, abs=1e-6) and out["sfid"] == pytest.approx(0.0, abs=1e-6)
    assert out["precision"] == 1.0 and out["recall"] == 1.0
    assert 1.0 <= out["is"] <= 1008 and abs(out["kid"]) < 1e-3
    with np.load(tmp_path / "ref_stats.npz") as cache:
        assert str(cache["extractor"]) == INCEPTION_NAME and cache["mu_s"].shape == (2023,)
        assert cache["pool"].shape == (8, 2048)


def test_malicious_inception_weights_are_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError, match="refused to load"):
        compute_metrics(_images(4, 0), _images(4, 1), inception_weights=path, device="cpu")
    assert not marker.exists()


def test_missing_inception_weights_offline_fail_fast_with_one_line(tmp_path, monkeypatch, inception_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # An address that refuses at once, so the test never downloads even on a machine with network.
    monkeypatch.setattr(inception_module, "INCEPTION_URL", f"http://127.0.0.1:9/{INCEPTION_FILENAME}")
    start = time.perf_counter()
    with pytest.raises(InceptionWeightsError) as info:
        InceptionV3Features()
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message and "--inception-weights PATH" in message
    assert f"$TORCH_HOME/hub/checkpoints/{INCEPTION_FILENAME}" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILENAME) in message
    with pytest.raises(InceptionWeightsError, match="no such file"):
        InceptionV3Features(tmp_path / "nowhere.pth")
    # A copy in the hub cache makes the default path work offline.
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(inception_file.read_bytes())
    assert InceptionV3Features().name == INCEPTION_NAME

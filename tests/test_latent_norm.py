"""Latent normalisation: exact per-channel store statistics, the channel-normalising autoencoder (an exact
inverse on decode), the config checks, and a channel-normalised run that samples without its store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import fake_state, reset_accelerate, tiny_config, write_image_folder

from sit_atconv.build import build_autoencoder, build_dataset, load_run, resolve_data
from sit_atconv.config_io import load_config
from sit_atconv.data import ChannelNorm, IdentityAutoencoder, LatentDataset, VAEAutoencoder, latent_statistics
from sit_atconv.data.extract_latents import extract_latents, shard_sums
from sit_atconv.data.latents import read_manifest, shard_path
from sit_atconv.errors import ConfigError, DataError

STORE_OVERRIDES = ("data.source=latents", "data.autoencoder=none", "model.input_size=4", "model.in_channels=4",
                   "model.num_classes=2")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes, 5 random RGB images (colour-biased so the latent channels have distinct statistics)."""
    return write_image_folder(tmp_path_factory.mktemp("images"), {"a": 3, "b": 2}, 32, scale=(1.0, 0.5, 0.2),
                              offset=(0, 100, 200))


@pytest.fixture(scope="module")
def store(image_folder, tiny_vae_dir, tmp_path_factory):
    """A float16 store of the 5 images at 32 px (latents 4x4x4), shards of 2, with statistics."""
    out = tmp_path_factory.mktemp("store") / "store"
    extract_latents(image_folder, out, VAEAutoencoder(tiny_vae_dir), image_size=32, batch_size=2, shard_size=2,
                    num_workers=0, state=fake_state())
    return out


def stored_latents(store) -> np.ndarray:
    """Every stored latent (n, 2 flips, C, h, w) as float64."""
    return np.concatenate([np.load(shard_path(store, s)) for s in range(3)]).astype(np.float64)


# ------------------------------------------------------------------------------------------ statistics

def test_manifest_statistics_are_exact_over_both_flips(store):
    manifest = read_manifest(store)
    latents = stored_latents(store)
    assert latents.shape == (5, 2, 4, 4, 4) and np.load(shard_path(store, 0)).dtype == np.float16
    mean, std = latent_statistics(manifest)
    assert np.allclose(mean, latents.mean(axis=(0, 1, 3, 4)), rtol=1e-12, atol=1e-14)
    assert np.allclose(std, latents.std(axis=(0, 1, 3, 4)), rtol=1e-12, atol=1e-14)   # population std
    assert manifest["latent_stats_count"] == 5 * 2 * 4 * 4
    assert not np.allclose(mean, latents[:, 0].mean(axis=(0, 2, 3)), rtol=1e-6)  # both flips count
    assert np.ptp(std) > 0.01 * np.max(std)  # distinct channels: a per-channel bug would show


def test_streamed_sums_match_numpy_in_any_chunking():
    rng = np.random.default_rng(1)
    latents = (rng.normal(size=(7, 2, 3, 2, 2)) * [[[[1.0]], [[5.0]], [[0.1]]]] + 3).astype(np.float16)
    x = latents.astype(np.float64).swapaxes(0, 2).reshape(3, -1)
    for rows in (1, 3, 256):
        count, total, squares = shard_sums(latents, rows=rows)
        assert np.all(count == x.shape[1])
        assert np.allclose(total, x.sum(1), rtol=1e-13) and np.allclose(squares, (x * x).sum(1), rtol=1e-13)


def test_statistics_wait_for_every_rank_and_are_added_to_old_stores(image_folder, store, tmp_path):
    ae = IdentityAutoencoder(3)
    calls, encode = [], ae.encode
    ae.encode = lambda x, **kw: (calls.append(len(x)), encode(x, **kw))[1]
    out, kwargs = tmp_path / "pixels", dict(image_size=8, batch_size=2, shard_size=2, num_workers=0, dtype="float32")
    extract_latents(image_folder, out, ae, state=fake_state(0, 2), **kwargs)  # rank 0 alone: shards 0 and 2
    assert latent_statistics(read_manifest(out)) is None  # a partial count is never written
    extract_latents(image_folder, out, ae, state=fake_state(1, 2), **kwargs)  # rank 1: not the main process
    assert latent_statistics(read_manifest(out)) is None
    calls.clear()
    extract_latents(image_folder, out, ae, state=fake_state(), **kwargs)    # rerun: nothing to encode, statistics
    assert calls == []
    pixels = np.concatenate([np.load(shard_path(out, s)) for s in range(3)]).astype(np.float64)
    mean, std = latent_statistics(read_manifest(out))
    assert np.allclose(mean, pixels.mean(axis=(0, 1, 3, 4)), rtol=1e-12)
    assert np.allclose(std, pixels.std(axis=(0, 1, 3, 4)), rtol=1e-12)
    # a store made before statistics existed gets them from a rerun of the same command
    manifest = read_manifest(out)
    for key in ("latent_mean", "latent_std", "latent_stats_count"):
        del manifest[key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    extract_latents(image_folder, out, ae, state=fake_state(), **kwargs)
    assert calls == [] and latent_statistics(read_manifest(out)) == (mean, std)


# ---------------------------------------------------------------------------------------- autoencoder

def test_channel_normalisation_inverts_exactly_on_decode(tiny_vae_dir, store):
    torch.manual_seed(0)
    mean, std = latent_statistics(read_manifest(store))
    norm = ChannelNorm(mean, std)
    plain, normed = VAEAutoencoder(tiny_vae_dir), VAEAutoencoder(tiny_vae_dir, norm=norm)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = plain.encode(x)
    m, s = torch.tensor(mean).view(4, 1, 1), torch.tensor(std).view(4, 1, 1)
    inputs = normed.encode(x)
    assert torch.allclose(inputs, ((z - m) / s).float(), atol=1e-6)  # encode -> normalise
    assert torch.allclose(norm.denormalize(norm.normalize(z)), z, atol=1e-6)
    assert torch.allclose(normed.decode(inputs), plain.decode(z), atol=1e-5)  # ... -> denormalise -> decode
    assert not torch.allclose(plain.decode(inputs), plain.decode(z), atol=1e-2)  # the inverse matters
    assert torch.allclose(norm.normalize(z[0]), inputs[0], atol=1e-6)  # one latent (C, h, w) as well
    with pytest.raises(ConfigError, match="3 channels but autoencoder"):
        VAEAutoencoder(tiny_vae_dir, norm=ChannelNorm(mean[:3], std[:3]))
    with pytest.raises(ConfigError, match="stds finite and > 0"):
        ChannelNorm(mean, [1.0, 0.0, 1.0, 1.0])


def test_config_checks_and_refusals(store, image_folder, tmp_path):
    with pytest.raises(ConfigError, match="pixel space"):
        resolve_data(load_config("digits", ["data.latent_norm=channel"]))
    latents = [*STORE_OVERRIDES, f"data.data_path={store}"]
    with pytest.raises(ConfigError, match="statistics for latent_norm channel"):
        resolve_data(load_config("digits", [*latents, "data.latent_mean=0,0,0,0", "data.latent_std=1,1,1,1"]))
    with pytest.raises(ConfigError, match="give both"):
        resolve_data(load_config("digits", [*latents, "data.latent_norm=channel", "data.latent_mean=0,0,0,0"]))
    with pytest.raises(ConfigError, match="stds finite and > 0"):
        resolve_data(load_config("digits", [*latents, "data.latent_norm=channel", "data.latent_mean=0,0,0,0",
                                            "data.latent_std=1,1,0,1"]))
    with pytest.raises(ConfigError, match="pass --data.latent_mean"):
        resolve_data(load_config("digits", ["data.source=images", f"data.data_path={image_folder}",
                                            "data.autoencoder=none", "data.latent_norm=channel"]))
    old = tmp_path / "old_store"
    shutil.copytree(store, old)
    manifest = read_manifest(old)
    del manifest["latent_mean"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="re-run extract_latents with the same arguments"):
        resolve_data(load_config("digits", [*STORE_OVERRIDES, f"data.data_path={old}", "data.latent_norm=channel"]))
    cfg = load_config("digits", [*STORE_OVERRIDES, f"data.data_path={store}", "data.latent_norm=channel",
                                 "data.latent_mean=0,0,0,0", "data.latent_std=1,1,1,1"])
    with pytest.raises(DataError, match="differ from the store's statistics"):
        build_dataset(cfg)
    scale = resolve_data(load_config("digits", [*STORE_OVERRIDES, f"data.data_path={store}"])).data
    assert (scale.latent_norm, scale.latent_mean, scale.latent_std) == ("scale", None, None)  # default untouched
    assert build_autoencoder(load_config("digits", [*STORE_OVERRIDES, f"data.data_path={store}"])).norm is None


# ------------------------------------------------------------------------------------------ a real run

def test_channel_run_trains_and_samples_without_its_store(store, tiny_vae_dir, tmp_path):
    from sit_atconv.sampling import SamplingOptions
    from sit_atconv.train import train

    moved = tmp_path / "store"
    shutil.copytree(store, moved)
    mean, std = latent_statistics(read_manifest(moved))
    cfg = tiny_config(tmp_path, "channel", *STORE_OVERRIDES, f"data.data_path={moved}", "data.latent_norm=channel",
                      "data.random_flip=true", "train.global_batch_size=4", "train.max_steps=2", "log.ckpt_every=2")
    data = build_dataset(cfg)
    raw = LatentDataset(moved)
    m, s = torch.tensor(mean).view(4, 1, 1), torch.tensor(std).view(4, 1, 1)
    for i in (0, 7):  # 7: the mirror of image 2
        assert torch.allclose(data[i][0], ((raw.load(i % 5, i >= 5)[0] - m) / s).float(), atol=1e-6)
    run = train(cfg)
    reset_accelerate()
    shutil.rmtree(moved)  # sampling reads the statistics saved with the run
    loaded = load_run(run)
    assert loaded.cfg.data.latent_norm == "channel"
    assert (loaded.cfg.data.latent_mean, loaded.cfg.data.latent_std) == (mean, std)
    assert loaded.autoencoder.norm == ChannelNorm(mean, std)
    x = torch.randn(2, 4, 4, 4)
    expected = VAEAutoencoder(tiny_vae_dir).decode(x * s.float() + m.float())
    assert torch.allclose(loaded.autoencoder.decode(x), expected, atol=1e-5)
    opts = SamplingOptions(num_steps=2, cfg_scale=1.0).resolved(loaded.cfg.transport)
    images = loaded.sampler().images(opts, torch.tensor([0, 1]), [0, 1], seed=0, show_progress=False)
    assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8


def _two_rank_statistics(data_path, out):
    from accelerate import PartialState

    PartialState._reset_state()  # a forked child must not inherit the parent's single-process state
    state = PartialState(cpu=True)
    assert state.num_processes == 2
    extract_latents(data_path, out, IdentityAutoencoder(3), image_size=8, batch_size=2, shard_size=1,
                    num_workers=0, dtype="float32")


def test_two_real_ranks_merge_their_statistics(image_folder, tmp_path):
    from accelerate import debug_launcher

    out = tmp_path / "dist"
    debug_launcher(_two_rank_statistics, args=(image_folder, out), num_processes=2)
    pixels = np.concatenate([np.load(shard_path(out, s)) for s in range(5)]).astype(np.float64)
    mean, std = latent_statistics(read_manifest(out))  # rank 0 saw shards 0, 2, 4 only: merged with rank 1's
    assert np.allclose(mean, pixels.mean(axis=(0, 1, 3, 4)), rtol=1e-12)
    assert np.allclose(std, pixels.std(axis=(0, 1, 3, 4)), rtol=1e-12)


def test_resume_refuses_other_model_inputs(tmp_path):
    from sit_atconv.errors import RunError
    from sit_atconv.train import train

    train(tiny_config(tmp_path, "inputs", "train.max_steps=2", "log.ckpt_every=2"))
    reset_accelerate()
    with pytest.raises(RunError, match="other model inputs \\(data.latent_scale"):
        train(tiny_config(tmp_path, "inputs", "train.max_steps=4", "data.latent_scale=0.5"))

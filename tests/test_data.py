"""Data: digits, image folders (ADM crop, flips, errors), autoencoders, latent extraction and stores."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from conftest import exit_code, fake_state
from PIL import Image

from sit_atconv.build import build_autoencoder, build_dataset, resolve_data
from sit_atconv.config import DataConfig, ModelConfig, RunConfig
from sit_atconv.config_io import load_config
from sit_atconv.data import (
    AutoencoderError,
    DigitsDataset,
    IdentityAutoencoder,
    ImageFolderDataset,
    LatentDataset,
    MirroredByIndex,
    VAEAutoencoder,
    digits_split,
    load_digits_tensors,
)
from sit_atconv.data.extract_latents import extract_latents
from sit_atconv.data.extract_latents import main as extract_main
from sit_atconv.data.images import load_image
from sit_atconv.data.latents import shard_path
from sit_atconv.errors import DataError


def run_config(model: dict | None = None, **data) -> RunConfig:
    """A RunConfig with these model and data fields (other sections at their defaults)."""
    return RunConfig(model=ModelConfig(**(model or {})), data=DataConfig(**data))


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes (named so that sorting matters), 5 random RGB images of mixed sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for cls, n in (("zebra", 2), ("apple", 3)):
        for i in range(n):
            save_png(root / cls / f"{i}.png", rng.integers(0, 256, (20 + 4 * i, 24, 3)))
    return root


# ------------------------------------------------------------------------------------------- digits

def test_digits_tensors_shape_range_labels():
    from sklearn.datasets import load_digits

    images, labels = load_digits_tensors(16)
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() == -1.0 and 0.9 < images.max() <= 1.0
    assert labels.dtype == torch.int64 and sorted(labels.unique().tolist()) == list(range(10))
    raw = load_digits()
    small, _ = load_digits_tensors(8)
    assert torch.allclose(small[:, 0], torch.from_numpy(raw.images).float() / 8 - 1)  # 0..16 -> [-1, 1]
    assert torch.equal(labels, torch.from_numpy(raw.target))
    # upsampling keeps each picture in place: 2x2 block means are far closer to the same digit
    # than to another digit or to the mirrored digit
    pooled = torch.nn.functional.avg_pool2d(images, 2)
    assert (pooled - small).abs().mean() < 0.2
    assert (pooled - small.roll(1, 0)).abs().mean() > 0.4 and (pooled - small.flip(-1)).abs().mean() > 0.4


def test_digits_split_deterministic_disjoint_stratified():
    train, held = digits_split(0)
    train2, held2 = digits_split(0)
    assert np.array_equal(train, train2) and np.array_equal(held, held2)
    assert not np.array_equal(held, digits_split(1)[1])
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 1797
    assert 0.15 < len(held) / 1797 < 0.25
    _, labels = load_digits_tensors(8)
    assert np.bincount(labels[held].numpy(), minlength=10).min() >= 30  # every class held out
    ds = DigitsDataset("held_out", image_size=16)
    assert len(ds) == len(held) and ds[0][0].shape == (1, 16, 16) and ds[0][1] == int(labels[held[0]])
    assert len(DigitsDataset("train")) == len(train) and len(DigitsDataset("all")) == 1797


def test_build_dataset_digits_matches_default_config():
    cfg = load_config("digits")
    ds = build_dataset(cfg)
    x, y = ds[3]
    assert x.shape == (1, 16, 16) and 0 <= y < 10 and len(ds) == len(digits_split()[0])
    with pytest.raises(DataError, match="model expects 1x8x8"):
        build_dataset(load_config("digits", ["model.input_size=8"]))
    flipped = build_dataset(load_config("digits", ["data.random_flip=true"]))
    assert isinstance(flipped, MirroredByIndex) and len(flipped) == 2 * len(ds)


# ------------------------------------------------------------------------------------- image folders

def test_image_folder_labels_sorted_and_crop(image_folder):
    ds = ImageFolderDataset(image_folder, image_size=16)
    assert ds.classes == ["apple", "zebra"] and ds.num_classes == 2 and len(ds) == 5
    assert ds.labels == [0, 0, 0, 1, 1]
    assert [p.parent.name for p in ds.files] == ["apple"] * 3 + ["zebra"] * 2
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1


def test_class_labels_follow_sorted_names_not_disk_order(tmp_path):
    names = ["n07", "n03", "n11", "n01", "n09", "n05", "n02", "n10", "n04", "n08", "n06", "n00"]
    for name in names:  # created in a scrambled order
        save_png(tmp_path / name / "x.png", np.zeros((4, 4, 3)))
    ds = ImageFolderDataset(tmp_path, 4)
    assert ds.classes == sorted(names)
    assert [ds.files[i].parent.name for i in range(len(ds))] == sorted(names) and ds.labels == list(range(12))


def test_adm_center_crop_keeps_the_centre(tmp_path):
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :16] = img[:, 48:] = (0, 255, 0)   # green borders
    img[:, 16:48] = (255, 0, 0)               # red centre: exactly what the ADM crop keeps at 16 px
    save_png(tmp_path / "c" / "wide.png", img)
    x = load_image(tmp_path / "c" / "wide.png", 16)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))


def test_image_folder_flip(tmp_path):
    img = np.zeros((16, 16, 3), np.uint8)
    img[:, :4] = 255
    save_png(tmp_path / "a" / "x.png", img)
    ds = ImageFolderDataset(tmp_path, 16)
    plain = ds[0][0]
    assert plain[:, :, :4].min() == 1 and all(torch.equal(ds[0][0], plain) for _ in range(3))  # never random
    assert torch.equal(ds.load(0, True)[0], plain.flip(-1))
    both = MirroredByIndex(ds)  # the one flip mechanism: the index chooses the orientation
    assert torch.equal(both[0][0], plain) and torch.equal(both[1][0], plain.flip(-1))


def test_flat_folder_and_grayscale(tmp_path):
    save_png(tmp_path / "g.png", np.full((20, 20), 128))
    ds = ImageFolderDataset(tmp_path, 8)
    assert ds.num_classes == 1 and ds[0][0].shape == (3, 8, 8) and ds[0][1] == 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        ImageFolderDataset(tmp_path / "empty")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "broken.png").write_bytes(b"not a png at all")
    ds = ImageFolderDataset(tmp_path / "bad", 8)
    with pytest.raises(DataError, match=r"broken.png: cannot read image") as exc:
        ds[0]
    assert "\n" not in str(exc.value)


def test_build_dataset_images_checks(image_folder):
    model = dict(name="SiT-S/2", input_size=16, in_channels=3, num_classes=2)
    data = dict(source="images", data_path=str(image_folder), image_size=16, autoencoder="identity",
                random_flip=False)
    assert build_dataset(run_config(model, **data))[4][1] == 1
    with pytest.raises(DataError, match="data.data_path is not set"):
        build_dataset(run_config(model, source="images", autoencoder="identity"))
    with pytest.raises(DataError, match="model expects 3x32x32"):
        build_dataset(run_config(dict(input_size=32, in_channels=3, num_classes=2), **data))
    uncond = build_dataset(run_config({**model, "num_classes": 1}, **data))
    assert [uncond[i][1] for i in range(5)] == [0] * 5


def test_build_dataset_too_many_classes(tmp_path):
    for cls in "abc":
        save_png(tmp_path / cls / "x.png", np.zeros((8, 8, 3)))
    cfg = run_config(dict(name="SiT-S/2", input_size=8, in_channels=3, num_classes=2), source="images",
                     data_path=str(tmp_path), image_size=8, autoencoder="identity")
    with pytest.raises(DataError, match="the data has 3 classes but model.num_classes is 2"):
        build_dataset(cfg)


# -------------------------------------------------------------------------------------- autoencoders

def test_vae_autoencoder_from_folder(tiny_vae_dir):
    from diffusers import AutoencoderKL

    ref = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    ae = VAEAutoencoder(tiny_vae_dir, scale=0.5)
    assert (ae.latent_channels, ae.downsample_factor, ae.scale) == (4, 8, 0.5)
    assert ae.latent_shape(256) == (4, 32, 32) and not ae.training
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 4, 4, 4)
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        assert torch.allclose(z, posterior.mean * 0.5, atol=1e-5)            # mean, times the scale
        assert torch.allclose(ae.decode(z), ref.decode(posterior.mean).sample.clamp(-1, 1), atol=1e-5)
    s1 = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.allclose(s1, z)
    built = build_autoencoder(run_config(source="images", autoencoder=tiny_vae_dir, latent_scale=0.25))
    assert isinstance(built, VAEAutoencoder) and torch.allclose(built.encode(x), z / 2, atol=1e-5)


def test_identity_autoencoder():
    ae = build_autoencoder(load_config("digits"))
    assert isinstance(ae, IdentityAutoencoder) and ae.latent_shape(16) == (1, 16, 16) and ae.scale == 1.0
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(x * 3), (x * 3).clamp(-1, 1))
    assert build_autoencoder(run_config(source="images", autoencoder="identity")).latent_channels == 3


def test_hub_id_offline_fails_fast_and_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(AutoencoderError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE") as e:
        VAEAutoencoder("stabilityai/sd-vae-ft-ema")
    assert time.time() - start < 10 and "\n" not in str(e.value)
    with pytest.raises(AutoencoderError, match="no config.json"):
        VAEAutoencoder(str(tmp_path))
    with pytest.raises(AutoencoderError, match="no such folder"):
        VAEAutoencoder(str(tmp_path / "nope" / "vae"))


# ---------------------------------------------------------------------------------- latent extraction

def test_extract_round_trip_resume_and_strided_ranks(image_folder, tiny_vae_dir, tmp_path):
    ae = VAEAutoencoder(tiny_vae_dir)
    calls = []
    encode = ae.encode
    ae.encode = lambda x, **kw: (calls.append(len(x)), encode(x, **kw))[1]
    store = tmp_path / "store"
    kwargs = dict(image_size=16, batch_size=2, shard_size=2, num_workers=0, dtype="float32")
    # rank 0 of 2 writes shards 0 and 2 only; the store is incomplete until rank 1 runs
    extract_latents(image_folder, store, ae, state=fake_state(0, 2), **kwargs)
    assert [shard_path(store, s).is_file() for s in range(3)] == [True, False, True]
    with pytest.raises(DataError, match="incomplete latent store"):
        LatentDataset(store)
    extract_latents(image_folder, store, ae, state=fake_state(1, 2), **kwargs)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["count"] == 5 and manifest["shape"] == [4, 2, 2]
    assert manifest["autoencoder"] == tiny_vae_dir
    assert manifest["scale"] == 0.18215 and manifest["classes"] == ["apple", "zebra"]

    ds = LatentDataset(store)
    files = ImageFolderDataset(image_folder, 16)
    assert len(ds) == 5 and ds.sample_shape == (4, 2, 2)
    for i in range(5):
        image = load_image(files.files[i], 16)[None]
        z, y = ds[i]
        assert y == files.labels[i] and z.dtype == torch.float32
        assert torch.allclose(z, encode(image)[0], atol=1e-5)
        stored = np.load(shard_path(store, i // 2))[i % 2]
        assert np.allclose(stored[1], encode(image.flip(-1))[0].numpy(), atol=1e-5)
    both = torch.from_numpy(np.load(shard_path(store, 0))[0])
    assert torch.equal(ds[0][0], both[0]) and torch.equal(ds.load(0, True)[0], both[1])  # the stored mirror

    # resume: only the deleted shard is encoded again; finished shards are not rewritten
    mtimes = {s: os.stat(shard_path(store, s)).st_mtime_ns for s in (0, 2)}
    os.remove(shard_path(store, 1))
    calls.clear()
    extract_latents(image_folder, store, ae, state=fake_state(), **kwargs)
    assert calls == [4]  # one batch of 2 images, encoded with their mirrors
    assert {s: os.stat(shard_path(store, s)).st_mtime_ns for s in (0, 2)} == mtimes
    assert torch.allclose(LatentDataset(store)[3][0], ds[3][0])
    calls.clear()
    extract_latents(image_folder, store, ae, state=fake_state(), **kwargs)
    assert calls == []
    with pytest.raises(DataError, match="different settings"):
        extract_latents(image_folder, store, ae, state=fake_state(), **{**kwargs, "image_size": 32})


def test_extract_cli_and_latent_dataset_checks(image_folder, tiny_vae_dir, tmp_path, capsys):
    store = tmp_path / "cli_store"
    extract_main(["--data-path", str(image_folder), "--out", str(store), "--image-size", "16",
                  "--autoencoder", tiny_vae_dir, "--batch-size", "4", "--shard-size", "3",
                  "--num-workers", "0"])
    assert "complete" in capsys.readouterr().out
    assert sorted(p.name for p in store.iterdir()) == ["labels.npy", "latents_00000.npy", "latents_00001.npy",
                                                        "manifest.json"]
    assert np.load(shard_path(store, 1)).dtype == np.float16  # default storage precision
    small = dict(name="SiT-S/2", input_size=2, in_channels=4, num_classes=2)
    data = dict(source="latents", data_path=str(store))  # autoencoder and scale: the store's own (manifest)
    assert resolve_data(run_config(small, **data)).data.autoencoder == tiny_vae_dir
    assert resolve_data(run_config(small, **data)).data.latent_scale == 0.18215
    ok = build_dataset(run_config(small, **data))
    assert ok[0][0].shape == (4, 2, 2) and ok[0][0].dtype == torch.float32
    assert isinstance(build_autoencoder(run_config(small, **data)), VAEAutoencoder)  # decodes with the store's
    with pytest.raises(DataError, match=r"gives 4x2x2 model inputs but the model expects 4x32x32"):
        build_dataset(run_config(None, **data))
    with pytest.raises(DataError, match="encoded with"):  # a given autoencoder is checked, not replaced
        build_dataset(run_config(small, **data, autoencoder="identity"))
    with pytest.raises(DataError, match="scaled by 0.18215"):
        build_dataset(run_config(small, **data, latent_scale=0.5))
    uncond = build_dataset(run_config({**small, "num_classes": 1}, **data, random_flip=False))
    assert {uncond[i][1] for i in range(5)} == {0}
    with pytest.raises(DataError, match="not a latent store"):
        LatentDataset(tmp_path)
    assert exit_code(extract_main, ["--data-path", str(tmp_path / "nothing"), "--out", str(tmp_path / "s"),
                                    "--autoencoder", "identity"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def _two_rank_extract(data_path, store, vae_dir):
    from accelerate import PartialState

    PartialState._reset_state()  # a forked child must not inherit the parent's single-process state
    state = PartialState(cpu=True)
    assert state.num_processes == 2
    ae, seen = VAEAutoencoder(vae_dir), []
    encode = ae.encode
    ae.encode = lambda x, **kw: (seen.append(len(x) // 2), encode(x, **kw))[1]
    extract_latents(data_path, store, ae, image_size=16, batch_size=2, shard_size=1, num_workers=0,
                    dtype="float32")
    (store.parent / f"rank{state.process_index}.txt").write_text(str(sum(seen)))


def test_extract_two_real_ranks(image_folder, tiny_vae_dir, tmp_path):
    from accelerate import debug_launcher

    store = tmp_path / "dist_store"
    debug_launcher(_two_rank_extract, args=(image_folder, store, tiny_vae_dir), num_processes=2)
    ds = LatentDataset(store)  # complete: the two ranks covered all 5 shards
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["3", "2"]  # shards 0,2,4 | 1,3
    assert len(ds) == 5 and ds.sample_shape == (4, 2, 2)
    ae = VAEAutoencoder(tiny_vae_dir)
    files = ImageFolderDataset(image_folder, 16).files
    assert torch.allclose(ds[4][0], ae.encode(load_image(files[4], 16)[None])[0], atol=1e-5)


def test_a_signal_stops_extraction_after_a_shard(image_folder, tmp_path, monkeypatch):
    import os
    import signal

    from sit_atconv.data import extract_latents as module

    real_save = module._save_npy

    def signalled(array, path):
        real_save(array, path)
        if path.name.startswith("latents_"):  # after the first shard (labels.npy is written before)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(module, "_save_npy", signalled)
    store, kwargs = tmp_path / "store", dict(image_size=16, batch_size=2, shard_size=2, num_workers=0,
                                             dtype="float32", state=fake_state())
    with pytest.raises(DataError, match="stopped by SIGTERM: every finished shard"):
        extract_latents(image_folder, store, IdentityAutoencoder(3), **kwargs)
    assert [shard_path(store, s).is_file() for s in range(3)] == [True, False, False]
    monkeypatch.setattr(module, "_save_npy", real_save)
    extract_latents(image_folder, store, IdentityAutoencoder(3), **kwargs)
    assert len(LatentDataset(store)) == 5

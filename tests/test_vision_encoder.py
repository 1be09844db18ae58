"""The REPA vision encoder (timm ViT, local weights in timm or official DINOv2 format) and the encoder
features stored next to the latents (flip-consistent items, manifest record, adding them later)."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import exit_code, fake_state, write_image_folder
from safetensors.torch import save_file

from sit_atconv.data import (
    IdentityAutoencoder,
    LatentDataset,
    MirroredByIndex,
    Unconditional,
    VisionEncoderError,
    load_vision_encoder,
    stored_features,
)
from sit_atconv.data.extract_latents import extract_latents
from sit_atconv.data.extract_latents import main as extract_main
from sit_atconv.data.images import ImageFolderDataset, load_image
from sit_atconv.data.latents import feature_path, shard_path
from sit_atconv.errors import DataError

TINY = dict(depth=1, embed_dim=32, num_heads=2)
NAME = "vit_small_patch14_dinov2"


def tiny_encoder(name=NAME, weights="random", resolution=28, **kwargs):
    return load_vision_encoder(name, weights, resolution=resolution, **{**TINY, **kwargs})


def randomise(encoder, seed=0):
    """Random values in every parameter (timm zero-initialises some: biases, layer scales)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return encoder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("images"), {"a": 2, "b": 1}, 20)


# -------------------------------------------------------------------------------------------- encoder

def test_tokens_of_resized_normalised_images():
    enc = randomise(tiny_encoder())
    assert (enc.name, enc.dim, enc.resolution, enc.patch_size, enc.num_tokens) == (NAME, 32, 28, 14, 4)
    assert not enc.train().training and not any(p.requires_grad for p in enc.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    tokens = enc(x)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)  # DINOv2's ImageNet normalisation of [0, 1] images
    resized = F.interpolate(((x + 1) / 2 - mean) / std, size=(28, 28), mode="bicubic", align_corners=False)
    expected = enc.model.forward_features(resized)[:, 1:]  # without the class token
    assert tokens.shape == (2, 4, 32) and torch.allclose(tokens, expected, atol=1e-5)
    grey = x[:, :1]
    assert torch.allclose(enc(grey), enc(grey.expand(-1, 3, -1, -1)), atol=1e-6)
    registers = tiny_encoder("vit_small_patch14_reg4_dinov2")
    assert registers.num_prefix_tokens == 5 and registers(x).shape == (2, 4, 32)
    default = load_vision_encoder(NAME, "random", **TINY)
    assert (default.resolution, default.num_tokens) == (518, 37 * 37)  # timm's default image size


def test_timm_state_dict_files_load(tmp_path):
    ref = randomise(tiny_encoder())
    state = ref.model.state_dict()
    save_file({**state, "head.weight": torch.zeros(3, 32)}, str(tmp_path / "w.safetensors"))  # head: ignored
    torch.save({"model": state}, tmp_path / "w.pth")
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    for name in ("w.safetensors", "w.pth"):
        loaded = tiny_encoder(weights=str(tmp_path / name))
        assert loaded.weights == str(tmp_path / name) and torch.equal(loaded(x), ref(x))
    assert not torch.allclose(tiny_encoder()(x), ref(x))


def test_official_dinov2_keys_map_to_timm(tmp_path):
    """The DINOv2 hub layout: mask_token, and with registers a class-token position inside pos_embed."""
    ref = randomise(tiny_encoder("vit_small_patch14_reg4_dinov2"))
    timm_state = ref.model.state_dict()
    cls_pos = torch.randn(1, 1, 32)
    official = {k: v for k, v in timm_state.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    official.update(mask_token=torch.randn(1, 32), register_tokens=timm_state["reg_token"],
                    cls_token=timm_state["cls_token"] - cls_pos,
                    pos_embed=torch.cat([cls_pos, timm_state["pos_embed"]], dim=1))
    torch.save(official, tmp_path / "dinov2_reg4.pth")
    loaded = tiny_encoder("vit_small_patch14_reg4_dinov2", str(tmp_path / "dinov2_reg4.pth"))
    x = torch.rand(2, 3, 28, 28) * 2 - 1
    assert torch.allclose(loaded(x), ref(x), atol=1e-6)

    big = randomise(tiny_encoder(resolution=56))  # a 4x4 grid checkpoint, loaded at a 2x2 grid
    plain = {**big.model.state_dict(), "mask_token": torch.randn(1, 32)}
    torch.save(plain, tmp_path / "dinov2.pth")
    small = tiny_encoder(weights=str(tmp_path / "dinov2.pth"))
    expected_pos = timm.layers.resample_abs_pos_embed(plain["pos_embed"], (2, 2), num_prefix_tokens=1)
    assert torch.allclose(small.model.pos_embed, expected_pos)
    assert torch.equal(small.model.blocks[0].attn.qkv.weight, plain["blocks.0.attn.qkv.weight"])


def test_errors_are_one_line_and_name_the_fix(tmp_path):
    torch.save(tiny_encoder(depth=2).model.state_dict(), tmp_path / "deeper.pth")
    torch.save(tiny_encoder(embed_dim=48, num_heads=2).model.state_dict(), tmp_path / "wider.pth")
    cases = [(lambda: tiny_encoder("vit_small_patch14_dinov3"), "not a timm model; did you mean"),
             (lambda: tiny_encoder(weights=str(tmp_path / "missing.pth")), "no such file"),
             (lambda: tiny_encoder(weights=str(tmp_path / "deeper.pth")), r"unexpected blocks\.1"),
             (lambda: tiny_encoder(weights=str(tmp_path / "wider.pth")), "shape of"),
             (lambda: load_vision_encoder("resnet18", "random"), "not a timm ViT"),
             (lambda: tiny_encoder(resolution=30), "not a multiple of its patch size 14")]
    for make, message in cases:
        with pytest.raises(VisionEncoderError, match=message) as err:
            make()
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------- stored features

def test_stored_features_are_the_encoder_on_each_flip(image_folder, tmp_path):
    enc = randomise(tiny_encoder())
    out, kwargs = tmp_path / "store", dict(image_size=16, batch_size=2, shard_size=2, num_workers=0,
                                           state=fake_state())
    ae = IdentityAutoencoder(3)
    extract_latents(image_folder, out, ae, **kwargs)
    assert stored_features(out) is None
    with pytest.raises(DataError, match="holds no encoder features"):
        LatentDataset(out, with_features=True)
    calls, encode = [], ae.encode  # features added to a finished store: the autoencoder is not run again
    ae.encode = lambda x, **kw: (calls.append(len(x)), encode(x, **kw))[1]
    extract_latents(image_folder, out, ae, vision_encoder=enc, **kwargs)
    assert calls == [] and feature_path(out, 1).is_file()
    info = stored_features(out)
    assert (info.encoder, info.num_tokens, info.dim, info.resolution, info.weights, info.dtype) == (
        NAME, 4, 32, 28, "random", "float16")
    assert np.load(feature_path(out, 0)).shape == (2, 2, 4, 32)

    files = ImageFolderDataset(image_folder, 16).files
    ds = LatentDataset(out, with_features=True)
    for i in range(3):
        image = load_image(files[i], 16)[None]
        latent, label, features = ds.load(i, False)
        assert features.dtype == torch.float32 and torch.allclose(features, enc(image)[0], atol=2e-3)
        assert torch.allclose(ds.load(i, True)[2], enc(image.flip(-1))[0], atol=2e-3)
        assert not torch.allclose(ds.load(i, True)[2], features, atol=1e-2)
    assert len(LatentDataset(out)[0]) == 2  # the default items are unchanged
    mirrored, uncond = MirroredByIndex(ds), Unconditional(ds)
    assert torch.equal(mirrored[4][2], ds.load(1, True)[2]) and torch.equal(mirrored[4][0], ds.load(1, True)[0])
    assert uncond[2][1] == 0 and torch.equal(uncond[2][2], ds[2][2])
    with pytest.raises(DataError, match="holds features of vit_small_patch14_dinov2"):
        extract_latents(image_folder, out, ae, vision_encoder=tiny_encoder(resolution=42), **kwargs)
    shard_path(out, 1).unlink()
    feature_path(out, 1).unlink()
    with pytest.raises(DataError, match="pass --repa-encoder vit_small_patch14_dinov2"):
        extract_latents(image_folder, out, ae, **kwargs)  # continuing without the encoder


def test_cli_stores_features(image_folder, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--data-path", str(image_folder), "--out", str(out), "--image-size", "16", "--autoencoder", "identity",
            "--num-workers", "0"]
    assert exit_code(extract_main, [*args, "--repa-encoder", NAME]) == 2
    assert "--repa-encoder-weights" in capsys.readouterr().err
    assert exit_code(extract_main, [*args, "--repa-resolution", "28"]) == 2
    assert exit_code(extract_main, [*args, "--repa-encoder", NAME, "--repa-encoder-weights", "random",
                                    "--repa-resolution", "28"]) == 0
    assert "vit_small_patch14_dinov2 features 4x384" in capsys.readouterr().out
    assert stored_features(out).dim == 384 and len(LatentDataset(out, with_features=True)[0]) == 3

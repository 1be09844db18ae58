"""Kernel pictures (`python -m sit_atconv.viz kernels`): the kernels and attention maps drawn are what the mixers
compute on the model's own block inputs, and the PNG has one panel per (sample, t) x (input, mixer column)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import exit_code, tiny_config
from PIL import Image
from timm.models.vision_transformer import Attention

from sit_atconv.build import LoadedRun, build_autoencoder, build_model
from sit_atconv.layers.atconv import ATConv
from sit_atconv.layers.atconv_reference import depthwise_conv_loop
from sit_atconv.models.sit import modulate
from sit_atconv.viz import attention_maps, draw_picture, kernel_picture, write_kernel_picture
from sit_atconv.viz.__main__ import main
from sit_atconv.viz.draw import PANEL_IN


def _stripes(seq: torch.Tensor, bins: int) -> torch.Tensor:
    """(B, C, N) -> (B, C, bins): torch's adaptive-average bins over the raster sequence, spelled out."""
    n = seq.shape[-1]
    return torch.stack([seq[..., (i * n) // bins: -((-(i + 1) * n) // bins)].mean(-1) for i in range(bins)], -1)


@torch.no_grad()
def test_kernels_are_the_ones_atconv_convolves_with():
    """`ATConv.kernels` on a 6x10 grid = the paper's order recomputed from the weights (project, pool, GELU,
    kernel_gen, inhibition), and convolving with them reproduces the layer's output."""
    torch.manual_seed(0)
    layer = ATConv(16, 3, layout="tokens", grid_size=(8, 8), act="gelu_tanh")
    layer.difference_control.normal_()
    x = torch.randn(2, 60, 16)
    kernels = layer.kernels(x, (6, 10))
    projected = layer.kernel_proj(x).transpose(1, 2)                                  # (B, C, N)
    plain = layer.kernel_gen(F.gelu(_stripes(projected, 9), approximate="tanh"))
    plain = plain - torch.sigmoid(layer.difference_control)[:, None] * plain.mean(-1, keepdim=True)
    assert kernels.shape == (2, 16, 3, 3) and torch.allclose(kernels, plain.reshape(2, 16, 3, 3), atol=1e-6)
    values = layer.x_proj(x).transpose(1, 2).reshape(2, 16, 6, 10)
    out = layer.proj(depthwise_conv_loop(values, kernels).flatten(2).transpose(1, 2))
    assert torch.allclose(out, layer(x, (6, 10)), atol=1e-5)
    image = ATConv(16, 3, layout="image")                                             # AttNet's layout
    xi = torch.randn(2, 16, 6, 10)
    assert torch.allclose(image.proj(depthwise_conv_loop(image.x_proj(xi), image.kernels(xi))), image(xi), atol=1e-5)


@pytest.mark.parametrize("qk_norm", [False, True])
@torch.no_grad()
def test_attention_maps_reproduce_the_attention_output(qk_norm):
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).eval()
    x = torch.randn(2, 12, 16)
    maps = attention_maps(attn, x)                                                    # (B, heads, N, N)
    v = attn.qkv(x).reshape(2, 12, 3, 2, 8).permute(2, 0, 3, 1, 4)[2]
    assert torch.allclose(maps.sum(-1), torch.ones(2, 2, 12))
    assert torch.allclose(attn.proj((maps @ v).transpose(1, 2).reshape(2, 12, 16)), attn(x), atol=1e-5)
    assert torch.allclose(attention_maps(attn, x, [3, 7]), maps[:, :, [3, 7]], atol=1e-7)


def _loaded(tmp_path, mixer: str) -> LoadedRun:
    """An untrained tiny digits SiT with every weight perturbed, as a loaded run (no training needed)."""
    cfg = tiny_config(tmp_path, mixer, f"model.mixer={mixer}")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return LoadedRun(model, cfg, 7, tmp_path / mixer / "checkpoints" / "step_0000007.pt", build_autoencoder(cfg))


@torch.no_grad()
def _first_mixer_input(model, x_t, t, y):
    """Block 0's mixer input, computed by hand from the SiT's parts."""
    tokens = model.x_embedder(x_t) + (model.pos_embed if model.use_pos_embed else 0)
    c = model.t_embedder(t) + model.y_embedder(y, False)
    shift, scale = model.blocks[0].adaLN_modulation(c).chunk(6, dim=1)[:2]
    return modulate(model.blocks[0].norm1(tokens), shift, scale)


@pytest.mark.parametrize("mixer, columns, bars", [("atconv", 2, 1), ("attn", 4, 0), ("hybrid", 3, 1)])
def test_picture_panels_and_the_drawn_maps(tmp_path, mixer, columns, bars):
    """2 samples x 2 times = 4 rows of (input + ATConv blocks + attention blocks x 2 queries), + the bar plot."""
    run = _loaded(tmp_path, mixer)
    picture = kernel_picture(run, samples=2, times=[0.25, 0.75], queries=2)
    assert picture.panel_count() == 4 * (1 + columns) + bars
    assert picture.queries == [2 * 8 + 2, 5 * 8 + 5] and picture.inputs.noised.shape == (2, 2, 1, 16, 16)
    assert list(picture.inputs.labels) == [0, 1]
    x_t, t = picture.inputs.noised[1], torch.full((2,), 0.75)                       # time index 1
    block_input = _first_mixer_input(run.model, x_t, t, picture.inputs.labels)
    first = run.model.blocks[0].attn
    expected = first.kernels(block_input) if mixer == "atconv" else \
        attention_maps(first, block_input, picture.queries).mean(1)
    assert torch.allclose(picture.maps[0][1], expected, atol=1e-6)
    if bars:
        atconv_block = 1 if mixer == "hybrid" else 0
        control = run.model.blocks[atconv_block].attn.difference_control
        assert torch.equal(picture.inhibition[atconv_block], torch.sigmoid(control))
    fig = draw_picture(picture)
    assert len(fig.axes) == picture.panel_count()
    out = write_kernel_picture(picture, tmp_path / "k.png")
    width, height = Image.open(out).size
    assert width == round(100 * max(6.0, PANEL_IN * (1 + columns)))
    assert height == round(100 * (PANEL_IN * 4 + 0.8 + (2.4 if bars else 0.0)))


def test_cli_writes_next_to_the_run_and_refuses_overwriting(trained_run, capsys):
    argv = ["kernels", "--ckpt", str(trained_run), "--samples", "2", "--times", "0.5", "--blocks", "1"]
    assert main(argv) == 0
    out = trained_run / "viz" / "kernels_step0000200.png"
    assert f"wrote {out} (5 panels)" in capsys.readouterr().out  # 2 rows x (input + block 1) + bars
    assert Image.open(out).format == "PNG"
    assert exit_code(main, argv) == 2 and "exists; pass --out elsewhere or --force" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
    for bad, message in [(["--blocks", "2"], "--blocks 2: give distinct indices in 0..1"),
                         (["--times", "1.5"], "--times [1.5]: times lie in [0, 1]")]:
        assert exit_code(main, [*argv, "--force", *bad]) == 2
        assert message in capsys.readouterr().err
    out.unlink()  # the shared run folder stays as it was
    out.parent.rmdir()

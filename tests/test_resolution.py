"""Resolution transfer: a SiT runs on another token grid without changing at its trained size; sample.py and
eval_fid.py draw at another pixel side; the study reports FID at other sides."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import exit_code
from einops import rearrange
from PIL import Image

import sample
from sit_atconv.build import load_run
from sit_atconv.errors import ConfigError
from sit_atconv.evaluation import evaluate
from sit_atconv.layers.atconv import ATConv
from sit_atconv.layers.atconv_reference import atconv_reference
from sit_atconv.layers.embed import sincos_pos_embed_2d
from sit_atconv.models.sit import SiT
from sit_atconv.sampling import MIN_CELL_PX, SamplingOptions
from sit_atconv.study import StudySpec
from sit_atconv.study import grid as study_grid
from sit_atconv.study.__main__ import main as study_main

TINY = dict(patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, learn_sigma=False)
MIXERS = ["atconv", "attn", "hybrid"]


def _sit(mixer: str, input_size: int = 16, seed: int = 0) -> SiT:
    """A tiny SiT with every weight perturbed (the zero-initialised adaLN and output layers too)."""
    torch.manual_seed(seed)
    model = SiT(input_size=input_size, mixer=mixer, **TINY).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _inputs(height: int, width: int, batch: int = 2):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(batch, 1, height, width, generator=gen), torch.rand(batch, generator=gen), torch.tensor([1, 7])


def _fixed_grid_forward(model: SiT, x, t, y):
    """SiT's forward as it was before resolution transfer: the stored table, the built grid, blocks called bare."""
    tokens = model.x_embedder.proj(x).flatten(2).transpose(1, 2)
    if model.use_pos_embed:
        tokens = tokens + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    for block in model.blocks:
        tokens = block(tokens, c)
    h, w = model.grid_size
    return rearrange(model.final_layer(tokens, c), "n (h w) (p q c) -> n c (h p) (w q)", h=h, w=w, p=2, q=2)


@pytest.mark.parametrize("mixer", MIXERS)
@torch.no_grad()
def test_at_the_trained_size_the_forward_is_bit_identical(mixer):
    model = _sit(mixer)
    x, t, y = _inputs(16, 16)
    assert torch.equal(model(x, t, y), _fixed_grid_forward(model, x, t, y))
    assert model.token_grid(x) is model.grid_size  # the built grid itself: ATConv's trained-size path


@pytest.mark.parametrize("mixer", MIXERS)
@torch.no_grad()
def test_on_another_grid_it_is_the_sit_built_for_that_grid(mixer):
    """16 px-trained weights at 24 px = a SiT built for 24 px holding them (its own sin-cos table for 12x12)."""
    small, big = _sit(mixer), SiT(input_size=24, mixer=mixer, **TINY).eval()
    state = {k: v for k, v in small.state_dict().items() if k != "pos_embed"}
    assert set(big.load_state_dict(state, strict=False).missing_keys) == ({"pos_embed"} if mixer != "atconv" else set())
    x, t, y = _inputs(24, 24)
    out = small(x, t, y)
    assert out.shape == (2, 1, 24, 24) and torch.equal(out, big(x, t, y))
    assert not torch.equal(out[..., :16, :16], small(x[..., :16, :16], t, y))  # the grid really changed


@torch.no_grad()
def test_a_non_square_grid_runs_and_recomputes_the_position_table():
    model = _sit("hybrid")
    x, t, y = _inputs(24, 20)
    assert model(x, t, y).shape == (2, 1, 24, 20)
    assert model.position_embedding(model.grid_size) is model.pos_embed
    assert torch.equal(model.position_embedding((12, 10))[0], sincos_pos_embed_2d(32, 12, 10))
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(*_inputs(15, 16)[:1], t, y)


@pytest.mark.parametrize("pool", ["sequence", "grid"])
@torch.no_grad()
def test_atconv_on_a_passed_grid_is_the_reference_on_that_grid(pool):
    """ATConv built for 8x8 and called on a 6x10 grid = the paper-order oracle of the same weights on 6x10."""
    torch.manual_seed(0)
    layer = ATConv(16, 3, layout="tokens", grid_size=(8, 8), act="gelu_tanh", kernel_pool=pool)
    with torch.no_grad():
        layer.difference_control.normal_()
    x = torch.randn(2, 60, 16)
    out = layer(x, (6, 10))
    layer.grid_size = (6, 10)
    assert torch.allclose(out, atconv_reference(layer, x), atol=1e-5)
    assert not torch.allclose(out, layer(x, (10, 6)), atol=1e-3)  # a transposed grid is another function
    with pytest.raises(ValueError, match="expected 8x8=64 tokens, got 60"):
        ATConv(16, 3, layout="tokens", grid_size=(8, 8))(x)


def test_sample_py_writes_a_grid_at_another_size(trained_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["--ckpt", str(trained_run), "--num-samples", "4", "--class-labels", "3", "--num-steps", "4",
            "--image-size", "24", "--save-npz", "--out", str(out)]
    assert sample.main(argv) == 0
    assert "ATConv on the 12x12 token grid (trained on 8x8" in capsys.readouterr().out
    with np.load(out.with_suffix(".npz")) as data:
        assert data["arr_0"].shape == (4, 24, 24, 3)
    cell = 24 * -(-MIN_CELL_PX // 24)  # upscaled by 3 to 72 px
    width, height = Image.open(out).size
    assert height == cell + 2 * 2 and width > 4 * cell + 5 * 2  # one row of four cells, padding 2, caption margin
    default = sample.parser().parse_args(["--image-size", "32"])
    assert default.image_size == 32
    assert exit_code(sample.main, [*argv[:-2], "--out", str(tmp_path / "bad.png"), "--image-size", "15"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--image-size 15: must be a multiple of 2" in err
    assert not (tmp_path / "bad.png").exists()


def test_eval_at_another_size_records_image_size_and_resize(trained_run, tmp_path):
    run_dir = shutil.copytree(trained_run, tmp_path / "run")  # its eval/ folder is the default output
    results = evaluate(ckpt=run_dir, num_samples=20, batch_size=20, image_size=32, metrics=["fid"],
                       opts=SamplingOptions(num_steps=4, cfg_scale=1.0), show_progress=False)
    out_dir = Path(results["out_dir"])
    assert out_dir.parent == run_dir / "eval" and out_dir.name.endswith("_n20_seed0_32px")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert (metrics["image_size"], metrics["resized_to"]) == (32, 16) and np.isfinite(metrics["fid"])
    assert json.loads((out_dir / "manifest.json").read_text())["image_size"] == 32
    with np.load(results["samples"]) as data:
        assert data["arr_0"].shape == (20, 32, 32, 3)
    with pytest.raises(ConfigError, match="--image-size 33: must be a multiple of 2"):
        load_run(run_dir).sampler().at_image_size(33)


def test_study_reports_fid_at_transfer_sizes(tmp_path, monkeypatch):
    """--transfer-sizes evaluates each cell's final checkpoint at those sides and reports fid_at_<S>."""
    calls = []

    def fake_evaluate(*, ckpt, out_dir, num_samples, seed, ref, show_progress, image_size=None):
        calls.append(image_size)
        out_dir.mkdir(parents=True, exist_ok=True)
        fid = {None: 10.0, 24: 30.0, 32: 50.0}[image_size]
        (out_dir / "metrics.json").write_text(json.dumps({"fid": fid, "image_size": image_size or 16,
                                                          "resized_to": 16 if image_size else None}))

    monkeypatch.setattr(study_grid, "evaluate", fake_evaluate)
    out = tmp_path / "study"
    argv = ["--config", "tiny", "--mixers", "atconv", "--seeds", "1", "--num-samples", "8", "--sampling-batch", "2",
            "--set", "transport.num_steps=2", "--set", "train.max_steps=2", "--eval-every", "2", "--out", str(out)]
    assert study_main([*argv, "--transfer-sizes", "24"]) == 0
    assert calls == [None, 24]
    assert study_main([*argv, "--transfer-sizes", "24", "32"]) == 0  # a size asked later: added to the finished cell
    assert calls == [None, 24, 32]
    results = json.loads((out / "results.json").read_text())
    assert [t["fid"] for t in results["cells"][0]["transfer"]] == [30.0, 50.0]
    assert results["summary"]["atconv"]["fid_at_32"]["mean"] == 50.0
    assert (out / "atconv-seed0" / "eval" / "study_step2_32px" / "metrics.json").is_file()
    md = (out / "results.md").read_text()
    assert "FID @24px | FID @32px |" in md and "resolution transfer" in md
    with pytest.raises(ConfigError, match="other than the trained 16"):
        study_grid.base_config(StudySpec(out=tmp_path / "x", config="tiny", transfer_sizes=[16]))
    with pytest.raises(ConfigError, match="multiples of 2"):
        study_grid.base_config(StudySpec(out=tmp_path / "x", config="tiny", transfer_sizes=[25]))

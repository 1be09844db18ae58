"""Checkpoints of the reference code's two SiT forks load as the models they are, in our time convention.

The fork layouts here are synthetic: our own SiT, built with the fork's facts (REPA fork: SiLU kernels,
position embedding everywhere, no learned sigma, optional QK-norm), saved with the fork's key layout and
training-container shape. Parity with the forks' own model code: tools/check_reference_parity.py.
"""

import argparse
import math
import os
import pickle
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import sample as sample_cli
from sit_atconv.build import build_model, load_run
from sit_atconv.config import RunConfig
from sit_atconv.convert import main as convert_main
from sit_atconv.convert import model_from_reference
from sit_atconv.errors import CheckpointError, ConfigError, UnsafeCheckpointError
from sit_atconv.layers.atconv import generate_kernels
from sit_atconv.models.sit import SiT, mixer_pattern
from sit_atconv.models.time_reversed import ReversedTime
from sit_atconv.reference_models import METADATA_KEY, load_reference, read_reference
from sit_atconv.transport import Sampler, create_transport

ATCONV_PROJ = re.compile(r"^blocks\.\d+\.attn\.(kernel_proj|x_proj|proj)\.weight$")
WIDTH, HEADS, DEPTH, SIDE, CLASSES = 32, 4, 4, 8, 10


@torch.no_grad()
def _source(fork: str, mixer, *, qk_norm=False, in_channels=4, seed=0, **kw) -> SiT:
    """Our SiT with the fork's facts and random weights everywhere (the init zeroes adaLN and the output)."""
    facts = {"learn_sigma": False, "kernel_act": "silu", "pos_embed": True} if fork == "repa" else {}
    model = SiT(input_size=SIDE, patch_size=2, in_channels=in_channels, hidden_size=WIDTH, depth=DEPTH,
                num_heads=HEADS, num_classes=CLASSES, mixer=mixer, qk_norm=qk_norm, **{**facts, **kw})
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name != "pos_embed":
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _repa_layout(model: SiT) -> dict:
    """The REPA fork's keys: 1x1-conv ATConv projections, plus its alignment projector."""
    out = {k: (v[:, :, None, None] if ATCONV_PROJ.match(k) else v).clone() for k, v in model.state_dict().items()}
    shapes = [(16, WIDTH), (16, 16), (8, 16)]
    for i, (rows, cols) in enumerate(shapes):
        out[f"projectors.0.{2 * i}.weight"] = torch.randn(rows, cols)
        out[f"projectors.0.{2 * i}.bias"] = torch.zeros(rows)
    return out


def _repa_file(model: SiT, path, name: str, **args) -> None:
    """A REPA-fork training checkpoint: {"model", "ema", "opt", "args", "steps"}."""
    state = _repa_layout(model)
    ns = argparse.Namespace(**{"model": name, "path_type": "linear", "prediction": "v", "encoder_depth": 2,
                               "proj_coeff": 0.5, "enc_type": "dinov2-vit-b", "qk_norm": False,
                               "num_classes": CLASSES, "resolution": SIDE * 8, **args})
    torch.save({"model": state, "ema": state, "opt": {}, "args": ns, "steps": 4000}, path)


def _sit_file(model: SiT, path, name: str) -> None:
    """A SiT-fork training checkpoint (DDP-prefixed weights, its argparse arguments)."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    ns = argparse.Namespace(model=name, image_size=SIDE * 8, num_classes=CLASSES, path_type="Linear",
                            prediction="velocity", vae="ema")
    torch.save({"model": state, "ema": state, "opt": {}, "args": ns}, path)


def _inputs(in_channels=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(3, in_channels, SIDE, SIDE, generator=gen), torch.rand(3, generator=gen),
            torch.tensor([0, 7, CLASSES]))


def test_kernel_act_option_reaches_the_kernels():
    pooled, weight, bias = torch.randn(2, 5, 9), torch.randn(9, 9), torch.randn(9)
    assert torch.equal(generate_kernels(pooled, weight, bias, "silu"), F.linear(F.silu(pooled), weight, bias))
    assert torch.equal(generate_kernels(pooled, weight, bias, "gelu_tanh"),
                       F.linear(F.gelu(pooled, approximate="tanh"), weight, bias))
    with pytest.raises(ValueError, match="silu"):
        generate_kernels(pooled, weight, bias, "relu")
    cfg = RunConfig()
    m = cfg.model
    m.name, m.depth, m.hidden_size, m.patch_size, m.num_heads, m.input_size = None, 2, WIDTH, 2, HEADS, SIDE
    m.mixer, m.kernel_act = "atconv", "silu"
    assert {b.attn.act for b in build_model(cfg).blocks} == {"silu"}
    assert {b.attn.act for b in _source("sit", "atconv").blocks} == {"gelu_tanh"}  # the default


def test_per_block_mixer_list_is_the_named_pattern():
    named, listed = _source("sit", "hybrid"), _source("sit", mixer_pattern("hybrid", DEPTH))
    x, t, y = _inputs()
    assert named.state_dict().keys() == listed.state_dict().keys()
    assert torch.equal(named(x, t, y), listed(x, t, y))
    assert not _source("sit", ["atconv"] * DEPTH).use_pos_embed and _source("sit", ["atconv"] * DEPTH,
                                                                          pos_embed=True).use_pos_embed
    with pytest.raises(ValueError, match="per-block mixer list"):
        _source("sit", ["attn", "conv", "attn", "attn"])


CASES = [  # (fork, mixer, name, qk_norm)
    ("sit", "attn", "SiT-S/2", False),
    ("sit", "atconv", "SiT-ATConv-S/2", False),
    ("sit", "hybrid", "SiT-ATConv-S/2-Hybrid", False),
    ("repa", "attn", "SiT-B/2", False),
    ("repa", "attn", "SiT-B/2-ATConv", False),    # the fork's non-hybrid "ATConv" model: all attention
    ("repa", "hybrid", "SiT-B/2-ATConv-Hybrid", True),
]


@pytest.mark.parametrize("fork, mixer, name, qk_norm", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_fork_checkpoints_load_as_the_models_they_are(tmp_path, fork, mixer, name, qk_norm):
    source, path = _source(fork, mixer, qk_norm=qk_norm), tmp_path / "0400000.pt"
    (_repa_file(source, path, name, qk_norm=qk_norm) if fork == "repa" else _sit_file(source, path, name))
    lines = []
    overrides = {} if qk_norm else {"num_heads": HEADS}  # width 32 is no zoo row; QK-norm tells the heads
    model = model_from_reference(path, log=lines.append, **overrides)
    x, t, y = _inputs()
    with torch.no_grad():
        if fork == "repa":  # the fork's time runs the other way: s = 1 - t, and its target is eps - x
            assert isinstance(model, ReversedTime)
            assert torch.equal(model(x, t, y), -source(x, 1 - t, y))
        else:
            assert torch.equal(model(x, t, y), source(x, t, y))
    net = model.net if fork == "repa" else model
    assert net.mixers == source.mixers and net.learn_sigma == source.learn_sigma
    assert net.use_pos_embed == source.use_pos_embed and net.num_classes == CLASSES
    assert {b.attn.act for b in net.blocks if hasattr(b.attn, "act")} <= {"silu" if fork == "repa" else "gelu_tanh"}
    assert any(isinstance(getattr(b.attn, "q_norm", None), nn.LayerNorm) for b in net.blocks) == qk_norm
    assert len(lines) == 1 and ("REPA fork" if fork == "repa" else "SiT fork") in lines[0]


def test_summary_says_an_atconv_name_holds_only_attention(tmp_path, capsys):
    path = tmp_path / "ckpt.pt"
    _repa_file(_source("repa", "attn"), path, "SiT-XL/2-ATConv")
    model_from_reference(path, num_heads=HEADS)
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "REPA fork (training arguments)" in line and "all attention" in line
    assert "'SiT-XL/2-ATConv' but every block is attention" in line and "time reversed to ours" in line


def test_fork_is_detected_from_keys_without_training_arguments():
    hybrid = _source("repa", "hybrid")
    no_projectors = {k: v for k, v in _repa_layout(hybrid).items() if not k.startswith("projectors.")}
    assert load_reference(_repa_layout(_source("repa", "attn")), num_heads=HEADS).fork == "repa"   # projectors
    assert load_reference(no_projectors, num_heads=HEADS).fork == "repa"                           # 1x1 convs
    assert load_reference(_source("repa", "attn", qk_norm=True).state_dict()).fork == "repa"        # QK-norm
    plain = _source("sit", "hybrid").state_dict()
    assert load_reference(plain, num_heads=HEADS).fork == "sit"
    forced = load_reference(plain, fork="repa", num_heads=HEADS)  # told: SiLU kernels and reversed time
    assert isinstance(forced.model, ReversedTime) and forced.sit_kwargs["kernel_act"] == "silu"


def test_architecture_inference_and_its_limits():
    wide = SiT(input_size=4, patch_size=2, hidden_size=384, depth=1, num_heads=6, num_classes=1000,
               class_dropout_prob=0.0, mixer="attn").state_dict()
    built = load_reference(wide)
    assert built.sit_kwargs["num_heads"] == 6 and built.sit_kwargs["input_size"] == 4   # size table, pos_embed
    assert built.sit_kwargs["num_classes"] == 1000 and built.sit_kwargs["class_dropout_prob"] == 0
    atconv = _source("sit", "atconv").state_dict()  # no pos_embed, no arguments: the input side is assumed
    assert "input side 32 assumed" in load_reference(atconv).summary
    assert load_reference(atconv, input_size=SIDE).sit_kwargs["input_size"] == SIDE
    with pytest.raises(CheckpointError, match="pass num_heads="):
        load_reference(_source("sit", "attn").state_dict())
    with pytest.raises(CheckpointError, match="does not fit the SiT inferred"):
        load_reference(_source("sit", "attn").state_dict(), num_heads=HEADS, input_size=2 * SIDE)
    with pytest.raises(ConfigError, match="not a SiT argument"):
        load_reference(wide, depht=3)
    with pytest.raises(CheckpointError, match="not a SiT checkpoint"):
        load_reference({"stages.0.0.norm_1.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match="training checkpoint, not a reference one"):
        load_reference({"ema": wide, "model": wide, "config": {}, "step": 1})


class ForkPointMass(nn.Module):
    """The exact REPA-fork velocity when the data is a point mass mu: x_s = a(s) mu + b(s) eps with
    s = 0 data, s = 1 noise, and v = a'(s) mu + b'(s) eps, eps recovered from x."""

    def __init__(self, mu: torch.Tensor, path: str):
        super().__init__()
        self.mu, self.path = mu, path

    def forward(self, x, s, y, force_drop=None):
        s = s.view(-1, 1, 1, 1)
        if self.path == "linear":
            a, b, da, db = 1 - s, s, -torch.ones_like(s), torch.ones_like(s)
        else:
            a, b = torch.cos(math.pi * s / 2), torch.sin(math.pi * s / 2)
            da, db = -math.pi / 2 * b, math.pi / 2 * a
        eps = (x - a * self.mu) / b
        return da * self.mu + db * eps


@pytest.mark.parametrize("fork_path, our_path", [("linear", "Linear"), ("cosine", "GVP")])
def test_reversed_time_gives_our_velocity_on_a_point_mass(fork_path, our_path):
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64)
    fork_model = ForkPointMass(mu, fork_path)
    ours, transport = ReversedTime(fork_model), create_transport(our_path)
    noise = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    x_t, u_t = transport.path.interpolate(t.view(-1, 1, 1, 1), noise, mu.expand_as(noise))
    y = torch.zeros(6, dtype=torch.long)
    assert torch.allclose(ours(x_t, t, y), u_t, atol=1e-10)                # our target, exactly
    assert not torch.allclose(fork_model(x_t, t, y), u_t, atol=1e-2)       # unmapped: another field
    loss = transport.training_losses(ours, mu.expand(64, -1, -1, -1), {"y": torch.zeros(64, dtype=torch.long)})
    assert loss["loss"].max() < 1e-12
    if our_path == "Linear":  # straight paths: Euler from noise lands on the data
        sample = Sampler(transport).sample_ode(sampling_method="euler", num_steps=5)(noise, ours, y=y)[-1]
        assert torch.allclose(sample, mu.expand_as(noise), atol=1e-9)


def test_load_run_and_sample_cli_take_a_reference_file(tmp_path, capsys):
    source = _source("repa", "hybrid", qk_norm=True, in_channels=3)
    path = tmp_path / "exps" / "checkpoints" / "0004000.pt"
    path.parent.mkdir(parents=True)
    _repa_file(source, path, "SiT-B/2-ATConv-Hybrid", qk_norm=True, path_type="cosine")
    run = load_run(path)
    assert run.step == 4000 and run.cfg.transport.path_type == "GVP" and run.cfg.data.autoencoder == "identity"
    assert run.cfg.model.mixer == "hybrid" and run.cfg.model.kernel_act == "silu"
    x, t, y = _inputs(in_channels=3)
    with torch.no_grad():  # frozen weights may take another (equivalent) depthwise-conv route: last-bit differences
        torch.testing.assert_close(run.model(x, t, y), -source(x, 1 - t, y), atol=1e-6, rtol=0)
    out = tmp_path / "grid.png"
    argv = ["--ckpt", str(path), "--class-labels", "1", "--num-samples", "2", "--mode", "ode",
            "--sampling-method", "euler", "--num-steps", "3", "--out", str(out), "--device", "cpu"]
    assert sample_cli.main(argv) == 0 and out.is_file()
    assert "REPA fork" in capsys.readouterr().out


def test_convert_cli_writes_a_file_that_rebuilds_the_same_model(tmp_path, capsys):
    source, src = _source("repa", "hybrid", qk_norm=True), tmp_path / "0004000.pt"
    _repa_file(source, src, "SiT-B/2-ATConv-Hybrid", qk_norm=True)
    out = tmp_path / "repa.safetensors"
    assert convert_main([str(src), str(out)]) == 0
    assert "REPA fork" in capsys.readouterr().out
    with safe_open(str(out), framework="pt") as f:
        assert METADATA_KEY in f.metadata() and not any(k.startswith("projectors.") for k in f.keys())
    rebuilt = load_reference(out)  # projectors gone, projections flattened: the record says REPA fork
    assert rebuilt.fork == "repa" and rebuilt.step == 4000 and "recorded at conversion" in rebuilt.summary
    x, t, y = _inputs()
    with torch.no_grad():  # (the depthwise-conv route may differ with autograd on)
        assert torch.equal(rebuilt.model(x, t, y), -source(x, 1 - t, y))
    attnet = tmp_path / "attnet.pt"
    torch.save({"model": {"stages.0.0.norm_1.weight": torch.ones(3)}}, attnet)
    assert convert_main([str(attnet), str(tmp_path / "a.safetensors"), "--fork", "repa"]) == 2


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EXPLOIT_MARKER"],))


def test_training_arguments_are_the_only_extra_class_allowed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"ema": {}, "args": argparse.Namespace(x=_Exploit())}, f)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_reference(path)
    assert not marker.exists()

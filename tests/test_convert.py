"""Reference checkpoints: key layout, conversion round-trip, safe loading, the convert CLI."""

import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from sit_atconv.checkpoint import load_tensors
from sit_atconv.convert import from_reference, load_reference_checkpoint, main
from sit_atconv.errors import UnsafeCheckpointError
from sit_atconv.models import create_attnet, create_sit

# Key names as they appear in the reference code's modules (SPEC §1-§3).
REFERENCE_SIT_KEYS = [
    "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight",
    "blocks.0.attn.kernel_proj.weight", "blocks.0.attn.kernel_gen.weight", "blocks.0.attn.x_proj.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.difference_control", "blocks.0.mlp.fc1.weight",
    "blocks.0.mlp.fc2.bias", "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight",
    "final_layer.adaLN_modulation.1.bias",
]
REFERENCE_ATTNET_KEYS = [
    "downsample_layers.0.0.0.weight", "downsample_layers.0.0.1.running_mean", "downsample_layers.0.2.0.weight",
    "downsample_layers.1.0.weight", "stages.0.0.norm_1.weight", "stages.0.0.token_mixer.kernel_proj.weight",
    "stages.0.0.token_mixer.difference_control", "stages.0.0.channel_mixer.fc1.weight",
    "stages.0.0.channel_mixer.dwconv.weight", "stages.0.0.channel_mixer.norm_layer.weight",
    "stages.0.0.channel_mixer.fc2.bias", "stages.0.0.layer_scale_1.gamma", "stages.0.0.norm_2.bias",
    "norm.weight", "head.weight",
]


def _tiny_sit():
    return create_sit("SiT-S/2", input_size=8, depth=2, hidden_size=32, num_heads=4, num_classes=10)


def test_our_names_are_the_reference_names():
    sit, attnet = _tiny_sit().state_dict(), create_attnet("attnet_t1", num_classes=10).state_dict()
    assert set(REFERENCE_SIT_KEYS) <= set(sit)
    assert set(REFERENCE_ATTNET_KEYS) <= set(attnet)
    assert sit["blocks.0.attn.kernel_proj.weight"].shape == (32, 32)
    assert attnet["stages.0.0.token_mixer.kernel_proj.weight"].shape == (48, 48, 1, 1)


def _reference_layout(state, repa=False):
    """Simulate what the reference's training scripts save: DDP prefixes, REPA's conv projections/projectors."""
    out = {}
    for key, value in state.items():
        if repa and key.startswith("blocks.") and key.split(".")[-2] in ("kernel_proj", "x_proj", "proj") \
                and ".attn." in key and value.dim() == 2:
            value = value[:, :, None, None]
        out["module." + key] = value.clone()
    if repa:
        out["module.projectors.0.0.weight"] = torch.randn(8, 32)
    return out


@pytest.mark.parametrize("family", ["sit", "sit_repa", "attnet"])
def test_from_reference_round_trips(family):
    model = _tiny_sit() if family.startswith("sit") else create_attnet("attnet_xxs", num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = from_reference(_reference_layout(state, repa=family == "sit_repa"))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], v) for k, v in state.items())
    fresh = _tiny_sit() if family.startswith("sit") else create_attnet("attnet_xxs", num_classes=10)
    fresh.load_state_dict(converted, strict=True)


def test_from_reference_is_identity_on_our_layout():
    state = create_attnet("attnet_xxs").state_dict()
    assert from_reference(state).keys() == state.keys()


def test_load_reference_checkpoint_from_training_container(tmp_path):
    model = _tiny_sit()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "0400000.pt"
    torch.save({"model": _reference_layout(model.state_dict()), "ema": _reference_layout(model.state_dict()),
                "opt": {}, "args": None}, path)
    fresh = load_reference_checkpoint(_tiny_sit(), path)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(fresh.eval()(x, t, y), model.eval()(x, t, y))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EXPLOIT_MARKER"],))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_tensors(path)
    assert main([str(path), str(tmp_path / "out.safetensors")]) == 2
    assert not marker.exists()


def test_convert_cli(tmp_path, capsys):
    model = create_attnet("attnet_xxs", num_classes=10)
    src = tmp_path / "attnet_xxs.pth"
    torch.save({"model": _reference_layout(model.state_dict())}, src)
    out = tmp_path / "attnet_xxs.safetensors"
    assert main([str(src), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_file(str(out))
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    out.write_bytes(b"keep me")
    assert main([str(src), str(out)]) == 2  # refuses to overwrite
    assert "exists; choose another path or pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main([str(tmp_path / "missing.pt"), str(tmp_path / "x.safetensors")]) == 2

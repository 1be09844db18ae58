"""SiT and AttNet zoos: shapes, parameter counts (SPEC §2, §3), mixer patterns, CFG, timm registration."""

import pytest
import timm
import torch

import sit_atconv  # noqa: F401  (registers attnet_* with timm)
from sit_atconv.layers.atconv import ATConv
from sit_atconv.models import ATTNET_VARIANTS, create_attnet, create_sit, list_sit_models, mixer_pattern


def _count(model) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def _tiny_sit(mixer="atconv", **kw):
    args = dict(input_size=8, in_channels=4, num_classes=10, depth=4, hidden_size=32, num_heads=4)
    args.update(kw)
    return create_sit("SiT-S/2", mixer=mixer, **args)


@pytest.mark.parametrize(("name", "mixer", "millions"), [
    ("SiT-S/2", "attn", 32.96), ("SiT-S/2", "atconv", 31.10), ("SiT-S/2", "hybrid", 32.08),
    ("SiT-B/2", "attn", 130.51), ("SiT-B/2", "atconv", 123.24),
    ("SiT-XL/2", "attn", 675.13), ("SiT-XL/2", "atconv", 637.68), ("SiT-XL/2", "hybrid", 656.55),
])
def test_sit_parameter_counts_match_reference(name, mixer, millions):
    with torch.device("meta"):  # counted without allocating
        model = create_sit(name, mixer=mixer, input_size=32, num_classes=1000, learn_sigma=True)
    assert _count(model) == millions


@pytest.mark.parametrize("name", list_sit_models())
@pytest.mark.parametrize("mixer", ["attn", "atconv", "hybrid"])
def test_every_sit_zoo_entry_shapes(name, mixer):
    """Every size x patch x mixer builds and maps (B, C, H, W) -> (B, C, H, W) (meta tensors: shapes only)."""
    with torch.device("meta"):
        model = create_sit(name, mixer=mixer, input_size=16, num_classes=10, learn_sigma=True)
        x, t, y = torch.empty(2, 4, 16, 16), torch.empty(2), torch.zeros(2, dtype=torch.long)
        out = model(x, t, y)
    assert out.shape == (2, 4, 16, 16)
    patch = int(name.split("/")[1])
    atconvs = [m for m in model.modules() if isinstance(m, ATConv)]
    assert all(m.grid_size == (16 // patch, 16 // patch) for m in atconvs)
    assert len(atconvs) == mixer_pattern(mixer, len(model.blocks)).count("atconv")


@pytest.mark.parametrize("mixer", ["attn", "atconv", "hybrid"])
@pytest.mark.parametrize("patch", [2, 4])
def test_sit_forward_backward_real(mixer, patch):
    model = create_sit(f"SiT-S/{patch}", mixer=mixer, input_size=16, in_channels=3, num_classes=5, depth=3,
                       hidden_size=48, num_heads=4, learn_sigma=True)
    for p in model.parameters():  # leave the zero init so gradients reach every weight
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 4])
    out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_mixer_patterns_and_position_embedding():
    assert mixer_pattern("hybrid", 6) == ["attn", "atconv", "attn", "atconv", "attn", "atconv"]
    assert mixer_pattern("atconv", 3) == ["atconv"] * 3
    with pytest.raises(ValueError, match="mixer"):
        mixer_pattern("conv", 3)
    assert not hasattr(_tiny_sit("atconv"), "pos_embed")
    for mixer in ("attn", "hybrid"):
        model = _tiny_sit(mixer)
        assert model.pos_embed.shape == (1, 16, 32) and not model.pos_embed.requires_grad
        assert model.pos_embed.abs().sum() > 0
    hybrid = _tiny_sit("hybrid")
    assert [type(b.attn).__name__ for b in hybrid.blocks] == ["Attention", "ATConv", "Attention", "ATConv"]


def test_sit_init_follows_dit():
    model = _tiny_sit("atconv")
    assert all(b.adaLN_modulation[-1].weight.abs().sum() == 0 for b in model.blocks)
    assert model.final_layer.linear.weight.abs().sum() == 0
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]))
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output layer
    gen = model.blocks[0].attn.kernel_gen.weight  # xavier-uniform on every Linear, ATConv's included
    bound = (6 / (gen.shape[0] + gen.shape[1])) ** 0.5
    assert gen.abs().max() <= bound and gen.abs().max() > 0.5 * bound


def test_learn_sigma_returns_input_channels():
    model = _tiny_sit(learn_sigma=True)
    assert model.final_layer.linear.out_features == 2 * 2 * 8
    assert model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.tensor([3])).shape == (1, 4, 8, 8)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_class_dropout_uses_null_label():
    model = _perturbed(_tiny_sit(class_dropout_prob=1.0))
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 5, 9])
    null = torch.full_like(y, 10)
    model.train()
    dropped = model(x, t, y)
    model.eval()
    assert torch.allclose(dropped, model(x, t, null))
    assert not torch.allclose(model(x, t, y), dropped)
    assert torch.allclose(model(x, t, y, force_drop=torch.ones(3)), dropped)


def test_guidance_wraps_the_network_from_outside():
    """CFG lives in transport.guidance: the SiT has no guidance path of its own."""
    from sit_atconv.transport import CFGModel

    model = _perturbed(_tiny_sit(learn_sigma=True)).eval()
    assert not hasattr(model, "forward_with_cfg")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, 10))
    assert torch.allclose(CFGModel(model, scale=1.0, num_classes=10)(x, t, y), cond, atol=1e-6)
    guided = CFGModel(model, scale=4.0, num_classes=10)(x, t, y)
    assert torch.allclose(guided, uncond + 4.0 * (cond - uncond), atol=1e-5)
    quirk = CFGModel(model, scale=4.0, num_classes=10, guided_channels=3)(x, t, y)
    assert torch.allclose(quirk[:, :3], guided[:, :3], atol=1e-6) and torch.allclose(quirk[:, 3:], cond[:, 3:],
                                                                                        atol=1e-6)


def test_bad_sit_name():
    with pytest.raises(ValueError, match="SiT-XL/2"):
        create_sit("SiT-XXL/2")
    with pytest.raises(ValueError, match="valid names"):
        create_sit("SiT-B/3")


@pytest.mark.parametrize(("variant", "millions"), [("xxs", 2.85), ("xs", 5.55), ("s", 7.68), ("t1", 13.71),
                                                   ("t2", 27.01), ("t3", 49.18), ("t4", 87.32)])
def test_attnet_parameter_counts(variant, millions):
    with torch.device("meta"):
        model = timm.create_model(f"attnet_{variant}")
    assert _count(model) == millions


@pytest.mark.parametrize("variant", list(ATTNET_VARIANTS))
def test_every_attnet_variant_shapes(variant):
    with torch.device("meta"):
        model = create_attnet(f"attnet_{variant}", num_classes=7)
        out = model(torch.empty(2, 3, 64, 64))
    assert out.shape == (2, 7)
    row = ATTNET_VARIANTS[variant]
    assert [len(s) for s in model.stages] == list(row.depths)
    assert any(n.endswith("layer_scale_1.gamma") for n, _ in model.named_parameters()) == row.layer_scale


def test_attnet_real_forward_backward_and_timm():
    model = timm.create_model("attnet_xxs", num_classes=10)
    assert isinstance(model, sit_atconv.models.AttNet) and "attnet_t4" in timm.list_models("attnet_*")
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.sum().backward()
    assert model.stages[2][0].token_mixer.difference_control.grad is not None
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 240)
    with pytest.raises(ValueError, match="attnet_t2"):
        create_attnet("attnet_t9")

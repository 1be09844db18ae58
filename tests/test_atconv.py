"""The ATConv core against a plain, loop-based implementation of SPEC §1."""

import pytest
import torch
import torch.nn.functional as F

from sit_atconv.layers.atconv import ATConv, dynamic_depthwise_conv, lateral_inhibition, pooling_matrix
from sit_atconv.layers.atconv_reference import _stripe_pool, atconv_reference, depthwise_conv_loop


def _randomise(module: ATConv) -> ATConv:
    """Non-trivial weights everywhere (difference_control starts at 0, biases at 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    return module


def _input(layout, b, c, h, w, dtype=torch.float32):
    return torch.randn(b, c, h, w, dtype=dtype) if layout == "image" else torch.randn(b, h * w, c, dtype=dtype)


@pytest.mark.parametrize("n,bins", [(16, 9), (35, 9), (64, 9), (7, 9), (256, 25), (100, 9)])
def test_pooling_matches_torch_adaptive_pool(n, bins):
    seq = torch.randn(2, 3, n, dtype=torch.float64)
    k = int(bins**0.5)
    expected = F.adaptive_avg_pool1d(seq, bins)
    assert torch.allclose(_stripe_pool(seq, bins), expected, atol=1e-12)
    assert torch.allclose(seq @ pooling_matrix(1, n, k, "sequence", dtype=torch.float64).t(), expected, atol=1e-12)


@pytest.mark.parametrize("h,w", [(5, 7), (8, 8), (3, 3), (16, 16)])
def test_grid_pooling_matches_adaptive_avg_pool2d(h, w):
    x = torch.randn(2, 4, h, w, dtype=torch.float64)
    pooled = x.flatten(2) @ pooling_matrix(h, w, 3, "grid", dtype=torch.float64).t()
    assert torch.allclose(pooled, F.adaptive_avg_pool2d(x, 3).flatten(2), atol=1e-12)


def test_sequence_bins_are_stripes_not_grid():
    assert not torch.allclose(pooling_matrix(6, 6, 3, "sequence"), pooling_matrix(6, 6, 3, "grid"))


@pytest.mark.parametrize("k", [3, 5])
def test_dynamic_depthwise_conv_matches_loop(k):
    values, kernels = torch.randn(3, 5, 6, 7, dtype=torch.float64), torch.randn(3, 5, k, k, dtype=torch.float64)
    assert torch.allclose(dynamic_depthwise_conv(values, kernels), depthwise_conv_loop(values, kernels), atol=1e-12)


def test_loop_conv_is_a_true_per_sample_conv():
    """The oracle itself: sample b, channel c uses only kernel (b, c) — checked against F.conv2d one by one."""
    values, kernels = torch.randn(2, 3, 5, 5, dtype=torch.float64), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    out = depthwise_conv_loop(values, kernels)
    for b in range(2):
        for c in range(3):
            single = F.conv2d(values[b:b + 1, c:c + 1], kernels[b:b + 1, c:c + 1], padding=1)
            assert torch.allclose(out[b, c], single[0, 0], atol=1e-12)


def test_lateral_inhibition_starts_at_half_the_mean():
    kernels = torch.randn(2, 4, 9)
    out = lateral_inhibition(kernels, torch.zeros(4))
    assert torch.allclose(out, kernels - 0.5 * kernels.mean(-1, keepdim=True))


@pytest.mark.parametrize("layout", ["image", "tokens"])
@pytest.mark.parametrize("kernel_pool", ["sequence", "grid"])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_atconv_matches_reference_forward_and_backward(layout, kernel_pool, act):
    torch.manual_seed(1)
    h, w, c = 5, 7, 12
    module = _randomise(ATConv(c, 3, layout=layout, grid_size=(h, w), act=act, kernel_pool=kernel_pool))
    x = _input(layout, 3, c, h, w).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = module(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    ref = atconv_reference(module, x_ref, conv="loop")
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *module.parameters()])

    assert out.shape == x.shape
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads, ref_grads):  # relative to each gradient's scale (fp32 sums of many terms)
        assert (g - g_ref).abs().max() <= 1e-5 * g_ref.abs().max() + 1e-6


def test_atconv_float64_is_exact_to_rounding():
    module = _randomise(ATConv(8, 3, layout="tokens", grid_size=(6, 6), act="gelu_tanh")).double()
    x = _input("tokens", 2, 8, 6, 6, torch.float64)
    assert torch.allclose(module(x), atconv_reference(module, x), atol=1e-12)


def test_reference_is_sensitive_to_each_parameter():
    """A mutated weight must change the output — guards against the oracle ignoring a term."""
    module = _randomise(ATConv(6, 3, layout="image"))
    x = torch.randn(2, 6, 5, 5)
    base = atconv_reference(module, x)
    for name, p in module.named_parameters():
        with torch.no_grad():
            p.add_(0.3)
        assert not torch.allclose(atconv_reference(module, x), base, atol=1e-4), name
        assert not torch.allclose(module(x), base, atol=1e-4), name
        with torch.no_grad():
            p.sub_(0.3)


@pytest.mark.parametrize("kernel_pool", ["sequence", "grid"])
def test_layouts_agree(kernel_pool):
    """Same weights in the image (1x1 conv) and tokens (Linear) layouts give the same map."""
    h, w, c = 6, 5, 10
    image = _randomise(ATConv(c, 3, layout="image", kernel_pool=kernel_pool))
    tokens = ATConv(c, 3, layout="tokens", grid_size=(h, w), kernel_pool=kernel_pool)
    tokens.load_state_dict({k: v.reshape(tokens.state_dict()[k].shape) for k, v in image.state_dict().items()})
    x = torch.randn(2, c, h, w)
    out_image = image(x)
    out_tokens = tokens(x.flatten(2).transpose(1, 2))
    assert torch.allclose(out_tokens.transpose(1, 2).reshape(2, c, h, w), out_image, atol=1e-5)


def test_parameter_names_and_shapes_match_reference():
    image, tokens = ATConv(8, layout="image"), ATConv(8, layout="tokens", grid_size=4)
    expected = {"kernel_proj.weight", "kernel_proj.bias", "kernel_gen.weight", "kernel_gen.bias", "x_proj.weight",
                "x_proj.bias", "proj.weight", "proj.bias", "difference_control"}
    assert set(image.state_dict()) == expected == set(tokens.state_dict())
    assert image.kernel_proj.weight.shape == (8, 8, 1, 1) and tokens.kernel_proj.weight.shape == (8, 8)
    assert image.kernel_gen.weight.shape == (9, 9)
    assert torch.equal(image.difference_control, torch.zeros(8))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="grid_size"):
        ATConv(8, layout="tokens")
    with pytest.raises(ValueError, match="kernel_pool"):
        ATConv(8, kernel_pool="stripes")
    with pytest.raises(ValueError, match="16 tokens"):
        ATConv(8, layout="tokens", grid_size=4)(torch.randn(1, 15, 8))

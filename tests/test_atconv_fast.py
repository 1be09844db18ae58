"""The fast ATConv paths (per-sample custom-backward conv, shift-and-add, compile) against the loop oracle."""

import pytest
import torch
import torch._dynamo

from sit_atconv.layers.atconv import ATConv, pool_features, pooling_matrix
from sit_atconv.layers.atconv_reference import atconv_reference, depthwise_conv_loop
from sit_atconv.layers.depthwise import dynamic_depthwise_conv, resolve_impl
from sit_atconv.models.sit import SiTBlock

IMPLS = ["per_sample", "shift", "grouped", "auto"]


def _randomise(module: ATConv, std: float = 0.5) -> ATConv:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def _input(layout: str, b: int, c: int, h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(b, c, h, w, dtype=dtype) if layout == "image" else torch.randn(b, h * w, c, dtype=dtype)


def _values(b, c, h, w, channels_last: bool, dtype=torch.float64) -> torch.Tensor:
    """(B, C, H, W) values; channels_last=True is the token layout's view of (B, N, C)."""
    if channels_last:
        return torch.randn(b, h, w, c, dtype=dtype).permute(0, 3, 1, 2)
    return torch.randn(b, c, h, w, dtype=dtype)


def _close(out, ref, rel: float = 1e-5) -> bool:
    """fp32 closeness relative to the tensor's scale (sums of many products round at ~1e-7 relative)."""
    return bool((out - ref).abs().max() <= rel * ref.abs().max() + 1e-6)


def _close_grads(grads, ref_grads, rel: float):
    for g, g_ref in zip(grads, ref_grads):
        assert (g - g_ref).abs().max() <= rel * g_ref.abs().max() + 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("channels_last", [True, False])
def test_depthwise_impls_match_loop_forward_and_backward(impl, k, channels_last):
    values = _values(3, 5, 7, 6, channels_last).requires_grad_(True)
    kernels = torch.randn(3, 5, k, k, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 5, 7, 6, dtype=torch.float64)
    out = dynamic_depthwise_conv(values, kernels, impl)
    ref = depthwise_conv_loop(values, kernels)
    assert torch.allclose(out, ref, atol=1e-12)
    grads = torch.autograd.grad(out, [values, kernels], grad)
    ref_grads = torch.autograd.grad(ref, [values, kernels], grad)
    for g, g_ref in zip(grads, ref_grads):
        assert torch.allclose(g, g_ref, atol=1e-11)


@pytest.mark.parametrize("impl", ["per_sample", "shift"])
def test_custom_backward_passes_gradcheck(impl):
    values = _values(2, 3, 5, 4, channels_last=True).requires_grad_(True)
    kernels = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, k: dynamic_depthwise_conv(v, k, impl), (values, kernels))


@pytest.mark.parametrize("impl", ["per_sample", "shift"])
def test_custom_backward_when_only_one_input_needs_grad(impl):
    values, kernels = _values(2, 3, 5, 4, channels_last=True), torch.randn(2, 3, 3, 3, dtype=torch.float64)
    for needs in ([True, False], [False, True]):
        v, k = values.clone().requires_grad_(needs[0]), kernels.clone().requires_grad_(needs[1])
        out = dynamic_depthwise_conv(v, k, impl)
        ref = depthwise_conv_loop(v, k)
        target = v if needs[0] else k
        assert torch.allclose(torch.autograd.grad(out.sum(), target)[0], torch.autograd.grad(ref.sum(), target)[0])


def test_per_sample_keeps_token_layout_without_copies():
    """Token-layout values (a channels-last view) come back channels-last, so (B, N, C) is a free view."""
    values = _values(2, 8, 4, 5, channels_last=True)
    out = dynamic_depthwise_conv(values, torch.randn(2, 8, 3, 3, dtype=torch.float64), "per_sample")
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert out.permute(0, 2, 3, 1).is_contiguous()


@pytest.mark.parametrize("layout", ["image", "tokens"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k,h,w", [(3, 5, 7), (5, 7, 9), (3, 9, 9)])
@pytest.mark.parametrize("kernel_pool", ["sequence", "grid"])
def test_atconv_impls_match_reference_fp32(layout, impl, k, h, w, kernel_pool):
    torch.manual_seed(3)
    c = 12
    module = _randomise(ATConv(c, k, layout=layout, grid_size=(h, w), act="gelu_tanh", kernel_pool=kernel_pool,
                               impl=impl))
    x = _input(layout, 3, c, h, w).requires_grad_(True)
    out = module(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    x_ref = x.detach().clone().requires_grad_(True)
    ref = atconv_reference(module, x_ref, conv="loop")
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *module.parameters()])
    assert out.shape == x.shape
    assert _close(out, ref)
    _close_grads(grads, ref_grads, 1e-5)


@pytest.mark.parametrize("layout", ["image", "tokens"])
@pytest.mark.parametrize("impl", ["per_sample", "shift", "grouped"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_atconv_under_cpu_autocast_is_close_to_fp32(layout, impl, dtype):
    torch.manual_seed(4)
    h, w, c = 7, 5, 16
    module = _randomise(ATConv(c, 3, layout=layout, grid_size=(h, w), act="gelu_tanh", impl=impl), std=0.2)
    x = _input(layout, 2, c, h, w).requires_grad_(True)
    with torch.autocast("cpu", dtype=dtype):
        out = module(x)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out.float().square().sum(), [x, *module.parameters()])
    x_ref = x.detach().clone().requires_grad_(True)
    ref = atconv_reference(module, x_ref, conv="loop")
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *module.parameters()])
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3  # a few ulps of each format, relative to the scale
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()
    for g, g_ref in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        assert (g.float() - g_ref).abs().max() <= 4 * tol * g_ref.abs().max() + 1e-4


@pytest.mark.parametrize("layout", ["image", "tokens"])
@pytest.mark.parametrize("kernel_pool", ["sequence", "grid"])
def test_pool_features_matches_pooling_matrix(layout, kernel_pool):
    h, w, c = 7, 9, 5
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    if layout == "tokens":
        x = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    expected = x.flatten(2) @ pooling_matrix(h, w, 3, kernel_pool, dtype=torch.float64).t()
    assert torch.allclose(pool_features(x, 3, kernel_pool), expected, atol=1e-12)


def test_bad_impl_and_even_kernel_raise():
    with pytest.raises(ValueError, match="impl"):
        ATConv(8, impl="fft")
    with pytest.raises(ValueError, match="odd"):
        ATConv(8, 4)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("layout", ["image", "tokens"])
def test_atconv_compiles_fullgraph_and_matches_eager(backend, layout):
    torch._dynamo.reset()
    h, w, c = 5, 7, 8
    module = _randomise(ATConv(c, 3, layout=layout, grid_size=(h, w), act="gelu_tanh"))
    x = _input(layout, 2, c, h, w).requires_grad_(True)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *module.parameters()])
    x_ref = x.detach().clone().requires_grad_(True)
    ref = module(x_ref)  # eager ("auto" -> per_sample); compiled traces the shift path
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *module.parameters()])
    assert _close(out, ref)
    _close_grads(grads, ref_grads, 1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("impl", ["auto", "per_sample"])
def test_sit_atconv_block_compiles_fullgraph_without_breaks(backend, impl):
    torch._dynamo.reset()
    block = SiTBlock(16, 2, "atconv", (5, 5))
    block.attn.impl = impl
    with torch.no_grad():
        for p in block.adaLN_modulation.parameters():  # non-zero gates so the mixer's output matters
            p.normal_(0, 0.1)
    x, c = torch.randn(3, 25, 16, requires_grad=True), torch.randn(3, 16)
    explanation = torch._dynamo.explain(block)(x, c)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    out = compiled(x, c)
    grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    x_ref = x.detach().clone().requires_grad_(True)
    ref = block(x_ref, c)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *block.parameters()])
    assert _close(out, ref)
    _close_grads(grads, ref_grads, 1e-5)


def test_pooling_matrix_traces_under_fullgraph_compile():
    torch._dynamo.reset()

    def pooled(x):
        return x.flatten(2) @ pooling_matrix(x.shape[-2], x.shape[-1], 3, "grid", x.device, x.dtype).t()

    x = torch.randn(2, 3, 5, 7)
    compiled = torch.compile(pooled, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(x), pooled(x))


def test_auto_impl_choice():
    """Eager: per-sample loop, grouped conv on tiny maps; compiling token layout: shift-and-add."""
    tokens, image = _values(1, 256, 5, 5, channels_last=True), _values(1, 256, 5, 5, channels_last=False)
    assert resolve_impl("auto", tokens) == "per_sample" and resolve_impl("auto", image) == "grouped"
    assert resolve_impl("auto", _values(1, 256, 4, 4, channels_last=True)) == "grouped"
    assert resolve_impl("auto", _values(1, 64, 8, 8, channels_last=True)) == "grouped"  # <= 4096 values
    assert resolve_impl("auto", _values(1, 65, 8, 8, channels_last=True)) == "per_sample"
    assert resolve_impl("auto", _values(1, 32, 16, 16, channels_last=False)) == "per_sample"
    torch._dynamo.reset()

    def picks_shift(v):
        return v.new_tensor(float(resolve_impl("auto", v) == "shift"))

    compiled = torch.compile(picks_shift, backend="eager", fullgraph=True)
    assert compiled(tokens).item() == 1.0 and compiled(image).item() == 0.0


def test_auto_impl_on_a_gpu_is_the_one_launch_grouped_conv():
    class OnGpu:  # the attributes resolve_impl reads, on a device this machine lacks
        def __init__(self, t):
            self.t, self.shape, self.device = t, t.shape, torch.device("cuda")

        def is_contiguous(self, memory_format=torch.contiguous_format):
            return self.t.is_contiguous(memory_format=memory_format)

    for channels_last in (True, False):
        assert resolve_impl("auto", OnGpu(_values(8, 256, 16, 16, channels_last))) == "grouped"
    assert resolve_impl("per_sample", OnGpu(_values(8, 256, 16, 16, True))) == "per_sample"


@pytest.mark.parametrize("kernel_pool", ["sequence", "grid"])
@pytest.mark.parametrize("bias,batch", [(True, 2), (False, 2), (True, 1)])
def test_fused_pool_and_project_passes_gradcheck(kernel_pool, bias, batch):
    from sit_atconv.layers.atconv import _PoolAndProject
    torch.manual_seed(8)
    h, w, c = 5, 7, 4
    x = torch.randn(batch, h * w, c, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = (x, weight, b) if bias else (x, weight)

    def fn(x, weight, b=None):
        return _PoolAndProject.apply(x, weight, b, (h, w), 3, kernel_pool)

    assert torch.autograd.gradcheck(fn, inputs)


def test_fused_pool_and_project_partial_grads_and_strided_input():
    """Only x (frozen weights) or only the weights (input without grad); a non-contiguous token tensor."""
    torch.manual_seed(9)
    module = _randomise(ATConv(6, 3, layout="tokens", grid_size=(4, 5), act="gelu_tanh"))
    base = torch.randn(20, 2, 6, dtype=torch.float64)
    module.double()
    for freeze in (True, False):
        for p in module.parameters():
            p.requires_grad_(not freeze)
        x = base.transpose(0, 1).requires_grad_(freeze)                 # (2, 20, 6), not contiguous
        x_ref = x.detach().contiguous().requires_grad_(freeze)
        wanted = [x] if freeze else list(module.parameters())
        wanted_ref = [x_ref] if freeze else list(module.parameters())
        grads = torch.autograd.grad(module(x).square().sum(), wanted)
        ref_grads = torch.autograd.grad(atconv_reference(module, x_ref, conv="loop").square().sum(), wanted_ref)
        for g, g_ref in zip(grads, ref_grads):
            assert torch.allclose(g, g_ref, atol=1e-10)

"""Per-sample depthwise convolution, SPEC §1.3: three interchangeable implementations.

Every function maps values (B, C, H, W) — any memory format — and kernels (B, C, k, k) to
(B, C, H, W): ``out[b, c] = values[b, c] (*) kernels[b, c]`` (cross-correlation, zero padding k//2).

* ``grouped``: the reference's one grouped ``F.conv2d`` over a (1, B*C, H, W) view. Needs an
  NCHW-contiguous input (a copy for token-layout values) and autograd's grouped-conv backward.
* ``per_sample``: a custom ``autograd.Function``. Forward runs one depthwise conv per sample in the
  input's own memory format, so token-layout values (a channels-last view of (B, N, C)) are never
  copied; each sample's result goes straight into one output buffer (no list and concatenation).
  Backward gets grad-input (a conv with flipped kernels) and grad-kernels (a per-sample correlation)
  from one ``convolution_backward`` call per sample, again in place of the slow grouped-conv weight
  backward and of autograd's per-slice gradient scatter.
* ``shift``: k*k shifted multiply-adds on a channels-last (B, H, W, C) view, with a custom backward
  of the same form (grad-input: the taps reversed; grad-taps: k*k reductions). Slow in eager (k*k
  passes), but under ``torch.compile`` each direction fuses into one loop over the tokens.

``auto`` (the default, see `resolve_impl`) picks ``shift`` while torch.compile traces token-layout
values, ``grouped`` for tiny maps and in eager mode on GPUs (a per-sample loop there would launch
B kernels per direction), and ``per_sample`` otherwise. On 2 CPU cores ``shift`` and
``per_sample`` tie under inductor; on 16x16 token grids the grouped conv is 3-4x slower.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DepthwiseImpl = Literal["auto", "per_sample", "grouped", "shift"]
IMPLS: tuple[str, ...] = ("auto", "per_sample", "grouped", "shift")


def depthwise_conv_grouped(values: Tensor, kernels: Tensor) -> Tensor:
    """SPEC §1.3 as the reference code does it: one grouped conv, groups = B*C (NCHW output)."""
    b, c, h, w = values.shape
    k = kernels.shape[-1]
    out = F.conv2d(values.reshape(1, b * c, h, w), kernels.reshape(b * c, 1, k, k).to(values.dtype),
                   padding=k // 2, groups=b * c)
    return out.view(b, c, h, w)


def _shift_conv_hwc(values: Tensor, taps: Tensor) -> Tensor:
    """Zero-padded 'same' correlation as k*k shifted multiply-adds. values (B, H, W, C), taps (B, k*k, C)."""
    b, h, w, c = values.shape
    k = int(round(taps.shape[1] ** 0.5))
    r = k // 2
    padded = F.pad(values, (0, 0, r, r, r, r))
    out = padded[:, :h, :w] * taps[:, 0, None, None]
    for t in range(1, k * k):
        u, v = divmod(t, k)
        out = out + padded[:, u:u + h, v:v + w] * taps[:, t, None, None]
    return out


def _shift_kernel_grad_hwc(grad_out: Tensor, values: Tensor, k: int) -> Tensor:
    """d out / d taps: per-sample, per-channel correlation of grad_out with shifted inputs -> (B, k*k, C)."""
    h, w = values.shape[1:3]
    r = k // 2
    padded = F.pad(values, (0, 0, r, r, r, r))
    return torch.stack([(grad_out * padded[:, u:u + h, v:v + w]).sum((1, 2)) for u in range(k) for v in range(k)], 1)


class _ShiftDepthwiseConv(torch.autograd.Function):
    """Shift-and-add depthwise conv on a channels-last (B, H, W, C) view with a shift-and-add backward.

    grad-values is the same correlation with the taps reversed; grad-taps are k*k reductions.
    Under torch.compile each direction fuses into one or two loops over the tokens.
    """

    @staticmethod
    def forward(ctx, values: Tensor, taps: Tensor) -> Tensor:
        ctx.save_for_backward(values, taps)
        return _shift_conv_hwc(values, taps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        values, taps = ctx.saved_tensors
        grad_values = _shift_conv_hwc(grad_out, taps.flip(1)) if ctx.needs_input_grad[0] else None
        k = int(round(taps.shape[1] ** 0.5))
        grad_taps = _shift_kernel_grad_hwc(grad_out, values, k) if ctx.needs_input_grad[1] else None
        return grad_values, grad_taps


def depthwise_conv_shift(values: Tensor, kernels: Tensor) -> Tensor:
    """SPEC §1.3 as k*k shifted multiply-adds on a channels-last view (fuses under torch.compile)."""
    taps = kernels.to(values.dtype).flatten(2).transpose(1, 2)              # (B, k*k, C); a view of tap-major kernels
    out = _ShiftDepthwiseConv.apply(values.permute(0, 2, 3, 1), taps)
    return out.permute(0, 3, 1, 2)


def _memory_format(t: Tensor) -> torch.memory_format:
    """channels_last for a (B, N, C) token view seen as (B, C, H, W); contiguous otherwise."""
    if t.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _conv_args(kernel_size: int, channels: int) -> tuple:
    """Positional args of aten.convolution_backward after (grad, input, weight): bias, stride, pad, ..."""
    r = kernel_size // 2
    return None, [1, 1], [r, r], [1, 1], False, [0, 0], channels


class _PerSampleDepthwiseConv(torch.autograd.Function):
    """Per-sample depthwise conv with an explicit backward (one conv / conv-backward per sample)."""

    @staticmethod
    def forward(ctx, values: Tensor, kernels: Tensor) -> Tensor:
        fmt = _memory_format(values)
        values = values.contiguous(memory_format=fmt)
        weights = kernels.to(values.dtype).contiguous().unsqueeze(2)        # (B, C, 1, k, k)
        ctx.save_for_backward(values, weights)
        ctx.kernels_dtype, ctx.fmt = kernels.dtype, fmt
        c, k = values.shape[1], kernels.shape[-1]
        out = torch.empty_like(values)                                      # same memory format
        for i in range(values.shape[0]):                                    # one live temporary at a time
            out[i:i + 1] = F.conv2d(values[i:i + 1], weights[i], padding=k // 2, groups=c)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        values, weights = ctx.saved_tensors
        grad_out = grad_out.to(values.dtype).contiguous(memory_format=ctx.fmt)
        c, k = values.shape[1], weights.shape[-1]
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        grad_values = torch.empty_like(values) if mask[0] else None
        grad_weights = torch.empty_like(weights) if mask[1] else None
        for i in range(values.shape[0]):
            grad_x, grad_w, _ = torch.ops.aten.convolution_backward(grad_out[i:i + 1], values[i:i + 1], weights[i],
                                                                    *_conv_args(k, c), mask)
            if mask[0]:
                grad_values[i:i + 1] = grad_x
            if mask[1]:
                grad_weights[i] = grad_w
        grad_kernels = grad_weights.squeeze(2).to(ctx.kernels_dtype) if mask[1] else None
        return grad_values, grad_kernels


def depthwise_conv_per_sample(values: Tensor, kernels: Tensor) -> Tensor:
    """SPEC §1.3 as one depthwise conv per sample in the input's memory format, custom backward."""
    return _PerSampleDepthwiseConv.apply(values, kernels)


# Largest H*W at which 'auto' prefers the one grouped conv to the per-sample loop in eager mode
# (measured on CPU, fp32: per-call overhead of the loop wins over its faster conv on tiny maps).
_GROUPED_MAX_POSITIONS = {torch.channels_last: 16, torch.contiguous_format: 196}
# ... and at which C*H*W per sample (the digits default, 8x8 tokens x 64 channels at batch 128: grouped
# is ~15% faster per training step there).
_GROUPED_MAX_ELEMENTS = 4096


def resolve_impl(impl: str, values: Tensor) -> str:
    """Resolve 'auto': 'shift' while torch.compile traces token-layout (channels-last) values — it fuses
    into C-contiguous loops there; in eager mode on accelerators 'grouped' (one kernel launch instead
    of B; a design choice not yet timed on a GPU); on CPU 'grouped' for tiny maps (a 4x4 token grid,
    NCHW maps up to 14x14, or at most 4096 values per sample) and 'per_sample' otherwise, the fastest
    eager CPU path."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; use one of {IMPLS}.")
    if impl != "auto":
        return impl
    fmt = _memory_format(values)
    if torch.compiler.is_compiling() and fmt == torch.channels_last:
        return "shift"
    if values.device.type not in ("cpu", "meta"):
        return "grouped"
    c, h, w = values.shape[1:]
    tiny = h * w <= _GROUPED_MAX_POSITIONS[fmt] or c * h * w <= _GROUPED_MAX_ELEMENTS
    return "grouped" if tiny else "per_sample"


def dynamic_depthwise_conv(values: Tensor, kernels: Tensor, impl: DepthwiseImpl = "auto") -> Tensor:
    """SPEC §1.3: convolve each sample's each channel with its own k x k kernel (zero padding k//2).

    values: (B, C, H, W) in any memory format; kernels: (B, C, k, k). Output: (B, C, H, W) —
    channels-last strided when values are (``per_sample``, ``shift`` in eager follows the input).
    """
    if kernels.shape[-1] % 2 == 0:
        raise ValueError(f"kernel_size={kernels.shape[-1]} must be odd ('same' zero padding k//2).")
    impl = resolve_impl(impl, values)
    if impl == "grouped":
        return depthwise_conv_grouped(values, kernels)
    if impl == "shift":
        return depthwise_conv_shift(values, kernels)
    return depthwise_conv_per_sample(values, kernels)

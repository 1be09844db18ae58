"""Attentive Convolution (ATConv), SPEC §1: one functional core, two layouts.

The core is pure functions — `pool_features` (with `pooling_matrix`, its matrix form),
`generate_kernels`, `lateral_inhibition`, `dynamic_depthwise_conv` (in `depthwise.py`) — shared by
the `ATConv` module in its two layouts:

* ``layout="image"``  (B, C, H, W), 1x1 Conv2d projections (AttNet);
* ``layout="tokens"`` (B, N, C) on an H x W raster grid, Linear projections (SiT). The token
  tensor is used as a channels-last (B, C, H, W) view throughout: no layout copies.

Kernel generation pools *before* `kernel_proj`. Pooling averages positions and `kernel_proj`
mixes channels, and every bin's weights sum to one, so ``pool(kernel_proj(x)) ==
kernel_proj(pool(x))`` exactly (bias included): same parameters and outputs as the paper's
order, with the N x C x C product replaced by a k^2 x C x C one. What remains per token is the
two C x C products of x_proj and proj plus k^2 multiply-adds per channel.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .depthwise import IMPLS, DepthwiseImpl, dynamic_depthwise_conv

Layout = Literal["image", "tokens"]
KernelPool = Literal["sequence", "grid"]
KernelAct = Literal["gelu", "gelu_tanh", "silu"]
KERNEL_ACTS: tuple[str, ...] = ("gelu", "gelu_tanh", "silu")  # AttNet; SiT fork and ours; REPA fork
_GELU_APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh"}


def kernel_activation(x: Tensor, act: str) -> Tensor:
    """The nonlinearity on pooled kernel features: exact GELU, tanh-approximate GELU, or SiLU."""
    if act == "silu":
        return F.silu(x)
    if act not in _GELU_APPROXIMATE:
        raise ValueError(f"kernel activation {act!r} is not supported; use one of {KERNEL_ACTS}.")
    return F.gelu(x, approximate=_GELU_APPROXIMATE[act])


def _adaptive_bins(length: int, bins: int, device: torch.device | None) -> tuple[Tensor, Tensor]:
    """(bins, length) membership mask and per-bin sizes: bin i covers [floor(i*L/bins), ceil((i+1)*L/bins)),
    exactly as torch's adaptive pooling."""
    i = torch.arange(bins, device=device)
    lo, hi = (i * length) // bins, -((-(i + 1) * length) // bins)
    pos = torch.arange(length, device=device)
    return (pos >= lo[:, None]) & (pos < hi[:, None]), hi - lo


def _build_pooling_matrix(height: int, width: int, kernel_size: int, mode: str,
                          device: torch.device | None, dtype: torch.dtype | None) -> Tensor:
    """Torch ops only (no Python loops over bins), so torch.compile(fullgraph=True) traces it."""
    k, k2 = kernel_size, kernel_size * kernel_size
    build = torch.float64 if dtype == torch.float64 else torch.float32
    if mode == "sequence":
        mask, count = _adaptive_bins(height * width, k2, device)
        pool = mask.to(build) / count[:, None].to(build)
    elif mode == "grid":
        (rows, nrows), (cols, ncols) = _adaptive_bins(height, k, device), _adaptive_bins(width, k, device)
        mask = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(k2, height * width)
        pool = mask.to(build) / (nrows[:, None] * ncols[None, :]).reshape(k2, 1).to(build)
    else:
        raise ValueError(f"kernel_pool={mode!r} is not supported; use 'sequence' (paper) or 'grid'.")
    return pool.to(dtype=dtype or torch.get_default_dtype())


_cached_pooling_matrix = functools.lru_cache(maxsize=64)(_build_pooling_matrix)


def pooling_matrix(height: int, width: int, kernel_size: int, mode: KernelPool = "sequence",
                   device=None, dtype=None) -> Tensor:
    """(k^2, H*W) averaging matrix: 'sequence' = AdaptiveAvgPool1d(k^2) over the raster order
    (horizontal stripes, the paper's behaviour), 'grid' = adaptive pooling to a k x k grid.

    The matrix form of `pool_features` (which the module runs). Cached in eager mode; rebuilt from
    shapes with torch ops while torch.compile traces, so it never breaks a fullgraph compile.
    """
    device = torch.device(device) if device is not None else None
    if torch.compiler.is_compiling():
        return _build_pooling_matrix(height, width, kernel_size, mode, device, dtype)
    return _cached_pooling_matrix(height, width, kernel_size, mode, device, dtype)


def pool_features(features: Tensor, kernel_size: int, mode: KernelPool = "sequence") -> Tensor:
    """SPEC §1.1 pooling: (B, C, H, W), any memory format -> (B, C, k^2), via adaptive average pooling.

    'sequence' pools the raster sequence into k^2 stripes (AdaptiveAvgPool1d(k^2), the paper);
    'grid' pools to a k x k grid. Equals ``features.flatten(2) @ pooling_matrix(...).t()``, but runs
    as one pass in the input's memory format (token-layout features stay channels-last).
    """
    if mode == "sequence":
        pooled = F.adaptive_avg_pool2d(features.flatten(2).unsqueeze(2), (1, kernel_size * kernel_size))
    elif mode == "grid":
        pooled = F.adaptive_avg_pool2d(features, kernel_size)
    else:
        raise ValueError(f"kernel_pool={mode!r} is not supported; use 'sequence' (paper) or 'grid'.")
    return pooled.flatten(2)


def generate_kernels(pooled: Tensor, gen_weight: Tensor, gen_bias: Tensor | None, act: str,
                     tap_dim: int = -1) -> Tensor:
    """Adaptive routing, SPEC §1.1: act(pooled projection) -> shared Linear(k^2, k^2) over the taps.

    `act` names the nonlinearity (`KERNEL_ACTS`). Taps along `tap_dim`: -1 for (B, C, k^2); 1 for
    (B, k^2, C), the token layout's own order.
    """
    act = kernel_activation(pooled, act)
    if tap_dim in (-1, act.dim() - 1):
        return F.linear(act, gen_weight, gen_bias)
    out = torch.matmul(gen_weight.to(act.dtype), act)                     # (k^2, k^2) @ (B, k^2, C)
    return out if gen_bias is None else out + gen_bias.to(out.dtype)[:, None]


def lateral_inhibition(kernels: Tensor, difference_control: Tensor, tap_dim: int = -1) -> Tensor:
    """SPEC §1.2: K - sigmoid(difference_control)[c] * mean_taps(K). kernels: (B, C, k^2) or, with
    tap_dim=1, (B, k^2, C)."""
    factor = torch.sigmoid(difference_control).to(kernels.dtype)
    if tap_dim in (-1, kernels.dim() - 1):
        factor = factor[:, None]
    return kernels - factor * kernels.mean(dim=tap_dim, keepdim=True)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would run a linear layer in (x's own dtype outside autocast, or on devices
    without autocast, such as meta)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _autocast_off(device_type: str):
    """A context with autocast disabled (a no-op where the device has no autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _PoolAndProject(torch.autograd.Function):
    """Token layout: ``(pool_features(x), x_proj(x))`` with one fused input gradient.

    Both consumers of x send it a gradient; autograd would materialise the pooling backward
    (a zero fill plus a scatter), the x_proj input-gradient, and their sum: three passes over a
    (B, N, C) tensor. Here the pooled gradient is spread with one small product (P^T @ g, which
    writes grad_x once) and x_proj's input-gradient GEMM accumulates into it in place (beta = 1).
    Weight and bias gradients are the usual linear ones. Runs in the autocast dtype, if any.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, grid_size: tuple[int, int],
                kernel_size: int, mode: str) -> tuple[Tensor, Tensor]:
        dtype = _compute_dtype(x)
        with _autocast_off(x.device.type):
            xc, wc = x.to(dtype), weight.to(dtype)
            b, n, c = xc.shape
            h, w = grid_size
            grid = xc.reshape(b, h, w, c).permute(0, 3, 1, 2)              # channels-last view
            pooled = pool_features(grid, kernel_size, mode).transpose(1, 2)  # (B, k^2, C)
            values = F.linear(xc, wc, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, wc)
        ctx.geometry = (h, w, kernel_size, mode)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return pooled, values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_pooled: Tensor | None, grad_values: Tensor | None):
        xc, wc = ctx.saved_tensors
        b, n, c = xc.shape
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_values = torch.zeros_like(xc) if grad_values is None else grad_values.to(xc.dtype)
        rows = grad_values.reshape(b * n, c)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if grad_pooled is None:
                grad_x = (rows @ wc).view(b, n, c)
            else:
                pool = pooling_matrix(*ctx.geometry, device=xc.device, dtype=xc.dtype)   # (k^2, N)
                spread = pool.t().expand(b, n, pool.shape[0])                        # (B, N, k^2), no copy
                grad_x = torch.bmm(spread, grad_pooled.to(xc.dtype))                 # (B, N, C), one write
                grad_x.view(b * n, c).addmm_(rows, wc)
            grad_x = grad_x.to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (rows.t() @ xc.reshape(b * n, c)).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None, None


class ATConv(nn.Module):
    """ATConv token mixer (SPEC §1) with the reference's parameter names.

    Args:
        dim: channels C.
        kernel_size: k (3 in the paper).
        layout: "image" (B, C, H, W; 1x1 Conv2d projections) or "tokens" (B, N, C; Linear).
        grid_size: (H, W) of the token grid — required for the tokens layout; `forward(x, grid_size)` runs
            the same module on another grid.
        act: the nonlinearity on the pooled kernels: "gelu" (exact, AttNet), "gelu_tanh" (SiT fork and
            ours) or "silu" (the REPA fork's SiT).
        kernel_pool: "sequence" (paper: raster stripes) or "grid" (k x k spatial cells).
        impl: depthwise-conv implementation (`depthwise.py`): "auto" (per-sample custom-backward conv
            in eager on CPU, grouped conv on tiny maps and in eager on GPUs, fused shift-and-add while
            torch.compile traces the tokens layout), "per_sample", "shift", or "grouped" (the
            reference's grouped conv).
            A plain attribute: switch it at any time; every choice computes the same function.

    The tokens layout applies x_proj through its parameters (`_PoolAndProject`, for the fused input
    gradient), so forward hooks registered on ``x_proj`` itself do not run.
    """

    def __init__(self, dim: int, kernel_size: int = 3, layout: Layout = "image",
                 grid_size: tuple[int, int] | int | None = None, act: str = "gelu",
                 kernel_pool: KernelPool = "sequence", bias: bool = True, impl: DepthwiseImpl = "auto"):
        super().__init__()
        if layout not in ("image", "tokens"):
            raise ValueError(f"layout={layout!r} is not supported; use 'image' or 'tokens'.")
        if act not in KERNEL_ACTS:
            raise ValueError(f"act={act!r} is not supported; use one of {KERNEL_ACTS}.")
        if kernel_pool not in ("sequence", "grid"):
            raise ValueError(f"kernel_pool={kernel_pool!r} is not supported; use 'sequence' or 'grid'.")
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not supported; use one of {IMPLS}.")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd (zero padding k//2 keeps the size).")
        if layout == "tokens" and grid_size is None:
            raise ValueError("ATConv(layout='tokens') needs grid_size=(H, W) of the token grid.")
        self.dim, self.kernel_size, self.layout, self.kernel_pool = dim, kernel_size, layout, kernel_pool
        self.impl = impl
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        self.act = act
        self.approximate = _GELU_APPROXIMATE.get(act)  # GELU variants only (paper-order oracles read it)
        k2 = kernel_size * kernel_size

        def projection() -> nn.Module:
            return nn.Linear(dim, dim, bias=bias) if layout == "tokens" else nn.Conv2d(dim, dim, 1, bias=bias)

        self.kernel_proj = projection()
        self.kernel_gen = nn.Linear(k2, k2, bias=bias)
        self.x_proj = projection()
        self.proj = projection()
        self.difference_control = nn.Parameter(torch.zeros(dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, layout={self.layout}, act={self.act}, " \
               f"kernel_pool={self.kernel_pool}, grid_size={self.grid_size}, impl={self.impl}"

    def _kernels(self, pooled: Tensor, tap_dim: int) -> Tensor:
        """Projected, pooled features (taps along tap_dim) -> inhibited kernels, a (B, C, k, k) view."""
        kernels = generate_kernels(pooled, self.kernel_gen.weight, self.kernel_gen.bias, self.act, tap_dim)
        kernels = lateral_inhibition(kernels, self.difference_control, tap_dim)
        return kernels.movedim(tap_dim, -1).unflatten(-1, (self.kernel_size, self.kernel_size))

    def forward(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """x: (B, C, H, W) or, tokens layout, (B, N, C) on `grid_size` (default: the grid built for).

        No parameter depends on the grid, so one module runs on any token grid (resolution transfer).
        """
        if self.layout == "tokens":
            return self._forward_tokens(x, grid_size)
        return self._forward_image(self._image_input(x, grid_size))

    @torch.no_grad()
    def kernels(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """The per-sample depthwise kernels `forward(x, grid_size)` convolves with, (B, C, k, k): pooled,
        projected, generated and inhibited by the same functions as the forward (for pictures and tests)."""
        if self.layout == "image":
            return self._image_kernels(self._image_input(x, grid_size))
        h, w = self._token_grid(x, grid_size)
        grid = x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)
        pooled = pool_features(grid, self.kernel_size, self.kernel_pool).transpose(1, 2)   # (B, k^2, C)
        return self._kernels(self.kernel_proj(pooled), tap_dim=1)

    @staticmethod
    def _image_input(x: Tensor, grid_size: tuple[int, int] | None) -> Tensor:
        if grid_size is not None:
            raise ValueError("grid_size applies to the tokens layout; (B, C, H, W) inputs carry their own grid.")
        return x

    def _image_kernels(self, x: Tensor) -> Tensor:
        pooled = pool_features(x, self.kernel_size, self.kernel_pool)        # pool first: (B, C, k^2)
        pooled = F.conv1d(pooled, self.kernel_proj.weight.flatten(2), self.kernel_proj.bias)
        return self._kernels(pooled, tap_dim=-1)

    def _forward_image(self, x: Tensor) -> Tensor:
        values = self.x_proj(x)
        return self.proj(dynamic_depthwise_conv(values, self._image_kernels(x), self.impl))

    def _token_grid(self, x: Tensor, grid_size: tuple[int, int] | None) -> tuple[int, int]:
        """(H, W) of a (B, N, C) token tensor: `grid_size`, else the grid the module was built for."""
        h, w = self.grid_size if grid_size is None else grid_size
        if x.shape[1] != h * w:
            raise ValueError(f"ATConv expected {h}x{w}={h * w} tokens, got {x.shape[1]}; pass the token grid "
                             "as grid_size.")
        return h, w

    def _forward_tokens(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        b, n, c = x.shape
        h, w = self._token_grid(x, grid_size)
        # pool first, and x_proj, with one fused input gradient (also under torch.compile, which keeps
        # the GEMMs as library calls and so could not fuse the gradient sum itself)
        pooled, values = _PoolAndProject.apply(x, self.x_proj.weight, self.x_proj.bias, (h, w),
                                               self.kernel_size, self.kernel_pool)
        kernels = self._kernels(self.kernel_proj(pooled), tap_dim=1)         # tap-major (B, k^2, C) inside
        values = values.view(b, h, w, c).permute(0, 3, 1, 2)
        out = dynamic_depthwise_conv(values, kernels, self.impl)
        return self.proj(out.permute(0, 2, 3, 1).reshape(b, n, c))          # a view unless the conv was grouped

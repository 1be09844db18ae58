"""Attentive Convolution (ATConv), SPEC §1: one functional core, two layouts.

The core is four pure functions — `pooling_matrix`, `generate_kernels`, `lateral_inhibition`,
`dynamic_depthwise_conv` — shared by the `ATConv` module in its two layouts:

* ``layout="image"``  (B, C, H, W), 1x1 Conv2d projections (AttNet);
* ``layout="tokens"`` (B, N, C) on an H x W raster grid, Linear projections (SiT).

Kernel generation pools *before* `kernel_proj`. Pooling averages positions and `kernel_proj`
mixes channels, and every bin's weights sum to one, so ``pool(kernel_proj(x)) ==
kernel_proj(pool(x))`` exactly (bias included): same parameters and outputs as the paper's
order, with the N x C x C product replaced by a k^2 x C x C one.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Layout = Literal["image", "tokens"]
KernelPool = Literal["sequence", "grid"]
_ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


def _adaptive_bins(length: int, bins: int) -> list[tuple[int, int]]:
    """Bin i covers [floor(i*L/bins), ceil((i+1)*L/bins)), exactly as torch's adaptive pooling."""
    return [((i * length) // bins, -((-(i + 1) * length) // bins)) for i in range(bins)]


@functools.lru_cache(maxsize=64)
def _pooling_matrix_cpu(height: int, width: int, kernel_size: int, mode: str) -> Tensor:
    k2 = kernel_size * kernel_size
    n = height * width
    pool = torch.zeros(k2, n, dtype=torch.float64, device="cpu")
    if mode == "sequence":
        for i, (lo, hi) in enumerate(_adaptive_bins(n, k2)):
            pool[i, lo:hi] = 1.0 / (hi - lo)
    elif mode == "grid":
        index = torch.arange(n, device="cpu").view(height, width)
        rows, cols = _adaptive_bins(height, kernel_size), _adaptive_bins(width, kernel_size)
        for i, (r0, r1) in enumerate(rows):
            for j, (c0, c1) in enumerate(cols):
                cells = index[r0:r1, c0:c1].reshape(-1)
                pool[i * kernel_size + j, cells] = 1.0 / cells.numel()
    else:
        raise ValueError(f"kernel_pool={mode!r} is not supported; use 'sequence' (paper) or 'grid'.")
    return pool


def pooling_matrix(height: int, width: int, kernel_size: int, mode: KernelPool = "sequence",
                   device=None, dtype=None) -> Tensor:
    """(k^2, H*W) averaging matrix: 'sequence' = AdaptiveAvgPool1d(k^2) over the raster order
    (horizontal stripes, the paper's behaviour), 'grid' = adaptive pooling to a k x k grid."""
    return _pooling_matrix_cpu(height, width, kernel_size, mode).to(device=device, dtype=dtype)


def generate_kernels(pooled: Tensor, gen_weight: Tensor, gen_bias: Tensor | None, approximate: str) -> Tensor:
    """Adaptive routing, SPEC §1.1: act(pooled projection) -> shared Linear(k^2, k^2). (B, C, k^2)."""
    return F.linear(F.gelu(pooled, approximate=approximate), gen_weight, gen_bias)


def lateral_inhibition(kernels: Tensor, difference_control: Tensor) -> Tensor:
    """SPEC §1.2: K - sigmoid(difference_control)[c] * mean_taps(K). kernels: (B, C, k^2)."""
    factor = torch.sigmoid(difference_control).to(kernels.dtype)[:, None]
    return kernels - factor * kernels.mean(dim=-1, keepdim=True)


def dynamic_depthwise_conv(values: Tensor, kernels: Tensor) -> Tensor:
    """SPEC §1.3: convolve each sample's each channel with its own k x k kernel (zero padding k//2).

    values: (B, C, H, W); kernels: (B, C, k, k). One grouped conv over a (1, B*C, H, W) view.
    """
    b, c, h, w = values.shape
    k = kernels.shape[-1]
    out = F.conv2d(values.reshape(1, b * c, h, w), kernels.reshape(b * c, 1, k, k).to(values.dtype),
                   padding=k // 2, groups=b * c)
    return out.view(b, c, h, w)


class ATConv(nn.Module):
    """ATConv token mixer (SPEC §1) with the reference's parameter names.

    Args:
        dim: channels C.
        kernel_size: k (3 in the paper).
        layout: "image" (B, C, H, W; 1x1 Conv2d projections) or "tokens" (B, N, C; Linear).
        grid_size: (H, W) of the token grid — required for the tokens layout.
        act: "gelu" (exact, AttNet) or "gelu_tanh" (SiT) applied to the pooled kernels.
        kernel_pool: "sequence" (paper: raster stripes) or "grid" (k x k spatial cells).
    """

    def __init__(self, dim: int, kernel_size: int = 3, layout: Layout = "image",
                 grid_size: tuple[int, int] | int | None = None, act: str = "gelu",
                 kernel_pool: KernelPool = "sequence", bias: bool = True):
        super().__init__()
        if layout not in ("image", "tokens"):
            raise ValueError(f"layout={layout!r} is not supported; use 'image' or 'tokens'.")
        if act not in _ACTIVATIONS:
            raise ValueError(f"act={act!r} is not supported; use one of {sorted(_ACTIVATIONS)}.")
        if kernel_pool not in ("sequence", "grid"):
            raise ValueError(f"kernel_pool={kernel_pool!r} is not supported; use 'sequence' or 'grid'.")
        if layout == "tokens" and grid_size is None:
            raise ValueError("ATConv(layout='tokens') needs grid_size=(H, W) of the token grid.")
        self.dim, self.kernel_size, self.layout, self.kernel_pool = dim, kernel_size, layout, kernel_pool
        self.grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        self.approximate = _ACTIVATIONS[act]
        k2 = kernel_size * kernel_size

        def projection() -> nn.Module:
            return nn.Linear(dim, dim, bias=bias) if layout == "tokens" else nn.Conv2d(dim, dim, 1, bias=bias)

        self.kernel_proj = projection()
        self.kernel_gen = nn.Linear(k2, k2, bias=bias)
        self.x_proj = projection()
        self.proj = projection()
        self.difference_control = nn.Parameter(torch.zeros(dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}, layout={self.layout}, " \
               f"kernel_pool={self.kernel_pool}, grid_size={self.grid_size}"

    def _kernels(self, pooled: Tensor) -> Tensor:
        """pooled: (B, C, k^2) projected, pooled features -> inhibited kernels (B, C, k, k)."""
        kernels = generate_kernels(pooled, self.kernel_gen.weight, self.kernel_gen.bias, self.approximate)
        kernels = lateral_inhibition(kernels, self.difference_control)
        return kernels.unflatten(-1, (self.kernel_size, self.kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        return self._forward_tokens(x) if self.layout == "tokens" else self._forward_image(x)

    def _forward_image(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        pool = pooling_matrix(h, w, self.kernel_size, self.kernel_pool, x.device, x.dtype)
        pooled = x.flatten(2) @ pool.t()                                    # (B, C, k^2)
        pooled = F.conv1d(pooled, self.kernel_proj.weight.flatten(2), self.kernel_proj.bias)
        values = self.x_proj(x)
        return self.proj(dynamic_depthwise_conv(values, self._kernels(pooled)))

    def _forward_tokens(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        h, w = self.grid_size
        if n != h * w:
            raise ValueError(f"ATConv expected {h}x{w}={h * w} tokens, got {n}; set grid_size to the token grid.")
        pool = pooling_matrix(h, w, self.kernel_size, self.kernel_pool, x.device, x.dtype)
        pooled = self.kernel_proj(pool @ x).transpose(1, 2)                  # (B, C, k^2)
        values = self.x_proj(x).transpose(1, 2).reshape(b, c, h, w)
        out = dynamic_depthwise_conv(values, self._kernels(pooled))
        return self.proj(out.flatten(2).transpose(1, 2))

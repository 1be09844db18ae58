"""Plain, obviously-correct ATConv for tests and benchmarks: the paper's order, no shortcuts.

`depthwise_conv_loop` spells the per-sample depthwise convolution out with Python loops;
`atconv_reference` follows SPEC §1 step by step (project, then pool; grouped conv like the
reference code) on an `ATConv` module's parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .atconv import ATConv


def depthwise_conv_loop(values: Tensor, kernels: Tensor) -> Tensor:
    """out[b,c,i,j] = sum_{u,v} K[b,c,u,v] * x[b,c,i+u-k//2, j+v-k//2] (zero outside)."""
    b, c, h, w = values.shape
    k = kernels.shape[-1]
    r = k // 2
    padded = F.pad(values, (r, r, r, r))
    out = torch.zeros_like(values)
    for u in range(k):
        for v in range(k):
            out += kernels[:, :, u, v, None, None] * padded[:, :, u:u + h, v:v + w]
    return out


def _stripe_pool(seq: Tensor, bins: int) -> Tensor:
    """Average a (B, C, N) sequence into `bins` raster stripes with explicit index arithmetic."""
    n = seq.shape[-1]
    chunks = []
    for i in range(bins):
        lo, hi = (i * n) // bins, -((-(i + 1) * n) // bins)
        chunks.append(seq[..., lo:hi].mean(dim=-1))
    return torch.stack(chunks, dim=-1)


def atconv_reference(module: ATConv, x: Tensor, conv: str = "loop") -> Tensor:
    """ATConv forward in the paper's order on `module`'s weights. conv: "loop" or "grouped"."""
    k = module.kernel_size
    if module.layout == "tokens":
        b, n, c = x.shape
        h, w = module.grid_size
        image = x.transpose(1, 2).reshape(b, c, h, w)
    else:
        image = x
        b, c, h, w = x.shape

    def project(layer, feats):  # 1x1 projection on (B, C, H, W)
        return torch.einsum("oc,bchw->bohw", layer.weight.reshape(c, c), feats) + layer.bias.view(1, c, 1, 1)

    g = project(module.kernel_proj, image)
    if module.kernel_pool == "sequence":
        pooled = _stripe_pool(g.reshape(b, c, h * w), k * k)
    else:
        pooled = F.adaptive_avg_pool2d(g, k).reshape(b, c, k * k)
    activated = F.silu(pooled) if module.act == "silu" else F.gelu(pooled, approximate=module.approximate)
    kernels = F.linear(activated, module.kernel_gen.weight, module.kernel_gen.bias).reshape(b, c, k, k)
    factor = torch.sigmoid(module.difference_control).view(1, c, 1, 1)
    kernels = kernels - factor * kernels.mean(dim=(2, 3), keepdim=True)
    values = project(module.x_proj, image)
    if conv == "loop":
        out = depthwise_conv_loop(values, kernels)
    else:
        out = F.conv2d(values.reshape(1, b * c, h, w), kernels.reshape(b * c, 1, k, k),
                       padding=k // 2, groups=b * c).reshape(b, c, h, w)
    out = project(module.proj, out)
    return out.flatten(2).transpose(1, 2) if module.layout == "tokens" else out

"""What the benchmarks run: the reference ATConv forward, token mixers, SiT blocks, a SiT training step.

`ReferenceATConv` re-implements the reference code's SiT ATConv forward (SPEC §1 in the paper's
order: project all N tokens, then AdaptiveAvgPool1d; x_proj, permute to NCHW, one grouped
``F.conv2d`` over a (1, B*C, H, W) view, permute back, proj) on an `ATConv`'s own parameters, so
the same weights can run either way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from sit_atconv.layers.atconv import ATConv
from sit_atconv.models.sit import SIT_SIZES, SiT, SiTBlock, create_sit


class ReferenceATConv(nn.Module):
    """The reference code's ATConv forward (tokens layout) on a wrapped `ATConv`'s parameters."""

    def __init__(self, inner: ATConv):
        super().__init__()
        if inner.layout != "tokens" or inner.kernel_pool != "sequence":
            raise ValueError("ReferenceATConv mirrors the reference's SiT mixer: tokens layout, sequence pooling.")
        self.inner = inner

    def forward(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        m, k = self.inner, self.inner.kernel_size
        b, n, c = x.shape
        h, w = grid_size or m.grid_size
        kernels = F.adaptive_avg_pool1d(m.kernel_proj(x).permute(0, 2, 1), k * k)       # project, then pool
        kernels = m.kernel_gen(F.gelu(kernels, approximate=m.approximate)).reshape(b, c, k, k)
        factor = torch.sigmoid(m.difference_control).view(1, -1, 1, 1)
        kernels = kernels - factor * kernels.mean(dim=(2, 3), keepdim=True)
        values = m.x_proj(x).permute(0, 2, 1).reshape(1, b * c, h, w)
        out = F.conv2d(values, kernels.reshape(b * c, 1, k, k).to(values.dtype), padding=k // 2, groups=b * c)
        return m.proj(out.reshape(b, c, h, w).flatten(2).transpose(1, 2))


class MatmulFloor(nn.Module):
    """The unavoidable work of pool-first ATConv: its two C x C linears (x_proj, proj) alone."""

    def __init__(self, dim: int):
        super().__init__()
        self.x_proj, self.proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.x_proj(x))


def with_reference_mixers(model: nn.Module) -> nn.Module:
    """A deep copy of `model` (same weights) whose ATConv mixers run the reference forward."""
    model = copy.deepcopy(model)
    for block in model.modules():
        if isinstance(block, SiTBlock) and isinstance(block.attn, ATConv):
            block.attn = ReferenceATConv(block.attn)
    return model


def mixers(width: str, grid: int, impl: str = "auto") -> dict[str, nn.Module]:
    """Token mixers of one SiT width: ATConv (ours), the reference forward on its weights, attention, floor."""
    size = SIT_SIZES[width]
    dim = size.hidden_size
    ours = ATConv(dim, 3, layout="tokens", grid_size=grid, act="gelu_tanh", impl=impl)
    for layer in (ours.kernel_proj, ours.kernel_gen, ours.x_proj, ours.proj):
        nn.init.xavier_uniform_(layer.weight)
    grouped = copy.deepcopy(ours)
    grouped.impl = "grouped"
    return {"atconv": ours, "atconv[grouped]": grouped, "reference": ReferenceATConv(ours),
            "attention": Attention(dim, num_heads=size.num_heads, qkv_bias=True), "floor": MatmulFloor(dim)}


class BlockStack(nn.Module):
    """SiT blocks applied in turn with the same conditioning (one block, or a hybrid pair)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x, c)
        return x


def blocks(width: str, grid: int) -> dict[str, nn.Module]:
    """Single SiT blocks (attn, atconv, atconv with the reference mixer) and pairs (attn+attn, hybrid)."""
    size = SIT_SIZES[width]

    def block(mixer: str) -> SiTBlock:
        b = SiTBlock(size.hidden_size, size.num_heads, mixer, (grid, grid))
        for p in b.adaLN_modulation.parameters():  # non-zero gates, as after training, so both branches run
            nn.init.normal_(p, std=0.02)
        return b

    atconv = BlockStack([block("atconv")])
    return {"attn": BlockStack([block("attn")]), "atconv": atconv, "atconv[reference]": with_reference_mixers(atconv),
            "attn+attn": BlockStack([block("attn"), block("attn")]),
            "hybrid(attn+atconv)": BlockStack([block("attn"), block("atconv")])}


def sit_models(name: str, input_size: int) -> dict[str, SiT]:
    """One SiT size as attn, atconv, and atconv with reference mixers (same weights as atconv)."""
    atconv = create_sit(name, mixer="atconv", input_size=input_size)
    return {"attn": create_sit(name, mixer="attn", input_size=input_size), "atconv": atconv,
            "atconv[reference]": with_reference_mixers(atconv)}


def flow_matching_loss(model: Callable[..., Tensor], x1: Tensor, y: Tensor, autocast) -> Tensor:
    """Linear-path velocity objective (SiT default): x_t = t x1 + (1 - t) x0, target x1 - x0; t = 1 is data."""
    x0 = torch.randn_like(x1)
    t = torch.rand(x1.shape[0], device=x1.device)
    tb = t.view(-1, 1, 1, 1)
    with autocast:
        pred = model(tb * x1 + (1 - tb) * x0, t, y)
    return F.mse_loss(pred.float(), x1 - x0)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Mixed precision as in training: fp32 parameters, autocast compute (no-op for fp32)."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)

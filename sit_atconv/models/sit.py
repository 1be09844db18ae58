"""SiT (DiT backbone, interpolant objective) with a token mixer chosen per block: attention or ATConv.

Sizes are rows of `SIT_SIZES`; the mixer pattern is `mixer_pattern(mixer, depth)`. Parameter names
follow the reference code so its checkpoints load (`blocks.{i}.attn.kernel_proj.weight`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from einops import rearrange
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from ..layers.atconv import ATConv
from ..layers.embed import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d

MIXERS = ("attn", "atconv", "hybrid")


@dataclass(frozen=True)
class SiTSize:
    depth: int
    hidden_size: int
    num_heads: int


SIT_SIZES: dict[str, SiTSize] = {
    "S": SiTSize(12, 384, 6),
    "B": SiTSize(12, 768, 12),
    "L": SiTSize(24, 1024, 16),
    "XL": SiTSize(28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)


def mixer_pattern(mixer: str, depth: int) -> list[str]:
    """Per-block mixer: all attention, all ATConv, or the reference's hybrid (ATConv where (i+1) is even)."""
    if mixer not in MIXERS:
        raise ValueError(f"mixer={mixer!r} is not supported; use one of {MIXERS}.")
    if mixer == "hybrid":
        return ["atconv" if (i + 1) % 2 == 0 else "attn" for i in range(depth)]
    return [mixer] * depth


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class SiTBlock(nn.Module):
    """adaLN-Zero transformer block; `attn` is the token mixer (attention or ATConv)."""

    def __init__(self, hidden_size: int, num_heads: int, mixer: str, grid_size: tuple[int, int],
                 mlp_ratio: float = 4.0, kernel_size: int = 3, kernel_pool: str = "sequence"):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if mixer == "attn":
            self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        else:
            self.attn = ATConv(hidden_size, kernel_size, layout="tokens", grid_size=grid_size,
                               act="gelu_tanh", kernel_pool=kernel_pool)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SiT(nn.Module):
    """Scalable Interpolant Transformer with per-block token mixers (SPEC §2).

    `forward(x, t, y)` returns the prediction with x's channels (the sigma half of a
    `learn_sigma` model is dropped, as in the reference). Guidance wraps the model from outside
    (`sit_atconv.transport.CFGModel`): the network knows nothing of sampling.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 mixer: str = "atconv", kernel_size: int = 3, kernel_pool: str = "sequence"):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}.")
        self.in_channels, self.learn_sigma, self.num_classes = in_channels, learn_sigma, num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.mixer = patch_size, mixer
        self.mixers = mixer_pattern(mixer, depth)
        grid = input_size // patch_size
        self.grid_size = (grid, grid)

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.use_pos_embed = mixer != "atconv"  # ATConv supplies position itself
        if self.use_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, num_heads, m, self.grid_size, mlp_ratio, kernel_size, kernel_pool)
            for m in self.mixers)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT/SiT init: xavier-uniform Linears (ATConv included), zero adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.use_pos_embed:
            self.pos_embed.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], *self.grid_size)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        """(B, T, p*p*C) tokens -> (B, C, H, W) images (token order row-major, patch pixels then channels)."""
        h, w = self.grid_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, w=w, p=self.patch_size, q=self.patch_size)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) latents, t: (B,) times in [0, 1] (t = 1 is data), y: (B,) labels."""
        tokens = self.x_embedder(x)
        if self.use_pos_embed:
            tokens = tokens + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop)
        for block in self.blocks:
            tokens = block(tokens, c)
        out = self.unpatchify(self.final_layer(tokens, c))
        return out[:, : self.in_channels] if self.learn_sigma else out


_SIT_NAME = re.compile(r"^SiT-(S|B|L|XL)/(\d+)$")


def parse_sit_name(name: str) -> tuple[SiTSize, int]:
    """'SiT-XL/2' -> (size row, patch size)."""
    match = _SIT_NAME.match(name)
    if not match or int(match.group(2)) not in PATCH_SIZES:
        valid = [f"SiT-{s}/{p}" for s in SIT_SIZES for p in PATCH_SIZES]
        raise ValueError(f"unknown SiT model {name!r}; valid names: {', '.join(valid)}.")
    return SIT_SIZES[match.group(1)], int(match.group(2))


def create_sit(name: str, mixer: str = "atconv", **kwargs) -> SiT:
    """Build a SiT from its zoo name, e.g. create_sit("SiT-XL/2", mixer="hybrid", input_size=32).

    kwargs override the size row (depth, hidden_size, num_heads) and any SiT argument
    (input_size, in_channels, num_classes, learn_sigma, class_dropout_prob, kernel_pool, ...).
    """
    size, patch = parse_sit_name(name)
    arch = {"depth": size.depth, "hidden_size": size.hidden_size, "num_heads": size.num_heads,
            "patch_size": patch}
    arch.update({k: v for k, v in kwargs.items() if v is not None})
    return SiT(mixer=mixer, **arch)


def list_sit_models() -> list[str]:
    return [f"SiT-{s}/{p}" for s in SIT_SIZES for p in PATCH_SIZES]

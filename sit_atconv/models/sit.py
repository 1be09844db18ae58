"""SiT (DiT backbone, interpolant objective) with a token mixer chosen per block: attention or ATConv.

Sizes are rows of `SIT_SIZES`; the mixer pattern is `mixer_pattern(mixer, depth)`. Parameter names
follow the reference code so its checkpoints load (`blocks.{i}.attn.kernel_proj.weight`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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


def mixer_pattern(mixer: str | Sequence[str], depth: int) -> list[str]:
    """Per-block mixer: all attention, all ATConv, the reference's hybrid (ATConv where (i+1) is even),
    or an explicit per-block list of 'attn'/'atconv' (as read from a reference checkpoint)."""
    if not isinstance(mixer, str):
        blocks = list(mixer)
        if len(blocks) != depth or not set(blocks) <= {"attn", "atconv"}:
            raise ValueError(f"a per-block mixer list needs {depth} entries of 'attn' or 'atconv', got {blocks}.")
        return blocks
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
                 mlp_ratio: float = 4.0, kernel_size: int = 3, kernel_pool: str = "sequence",
                 kernel_act: str = "gelu_tanh", qk_norm: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if mixer == "attn":
            self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
                                  norm_layer=nn.LayerNorm)  # QK-norm's (timm < 1.0.20 default)
        else:
            self.attn = ATConv(hidden_size, kernel_size, layout="tokens", grid_size=grid_size,
                               act=kernel_act, kernel_pool=kernel_pool)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """x: (B, N, D) tokens on `grid_size` (default: the grid built for; only ATConv needs it), c: (B, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        mixer_input = modulate(self.norm1(x), shift_msa, scale_msa)
        mixed = self.attn(mixer_input) if isinstance(self.attn, Attention) else self.attn(mixer_input, grid_size)
        x = x + gate_msa.unsqueeze(1) * mixed
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


def projector_mlp(hidden_size: int, projector_dim: int, out_dim: int) -> nn.Sequential:
    """REPA's projector: two SiLU hidden layers of `projector_dim`, then the encoder's width."""
    return nn.Sequential(nn.Linear(hidden_size, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, out_dim))


class SiT(nn.Module):
    """Scalable Interpolant Transformer with per-block token mixers (SPEC §2).

    `forward(x, t, y)` returns the prediction with x's channels (the sigma half of a
    `learn_sigma` model is dropped, as in the reference). Guidance wraps the model from outside
    (`sit_atconv.transport.CFGModel`): the network knows nothing of sampling.

    `mixer` is a pattern name (`MIXERS`) or a per-block list. The defaults of `kernel_act` (ATConv's
    kernel nonlinearity), `qk_norm` (LayerNorm on attention queries and keys) and `pos_embed` (None: only
    with attention blocks) are the SiT fork's; the REPA fork's SiT uses "silu", optional QK-norm and True.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 mixer: str | Sequence[str] = "atconv", kernel_size: int = 3, kernel_pool: str = "sequence",
                 repa_depth: int | None = None, repa_dim: int | None = None, projector_dim: int = 2048,
                 kernel_act: str = "gelu_tanh", qk_norm: bool = False, pos_embed: bool | None = None):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}.")
        self.in_channels, self.learn_sigma, self.num_classes = in_channels, learn_sigma, num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size, self.mixer = patch_size, mixer
        self.mixers = mixer_pattern(mixer, depth)
        grid = input_size // patch_size
        self.grid_size = (grid, grid)

        # any input side divisible by the patch runs (resolution transfer: `forward` infers the token grid)
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True,
                                     strict_img_size=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # ATConv supplies position itself: by default only models with attention blocks add the fixed
        # embedding; pos_embed=True adds it whatever the mixers (the REPA fork's SiT)
        self.use_pos_embed = "attn" in self.mixers if pos_embed is None else pos_embed
        if self.use_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, num_heads, m, self.grid_size, mlp_ratio, kernel_size, kernel_pool, kernel_act,
                     qk_norm) for m in self.mixers)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.repa_depth = repa_depth
        if repa_depth is not None:  # REPA: tokens after block `repa_depth` are aligned to an encoder's
            if not (1 <= repa_depth <= depth and repa_dim):
                raise ValueError(f"repa_depth={repa_depth} must be in [1, {depth}] with a positive repa_dim.")
            self.projectors = nn.ModuleList([projector_mlp(hidden_size, projector_dim, repa_dim)])
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

    def unpatchify(self, x: Tensor, grid_size: tuple[int, int] | None = None) -> Tensor:
        """(B, T, p*p*C) tokens on `grid_size` (default: the grid built for) -> (B, C, H, W) images (token
        order row-major, patch pixels then channels)."""
        h, w = self.grid_size if grid_size is None else grid_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=h, w=w, p=self.patch_size, q=self.patch_size)

    def token_grid(self, x: Tensor) -> tuple[int, int]:
        """(H/p, W/p): the token grid of input x, whose sides must be multiples of the patch size."""
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"input {height}x{width} is not divisible by the patch size {self.patch_size}.")
        grid = (height // self.patch_size, width // self.patch_size)
        return self.grid_size if grid == self.grid_size else grid

    def position_embedding(self, grid_size: tuple[int, int]) -> Tensor:
        """(1, H*W, D) fixed sin-cos table: the stored one on the grid built for; on another grid it is
        recomputed (not interpolated), as a SiT built for that grid would hold it. Either way a model trained
        on one grid sees positions it never saw on another."""
        if grid_size == self.grid_size:
            return self.pos_embed
        table = sincos_pos_embed_2d(self.pos_embed.shape[-1], *grid_size)
        return table[None].to(device=self.pos_embed.device, dtype=self.pos_embed.dtype)

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None,
                return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, C, H, W) latents, t: (B,) times in [0, 1] (t = 1 is data), y: (B,) labels.

        H and W may differ from `input_size` (any multiples of the patch size): the token grid follows x,
        ATConv runs on it, and a position embedding is recomputed for it (`position_embedding`).
        `return_features` (REPA models): also return the projected tokens of block `repa_depth`,
        (B, T, repa_dim), for the alignment loss.
        """
        grid = self.token_grid(x)
        tokens = self.x_embedder(x)
        if self.use_pos_embed:
            tokens = tokens + self.position_embedding(grid)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop)
        features = None
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c, grid)
            if return_features and i + 1 == self.repa_depth:
                features = self.projectors[0](tokens)
        out = self.unpatchify(self.final_layer(tokens, c), grid)
        out = out[:, : self.in_channels] if self.learn_sigma else out
        if return_features:
            if features is None:
                raise ValueError("return_features needs a REPA model (built with repa_depth and repa_dim).")
            return out, features
        return out


def unwrap_sit(model: nn.Module) -> SiT:
    """The SiT inside `model`: itself, or the network a wrapper (such as `ReversedTime`) holds as `net`."""
    while not isinstance(model, SiT):
        inner = getattr(model, "net", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"{type(model).__name__} is not a SiT and holds none as `net`.")
        model = inner
    return model


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

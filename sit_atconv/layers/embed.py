"""Conditioning embeddings of SiT/DiT: timesteps, class labels, 2D sin-cos positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [cos, sin] of (fractional) timesteps t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features -> MLP (Linear, SiLU, Linear)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        freqs = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; index `num_classes` is the null label used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def drop_labels(self, labels: Tensor, force_drop: Tensor | None = None) -> Tensor:
        """Replace labels by the null label with probability `dropout_prob` (or where force_drop)."""
        drop = force_drop.bool() if force_drop is not None else \
            torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor, train: bool, force_drop: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop is not None:
            labels = self.drop_labels(labels, force_drop)
        return self.embedding_table(labels)


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> Tensor:
    """Fixed 2D sin-cos position embedding of an H x W raster grid, shape (H*W, dim).

    MAE/DiT convention: the first half of the channels encodes the column index, the second the row.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size divisible by 4, got {dim}.")
    grid_w, grid_h = torch.meshgrid(torch.arange(width, dtype=torch.float64),
                                    torch.arange(height, dtype=torch.float64), indexing="xy")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([encode(grid_w), encode(grid_h)], dim=1).float()

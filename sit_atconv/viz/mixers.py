"""What a trained SiT's token mixers do on given inputs: ATConv's per-sample kernels, attention's maps.

Both are read off one ordinary forward pass: a forward hook on every block's mixer keeps its input, and the
mixer's own weights turn it into the picture — `ATConv.kernels` (the same functions its forward runs) and
`attention_maps` (softmax(q k^T / sqrt(d)) from timm Attention's qkv projection and QK-norms). Nothing here
copies the operators' math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import Attention
from torch import Tensor, nn

from ..data.digits import DigitsDataset
from ..errors import ConfigError
from ..layers.atconv import ATConv
from ..models.sit import unwrap_sit
from ..sampling import SamplingOptions, image_generators, make_sample_fn, per_image_randn
from ..transport.paths import expand_t


def attention_maps(attn: Attention, x: Tensor, queries: list[int] | None = None) -> Tensor:
    """(B, heads, Q, N) attention weights of the query tokens `queries` (None: all N) for input x (B, N, D)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    if queries is not None:
        q = q[:, :, queries]
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def inhibition_strength(model: nn.Module) -> dict[int, Tensor]:
    """{block index: sigmoid(difference_control), (C,)} for every ATConv block: the share of a kernel's tap
    mean that lateral inhibition subtracts per channel (SPEC §1.2; 0.5 at initialisation)."""
    blocks = unwrap_sit(model).blocks
    return {i: torch.sigmoid(b.attn.difference_control.detach().float()).cpu()
            for i, b in enumerate(blocks) if isinstance(b.attn, ATConv)}


@torch.no_grad()
def mixer_pictures(model: nn.Module, x_t: Tensor, t: Tensor, y: Tensor, blocks: list[int],
                   queries: list[int]) -> dict[int, Tensor]:
    """One forward of `model` (a SiT, or a wrapper holding one) on (x_t, t, y); for each block of `blocks`:
    ATConv -> its per-sample kernels (B, C, k, k); attention -> the head-averaged maps of the query tokens
    (B, Q, N)."""
    sit = unwrap_sit(model)
    seen: dict[int, tuple] = {}
    hooks = [sit.blocks[i].attn.register_forward_hook(lambda _m, args, _out, i=i: seen.__setitem__(i, args))
             for i in blocks]
    try:
        model(x_t, t, y)
    finally:
        for hook in hooks:
            hook.remove()
    out = {}
    for i in blocks:
        mixer, args = sit.blocks[i].attn, seen[i]
        if isinstance(mixer, ATConv):
            out[i] = mixer.kernels(*args).float().cpu()
        else:
            out[i] = attention_maps(mixer, args[0], queries).mean(dim=1).float().cpu()
    return out


def diagonal_queries(grid: tuple[int, int], count: int) -> list[int]:
    """`count` token indices spread along the grid's diagonal (row-major), away from the borders."""
    h, w = grid
    return [int((j + 1) * h // (count + 1)) * w + int((j + 1) * w // (count + 1)) for j in range(count)]


@dataclass
class NoisedInputs:
    """x_t of a few clean inputs at several times (t = 0 noise, t = 1 data), one noise draw per sample."""

    clean: Tensor          # (S, C, H, W) model inputs
    labels: Tensor         # (S,)
    times: list[float]
    noised: Tensor         # (T, S, C, H, W)
    source: str            # what the clean inputs are, for the picture's caption


def clean_inputs(run, count: int, seed: int, device) -> tuple[Tensor, Tensor, str]:
    """(inputs, labels, source): held-out digits of classes 0, 1, ... for a digits run; else the model's own
    unguided samples for those labels (its sampler settings, image i seeded by (seed, i))."""
    labels = torch.arange(count) % run.cfg.model.num_classes
    if run.cfg.data.source == "digits":
        data = DigitsDataset("held_out", run.cfg.data.image_size)
        picks = [int(torch.nonzero(data.labels == y)[i // data.num_classes]) for i, y in enumerate(labels.tolist())]
        return data.images[picks].to(device), labels, "held-out digits"
    sampler = run.sampler()
    opts = SamplingOptions(cfg_scale=1.0).resolved(run.cfg.transport)
    z = per_image_randn(image_generators(range(count), seed, device), sampler.latent_shape, device)
    sample = make_sample_fn(sampler.transport, opts)(z, run.model, y=labels.to(device))[-1]
    return sample, labels, f"the model's own unguided samples ({opts.tag()})"


def noised_inputs(run, count: int, times: list[float], seed: int, device) -> NoisedInputs:
    """x_t = alpha(t) x + sigma(t) eps (the run's path) of `count` clean inputs, eps fixed per sample."""
    bad = [t for t in times if not 0.0 <= t <= 1.0]
    if bad:
        raise ConfigError(f"--times {bad}: times lie in [0, 1] (0 = noise, 1 = data)")
    clean, labels, source = clean_inputs(run, count, seed, device)
    eps = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    path = run.sampler().transport.path
    noised = torch.stack([path.interpolate(expand_t(torch.full((count,), t, device=device), clean), eps, clean)[0]
                          for t in times])
    return NoisedInputs(clean, labels, list(times), noised, source)

"""A trained run -> its kernel picture (`python -m sit_atconv.viz kernels`): noised inputs at several times, the
mixers' kernels and attention maps on them, the learned inhibition strengths; PNG out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..build import LoadedRun
from ..errors import ConfigError
from ..io import atomic_write
from ..models.sit import unwrap_sit
from .draw import KernelPicture, draw_picture, stack_maps
from .mixers import diagonal_queries, inhibition_strength, mixer_pictures, noised_inputs


def default_output(run: LoadedRun) -> Path:
    return run.run_dir / "viz" / f"kernels_step{run.step:07d}.png"


def chosen_blocks(depth: int, blocks: Sequence[int] | None) -> list[int]:
    """The blocks to draw (0-based, as in `blocks.{i}`): all by default; out-of-range indices are refused."""
    if blocks is None:
        return list(range(depth))
    bad = [i for i in blocks if not 0 <= i < depth]
    if bad or len(set(blocks)) != len(blocks):
        raise ConfigError(f"--blocks {' '.join(map(str, blocks))}: give distinct indices in 0..{depth - 1}")
    return sorted(blocks)


@torch.no_grad()
def kernel_picture(run: LoadedRun, samples: int = 4, times: Sequence[float] = (0.1, 0.5, 0.9),
                   blocks: Sequence[int] | None = None, queries: int = 2, seed: int = 0,
                   device: torch.device | str = "cpu") -> KernelPicture:
    """What `draw_picture` draws for `run`: `samples` inputs noised to each of `times` (t = 0 noise, 1 data)."""
    if run.autoencoder is None:
        raise ConfigError(f"{run.path} is a {run.cfg.train.task} run; kernel pictures are drawn for SiT runs")
    sit = unwrap_sit(run.model)
    chosen = chosen_blocks(len(sit.blocks), blocks)
    inputs = noised_inputs(run, samples, list(times), seed, device)
    grid = sit.token_grid(inputs.clean)
    query_tokens = diagonal_queries(grid, queries)
    y = inputs.labels.to(device)
    per_time = [mixer_pictures(run.model, x_t, torch.full((samples,), t, device=device), y, chosen, query_tokens)
                for t, x_t in zip(inputs.times, inputs.noised)]
    kinds = {i: "attn" if sit.mixers[i] == "attn" else "atconv" for i in chosen}
    inhibition = {i: v for i, v in inhibition_strength(sit).items() if i in chosen}
    title = (f"{run.run_dir.name}, step {run.step}: {sit.mixer if isinstance(sit.mixer, str) else 'per-block'} "
             "mixers\nATConv kernels: channel means; attention: head means; t = 0 noise, t = 1 data")
    return KernelPicture(inputs, stack_maps(per_time), kinds, query_tokens, grid, inhibition, title)


def check_output(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing picture unless `force`."""
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --out elsewhere or --force to overwrite")


def write_kernel_picture(picture: KernelPicture, out: Path, force: bool = False) -> Path:
    """Draw `picture` into the PNG `out` (atomically); an existing file is refused unless `force`."""
    check_output(out, force)
    fig = draw_picture(picture)
    return atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100))

"""The kernel picture: one row per (sample, t), one column per mixer panel, and the inhibition bars.

Columns: the input x_t; per ATConv block its generated k x k kernel averaged over the C channels (a diverging
map, symmetric about 0, one colour scale per block, its bound in the header); per attention block and query
token the head-averaged attention map on the token grid (the query marked). Below, for models with ATConv,
sigmoid(difference_control) per block: the mean over channels, whiskers min-max. Drawn with matplotlib's object
API on an Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .mixers import NoisedInputs

PANEL_IN = 0.95  # inches per panel
BARS_IN = 2.4  # inches for the inhibition bar plot


@dataclass
class KernelPicture:
    """Everything one picture shows; `maps[i]` is (T, S, C, k, k) kernels (ATConv block i) or (T, S, Q, N)
    attention maps (attention block i)."""

    inputs: NoisedInputs
    maps: dict[int, Tensor]
    kinds: dict[int, str]            # block -> "atconv" | "attn"
    queries: list[int]
    grid: tuple[int, int]
    inhibition: dict[int, Tensor]    # ATConv block -> sigmoid(difference_control) (C,)
    title: str

    def columns(self) -> list[tuple[int, int | None]]:
        """(block, query position or None) per mixer column, blocks in order."""
        return [(i, None) if self.kinds[i] == "atconv" else (i, q) for i in sorted(self.maps)
                for q in ([None] if self.kinds[i] == "atconv" else range(len(self.queries)))]

    def panel_count(self) -> int:
        rows = len(self.inputs.times) * len(self.inputs.labels)
        return rows * (1 + len(self.columns())) + (1 if self.inhibition else 0)


def _show_input(ax, image: Tensor) -> None:
    """A model input (C, H, W): grey for one channel, else the first three channels rescaled to [0, 1]."""
    image = image.float().cpu()
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=-1, vmax=1)
    else:
        rgb = image[:3].permute(1, 2, 0)
        ax.imshow(((rgb - rgb.min()) / (rgb.max() - rgb.min()).clamp_min(1e-8)).numpy())


def _header(picture: KernelPicture, block: int, query: int | None, bound: float) -> str:
    if query is None:
        return f"block {block} ATConv\nkernel, |K| <= {bound:.2g}"
    row, col = divmod(picture.queries[query], picture.grid[1])
    return f"block {block} attn\nquery ({row},{col})"


def _draw_grid(fig, picture: KernelPicture) -> None:
    inputs, columns = picture.inputs, picture.columns()
    times, samples = inputs.times, len(inputs.labels)
    axes = fig.subplots(len(times) * samples, 1 + len(columns), squeeze=False)
    bounds = {i: float(picture.maps[i].mean(dim=2).abs().max()) for i, q in columns if q is None}
    h, w = picture.grid
    for r, (ti, s) in enumerate((ti, s) for s in range(samples) for ti in range(len(times))):
        row = axes[r]
        _show_input(row[0], inputs.noised[ti, s])
        row[0].set_ylabel(f"label {int(inputs.labels[s])}\nt = {times[ti]:g}", fontsize=8)
        for ax, (block, query) in zip(row[1:], columns):
            maps = picture.maps[block][ti, s]
            if query is None:
                bound = max(bounds[block], 1e-8)
                ax.imshow(maps.mean(dim=0).numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
            else:
                ax.imshow(maps[query].reshape(h, w).numpy(), cmap="viridis", vmin=0)
                qr, qc = divmod(picture.queries[query], w)
                ax.plot([qc], [qr], marker="o", markersize=3, color="red")
            if r == 0:
                ax.set_title(_header(picture, block, query, bounds.get(block, 0.0)), fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title(f"x_t ({inputs.source})", fontsize=7)


def _draw_inhibition(fig, inhibition: dict[int, Tensor]) -> None:
    ax = fig.subplots()
    blocks = sorted(inhibition)
    means = [float(inhibition[i].mean()) for i in blocks]
    low = [m - float(inhibition[i].min()) for m, i in zip(means, blocks)]
    high = [float(inhibition[i].max()) - m for m, i in zip(means, blocks)]
    ax.bar([str(i) for i in blocks], means, yerr=[low, high], capsize=3, color="C0")
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set(ylim=(0, 1), xlabel="ATConv block", ylabel="sigmoid(diff. control)")
    ax.set_title("lateral inhibition strength sigmoid(difference_control)\nmean over channels, whiskers "
                 "min-max; 0.5 at init", fontsize=8)


def draw_picture(picture: KernelPicture):
    """The matplotlib Figure of `picture` (`picture.panel_count()` axes)."""
    from matplotlib.figure import Figure

    rows = len(picture.inputs.times) * len(picture.inputs.labels)
    cols = 1 + len(picture.columns())
    bars = BARS_IN if picture.inhibition else 0.0
    width, grid_height = max(6.0, PANEL_IN * cols), PANEL_IN * rows + 0.8
    fig = Figure(figsize=(width, grid_height + bars), layout="constrained")
    fig.suptitle(picture.title, fontsize=9)
    if not picture.inhibition:
        _draw_grid(fig, picture)
        return fig
    top, bottom = fig.subfigures(2, 1, height_ratios=[grid_height, bars])
    _draw_grid(top, picture)
    _draw_inhibition(bottom, picture.inhibition)
    return fig


def stack_maps(per_time: Sequence[dict[int, Tensor]]) -> dict[int, Tensor]:
    """[{block: (S, ...)} per time] -> {block: (T, S, ...)}."""
    return {i: torch.stack([m[i] for m in per_time]) for i in per_time[0]}

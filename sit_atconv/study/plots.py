"""A study's PNG plots: FID against steps and against training seconds, and the loss curves, one colour per
mixer: the mean over seeds as a line, the min-max range over seeds as a band, each seed as a faint dotted line.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..io import atomic_write
from ..train.plots import read_log
from .stats import band

X_LABELS = {"step": "training step", "train_seconds": "training wall-clock (s)"}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _save(fig, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_fid(cells: Sequence[dict], fid_curves: dict[str, list[dict]], mixers: Sequence[str], x_key: str,
             path: Path) -> Path | None:
    """FID of each mixer against `x_key` ('step' or 'train_seconds', the mean over seeds at each evaluated
    step); None when no FID is known."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax, values = fig.subplots(), []
    for i, mixer in enumerate(mixers):
        color = f"C{i}"
        points = [p for p in fid_curves[mixer] if p["fid"]["mean"] is not None
                  and (x_key == "step" or p[x_key]["mean"] is not None)]
        xs = [p["step"] if x_key == "step" else p[x_key]["mean"] for p in points]
        if not xs:
            continue
        ax.plot(xs, [p["fid"]["mean"] for p in points], marker="o", color=color,
                label=f"{mixer} (n={max(p['fid']['n'] for p in points)})")
        ax.fill_between(xs, [p["fid"]["min"] for p in points], [p["fid"]["max"] for p in points], color=color,
                        alpha=0.2, linewidth=0)
        for cell in (c for c in cells if c["mixer"] == mixer):
            seed = [(e[x_key], e["fid"]) for e in cell["evals"] if _finite(e[x_key]) and _finite(e["fid"])]
            ax.plot([s[0] for s in seed], [s[1] for s in seed], linestyle=":", color=color, alpha=0.5)
        values.extend(p["fid"]["min"] for p in points)
    if not values:
        return None
    if min(values) > 0:
        ax.set_yscale("log")  # FID falls by orders of magnitude along a run; a linear axis flattens the end
    ax.set(xlabel=X_LABELS[x_key], ylabel="FID (lower is better)",
           title=f"FID against {X_LABELS[x_key]}: mean over seeds, band = min-max")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def loss_series(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, loss) of a run's metrics log."""
    return [(r["step"], float(r["loss"])) for r in read_log(Path(run_dir) / "metrics.jsonl") if _finite(r.get("loss"))]


def plot_loss(cells: Sequence[dict], mixers: Sequence[str], path: Path) -> Path | None:
    """Training loss of each mixer against step (mean over seeds at the logged steps, min-max band); None
    when no run logged a loss."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax, lows = fig.subplots(), []
    for i, mixer in enumerate(mixers):
        series = [s for c in cells if c["mixer"] == mixer and (s := loss_series(c["run_dir"]))]
        steps, mean, low, high = band(series)
        if not steps:
            continue
        ax.plot(steps, mean, color=f"C{i}", marker="." if len(steps) < 50 else None, label=f"{mixer} (n={len(series)})")
        ax.fill_between(steps, low, high, color=f"C{i}", alpha=0.2, linewidth=0)
        lows.extend(low)
    if not lows:
        return None
    if min(lows) > 0:
        ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel="loss", title="training loss: mean over seeds, band = min-max")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)

"""RUN/metrics.jsonl -> RUN/training.png: the losses and images/s against step, redrawn at each preview.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch), written atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..io import atomic_write

PLOT_NAME = "training.png"


def read_log(path: str | Path) -> list[dict]:
    """The JSON records of a metrics log; a line cut short by a killed writer is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_training(run_dir: str | Path) -> Path | None:
    """Draw RUN/training.png from RUN/metrics.jsonl: every `*loss` key, and images/s; None if nothing to draw."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    run_dir = Path(run_dir)
    records = read_log(run_dir / "metrics.jsonl")
    loss_keys = sorted({k for r in records for k in r if k.endswith("loss") and _series(records, k)[0]})
    if not loss_keys:
        return None
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, speed_ax = fig.subplots(1, 2)
    for key in loss_keys:
        loss_ax.plot(*_series(records, key), marker=".", label=key)
    if all(v > 0 for key in loss_keys for v in _series(records, key)[1]):
        loss_ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.3, not 3 x 10^-1
        loss_ax.yaxis.set_major_formatter(plain)
        loss_ax.yaxis.set_minor_formatter(plain)
    loss_ax.set(xlabel="step", ylabel="loss", title=f"{run_dir.name}: training loss")
    loss_ax.legend()
    speed_ax.plot(*_series(records, "images_per_sec"), marker=".", color="tab:green")
    speed_ax.set(xlabel="step", ylabel="images / s", title="throughput (all processes)")
    speed_ax.set_ylim(bottom=0)
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
    return atomic_write(run_dir / PLOT_NAME, lambda tmp: fig.savefig(tmp, format="png", dpi=100))

"""What a training run optimises: a *task* turns a batch into a loss, and may draw previews.

The training loop (`sit_atconv.train.loop`) knows optimizers, EMA, checkpoints and logging, and nothing of
diffusion; a task knows its objective and nothing of Accelerate. Diffusion (flow matching on latents with
EMA sample grids) is the first task; AttNet classification plugs in the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import Tensor, nn

from .classification import ClassificationTask
from .diffusion import DiffusionTask


class Task(Protocol):
    """The seam between the training loop and an objective."""

    name: str

    def prepare(self, batch: Any) -> Any:
        """Per-batch preprocessing outside autocast and autograd (e.g. VAE encoding); identity if none."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """(scalar loss to minimise, extra per-batch scalar metrics to average and log)."""

    def preview(self, model: nn.Module, step: int, run_dir: Path) -> dict[str, float | Path]:
        """Look at the EMA model (main process only): numbers to log (held-out accuracy) and files written
        (sample grids), by name; {} for nothing."""


__all__ = ["ClassificationTask", "DiffusionTask", "Task"]

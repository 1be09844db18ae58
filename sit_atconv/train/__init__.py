"""Training: `train(cfg)` (run.py) builds a run and drives the task-agnostic loop (loop.py), with its
plumbing: EMA, optimizer groups, deterministic data order, trackers."""

from .run import train

__all__ = ["train"]

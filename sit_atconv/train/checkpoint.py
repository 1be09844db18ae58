"""Run-folder checkpoints: atomic writes, keep the last k plus every Nth, safe loading.

A checkpoint is one `.pt` file of tensors and plain containers (loadable with
`torch.load(weights_only=True)`): model, EMA, optimizer, scheduler, step, RNG states, data
position and the resolved config, so `sample.py`/`eval_fid.py` need nothing but the file.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import torch

from ..io import torch_load_safe, torch_save_atomic

_NAME = re.compile(r"^step_(\d{7,})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in the run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder -> its latest checkpoint; one clear error otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path}: run folder has no checkpoints in {checkpoint_dir(path)}; "
                                    "train longer or pass a checkpoint file.")
        return latest
    raise FileNotFoundError(f"{path}: no such checkpoint file or run folder.")


def rng_state() -> dict:
    """Python and torch (CPU + CUDA) RNG states as tensors/plain values."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, payload: dict, keep_last: int, keep_every: int) -> Path:
    """Write `payload` for `step` atomically, then prune: keep the newest `keep_last` and every
    `keep_every`-th step (0 disables that rule)."""
    path = torch_save_atomic({**payload, "step": step}, checkpoint_path(run_dir, step))
    found = list_checkpoints(run_dir)
    recent = {s for s, _ in found[-max(keep_last, 1):]}
    for s, p in found:
        if s not in recent and not (keep_every > 0 and s % keep_every == 0):
            p.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (weights only) onto the CPU."""
    return torch_load_safe(resolve_checkpoint(path))

"""What keeps a long run from losing work: a stop on signals at a step boundary, one writer per run
folder, and no checkpoint with non-finite weights."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ..errors import RunError
from ..stopping import StopSignals

__all__ = ["RunLock", "StopSignals", "finite_weights", "stop_requested"]


def stop_requested(stop: StopSignals, accelerator: Accelerator) -> bool:
    """True on every process once any process got a signal (one tiny all-reduce per step when distributed)."""
    flag = stop.received is not None
    if accelerator.num_processes > 1:
        flag = bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "max").item())
    return flag

def finite_weights(model: nn.Module) -> bool:
    """Every parameter and buffer finite (one host sync; called before checkpoints only)."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """RUN/.lock with the holder's host and pid, created exclusively: a second trainer on the same folder
    stops with one line. A lock left by a dead process on this host is taken over (and said so)."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path, self.enabled, self.taken_over = Path(run_dir) / ".lock", enabled, None

    def __enter__(self) -> RunLock:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                host, _, pid = self.path.read_text().strip().partition(" ")
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    self.taken_over = f"{host} {pid}"
                    self.path.unlink(missing_ok=True)
                    continue
                raise RunError(f"{self.path.parent} is being trained by {host} pid {pid} (lock {self.path}); wait "
                               "for it, or delete the lock if that process is gone") from None
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            return self
        raise RunError(f"{self.path}: could not take the run lock; retry")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.path.unlink(missing_ok=True)

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

__all__ = ["RunLock", "StepGuard", "StopSignals", "finite_weights"]


class StepGuard:
    """After each backward pass: did any process get a stop signal, and is the step non-finite (loss or
    gradient norm) on any process? One host sync per step (a two-value max all-reduce when distributed) —
    the price of skipping a bad update before it reaches the weights. More than `max_bad` bad steps in a
    row stop the run with one line."""

    def __init__(self, stop: StopSignals, max_bad: int):
        self.stop, self.max_bad, self.skipped, self.consecutive = stop, max_bad, 0, 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, accelerator: Accelerator,
              step: int) -> tuple[bool, bool]:
        """(stop now, skip this update), the same on every process."""
        bad = ~torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device).float())
        flags = torch.stack([torch.tensor(float(self.stop.received is not None), device=bad.device), bad.float()])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "max")
        stop, skip = (value > 0 for value in flags.tolist())
        self.consecutive = self.consecutive + 1 if skip else 0
        self.skipped += skip
        if self.consecutive > self.max_bad:
            raise RunError(f"{self.consecutive} non-finite steps in a row by step {step + 1} (their updates "
                           "skipped); lower --optim.lr or set --optim.grad_clip, then rerun to continue "
                           "from the last checkpoint")
        return stop, skip

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

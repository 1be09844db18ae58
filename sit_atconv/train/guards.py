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
    gradient norm) on any process? More than `max_bad` bad steps in a row stop the run with one line.

    Two ways to act, the same on every process:
    - on the host (`on_device=False`): one host sync per step (a two-value max all-reduce when
      distributed), and a bad update is skipped by not stepping at all;
    - on the device (`on_device=True`, for GPUs where a per-step sync stalls the launch queue): the
      check stays a tensor `ok` (1 good, 0 bad) that the fused optimizer (`found_inf`), the EMA weights
      and the meter consume without leaving the device; counts are read at `sync()` points (log and
      checkpoint steps, and every `sync_every` steps for the stop agreement of several processes).
    Both skip exactly the same updates (tested).
    """

    def __init__(self, stop: StopSignals, max_bad: int, on_device: bool = False, device: torch.device | str = "cpu",
                 sync_every: int = 10):
        self.stop, self.max_bad, self.skipped, self.consecutive = stop, max_bad, 0, 0
        self.on_device, self.sync_every = on_device, sync_every
        self._run, self._worst, self._count = (torch.zeros((), device=device) for _ in range(3))

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, accelerator: Accelerator,
              step: int) -> tuple[bool, bool, torch.Tensor | None]:
        """(stop now, skip this update on the host, device-side ok flag or None), the same on every process."""
        bad = ~torch.isfinite(loss.detach().float())
        if grad_norm is not None:
            bad = bad | ~torch.isfinite(torch.as_tensor(grad_norm, device=bad.device).float())
        if self.on_device:
            return self._check_on_device(bad.float(), accelerator, step)
        flags = torch.stack([torch.tensor(float(self.stop.received is not None), device=bad.device), bad.float()])
        if accelerator.num_processes > 1:
            flags = accelerator.reduce(flags, "max")
        stop, skip = (value > 0 for value in flags.tolist())
        self.consecutive = self.consecutive + 1 if skip else 0
        self.skipped += skip
        if self.consecutive > self.max_bad:
            self._fail(self.consecutive, step + 1)
        return stop, skip, None

    def _check_on_device(self, bad: torch.Tensor, accelerator: Accelerator, step: int):
        stop = self.stop.received is not None
        if accelerator.num_processes > 1:
            bad = accelerator.reduce(bad, "max")  # a collective, not a host sync
            if (step + 1) % self.sync_every:
                stop = False  # processes agree on stopping at sync steps only
            else:
                stop = accelerator.reduce(torch.tensor(float(stop), device=bad.device), "max").item() > 0
        self._run = (self._run + 1) * bad
        self._worst = torch.maximum(self._worst, self._run)
        self._count += bad
        return stop, False, 1 - bad

    def sync(self, step: int) -> None:
        """Read the device-side counts (one host sync); stop with one line after too many bad steps in a row."""
        if not self.on_device:
            return
        worst, count, run = torch.stack([self._worst, self._count, self._run]).tolist()
        self.skipped, self.consecutive = int(count), int(run)
        if worst > self.max_bad:
            self._fail(int(worst), step)
        self._worst = self._run.clone()

    @staticmethod
    def _fail(bad_in_a_row: int, step: int):
        raise RunError(f"{bad_in_a_row} non-finite steps in a row by step {step} (their updates skipped); lower "
                       "--optim.lr or set --optim.grad_clip, then rerun to continue from the last checkpoint")


def check_on_device(mode: str, device: torch.device, mixed_precision: str) -> bool:
    """`train.nonfinite_check` resolved: auto = on the device on GPUs (not with fp16, whose gradient scaler
    already skips non-finite steps through the same optimizer hook), on the host otherwise."""
    if mode == "auto":
        return device.type == "cuda" and mixed_precision != "fp16"
    return mode == "device"


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

"""The training loop: Accelerate, AdamW + schedule, EMA (and post-hoc EMA snapshots), checkpoints, metrics,
previews — for any task.

The loop knows nothing of diffusion: a task (`sit_atconv.tasks.Task`) turns a batch into a loss and may
preview the EMA model (sample grids, held-out accuracy). Resume is "rerun the same command": the data
order and every random draw of step s are pure functions of (seed, s, rank), so a run continued from a
checkpoint is bit-identical to one that never stopped (same world size).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..checkpoint import save_checkpoint
from ..config import RunConfig
from ..errors import RunError
from ..seeding import TRAIN_STEP, derive_seed
from .data_order import ResumableBatchSampler
from .ema import PowerFunctionEMA, update_ema
from .guards import StepGuard, StopSignals, check_on_device, finite_weights
from .phema_snapshots import save_snapshots
from .plots import plot_training
from .trackers import Tracker


@dataclass
class LoopSettings:
    """What the loop needs from a run config, and nothing else."""

    max_steps: int
    global_batch_size: int
    ema_decay: float
    grad_clip: float | None
    compile: bool
    seed: int
    num_workers: int
    log_every: int
    ckpt_every: int
    preview_every: int
    keep_last: int
    keep_every: int
    repeats: int = 1
    stop_signal: str | None = None
    max_bad_steps: int = 0
    phema_every: int = 0  # steps between post-hoc EMA snapshots (when the state tracks profiles)
    guard_on_device: bool = False  # the non-finite guard acts on the device (see StepGuard)

    @classmethod
    def from_config(cls, cfg: RunConfig, device: torch.device | str = "cpu") -> LoopSettings:
        t, lg = cfg.train, cfg.log
        return cls(t.max_steps, t.global_batch_size, t.ema_decay, cfg.optim.grad_clip, t.compile, t.seed,
                   cfg.data.num_workers, lg.log_every, lg.ckpt_every, lg.preview_every, lg.keep_last,
                   lg.keep_every or 0, cfg.augment.repeats if t.task == "classification" else 1, t.stop_signal,
                   t.max_bad_steps, t.phema_every,
                   check_on_device(t.nonfinite_check, torch.device(device), t.mixed_precision))


@dataclass
class TrainState:
    """Everything a checkpoint holds besides the config; `step` = optimizer steps taken."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    phema: PowerFunctionEMA | None = None  # post-hoc EMA profiles, when tracked

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                **({"phema": self.phema.state_dict()} if self.phema else {})}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        if self.phema:
            self.phema.load_state_dict(state["phema"])


class _Meter:
    """Running sums of the loss and task metrics since the last log, kept on device (no per-step sync).

    `ok` (the device-side guard's 0/1 flag) leaves a skipped step out of the means; throughput counts it.
    """

    def __init__(self, device: torch.device):
        self.device, self.sums, self.count, self.tick = device, {}, 0, time.perf_counter()
        self.good = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor, extra: dict[str, torch.Tensor], ok: torch.Tensor | None = None) -> None:
        for key, value in {"loss": loss, **extra}.items():
            if key not in self.sums:
                self.sums[key] = torch.zeros((), device=self.device)
            value = value.detach()
            self.sums[key] += value if ok is None else torch.where(ok > 0, value, 0.0)
        self.good += 1.0 if ok is None else ok
        self.count += 1

    def flush(self, accelerator: Accelerator, global_batch: int) -> dict[str, float]:
        """Means over good steps and processes (none when every step was skipped), plus throughput; resets."""
        elapsed, good = time.perf_counter() - self.tick, self.good.item()
        out = {k: accelerator.reduce(v / good, "mean").item() for k, v in self.sums.items()} if good else {}
        out.update(steps_per_sec=self.count / elapsed, images_per_sec=self.count * global_batch / elapsed)
        for v in [*self.sums.values(), self.good]:
            v.zero_()
        self.count, self.tick = 0, time.perf_counter()
        return out


def _loader(dataset: Dataset, s: LoopSettings, accelerator: Accelerator, start_step: int) -> DataLoader:
    sampler = ResumableBatchSampler(len(dataset), s.global_batch_size, accelerator.process_index,
                                    accelerator.num_processes, s.seed, start_step,
                                    item_seeds=getattr(dataset, "item_seeds", False), repeats=s.repeats)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=s.num_workers,
                      pin_memory=accelerator.device.type == "cuda", persistent_workers=s.num_workers > 0)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(b, device) for b in batch)
    return batch.to(device, non_blocking=True) if isinstance(batch, torch.Tensor) else batch


def _log_preview(tracker: Tracker, preview: dict[str, float | Path], step: int) -> None:
    """Numbers go to the metric log, files (sample grids) to the trackers that show images."""
    numbers = {k: v for k, v in preview.items() if not isinstance(v, Path)}
    if numbers:
        tracker.log(numbers, step)
    for key, value in preview.items():
        if isinstance(value, Path):
            tracker.log_image(key, value, step)
    plot_training(tracker.run_dir)  # RUN/training.png: loss and images/s so far


def _checkpoint(state: TrainState, run_dir: Path, s: LoopSettings, record: dict, accelerator: Accelerator) -> None:
    """Save the state at `state.step` (main process), never with non-finite weights (checked everywhere)."""
    if not all(finite_weights(m) for m in [state.model, state.ema, *(state.phema.profiles if state.phema else [])]):
        raise RunError(f"weights became non-finite by step {state.step}; no checkpoint written, the earlier ones "
                       "are kept; lower --optim.lr or set --optim.grad_clip, then rerun to continue from them")
    if accelerator.is_main_process:
        save_checkpoint(run_dir, state.step, {**state.state_dict(), "config": record}, s.keep_last, s.keep_every)
    accelerator.wait_for_everyone()


def training_loop(task, state: TrainState, dataset: Dataset, accelerator: Accelerator, run_dir: Path,
                  settings: LoopSettings, tracker: Tracker, config_record: dict) -> str | None:
    """Train `state` from `state.step` to `settings.max_steps` on `task`, logging and checkpointing.

    Returns the name of the signal that stopped it early (after a checkpoint of the last step), or None.
    """
    s, device, main = settings, accelerator.device, accelerator.is_main_process
    step_model = torch.compile(state.model) if s.compile else state.model
    step_model, state.optimizer = accelerator.prepare(step_model, state.optimizer)
    batches, meter = iter(_loader(dataset, s, accelerator, state.step)), _Meter(device)
    bar = tqdm(range(state.step, s.max_steps), initial=state.step, total=s.max_steps, desc="train",
               unit="step", disable=not main, dynamic_ncols=True)
    with StopSignals(s.stop_signal) as stop:
        guard = StepGuard(stop, s.max_bad_steps, s.guard_on_device, device)
        for step in bar:
            torch.manual_seed(derive_seed(TRAIN_STEP, s.seed, step, accelerator.process_index))  # this step's draws
            batch = task.prepare(_to_device(next(batches), device))
            with accelerator.autocast():
                loss, extra = task.loss(step_model, batch)
            accelerator.backward(loss)
            norm = accelerator.clip_grad_norm_(state.model.parameters(), s.grad_clip) if s.grad_clip else None
            stopping, skip, ok = guard.check(loss, norm, accelerator, step)
            if not skip:
                if ok is not None:  # the fused kernel skips the whole update (step counts included) when set
                    getattr(state.optimizer, "optimizer", state.optimizer).found_inf = 1 - ok
                state.optimizer.step()
                update_ema(state.ema, state.model, s.ema_decay, ok)
                if state.phema:
                    state.phema.update(state.model, step + 1, ok)
                meter.add(loss, extra, ok)
            state.scheduler.step()  # the schedule follows the step count, skipped steps included
            state.optimizer.zero_grad(set_to_none=True)
            state.step = done = step + 1
            last = done == s.max_steps
            if done % s.log_every == 0 or done % s.ckpt_every == 0 or last or stopping:
                guard.sync(done)  # device-side counts read here, before any log or checkpoint
            if (done % s.log_every == 0 or last or stopping) and meter.count:
                metrics = {**meter.flush(accelerator, s.global_batch_size), "lr": state.scheduler.get_last_lr()[0],
                           **({"skipped_steps": guard.skipped} if guard.skipped else {})}
                tracker.log(metrics, done)
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                img_s=f"{metrics['images_per_sec']:.0f}")
            if state.phema and (done % s.phema_every == 0 or last):
                if main:
                    save_snapshots(run_dir, done, state.phema, config_record)
                accelerator.wait_for_everyone()
            if done % s.ckpt_every == 0 or last or stopping:
                _checkpoint(state, run_dir, s, config_record, accelerator)
            if stopping:
                bar.close()
                return stop.received or "a signal on another process"
            if s.preview_every and (done % s.preview_every == 0 or last):
                if main:
                    _log_preview(tracker, task.preview(state.ema, done, run_dir), done)
                accelerator.wait_for_everyone()
                meter.tick = time.perf_counter()  # throughput measures training, not previews
    bar.close()
    return None

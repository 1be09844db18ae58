"""The training loop: data -> (encoder) -> SiT -> transport loss -> AdamW + EMA, under Accelerate.

Resume is "rerun the same command": the data order and every random draw of step s are pure
functions of (seed, s, rank), so a run continued from a checkpoint is bit-identical to one that
never stopped (same world size).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import TrainConfig, config_to_dict, save_config
from ..data import MirroredByIndex, build_dataset
from ..sampling import (
    SamplingOptions,
    autoencoder_for,
    build_model,
    build_transport,
    class_grid_labels,
    generate,
    save_grid,
)
from .checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from .data_order import ResumableBatchSampler
from .ema import create_ema, update_ema
from .optim import build_optimizer, warmup_schedule
from .trackers import Tracker


class RunError(RuntimeError):
    """The run folder cannot be used as asked; one line naming the problem and the fix."""


def run_dir_for(cfg: TrainConfig) -> Path:
    name = cfg.log.run_name or f"{cfg.model.name.replace('/', '_')}-{cfg.model.mixer}-{cfg.data.source}"
    return Path(cfg.log.results_dir) / name


def step_seed(seed: int, step: int, rank: int) -> int:
    """The torch seed of one (step, rank): noise, times and label dropout of that step."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def find_resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """Which checkpoint to continue from, refusing anything that would overwrite existing work."""
    resume = cfg.log.resume
    if resume == "none":
        if list_checkpoints(run_dir):
            raise RunError(f"{run_dir} already holds checkpoints; continue it with --resume auto, "
                           f"or start a new run with --log.run_name NEW_NAME")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not path.is_file():
        raise RunError(f"--resume {resume}: no such checkpoint file; pass a .pt from a run's checkpoints/ folder")
    return path


def _check_same_model(saved: dict, cfg: TrainConfig, where: Path) -> None:
    ours = config_to_dict(cfg)["model"]
    if saved["model"] != ours:
        diff = sorted(k for k in ours if saved["model"].get(k) != ours[k])
        raise RunError(f"{where} was trained with a different model ({', '.join('model.' + k for k in diff)}); "
                       f"use --log.run_name NEW_NAME for a new run or restore those settings")


def _summary(cfg: TrainConfig, n_params: int, accelerator: Accelerator) -> str:
    m, world = cfg.model, accelerator.num_processes
    width = f"depth {m.depth}, width {m.hidden_size}" if m.depth or m.hidden_size else "zoo size"
    return (f"{m.name} ({width}) | mixer {m.mixer} | {n_params / 1e6:.2f}M params | {world} process"
            f"{'es' if world > 1 else ''} | global batch {cfg.optim.global_batch_size} "
            f"({cfg.optim.global_batch_size // world} per process) | precision {cfg.optim.mixed_precision} | "
            f"device {accelerator.device}")


def train(cfg: TrainConfig, accelerator: Accelerator | None = None) -> Path:
    """Train (or continue) the run `cfg` describes; returns its folder."""
    o = cfg.optim
    accelerator = accelerator or Accelerator(mixed_precision=o.mixed_precision)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if o.global_batch_size % world:
        raise RunError(f"global batch {o.global_batch_size} is not divisible by {world} processes; "
                       f"pass --global-batch-size as a multiple of {world}")
    run_dir = run_dir_for(cfg)
    resume_from = find_resume_checkpoint(cfg, run_dir)

    torch.manual_seed(o.seed)
    autoencoder = autoencoder_for(cfg, device)
    dataset = build_dataset(cfg.data, cfg.model, autoencoder)
    if cfg.data.random_flip:  # flips chosen by the (seeded, resumable) index order, not by worker RNGs
        dataset = MirroredByIndex(dataset)
    model = build_model(cfg).to(device)
    ema = create_ema(model)
    optimizer = build_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps)
    scheduler = warmup_schedule(optimizer, o.warmup_steps)
    start_step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _check_same_model(state["config"], cfg, resume_from)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    n_params = sum(p.numel() for p in model.parameters())
    accelerator.print(_summary(cfg, n_params, accelerator))
    accelerator.print(f"run folder {run_dir} | " + (f"resuming from {resume_from.name} (step {start_step})"
                                                     if resume_from else "new run"))

    step_model = torch.compile(model) if o.compile else model
    step_model, optimizer = accelerator.prepare(step_model, optimizer)
    transport = build_transport(cfg)
    sampler = ResumableBatchSampler(len(dataset), o.global_batch_size, rank, world, o.seed, start_step)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=cfg.data.num_workers > 0)
    encode = cfg.data.source == "images" and cfg.data.autoencoder != "identity"
    tracker = Tracker(run_dir, cfg.log.trackers, config_to_dict(cfg), cfg.log.wandb_project,
                      cfg.log.run_name, enabled=accelerator.is_main_process)

    def checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            payload = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "rng": rng_state(),
                       "data": {"samples_seen": step * o.global_batch_size}, "config": config_to_dict(cfg)}
            save_checkpoint(run_dir, step, payload, cfg.log.keep_last, cfg.log.keep_every or 0)
        accelerator.wait_for_everyone()

    def preview(step: int) -> None:
        if accelerator.is_main_process:
            per_class = 8
            labels = class_grid_labels(cfg.model.num_classes, per_class)
            images = generate(ema, cfg, SamplingOptions(), labels, range(len(labels)), o.seed, autoencoder,
                              device, batch_size=64, show_progress=False)
            path = save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=per_class)
            tracker.log_image("samples", path, step)
        accelerator.wait_for_everyone()

    batches = iter(loader)
    bar = tqdm(range(start_step, o.max_steps), initial=start_step, total=o.max_steps, desc="train",
               unit="step", disable=not accelerator.is_main_process, dynamic_ncols=True)
    loss_sum, loss_count, tick = torch.zeros((), device=device), 0, time.perf_counter()
    step = start_step
    for step in bar:
        torch.manual_seed(step_seed(o.seed, step, rank))
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if encode:
            with torch.no_grad():
                x = autoencoder.encode(x, sample=True)
        with accelerator.autocast():
            loss = transport.training_losses(step_model, x, {"y": y})["loss"].mean()
        accelerator.backward(loss)
        if o.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, o.ema_decay)
        loss_sum += loss.detach()
        loss_count += 1

        done = step + 1
        if done % cfg.log.log_every == 0 or done == o.max_steps:
            mean_loss = accelerator.reduce(loss_sum / loss_count, "mean").item()
            elapsed = time.perf_counter() - tick
            metrics = {"loss": mean_loss, "steps_per_sec": loss_count / elapsed,
                       "images_per_sec": loss_count * o.global_batch_size / elapsed,
                       "lr": scheduler.get_last_lr()[0]}
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss became {mean_loss} at step {done}; lower --optim.lr or enable "
                                         f"--optim.grad_clip")
            tracker.log(metrics, done)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{metrics['images_per_sec']:.0f}")
            loss_sum.zero_()
            loss_count, tick = 0, time.perf_counter()
        if done % cfg.log.ckpt_every == 0 or done == o.max_steps:
            checkpoint(done)
        if cfg.log.sample_every and (done % cfg.log.sample_every == 0 or done == o.max_steps):
            preview(done)
    bar.close()
    tracker.close()
    if start_step >= o.max_steps:
        accelerator.print(f"{run_dir} is already at step {start_step} (max_steps {o.max_steps}); nothing to do. "
                          "Raise --max-steps to train longer.")
    else:
        accelerator.print(f"done: step {o.max_steps}; checkpoints in {run_dir / 'checkpoints'}, "
                          f"samples in {run_dir / 'samples'}, metrics in {run_dir / 'metrics.jsonl'}")
    return run_dir

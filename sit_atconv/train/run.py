"""`train(cfg)`: build a run from its config (through `sit_atconv.build`), resume it, and drive the loop."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..build import build_training, network_section, resolve_data, resolve_repa, resume_state, run_dir_for
from ..config import RunConfig, config_to_dict
from ..config_io import save_config
from ..errors import RunError
from .ema import PowerFunctionEMA, create_ema
from .guards import RunLock
from .loop import LoopSettings, TrainState, training_loop
from .optim import apply_settings, build_optimizer, lr_schedule, scaled_lr
from .trackers import Tracker


def _summary(cfg: RunConfig, n_params: int, accelerator: Accelerator) -> str:
    """One start-up line: network, parameters, processes, batch, precision, device."""
    t, world = cfg.train, accelerator.num_processes
    if network_section(cfg) == "classifier":
        net = f"{cfg.classifier.tag()} ({cfg.classifier.num_classes} classes, {cfg.classifier.input_size} px)"
    else:
        a = cfg.model.architecture()
        net = (f"{cfg.model.name or 'SiT'} (depth {a['depth']}, width {a['hidden_size']}, patch {a['patch_size']}) "
               f"| mixer {cfg.model.mixer}")
    return (f"{net} | {n_params / 1e6:.2f}M params | {world} process{'es' if world > 1 else ''} | global batch "
            f"{t.global_batch_size} ({t.global_batch_size // world} per process) | lr {scaled_lr(cfg):.3g} | "
            f"precision {t.mixed_precision} | device {accelerator.device}")


def _enable_tf32(accelerator: Accelerator) -> None:
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _lock(run_dir: Path, accelerator: Accelerator) -> RunLock:
    """The run-folder lock, taken by the main process; every process raises the same one-line error if not."""
    lock, outcome = RunLock(run_dir, enabled=accelerator.is_main_process), ["ok"]
    if accelerator.is_main_process:
        try:
            lock.__enter__()
        except RunError as err:
            outcome = [str(err)]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[0] != "ok":
        raise RunError(outcome[0])
    if lock.taken_over:
        accelerator.print(f"took over the lock of {lock.taken_over}, a process that no longer runs")
    return lock


def _state(cfg: RunConfig, model, resumed: dict | None, log, fused: bool = False) -> TrainState:
    """Model, EMA, optimizer and schedule, restored from `resumed`; the optimizer follows today's config
    (changed settings are applied and said, never silently kept from the checkpoint)."""
    o = cfg.optim
    optimizer = build_optimizer(model, scaled_lr(cfg), o.weight_decay, o.betas, o.eps, fused=fused)
    rels = cfg.train.phema_sigma_rels
    state = TrainState(model, create_ema(model), optimizer, lr_schedule(optimizer, cfg),
                       phema=PowerFunctionEMA(model, rels) if rels else None)
    if resumed is not None:
        _check_same_phema(resumed, rels)
        state.load_state_dict(resumed)
        apply_settings(state.optimizer, state.scheduler, cfg)
        old, new = resumed["config"], config_to_dict(cfg)
        changed = [f"{s}.{k} {old.get(s, {}).get(k)} -> {v}" for s in ("optim", "train") for k, v in new[s].items()
                   if k in old.get(s, {}) and old[s][k] != v]
        if changed:
            log("resuming with changed settings, applied from here on: " + "; ".join(changed))
    return state


def _check_same_phema(resumed: dict, sigma_rels: list[float]) -> None:
    """Post-hoc EMA profiles average from step 1: their widths can neither change nor start mid-run."""
    saved = list(resumed["config"].get("train", {}).get("phema_sigma_rels") or [])
    if saved != list(sigma_rels):
        raise RunError(f"train.phema_sigma_rels: {resumed['path'].name} tracks {saved or 'none'}, asked "
                       f"{list(sigma_rels) or 'none'}; the profiles average from step 1, so keep the run's widths "
                       "or start a new run with --run-name NEW_NAME")


def train(cfg: RunConfig, accelerator: Accelerator | None = None) -> Path:
    """Train (or continue) the run `cfg` describes; returns its folder. One writer per folder (RUN/.lock)."""
    cfg = resolve_repa(resolve_data(cfg))  # what the store and encoder imply, recorded in the run
    accelerator = accelerator or Accelerator(mixed_precision=cfg.train.mixed_precision)
    _enable_tf32(accelerator)
    if cfg.train.global_batch_size % accelerator.num_processes:
        raise RunError(f"global batch {cfg.train.global_batch_size} is not divisible by {accelerator.num_processes} "
                       f"processes; pass --global-batch-size as a multiple of {accelerator.num_processes}")
    run_dir = run_dir_for(cfg)
    lock = _lock(run_dir, accelerator)
    try:
        _train_locked(cfg, accelerator, run_dir)
    finally:
        lock.__exit__(None, None, None)
    return run_dir


def _train_locked(cfg: RunConfig, accelerator: Accelerator, run_dir: Path) -> None:
    resumed = resume_state(cfg, run_dir, log=accelerator.print)
    torch.manual_seed(cfg.train.seed)
    model, dataset, task = build_training(cfg, accelerator.device)
    settings = LoopSettings.from_config(cfg, accelerator.device)
    state = _state(cfg, model, resumed, accelerator.print, fused=settings.guard_on_device)
    start_step = state.step
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    accelerator.print(_summary(cfg, sum(p.numel() for p in model.parameters()), accelerator))
    accelerator.print(f"run folder {run_dir} | " + (f"resuming from {resumed['path'].name} (step {start_step})"
                                                     if resumed else "new run"))
    record = config_to_dict(cfg)
    tracker = Tracker(run_dir, cfg.log.trackers, record, cfg.log.wandb_project, cfg.log.run_name,
                      enabled=accelerator.is_main_process, resume_step=start_step if resumed else None)
    try:
        stopped = training_loop(task, state, dataset, accelerator, run_dir, settings, tracker,
                                record)
    finally:
        tracker.close()
    if stopped:
        accelerator.print(f"stopped by {stopped} at step {state.step}: checkpoint written; rerun the same command "
                          "to continue")
    elif start_step >= cfg.train.max_steps:
        accelerator.print(f"{run_dir} is already at step {start_step} (max_steps {cfg.train.max_steps}); nothing "
                          "to do. Raise --max-steps to train longer.")
    else:
        samples = f", samples in {run_dir / 'samples'}" if (run_dir / "samples").is_dir() else ""
        accelerator.print(f"done: step {cfg.train.max_steps}; checkpoints in {run_dir / 'checkpoints'}{samples}, "
                          f"metrics in {run_dir / 'metrics.jsonl'}")

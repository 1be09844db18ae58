"""AdamW with explicit parameter groups (no weight decay on biases, norms, gains and `difference_control`)
and the learning-rate schedule: linear batch scaling, warm-up, constant or cosine."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: matrices/kernels decay; 1-D tensors (biases, norm weights,
    LayerScale gammas, ATConv's `difference_control`) do not."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith("difference_control") else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused when every parameter lives on CUDA, or when asked (the device-side
    non-finite guard skips updates through the fused kernel's `found_inf`)."""
    on_cuda = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             fused=True if (on_cuda or fused) else None)


def scaled_lr(cfg) -> float:
    """`optim.lr`, scaled linearly to the global batch when `optim.lr_reference_batch` is set."""
    o = cfg.optim
    return o.lr * cfg.train.global_batch_size / o.lr_reference_batch if o.lr_reference_batch else o.lr


def lr_factor(step: int, warmup_steps: int, warmup_start: float, total_steps: int, schedule: str,
              final: float) -> float:
    """Multiplier on the base LR after `step` optimizer steps: linear warm-up from `warmup_start` (a fraction
    of the base LR; 0 gives the first step 1 / warmup_steps), then constant or cosine down to `final`."""
    if step < warmup_steps:
        return warmup_start + (1.0 - warmup_start) * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule (`optim.warmup_*`, `optim.schedule`, `optim.min_lr`) as a resumable LambdaLR."""
    o, base = cfg.optim, scaled_lr(cfg)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, warmup_steps=o.warmup_steps, warmup_start=o.warmup_lr / base, total_steps=cfg.train.max_steps,
        schedule=o.schedule, final=o.min_lr / base))


def apply_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg) -> None:
    """Make a resumed optimizer and schedule follow `cfg` (a restored optimizer state carries the old lr,
    betas, eps and weight decay): the base LR, the hyper-parameters and the current LR are set anew."""
    o, base = cfg.optim, scaled_lr(cfg)
    for group, decays in zip(optimizer.param_groups, (True, False)):
        group.update(initial_lr=base, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay if decays else 0.0)
    scheduler.base_lrs = [base] * len(optimizer.param_groups)
    factor = scheduler.lr_lambdas[0](max(scheduler.last_epoch, 0))
    for group in optimizer.param_groups:
        group["lr"] = base * factor
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]

"""Exponential moving average of model weights (identical on every process: same inputs, same math)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode that tracks its weights."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (buffers are copied)."""
    ema_params = [p for p in ema.parameters()]
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for ema_buf, buf in zip(ema.buffers(), model.buffers()):
        ema_buf.copy_(buf)

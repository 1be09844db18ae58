"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the model callable.

Works with every sampler: the wrapper has the model's signature model(x, t, y).
Times follow the package convention (t = 0 noise, t = 1 data); a REPA-style interval
[a, b] written with t = 1 as noise is [1 - b, 1 - a] here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .paths import expand_t


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, guided_channels: int | None = None) -> Tensor:
    """uncond + scale * (cond - uncond) on channels (dim 1); guided_channels=k guides channels [:k] only.

    k = 3 reproduces DiT/SiT `forward_with_cfg`, which guides the first 3 output channels and takes the
    rest from the conditional output; None guides every channel (standard CFG).
    """
    guided = uncond + scale * (cond - uncond)
    if guided_channels is None:
        return guided
    if not 0 < guided_channels <= cond.shape[1]:
        raise ValueError(f"guided_channels must be in [1, {cond.shape[1]}] or None, got {guided_channels}")
    return torch.cat([guided[:, :guided_channels], cond[:, guided_channels:]], dim=1)


class CFGModel:
    """model(x, t, y) guided by its class-dropped output; the null class index is num_classes.

    One forward on the batch [x, x] with labels [y, null]. With an interval (low, high), guidance is
    applied only where low <= t <= high; elsewhere the conditional output is returned (and when no
    sample is inside, the unconditional half is not run). scale == 1 or num_classes == 1
    (unconditional model) is a plain model call. The output keeps the model's channels (2C for
    learn_sigma); the transport uses the first C.
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor, Tensor], Tensor],
        *,
        scale: float,
        num_classes: int,
        guided_channels: int | None = None,
        interval: tuple[float, float] | None = None,
    ):
        if interval is not None and not interval[0] <= interval[1]:
            raise ValueError(f"guidance interval must be (low, high) with low <= high, got {interval}")
        self.model, self.scale, self.num_classes = model, scale, num_classes
        self.guided_channels, self.interval = guided_channels, interval

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        if self.scale == 1 or self.num_classes == 1:
            return self.model(x, t, y)
        inside = None
        if self.interval is not None:
            inside = (t >= self.interval[0]) & (t <= self.interval[1])
            if not bool(inside.any()):
                return self.model(x, t, y)
        null = torch.full_like(y, self.num_classes)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        guided = cfg_combine(cond, uncond, self.scale, self.guided_channels)
        if inside is not None:
            guided = torch.where(expand_t(inside, guided), guided, cond)
        return guided

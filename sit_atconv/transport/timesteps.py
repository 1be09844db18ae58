"""Training-time distributions p(t): uniform (SiT), logit-normal, and a resolution shift.

Convention: t = 0 noise, t = 1 data (SiT's; the only one in this package). A draw is
    base u ~ uniform on [0, 1]  or  u = sigmoid(mean + std * n), n ~ N(0, 1)   (logit-normal, SD3 eq. 19)
    shifted u' = shift * u / (1 + (shift - 1) * u)                                (1 = no shift)
    t = t0 + (t1 - t0) * u'                                     (the transport's training window)
so train_eps clipping is kept exactly as SiT's uniform draw keeps it, and `uniform` with shift 1 is
SiT's `rand * (t1 - t0) + t0`, draw for draw. The shift is increasing on [0, 1] with fixed ends;
shift > 1 moves mass towards t = 1 (data), shift < 1 towards t = 0 (noise).

Other papers write t with 1 = noise (t_theirs = 1 - t). With s their resolution shift and m their
logit-normal mean, the same distribution here is  time_shift = 1 / s,  time_mean = -m,  time_std = their std:
- SD3 (Esser et al. 2024): logit-normal (m=0, std=1), shift s = sqrt(pixels / base pixels), e.g. 3 at
  1024 px -> time_shift = 1/3 (more noise).
- RAE (Zheng et al. 2025): shift alpha = sqrt(token dim / 4096) on its t = 1 noise grid -> time_shift = 1/alpha.
- LightningDiT (Yao et al. 2025): SiT's convention already (t = 1 data), logit-normal mean 0, std 1 for
  training -> time_sampling=logit_normal, time_mean=0, time_std=1 as written.
Pure math: no I/O, no global state besides torch's RNG for the draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TIME_SAMPLINGS = ("uniform", "logit_normal")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t -> shift * t / (1 + (shift - 1) t): a monotone map of [0, 1] onto itself (t = 0 noise)."""
    return shift * t / (1 + (shift - 1) * t)


def unshift_time(t: Tensor, shift: float) -> Tensor:
    """Inverse of `shift_time`: t / (shift - (shift - 1) t), i.e. `shift_time(t, 1 / shift)`."""
    return t / (shift - (shift - 1) * t)


@dataclass(frozen=True)
class TimeSampling:
    """How training draws t on [0, 1] before the window map (see the module docstring)."""

    kind: str = "uniform"
    mean: float = 0.0  # logit-normal: mean of logit(u)
    std: float = 1.0  # logit-normal: std of logit(u)
    shift: float = 1.0  # 1 = no shift

    def __post_init__(self) -> None:
        if self.kind not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {self.kind!r}; valid options: "
                             f"{', '.join(repr(k) for k in TIME_SAMPLINGS)}")
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"time_std must be a finite number > 0, got {self.std}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"time_shift must be a finite number > 0, got {self.shift}")
        if not math.isfinite(self.mean):
            raise ValueError(f"time_mean must be finite, got {self.mean}")
        if self.kind == "uniform" and (self.mean, self.std) != (0.0, 1.0):
            raise ValueError("time_mean/time_std apply to time_sampling='logit_normal' only")

    @classmethod
    def from_noise_at_one(cls, kind: str = "uniform", mean: float = 0.0, std: float = 1.0,
                          shift: float = 1.0) -> TimeSampling:
        """The same p(t) given in the t = 1 noise convention (SD3, RAE): mean -> -mean, shift -> 1 / shift."""
        return cls(kind, -mean if kind == "logit_normal" else mean, std, 1.0 / shift)

    def sample(self, n: int, *, low: float = 0.0, high: float = 1.0, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> Tensor:
        """n draws of t in [low, high] from torch's global RNG (uniform: exactly SiT's expression)."""
        if self.kind == "uniform":
            u = torch.rand(n, device=device, dtype=dtype)
        else:
            u = torch.sigmoid(torch.randn(n, device=device, dtype=dtype) * self.std + self.mean)
        if self.shift != 1.0:
            u = shift_time(u, self.shift)
        return u * (high - low) + low

    def cdf(self, t: Tensor, *, low: float = 0.0, high: float = 1.0) -> Tensor:
        """P(T <= t) in closed form for draws of `sample(low=low, high=high)` (tests, plots)."""
        u = ((t - low) / (high - low)).clamp(0, 1)
        u = unshift_time(u, self.shift) if self.shift != 1.0 else u
        if self.kind == "uniform":
            return u
        return torch.special.ndtr((torch.logit(u) - self.mean) / self.std)

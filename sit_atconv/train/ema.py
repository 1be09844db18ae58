"""Moving averages of model weights: the classic EMA and EDM2's power-function EMA profiles (identical on
every process: same inputs, same math)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..posthoc_ema import power_ema_beta, sigma_rel_to_gamma


def create_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode that tracks its weights."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, ok: torch.Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter (buffers are copied).

    `ok`: a device-side 0/1 flag of the step (the non-finite guard); 0 leaves the EMA as it was.
    """
    ema_params = [p for p in ema.parameters()]
    params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay if ok is None else ok * (1.0 - decay))
    for ema_buf, buf in zip(ema.buffers(), model.buffers()):
        ema_buf.copy_(buf if ok is None else torch.where(ok > 0, buf, ema_buf))


class PowerFunctionEMA:
    """EDM2's power-function EMA profiles, one frozen model copy per relative width σ_rel, all updated after
    every optimizer step t (counted from 1 at the start of training) with β_t = (1 − 1/t)^(γ+1), Eq. 127:
    each copy is then the average of θ_1..θ_t weighted ∝ τ^γ. Snapshots of them let any other width be
    reconstructed after training (`sit_atconv.posthoc_ema`, `python -m sit_atconv.phema`)."""

    def __init__(self, model: nn.Module, sigma_rels: list[float]):
        self.sigma_rels = list(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.profiles = [create_ema(model) for _ in self.sigma_rels]

    def update(self, model: nn.Module, step: int, ok: torch.Tensor | None = None) -> None:
        """Fold in the weights after optimizer step `step` (1-based); `ok` as in `update_ema`."""
        for gamma, profile in zip(self.gammas, self.profiles):
            update_ema(profile, model, power_ema_beta(gamma, step), ok)

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "profiles": [p.state_dict() for p in self.profiles]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sigma_rels"]) != self.sigma_rels:
            raise ValueError(f"post-hoc EMA widths differ: saved {state['sigma_rels']}, asked {self.sigma_rels}")
        for profile, saved in zip(self.profiles, state["profiles"]):
            profile.load_state_dict(saved)

"""Post-hoc EMA math (EDM2: Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3 and App. C). Pure: numbers and tensors in, numbers and tensors out; no files, no runs.

A *power-function EMA profile* of exponent γ at optimizer step t averages the weights θ_1..θ_t with density
p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]; its width relative to t is σ_rel (Eq. 123). Training tracks a few widths
with β_t = (1 − 1/t)^(γ+1) (Eq. 127), which gives θ_τ exactly the mass of p on (τ−1, τ]. Snapshots of those
profiles taken every N steps span profiles of any other width: solving the least-squares problem
min_x ‖Σ_i x_i p_i − p_target‖² (normal equations of the profiles' inner products, Eq. 151, Algorithm 3)
gives the weights of the snapshots whose weighted sum is the EMA of the asked width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)  # γ = 0: the plain average of all weights so far (Eq. 123 at γ = 0)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Eq. 123: the standard deviation of the profile τ^γ on [0, t], relative to t."""
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Eq. 126: the exponent γ ≥ 0 of relative width `sigma_rel` in (0, MAX_SIGMA_REL].

    That is the root of (γ+2)²(γ+3) − σ_rel⁻²(γ+1) on [0, ∞), where σ_rel(γ) falls monotonically; found by
    bisection to the last bit (plain float arithmetic: the same γ on every machine and process).
    """
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}], got {sigma_rel}")
    inv_var = sigma_rel ** -2.0

    def cubic(g: float) -> float:
        return (g + 2.0) ** 2 * (g + 3.0) - inv_var * (g + 1.0)

    lo, hi = 0.0, 1.0
    while cubic(hi) < 0.0:
        lo, hi = hi, 2.0 * hi
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            return hi
        lo, hi = (mid, hi) if cubic(mid) < 0.0 else (lo, mid)


def power_ema_beta(gamma: float, step: int) -> float:
    """Eq. 127 with one step per update: β_t = (1 − 1/t)^(γ+1) for optimizer step t = 1, 2, ... (β_1 = 0)."""
    if step < 1:
        raise ValueError(f"power-function EMA steps count from 1, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(steps_a: Sequence[float], gammas_a: Sequence[float], steps_b: Sequence[float],
                           gammas_b: Sequence[float]) -> np.ndarray:
    """Eq. 151: ⟨p_a, p_b⟩ = ∫ p_a(τ) p_b(τ) dτ for every pair (rows a, columns b), in float64.

    With m = min(t_a, t_b): (γ_a+1)(γ_b+1)/(γ_a+γ_b+1) · (m/t_a)^(γ_a+1) (m/t_b)^(γ_b+1) / m — written with
    ratios ≤ 1, so large steps and exponents never overflow.
    """
    ta, ga = np.asarray(steps_a, np.float64)[:, None], np.asarray(gammas_a, np.float64)[:, None]
    tb, gb = np.asarray(steps_b, np.float64)[None, :], np.asarray(gammas_b, np.float64)[None, :]
    m = np.minimum(ta, tb)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (m / ta) ** (ga + 1) * (m / tb) ** (gb + 1) / m


def posthoc_coefficients(steps: Sequence[int], gammas: Sequence[float], target_step: int,
                         target_gamma: float) -> np.ndarray:
    """Weights x of the snapshot profiles (t_i, γ_i) whose sum best matches the profile (target_step,
    target_gamma) in L2 (Algorithm 3: A x = b with A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p_target⟩), rescaled to
    sum to 1 so that the result stays an average of weights."""
    gram = profile_inner_products(steps, gammas, steps, gammas)
    rhs = profile_inner_products(steps, gammas, [target_step], [target_gamma])[:, 0]
    x = np.linalg.solve(gram, rhs)
    return x / x.sum()


def profile_fit_error(steps: Sequence[int], gammas: Sequence[float], coefficients: Sequence[float],
                      target_step: int, target_gamma: float) -> float:
    """‖Σ_i x_i p_i − p_target‖ / ‖p_target‖: how far the reconstructed profile is from the asked one."""
    x = np.asarray(coefficients, np.float64)
    gram = profile_inner_products(steps, gammas, steps, gammas)
    rhs = profile_inner_products(steps, gammas, [target_step], [target_gamma])[:, 0]
    own = profile_inner_products([target_step], [target_gamma], [target_step], [target_gamma])[0, 0]
    return math.sqrt(max(float(x @ gram @ x - 2.0 * x @ rhs + own), 0.0) / own)


class WeightedSum:
    """Σ_i w_i · state_i over state dicts added one at a time (float64 accumulation, cast back at the end).

    A tensor equal in every state (a buffer, a frozen weight) is kept exactly: with weights that sum to 1
    that is the sum without its rounding. A non-float tensor that changes (a counter) is taken from the last
    state added.
    """

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.first: dict[str, torch.Tensor] = {}
        self.latest: dict[str, torch.Tensor] = {}
        self.constant: dict[str, bool] = {}

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        if self.first and state.keys() != self.first.keys():
            raise ValueError(f"state dicts differ in their keys: {sorted(set(state) ^ set(self.first))[:3]}")
        for key, value in state.items():
            if key not in self.first:
                self.first[key], self.constant[key] = value, True
            elif self.constant[key] and not torch.equal(self.first[key], value):
                self.constant[key] = False
            if not value.is_floating_point():
                self.latest[key] = value
                continue
            term = value.detach().to(torch.float64) * weight
            if key in self.total:
                self.total[key].add_(term)
            else:
                self.total[key] = term

    def result(self) -> dict[str, torch.Tensor]:
        """The weighted sum, each tensor in its own dtype."""
        return {key: first if self.constant[key] else self.latest[key] if key in self.latest
                else self.total[key].to(first.dtype) for key, first in self.first.items()}

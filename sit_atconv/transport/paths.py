"""Interpolant paths: alpha(t), sigma(t), their derivatives, and drift/score/noise conversions.

Convention (the only one in this package): t = 0 is noise, t = 1 is data, and
x_t = alpha(t) * x_data + sigma(t) * noise with noise ~ N(0, I)  (SiT, Ma et al. 2024, eq. 1).
Every method here is elementwise in t: pass t already shaped to broadcast against x
(see `expand_t`). No state, no randomness, no I/O.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def expand_t(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (B,) time vector to (B, 1, ..., 1) so it broadcasts against x of shape (B, ...)."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


class Path:
    """An interpolant x_t = alpha x_data + sigma noise; subclasses define alpha, sigma, d log alpha / dt."""

    name = ""

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha(t), d alpha / dt): the data coefficient."""
        raise NotImplementedError

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma(t), d sigma / dt): the noise coefficient."""
        raise NotImplementedError

    def d_log_alpha(self, t: Tensor) -> Tensor:
        """alpha'(t) / alpha(t), written in a numerically stable closed form."""
        raise NotImplementedError

    def drift_var(self, t: Tensor) -> Tensor:
        """g(t) = (alpha'/alpha) sigma^2 - sigma sigma': velocity = (alpha'/alpha) x + g * score.

        SiT eq. 7 (its `compute_drift`); also the "SBDM" diffusion coefficient.
        """
        sigma, d_sigma = self.sigma(t)
        return self.d_log_alpha(t) * sigma**2 - sigma * d_sigma

    def interpolate(self, t: Tensor, noise: Tensor, data: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t, u_t): the interpolant and its time derivative alpha' x_data + sigma' noise (SiT eq. 1-2)."""
        alpha, d_alpha = self.alpha(t)
        sigma, d_sigma = self.sigma(t)
        return alpha * data + sigma * noise, d_alpha * data + d_sigma * noise

    def velocity_from_score(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Probability-flow velocity from the score of p_t (SiT eq. 7)."""
        return self.d_log_alpha(t) * x + self.drift_var(t) * score

    def score_from_velocity(self, velocity: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Inverse of `velocity_from_score`; singular only where sigma = 0 (t = 1 on every path)."""
        sigma, d_sigma = self.sigma(t)
        ratio = 1.0 / self.d_log_alpha(t)  # alpha / alpha', 0 at t = 0 on Linear/GVP
        return (ratio * velocity - x) / (sigma**2 - ratio * sigma * d_sigma)

    def score_from_noise(self, noise: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Score from the noise prediction E[noise | x_t]: score = -noise / sigma (Tweedie)."""
        return -noise / self.sigma(t)[0]

    def noise_from_score(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """E[noise | x_t] = -sigma * score (Tweedie)."""
        return -self.sigma(t)[0] * score

    def data_from_score(self, score: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """E[x_data | x_t] = (x + sigma^2 score) / alpha (Tweedie)."""
        return (x + self.sigma(t)[0] ** 2 * score) / self.alpha(t)[0]


class LinearPath(Path):
    """alpha = t, sigma = 1 - t (rectified flow / SiT "Linear")."""

    name = "Linear"

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return t, torch.ones_like(t)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return 1 - t, -torch.ones_like(t)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return 1 / t


class GVPPath(Path):
    """alpha = sin(pi t / 2), sigma = cos(pi t / 2), so alpha^2 + sigma^2 = 1 (SiT "GVP")."""

    name = "GVP"

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sin(t * math.pi / 2), math.pi / 2 * torch.cos(t * math.pi / 2)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.cos(t * math.pi / 2), -math.pi / 2 * torch.sin(t * math.pi / 2)

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return math.pi / (2 * torch.tan(t * math.pi / 2))


class VPPath(Path):
    """The VP-SDE of score-based diffusion (beta linear from sigma_max at t=0 to sigma_min at t=1).

    log alpha = -(1-t)^2 (sigma_max - sigma_min) / 4 - (1-t) sigma_min / 2, sigma = sqrt(1 - alpha^2).
    alpha(0) = exp(-5.025) ~ 0.0066 for the defaults, so p_0 is N(0, I) only approximately.
    """

    name = "VP"

    def __init__(self, sigma_min: float = 0.1, sigma_max: float = 20.0):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def log_alpha(self, t: Tensor) -> Tensor:
        """log alpha(t)."""
        s = 1 - t
        return -0.25 * s**2 * (self.sigma_max - self.sigma_min) - 0.5 * s * self.sigma_min

    def beta(self, t: Tensor) -> Tensor:
        """beta(t) = sigma_min + (1 - t)(sigma_max - sigma_min) = 2 d log alpha / dt."""
        return self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)

    def alpha(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha = torch.exp(self.log_alpha(t))
        return alpha, alpha * self.d_log_alpha(t)

    def sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        two_log_alpha = 2 * self.log_alpha(t)
        sigma = torch.sqrt(-torch.expm1(two_log_alpha))
        return sigma, -torch.exp(two_log_alpha) * self.d_log_alpha(t) / sigma

    def d_log_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * self.beta(t)

    def drift_var(self, t: Tensor) -> Tensor:
        return 0.5 * self.beta(t)  # the generic formula simplifies exactly to beta / 2


PATHS: dict[str, type[Path]] = {"Linear": LinearPath, "GVP": GVPPath, "VP": VPPath}

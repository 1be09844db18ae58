"""A network trained with time running the other way (the REPA fork), seen in our convention.

Ours: x_t = alpha(t) x + sigma(t) eps with t = 0 noise, t = 1 data, and the network predicts the
velocity d/dt x_t. The REPA fork writes the same kind of path with s = 0 data, s = 1 noise,
x_s = a(s) x + b(s) eps, and regresses v_fork = d/ds x_s = a'(s) x + b'(s) eps (linear path: eps - x).
With s = 1 - t the two describe one path, alpha(t) = a(1 - t) and sigma(t) = b(1 - t), so

    v_ours(x, t) = d/dt x_t = -a'(1 - t) x - b'(1 - t) eps = -v_fork(x, 1 - t).

The fork's linear path is then our Linear path, and its cosine path (a = cos(pi s / 2),
b = sin(pi s / 2)) our GVP path (alpha = sin(pi t / 2), sigma = cos(pi t / 2)).
"""

from __future__ import annotations

from torch import Tensor, nn


class ReversedTime(nn.Module):
    """`net(x, s, y)` with s = 1 - t and the sign of its velocity flipped: model(x, t, y) in our convention."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, y: Tensor, force_drop: Tensor | None = None) -> Tensor:
        return -self.net(x, 1 - t, y, force_drop)

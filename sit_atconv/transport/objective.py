"""The transport objective: what the model predicts, the training loss, and time windows.

Follows SiT's `create_transport` / `Transport` (Ma et al. 2024, Sec. 2-3): a path (Linear, GVP, VP), a
prediction (velocity, score, noise), a loss weight for score/noise models (None, "velocity",
"likelihood"), and small epsilons that keep t away from singular end points.
Convention: t = 0 noise, t = 1 data, x_t = alpha(t) x_data + sigma(t) noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .paths import PATHS, Path, expand_t
from .timesteps import TimeSampling

PREDICTIONS = ("velocity", "score", "noise")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DEFAULT_EPS = 1e-3  # SiT's sampling epsilon; also the training epsilon of score/noise models

Model = Callable[..., Tensor]


def check_choice(kind: str, value: Any, options: Iterable[Any]) -> Any:
    """Return value if it is one of options, else raise one clear line listing them."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"unknown {kind} {value!r}; valid options: {', '.join(repr(o) for o in options)}")
    return value


def default_eps(
    path_type: str, prediction: str, train_eps: float | None, sample_eps: float | None
) -> tuple[float, float]:
    """SiT's (train_eps, sample_eps) defaults; values given by the caller always win.

    VP: (1e-5, 1e-3). Linear/GVP with score or noise: (1e-3, 1e-3). Linear/GVP with velocity: (0, 0),
    since the velocity is regular on [0, 1]. Unlike SiT, a given train_eps no longer leaves sample_eps
    unset (SiT then crashed), and explicit values are not overwritten for velocity models.
    """
    if path_type == "VP":
        defaults = (1e-5, DEFAULT_EPS)
    elif prediction != "velocity":
        defaults = (DEFAULT_EPS, DEFAULT_EPS)
    else:
        defaults = (0.0, 0.0)
    return (
        defaults[0] if train_eps is None else float(train_eps),
        defaults[1] if sample_eps is None else float(sample_eps),
    )


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all dimensions but the first (batch)."""
    return x.mean(dim=tuple(range(1, x.dim())))


class Transport:
    """One interpolant + prediction type: training loss, model-output conversions, time windows."""

    def __init__(
        self,
        *,
        path_type: str,
        prediction: str,
        loss_weight: str | None,
        train_eps: float,
        sample_eps: float,
        time_sampling: TimeSampling | None = None,
    ):
        self.path_type = check_choice("path_type", path_type, PATHS)
        self.prediction = check_choice("prediction", prediction, PREDICTIONS)
        self.loss_weight = check_choice("loss_weight", loss_weight, LOSS_WEIGHTS)
        if prediction == "velocity" and loss_weight is not None:
            raise ValueError(f"loss_weight={loss_weight!r} applies to score/noise predictions only; use None")
        self.path: Path = PATHS[path_type]()
        self.train_eps = train_eps
        self.sample_eps = sample_eps
        self.time_sampling = time_sampling or TimeSampling()

    def __repr__(self) -> str:
        return (
            f"Transport(path_type={self.path_type!r}, prediction={self.prediction!r}, "
            f"loss_weight={self.loss_weight!r}, train_eps={self.train_eps}, sample_eps={self.sample_eps}, "
            f"time_sampling={self.time_sampling})"
        )

    def interval(
        self,
        *,
        train: bool = False,
        sde: bool = False,
        diffusion_form: str = "SBDM",
        last_step_size: float = 0.0,
    ) -> tuple[float, float]:
        """The time window [t0, t1] for training or sampling (SiT `check_interval`).

        VP: [0, 1 - eps]. Linear/GVP: [0, 1] for velocity ODEs and training; score/noise models
        use [eps, 1 - eps]; SDEs start at eps with the SBDM diffusion (infinite at t = 0) and end at
        1 - last_step_size when a last step follows. eps is train_eps or sample_eps; an SDE on
        Linear/GVP with eps = 0 (the velocity default) uses DEFAULT_EPS, where SiT produced NaNs.
        """
        eps = self.train_eps if train else self.sample_eps
        end = 1.0 - (last_step_size if sde and last_step_size > 0 else eps)
        if self.path_type == "VP":
            return 0.0, end
        if self.prediction == "velocity" and not sde:
            return 0.0, 1.0
        if sde and eps == 0:
            eps = DEFAULT_EPS
            end = 1.0 - (last_step_size if last_step_size > 0 else eps)
        start = eps if self.prediction != "velocity" or (sde and diffusion_form == "SBDM") else 0.0
        return start, end

    def model_output(self, model: Model, x: Tensor, t: Tensor, model_kwargs: Mapping[str, Any]) -> Tensor:
        """model(x, t, **model_kwargs) with t of shape (B,); keeps the first C channels of a wider output.

        A learn_sigma model returns 2C channels (prediction, then variance); only the first C are used.
        """
        out = model(x, t, **model_kwargs)
        if out.shape[0] != x.shape[0] or out.shape[2:] != x.shape[2:] or out.shape[1] < x.shape[1]:
            raise ValueError(f"model output shape {tuple(out.shape)} does not fit input {tuple(x.shape)}")
        return out[:, : x.shape[1]]

    def to_score(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Score of p_t from the model output; t broadcast against x."""
        if self.prediction == "score":
            return out
        if self.prediction == "noise":
            return self.path.score_from_noise(out, x, t)
        return self.path.score_from_velocity(out, x, t)

    def to_velocity(self, out: Tensor, x: Tensor, t: Tensor) -> Tensor:
        """Probability-flow velocity from the model output; t broadcast against x."""
        if self.prediction == "velocity":
            return out
        return self.path.velocity_from_score(self.to_score(out, x, t), x, t)

    def loss_weight_fn(self, t: Tensor) -> Tensor | float:
        """Score/noise loss weight (SiT): 1, (g / sigma)^2 ("velocity") or g / sigma^2 ("likelihood")."""
        if self.loss_weight is None:
            return 1.0
        g, sigma = self.path.drift_var(t), self.path.sigma(t)[0]
        return (g / sigma) ** 2 if self.loss_weight == "velocity" else g / sigma**2

    def training_losses(
        self, model: Model, x1: Tensor, model_kwargs: Mapping[str, Any] | None = None
    ) -> dict[str, Tensor]:
        """Per-sample interpolant loss for data x1 (SiT eq. 4-6): {"loss": (B,), "pred": model output}.

        Draws noise ~ N(0, I), then t (B,) on [t0, t1] from `time_sampling` (default U[t0, t1], SiT's
        draw; see `timesteps`); calls model(x_t, t, **model_kwargs). The model
        output's first C channels are the prediction (a learn_sigma model's extra channels are ignored).
        Targets: velocity u_t = alpha' x1 + sigma' noise; noise; score = -noise / sigma (its loss is
        |sigma * pred + noise|^2, as SiT).
        """
        t0, t1 = self.interval(train=True)
        noise = torch.randn_like(x1)
        t = self.time_sampling.sample(x1.shape[0], low=t0, high=t1, device=x1.device, dtype=x1.dtype)
        tb = expand_t(t, x1)
        xt, ut = self.path.interpolate(tb, noise, x1)
        pred = self.model_output(model, xt, t, model_kwargs or {})
        if self.prediction == "velocity":
            err = pred - ut
        elif self.prediction == "noise":
            err = pred - noise
        else:
            err = pred * self.path.sigma(tb)[0] + noise
        return {"loss": mean_flat(self.loss_weight_fn(tb) * err**2), "pred": pred}

    @staticmethod
    def prior_logp(z: Tensor) -> Tensor:
        """log N(z; 0, I) per sample."""
        dim = z[0].numel()
        return -0.5 * dim * math.log(2 * math.pi) - 0.5 * z.flatten(1).pow(2).sum(dim=1)


def create_transport(
    path_type: str = "Linear",
    prediction: str = "velocity",
    loss_weight: str | None = None,
    train_eps: float | None = None,
    sample_eps: float | None = None,
    *,
    time_sampling: str = "uniform",
    time_mean: float = 0.0,
    time_std: float = 1.0,
    time_shift: float = 1.0,
) -> Transport:
    """Build a Transport with SiT's argument names and defaults (see `default_eps`).

    time_*: the training-time distribution (`TimeSampling`; uniform with shift 1 is SiT's).
    """
    check_choice("path_type", path_type, PATHS)
    check_choice("prediction", prediction, PREDICTIONS)
    train_eps, sample_eps = default_eps(path_type, prediction, train_eps, sample_eps)
    return Transport(
        path_type=path_type,
        prediction=prediction,
        loss_weight=loss_weight,
        train_eps=train_eps,
        sample_eps=sample_eps,
        time_sampling=TimeSampling(time_sampling, time_mean, time_std, time_shift),
    )

"""Samplers for a Transport: probability-flow ODE (torchdiffeq), SDE (Euler-Maruyama / Heun), likelihood.

The integrators (`integrate_ode`, `integrate_sde`) only see drift callables f(x, t) with t of shape (B,);
`Sampler` builds those drifts from a Transport and a model, as SiT's `Sampler` (same argument names).
Time runs from noise (t = 0) to data (t = 1). Every `Sampler.sample_*` returns a function
`fn(z, model, **model_kwargs)`; after each call `fn.nfe` holds the number of model calls it made (a CFG
wrapper's single forward on the doubled batch counts once).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torchdiffeq import odeint

from .objective import Model, Transport, check_choice
from .paths import Path, expand_t

# torchdiffeq's methods by their public names (its `method=` argument), split by how they step
ADAPTIVE_ODE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")  # accept options step_t
# explicit_adams is left out: torchdiffeq 0.2.5's gives 0.68 for dx/dt = -x, x(0) = 1 at t = 1 (e^-1 = 0.37)
FIXED_STEP_ODE_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "implicit_adams", "fixed_adams")
ODE_METHODS = ADAPTIVE_ODE_METHODS + FIXED_STEP_ODE_METHODS
SDE_METHODS = ("Euler", "Heun")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")

Drift = Callable[[Tensor, Tensor], Tensor]
Progress = Callable[[int, int], None]


def diffusion_coefficient(path: Path, t: Tensor, form: str = "SBDM", norm: float = 1.0) -> Tensor:
    """w(t) of the SDE dx = [v + w s] dt + sqrt(2 w) dW, which keeps the marginals p_t for any w >= 0.

    SiT eq. 8 and its `compute_diffusion`; "SBDM" is g(t) (`Path.drift_var`), matching score-based SDEs.
    """
    check_choice("diffusion_form", form, DIFFUSION_FORMS)
    if form == "constant":
        return torch.full_like(t, norm)
    if form == "SBDM":
        return norm * path.drift_var(t)
    if form == "sigma":
        return norm * path.sigma(t)[0]
    if form == "linear":
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * torch.cos(math.pi * t) + 1) ** 2
    return norm * torch.sin(math.pi * t) ** 2  # increasing-decreasing


def _check_ode_method(method: str, progress: Progress | None) -> None:
    check_choice("ODE sampling_method", method, ODE_METHODS)
    if progress is not None and method not in FIXED_STEP_ODE_METHODS:
        raise ValueError(
            f"progress is reported by fixed-step methods only: {', '.join(FIXED_STEP_ODE_METHODS)}"
        )


class _ODEFunc:
    """torchdiffeq right-hand side: broadcasts the scalar time to (B,) and reports fixed steps."""

    def __init__(
        self, drift: Callable[[Any, Tensor], Any], batch: int, progress: Progress | None, total: int
    ):
        self.drift, self.batch, self.progress, self.total, self.step = drift, batch, progress, total, 0
        if progress is not None:
            self.callback_step = self._callback_step

    def __call__(self, t: Tensor, x: Any) -> Any:
        return self.drift(x, t.reshape(1).repeat(self.batch))

    def _callback_step(self, t0: Tensor, y0: Any, dt: Tensor) -> None:
        self.step += 1
        self.progress(self.step, self.total)


def integrate_ode(
    drift: Callable[[Any, Tensor], Any],
    x: Tensor | tuple[Tensor, ...],
    ts: Tensor,
    *,
    method: str = "dopri5",
    atol: float = 1e-6,
    rtol: float = 1e-3,
    progress: Progress | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Solve dx/dt = drift(x, t) from ts[0] through ts (either direction); returns the states at ts.

    Fixed-step methods step on the grid ts (len(ts) - 1 steps) and call progress(step, total) per step.
    Adaptive Runge-Kutta methods are told to land on ts[-1] instead of stepping past it and
    interpolating back, so the drift is never evaluated outside [t0, t1] (VP is NaN beyond t = 1).
    """
    _check_ode_method(method, progress)
    batch = x[0].shape[0] if isinstance(x, tuple) else x.shape[0]
    func = _ODEFunc(drift, batch, progress, len(ts) - 1)
    options = {"step_t": ts[-1:]} if method in ADAPTIVE_ODE_METHODS else None
    return odeint(func, x, ts, method=method, atol=atol, rtol=rtol, options=options)


def integrate_sde(
    drift: Drift,
    diffusion: Callable[[Tensor], Tensor],
    x: Tensor,
    ts: Tensor,
    *,
    method: str = "Euler",
    progress: Progress | None = None,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """Integrate dx = drift dt + sqrt(2 w(t)) dW forward over the uniform grid ts; returns x after each step.

    "Euler": Euler-Maruyama. "Heun" (SiT): add the noise at t, then one Heun step of the drift.
    diffusion(t) returns w(t) broadcastable against x. Noise comes from noise_fn(x) (standard normal like x;
    e.g. per-image generators for batch-size-independent samples), else from the global torch RNG.
    """
    check_choice("SDE sampling_method", method, SDE_METHODS)
    dt = ts[1] - ts[0]
    total = len(ts) - 1
    out = []
    for i in range(total):
        t = ts[i].reshape(1).repeat(x.shape[0])
        dw = (torch.randn_like(x) if noise_fn is None else noise_fn(x)) * dt.sqrt()
        if method == "Euler":
            x = x + drift(x, t) * dt + torch.sqrt(2 * diffusion(t)) * dw
        else:
            x_hat = x + torch.sqrt(2 * diffusion(t)) * dw
            k1 = drift(x_hat, t)
            k2 = drift(x_hat + dt * k1, t + dt)
            x = x_hat + 0.5 * dt * (k1 + k2)
        out.append(x)
        if progress is not None:
            progress(i + 1, total)
    return out


class _Net:
    """The model as the samplers call it: (x, t (B,)) -> first C channels; counts calls (NFE)."""

    def __init__(self, transport: Transport, model: Model, model_kwargs: Mapping[str, Any]):
        self.transport, self.model, self.model_kwargs, self.calls = transport, model, model_kwargs, 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.transport.model_output(self.model, x, t, self.model_kwargs)


def _last_step(kind: str | None, x: Tensor, t: Tensor, size: float, sde_drift: Drift,
               velocity_and_score: Callable, path: Path) -> Tensor:
    """The SDE sampler's noise-free final step from t1 (see `Sampler.sample_sde`)."""
    if kind == "Mean":
        return x + sde_drift(x, t) * size
    if kind == "Euler":
        return x + velocity_and_score(x, t)[0] * size
    if kind == "Tweedie":
        _, score, tb = velocity_and_score(x, t)
        return path.data_from_score(score, x, tb)
    return x


class Sampler:
    """ODE, SDE and likelihood samplers for a Transport (SiT `Sampler`, same arguments)."""

    def __init__(self, transport: Transport):
        self.transport = transport
        self.path = transport.path

    def _velocity(self, net: _Net) -> Drift:
        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return self.transport.to_velocity(net(x, t), x, expand_t(t, x))

        return velocity

    def _grid(self, t0: float, t1: float, num_steps: int, like: Tensor) -> Tensor:
        if num_steps < 2:
            raise ValueError(f"num_steps must be >= 2, got {num_steps}")
        return torch.linspace(t0, t1, num_steps, dtype=like.dtype, device=like.device)

    def sample_ode(
        self,
        *,
        sampling_method: str = "dopri5",
        num_steps: int = 50,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        reverse: bool = False,
        progress: Progress | None = None,
    ) -> Callable[..., Tensor]:
        """Probability-flow ODE sampler (SiT eq. 7) with any torchdiffeq method.

        The grid has num_steps times from t0 to t1 (data to noise when reverse): fixed-step methods take
        num_steps - 1 steps on it, adaptive ones return their solution at those times. Returns
        fn(z, model, **model_kwargs) -> trajectory (num_steps, *z.shape); the last entry is the sample.
        """
        _check_ode_method(sampling_method, progress)
        t0, t1 = self.transport.interval()
        if reverse:
            t0, t1 = t1, t0  # the same window traversed backwards (SiT used 1 - t0, 1 - t1)

        def sample(z: Tensor, model: Model, **model_kwargs: Any) -> Tensor:
            net = _Net(self.transport, model, model_kwargs)
            with torch.no_grad():
                ts = self._grid(t0, t1, num_steps, z)
                xs = integrate_ode(
                    self._velocity(net),
                    z,
                    ts,
                    method=sampling_method,
                    atol=atol,
                    rtol=rtol,
                    progress=progress,
                )
            sample.nfe = net.calls
            return xs

        sample.nfe = 0
        return sample

    def sample_sde(
        self,
        *,
        sampling_method: str = "Euler",
        diffusion_form: str = "SBDM",
        diffusion_norm: float = 1.0,
        last_step: str | None = "Mean",
        last_step_size: float = 0.04,
        num_steps: int = 250,
        progress: Progress | None = None,
        noise_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Callable[..., Tensor]:
        """Reverse-time SDE sampler dx = [v + w s] dt + sqrt(2 w) dW (SiT eq. 8) on num_steps grid times.

        num_steps - 1 SDE steps reach t1 = 1 - last_step_size; then the last step, without noise:
        "Mean" x + (v + w s) h, "Euler" x + v h (h = last_step_size), "Tweedie" E[x_data | x_t1],
        None keeps x (and t1 = 1 - sample_eps). One model call per Euler step, two per Heun step.
        Returns fn(z, model, **model_kwargs) -> trajectory (num_steps, *z.shape); last entry = sample.
        """
        check_choice("SDE sampling_method", sampling_method, SDE_METHODS)
        check_choice("diffusion_form", diffusion_form, DIFFUSION_FORMS)
        check_choice("last_step", last_step, LAST_STEPS)
        if last_step is None:
            last_step_size = 0.0
        t0, t1 = self.transport.interval(
            sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size
        )

        def diffusion(t: Tensor, x: Tensor) -> Tensor:
            return diffusion_coefficient(self.path, expand_t(t, x), diffusion_form, diffusion_norm)

        def sample(z: Tensor, model: Model, **model_kwargs: Any) -> Tensor:
            net = _Net(self.transport, model, model_kwargs)

            def velocity_and_score(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                tb = expand_t(t, x)
                out = net(x, t)
                return self.transport.to_velocity(out, x, tb), self.transport.to_score(out, x, tb), tb

            def sde_drift(x: Tensor, t: Tensor) -> Tensor:
                v, s, _ = velocity_and_score(x, t)
                return v + diffusion(t, x) * s

            with torch.no_grad():
                ts = self._grid(t0, t1, num_steps, z)
                xs = integrate_sde(
                    sde_drift, lambda t: diffusion(t, z), z, ts, method=sampling_method, progress=progress,
                    noise_fn=noise_fn,
                )
                t = ts[-1].reshape(1).repeat(z.shape[0])
                xs.append(_last_step(last_step, xs[-1], t, last_step_size, sde_drift, velocity_and_score, self.path))
            sample.nfe = net.calls
            return torch.stack(xs)

        sample.nfe = 0
        return sample

    def sample_ode_likelihood(
        self,
        *,
        sampling_method: str = "dopri5",
        num_steps: int = 50,
        atol: float = 1e-6,
        rtol: float = 1e-3,
        num_probes: int = 1,
        exact_divergence: bool = False,
    ) -> Callable[..., tuple[Tensor, Tensor]]:
        """Log-likelihood of data x by the probability-flow ODE (instantaneous change of variables).

        Integrates x and the divergence of v from t1 (data) back to t0 (noise): log p(x) =
        log N(z; 0, I) + int_{t1}^{t0} div v dt. The divergence is Hutchinson's estimate with
        num_probes Rademacher probes drawn once per call (SiT draws one per evaluation), or exact
        (one backward pass per dimension) when exact_divergence. Returns fn(x, model, **model_kwargs)
        -> (logp (B,), z), as SiT's.
        """
        check_choice("ODE sampling_method", sampling_method, ODE_METHODS)
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1, got {num_probes}")
        t0, t1 = self.transport.interval()

        def sample(x: Tensor, model: Model, **model_kwargs: Any) -> tuple[Tensor, Tensor]:
            net = _Net(self.transport, model, model_kwargs)
            velocity = self._velocity(net)
            probes = torch.randint(0, 2, (num_probes, *x.shape), device=x.device).to(x.dtype) * 2 - 1

            def drift(state: tuple[Tensor, Tensor], t: Tensor) -> tuple[Tensor, Tensor]:
                with torch.enable_grad():
                    y = state[0].detach().requires_grad_(True)
                    v = velocity(y, t)
                    div = _divergence(v, y, None if exact_divergence else probes)
                return v.detach(), div.detach()

            ts = self._grid(t1, t0, num_steps, x)
            xs, deltas = integrate_ode(
                drift, (x, x.new_zeros(x.shape[0])), ts, method=sampling_method, atol=atol, rtol=rtol
            )
            z = xs[-1]
            sample.nfe = net.calls
            return self.transport.prior_logp(z) + deltas[-1], z

        sample.nfe = 0
        return sample


def _divergence(v: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """Per-sample div_x v: exact (probes None) or mean over probes of e^T (dv/dx) e (Hutchinson)."""
    if probes is None:
        flat = v.flatten(1)
        cols = [
            torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
            for i in range(flat.shape[1])
        ]
        return torch.stack(cols, dim=1).sum(dim=1)
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for e in probes:
        grad = torch.autograd.grad((v * e).sum(), x, retain_graph=True)[0]
        total = total + (grad * e).flatten(1).sum(dim=1)
    return total / len(probes)

"""A trained network -> images: sampler options, per-image seeds, guidance, decoding, grids.

Image i of a request is drawn from its own generator seeded by (seed, i) — both its starting noise and,
for SDE samplers, every noise increment — so a set of images is identical whatever the batch size or
number of processes (edm2's per-image RNG). This holds exactly for fixed-step samplers; adaptive ODE
solvers (dopri5) choose steps from the whole batch's error norm, so their images agree only to the
solver tolerance across batch compositions.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import TransportConfig
from .data.encoders import Autoencoder
from .errors import ConfigError
from .io import atomic_write
from .seeding import IMAGE, derive_seed
from .transport import DIFFUSION_FORMS, LAST_STEPS, ODE_METHODS, SDE_METHODS, CFGModel, Sampler, Transport

DEFAULT_ODE, DEFAULT_SDE = "dopri5", "Euler"  # a mode's method when the run's config names the other mode


@dataclass
class SamplingOptions:
    """How to sample; `None` fields fall back to the run's `transport` config (`resolved`)."""

    mode: str | None = None                  # "ode" | "sde"
    sampling_method: str | None = None       # ode: any torchdiffeq method; sde: Euler | Heun
    num_steps: int | None = None
    atol: float = 1e-6
    rtol: float = 1e-3
    diffusion_form: str = "SBDM"
    diffusion_norm: float = 1.0
    last_step: str | None = "Mean"
    last_step_size: float = 0.04
    cfg_scale: float | None = None
    guided_channels: int | None = None       # None: guide all channels; 3: the reference's quirk
    guidance_interval: tuple[float, float] | None = None

    def resolved(self, t: TransportConfig) -> SamplingOptions:
        """Fill unset fields from a run's transport config."""
        mode = self.mode or t.sample_mode
        method = self.sampling_method or (t.sampling_method if mode == t.sample_mode else
                                          (DEFAULT_ODE if mode == "ode" else DEFAULT_SDE))
        out = SamplingOptions(**{**asdict(self), "mode": mode, "sampling_method": method,
                                 "num_steps": t.num_steps if self.num_steps is None else self.num_steps,
                                 "cfg_scale": t.cfg_scale if self.cfg_scale is None else self.cfg_scale})
        out.check()
        return out

    def check(self) -> None:
        """One ConfigError line for options no sampler accepts (before any model call)."""
        methods = {"ode": ODE_METHODS, "sde": SDE_METHODS}.get(self.mode)
        if methods is None:
            raise ConfigError(f"--mode {self.mode!r}: use ode or sde")
        if self.sampling_method not in methods:
            raise ConfigError(f"--sampling-method {self.sampling_method!r} is not a {self.mode} method; use one of "
                              f"{', '.join(methods)}")
        if self.num_steps is not None and self.num_steps < 2:
            raise ConfigError(f"--num-steps must be >= 2 (grid points), got {self.num_steps}")
        if self.guidance_interval is not None and not self.guidance_interval[0] <= self.guidance_interval[1]:
            raise ConfigError(f"--guidance-interval {self.guidance_interval}: LOW must be <= HIGH")

    def tag(self) -> str:
        """A folder-name summary of resolved options, e.g. ode-euler-32_cfg2."""
        return f"{self.mode}-{self.sampling_method}-{self.num_steps}_cfg{self.cfg_scale:g}"


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """The sampler/CFG flags shared by sample.py and eval_fid.py."""
    from .cli import finite_float, positive_int

    g = parser.add_argument_group("sampler (defaults: the run's transport config)")
    g.add_argument("--mode", choices=["ode", "sde"], help="probability-flow ODE or SDE sampler")
    g.add_argument("--sampling-method", help="ode: dopri5, euler, heun2, rk4, ... (torchdiffeq); sde: Euler, Heun")
    g.add_argument("--num-steps", type=positive_int, help="grid points (fixed-step ODE and SDE solvers)")
    g.add_argument("--atol", type=finite_float, default=1e-6, help="ODE absolute tolerance (adaptive methods)")
    g.add_argument("--rtol", type=finite_float, default=1e-3, help="ODE relative tolerance (adaptive methods)")
    g.add_argument("--diffusion-form", default="SBDM", choices=DIFFUSION_FORMS, help="SDE diffusion coefficient w(t)")
    g.add_argument("--diffusion-norm", type=finite_float, default=1.0, help="SDE diffusion scale")
    g.add_argument("--last-step", default="Mean", choices=["none" if s is None else s for s in LAST_STEPS],
                   help="SDE final denoising step")
    g.add_argument("--last-step-size", type=finite_float, default=0.04, help="SDE last step size")
    g.add_argument("--cfg-scale", type=finite_float, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--guided-channels", type=positive_int,
                   help="guide only the first K channels (3 = the reference DiT/SiT quirk); default all")
    g.add_argument("--guidance-interval", type=finite_float, nargs=2, metavar=("LOW", "HIGH"),
                   help="apply CFG only for t in [LOW, HIGH] (t=0 noise, t=1 data)")


def options_from_args(args: argparse.Namespace) -> SamplingOptions:
    names = {f.name for f in fields(SamplingOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("last_step") == "none":
        values["last_step"] = None
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    return SamplingOptions(**values)


def image_generators(indices: Sequence[int], seed: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per image, seeded from (seed, index) only."""
    return [torch.Generator(device=device).manual_seed(derive_seed(IMAGE, seed, int(i))) for i in indices]


def per_image_randn(gens: list[torch.Generator], shape: Sequence[int], device, dtype=torch.float32) -> Tensor:
    """Stack one standard-normal draw of `shape` from each image's generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device, dtype=dtype) for g in gens])


def make_sample_fn(transport: Transport, opts: SamplingOptions,
                   noise_fn: Callable[[Tensor], Tensor] | None = None) -> Callable[..., Tensor]:
    """The transport sampler for resolved `opts`: fn(z, model, **model_kwargs) -> trajectory."""
    sampler = Sampler(transport)
    if opts.mode == "ode":
        return sampler.sample_ode(sampling_method=opts.sampling_method, num_steps=opts.num_steps,
                                  atol=opts.atol, rtol=opts.rtol)
    if opts.mode == "sde":
        return sampler.sample_sde(sampling_method=opts.sampling_method, diffusion_form=opts.diffusion_form,
                                  diffusion_norm=opts.diffusion_norm, last_step=opts.last_step,
                                  last_step_size=opts.last_step_size, num_steps=opts.num_steps,
                                  noise_fn=noise_fn)
    raise ValueError(f"sampling mode {opts.mode!r} is not supported; use 'ode' or 'sde'.")


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] images (B, C, H, W) -> uint8 (B, H, W, 3), grey replicated to RGB (ADM's packing)."""
    out = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).contiguous()


@dataclass
class ImageSampler:
    """Everything needed to turn labels and seeds into images: network, transport, autoencoder, shapes."""

    model: nn.Module
    transport: Transport
    autoencoder: Autoencoder
    latent_shape: tuple[int, int, int]
    num_classes: int

    @torch.no_grad()
    def images(self, opts: SamplingOptions, labels: Tensor, indices: Sequence[int], seed: int,
               device: torch.device | str = "cpu", batch_size: int = 64, show_progress: bool = True) -> Tensor:
        """uint8 (N, H, W, 3) images for `labels` (N,) with resolved `opts`; image k seeded by (seed, indices[k])."""
        if opts.cfg_scale != 1 and self.num_classes == 1:
            raise ConfigError(f"--cfg-scale {opts.cfg_scale:g}: this model is unconditional (1 class), so there is "
                              "nothing to guide; use --cfg-scale 1")
        channels = self.latent_shape[0]
        if opts.guided_channels is not None and not 0 < opts.guided_channels <= channels:
            raise ConfigError(f"--guided-channels {opts.guided_channels}: this model has {channels} channels")
        guided = CFGModel(self.model, scale=opts.cfg_scale, num_classes=self.num_classes,
                          guided_channels=opts.guided_channels, interval=opts.guidance_interval)
        out = []
        for start in tqdm(range(0, len(indices), batch_size), desc="sampling", unit="batch",
                          disable=not show_progress):
            gens = image_generators(list(indices[start:start + batch_size]), seed, device)
            z = per_image_randn(gens, self.latent_shape, device)
            sample_fn = make_sample_fn(self.transport, opts, noise_fn=lambda like, g=gens: per_image_randn(
                g, like.shape[1:], like.device, like.dtype))
            latents = sample_fn(z, guided, y=labels[start:start + batch_size].to(device))[-1]
            out.append(to_uint8(self.autoencoder.decode(latents)).cpu())
        if not out:
            raise ValueError("no images requested")
        return torch.cat(out)


def save_grid(images: Tensor, path: str | Path, nrow: int) -> Path:
    """Write uint8 (N, H, W, 3) images as one PNG grid, `nrow` images per row (atomically)."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def class_grid_labels(num_classes: int, per_class: int, max_classes: int = 16) -> Tensor:
    """Labels for a preview grid: one row per class (first `max_classes`), `per_class` columns."""
    return torch.arange(min(num_classes, max_classes)).repeat_interleave(per_class)

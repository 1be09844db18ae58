"""Checkpoint -> images: sampler options, per-image seeds, decoding, grids.

Image i of a request is drawn from its own generator seeded by (base_seed, i) — both its starting
noise and, for SDE samplers, every noise increment — so a set of images is identical whatever the
batch size or number of processes (edm2's per-image RNG). This holds exactly for fixed-step
samplers; adaptive ODE solvers (dopri5) choose steps from the whole batch's error norm, so their
images agree only to the solver tolerance across batch compositions.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import TrainConfig, config_from_dict
from .data.encoders import Autoencoder, build_autoencoder
from .models import create_sit
from .train.checkpoint import load_checkpoint, resolve_checkpoint
from .transport import CFGModel, Sampler, create_transport


@dataclass
class SamplingOptions:
    """How to sample; `None` fields fall back to the run's `transport` config."""

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

    def resolved(self, cfg: TrainConfig) -> SamplingOptions:
        """Fill unset fields from the run's transport config."""
        t = cfg.transport
        mode = self.mode or t.sample_mode
        method = self.sampling_method or (t.sampling_method if mode == t.sample_mode else
                                          ("dopri5" if mode == "ode" else "Euler"))
        return SamplingOptions(**{**asdict(self), "mode": mode, "sampling_method": method,
                                  "num_steps": self.num_steps or t.num_steps,
                                  "cfg_scale": t.cfg_scale if self.cfg_scale is None else self.cfg_scale})


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The sampler/CFG flags shared by sample.py and eval_fid.py."""
    g = parser.add_argument_group("sampler (defaults: the run's transport config)")
    g.add_argument("--mode", choices=["ode", "sde"], help="probability-flow ODE or SDE sampler")
    g.add_argument("--sampling-method", help="ode: dopri5, euler, heun2, rk4, ... (torchdiffeq); sde: Euler, Heun")
    g.add_argument("--num-steps", type=int, help="grid points (fixed-step ODE and SDE solvers)")
    g.add_argument("--atol", type=float, default=1e-6, help="ODE absolute tolerance (adaptive methods)")
    g.add_argument("--rtol", type=float, default=1e-3, help="ODE relative tolerance (adaptive methods)")
    g.add_argument("--diffusion-form", default="SBDM",
                   choices=["constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing"],
                   help="SDE diffusion coefficient w(t)")
    g.add_argument("--diffusion-norm", type=float, default=1.0, help="SDE diffusion scale")
    g.add_argument("--last-step", default="Mean", choices=["Mean", "Tweedie", "Euler", "none"],
                   help="SDE final denoising step")
    g.add_argument("--last-step-size", type=float, default=0.04, help="SDE last step size")
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--guided-channels", type=int,
                   help="guide only the first K channels (3 = the reference DiT/SiT quirk); default all")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="apply CFG only for t in [LOW, HIGH] (t=0 noise, t=1 data)")


def options_from_args(args: argparse.Namespace) -> SamplingOptions:
    names = {f.name for f in fields(SamplingOptions)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("last_step") == "none":
        values["last_step"] = None
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    return SamplingOptions(**values)


def build_model(cfg: TrainConfig) -> nn.Module:
    """The SiT a config describes (one home for config -> model arguments)."""
    m = cfg.model
    return create_sit(m.name, mixer=m.mixer, depth=m.depth, hidden_size=m.hidden_size, num_heads=m.num_heads,
                      input_size=m.input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                      learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob,
                      kernel_size=m.kernel_size, kernel_pool=m.kernel_pool)


def build_transport(cfg: TrainConfig):
    t = cfg.transport
    return create_transport(t.path_type, t.prediction, t.loss_weight, t.train_eps, t.sample_eps)


def load_run(ckpt: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
             ) -> tuple[nn.Module, TrainConfig, int, Path]:
    """(model in eval mode with EMA weights, run config, step, checkpoint path) from a file or run folder."""
    path = resolve_checkpoint(ckpt)
    state = load_checkpoint(path)
    if "config" not in state:
        raise ValueError(f"{path}: not a sit_atconv training checkpoint (no 'config'); "
                         "convert reference weights with python -m sit_atconv.convert first.")
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.to(device).eval().requires_grad_(False), cfg, int(state["step"]), path


def image_generators(indices: Sequence[int], base_seed: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per image, seeded from (base_seed, index) only."""
    gens = []
    for i in indices:
        seed = int(np.random.SeedSequence([base_seed, int(i)]).generate_state(1, dtype=np.uint64)[0] >> 1)
        gens.append(torch.Generator(device=device).manual_seed(seed))
    return gens


def per_image_randn(gens: list[torch.Generator], shape: Sequence[int], device, dtype=torch.float32) -> Tensor:
    """Stack one standard-normal draw of `shape` from each image's generator."""
    return torch.stack([torch.randn(tuple(shape), generator=g, device=device, dtype=dtype) for g in gens])


def make_sample_fn(transport, opts: SamplingOptions,
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


@torch.no_grad()
def generate(model: nn.Module, cfg: TrainConfig, opts: SamplingOptions, labels: Tensor, indices: Sequence[int],
             base_seed: int, autoencoder: Autoencoder, device: torch.device | str = "cpu", batch_size: int = 64,
             show_progress: bool = True) -> Tensor:
    """uint8 (N, H, W, 3) images for `labels` (N,), image k seeded by (base_seed, indices[k])."""
    opts = opts.resolved(cfg)
    transport = build_transport(cfg)
    m = cfg.model
    guided = CFGModel(model, scale=opts.cfg_scale, num_classes=m.num_classes,
                      guided_channels=opts.guided_channels, interval=opts.guidance_interval)
    shape = (m.in_channels, m.input_size, m.input_size)
    out = []
    for start in tqdm(range(0, len(indices), batch_size), desc="sampling", unit="batch", disable=not show_progress):
        idx = list(indices[start:start + batch_size])
        gens = image_generators(idx, base_seed, device)
        z = per_image_randn(gens, shape, device)
        sample_fn = make_sample_fn(transport, opts, noise_fn=lambda like, g=gens: per_image_randn(
            g, like.shape[1:], like.device, like.dtype))
        y = labels[start:start + batch_size].to(device)
        latents = sample_fn(z, guided, y=y)[-1]
        out.append(to_uint8(autoencoder.decode(latents)).cpu())
    return torch.cat(out) if out else torch.empty(0, m.input_size, m.input_size, 3, dtype=torch.uint8)


def save_grid(images: Tensor, path: str | Path, nrow: int) -> Path:
    """Write uint8 (N, H, W, 3) images as one PNG grid, `nrow` images per row (atomically)."""
    from PIL import Image
    from torchvision.utils import make_grid

    from .io import atomic_write

    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def class_grid_labels(num_classes: int, per_class: int, max_classes: int = 16) -> Tensor:
    """Labels for a preview grid: one row per class (first `max_classes`), `per_class` columns."""
    classes = min(num_classes, max_classes)
    return torch.arange(classes).repeat_interleave(per_class)


def autoencoder_for(cfg: TrainConfig, device) -> Autoencoder:
    return build_autoencoder(cfg.data).to(device).eval()

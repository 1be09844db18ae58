"""A trained network -> images: sampler options, per-image seeds, guidance, decoding, grids.

Image i of a request is drawn from its own generator seeded by (seed, i) — both its starting noise and,
for SDE samplers, every noise increment — so a set of images is identical whatever the batch size or
number of processes (edm2's per-image RNG). This holds exactly for fixed-step samplers; adaptive ODE
solvers (dopri5) choose steps from the whole batch's error norm, so their images agree only to the
solver tolerance across batch compositions.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import TransportConfig
from .data.encoders import Autoencoder
from .errors import ConfigError
from .io import atomic_write
from .models.sit import unwrap_sit
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
    """Everything needed to turn labels and seeds into images: network, transport, autoencoder, shapes.

    Counts its cost: `nfe` is the mean number of network evaluations per image over the images drawn so far
    (the sampler's model calls along one trajectory; a CFG call on the doubled batch [cond, uncond] counts
    once, so a guided step costs about twice the compute of an unguided one at the same NFE).
    """

    model: nn.Module
    transport: Transport
    autoencoder: Autoencoder
    latent_shape: tuple[int, int, int]
    num_classes: int
    model_calls: int = field(default=0, init=False)  # sum over images of their trajectory's model calls
    images_drawn: int = field(default=0, init=False)

    @property
    def nfe(self) -> float | None:
        """Mean network evaluations per image drawn by `images` so far; None before the first image."""
        return self.model_calls / self.images_drawn if self.images_drawn else None

    @property
    def image_size(self) -> int:
        """Pixel side of the images drawn (latent side x the autoencoder's downsampling factor)."""
        return self.latent_shape[-1] * self.autoencoder.downsample_factor

    def at_image_size(self, image_size: int) -> ImageSampler:
        """This sampler drawing image_size x image_size images: the SiT runs on another token grid (resolution
        transfer, `SiT.forward`). Refuses a side that is not a multiple of patch x autoencoder factor."""
        try:
            patch = unwrap_sit(self.model).patch_size
        except TypeError as err:
            raise ConfigError(f"--image-size needs a SiT model: {err}") from None
        factor = self.autoencoder.downsample_factor
        if image_size % (patch * factor):
            raise ConfigError(f"--image-size {image_size}: must be a multiple of {patch * factor} (patch size "
                              f"{patch} x autoencoder downsampling {factor}); e.g. {patch * factor * 2}")
        side = image_size // factor
        return replace(self, latent_shape=(self.latent_shape[0], side, side))

    def grid_note(self) -> str:
        """One line on the token grid drawn on against the one the model was built for, and what happens to
        its position embedding there (a model with one gets the sin-cos table recomputed for the new grid)."""
        sit = unwrap_sit(self.model)
        h, w = (side // sit.patch_size for side in self.latent_shape[1:])
        trained = "x".join(map(str, sit.grid_size))
        if (h, w) == sit.grid_size:
            return f"{self.image_size} px: the {trained} token grid the model was trained on"
        if sit.use_pos_embed:
            return (f"{self.image_size} px: attention/hybrid: sin-cos position embedding recomputed for the "
                    f"{w}x{h} grid (trained on {trained})")
        return f"{self.image_size} px: ATConv on the {w}x{h} token grid (trained on {trained}; no position embedding)"

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
            self.model_calls += sample_fn.nfe * len(z)
            self.images_drawn += len(z)
            out.append(to_uint8(self.autoencoder.decode(latents)).cpu())
        if not out:
            raise ValueError("no images requested")
        return torch.cat(out)


MIN_CELL_PX = 64  # grids upscale small images (digits are 16 px) so a person can read each cell


def upscale_nearest(images: Tensor, min_side: int = MIN_CELL_PX) -> Tensor:
    """uint8 (N, H, W, C) repeated by the smallest integer factor that makes both sides >= min_side."""
    factor = max(1, math.ceil(min_side / min(images.shape[1], images.shape[2])))
    return images if factor == 1 else images.repeat_interleave(factor, 1).repeat_interleave(factor, 2)


def row_labels(labels: Sequence[int] | Tensor, nrow: int, names: Sequence[str] | None = None) -> list[str]:
    """One caption per grid row of `nrow` images: 'class 3' (or names[3]); mixed rows list each label once."""
    def caption(row: list[int]) -> str:
        if names is not None:
            return ", ".join(names[y] for y in row)
        return f"class {row[0]}" if len(row) == 1 else "classes " + ", ".join(map(str, row))

    labels = [int(y) for y in labels]
    return [caption(list(dict.fromkeys(labels[i:i + nrow]))) for i in range(0, len(labels), nrow)]


def _caption_rows(grid, captions: Sequence[str], cell: int, padding: int):
    """The grid image with a white left margin holding one caption centred on each row."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(12, min(cell // 4, 24)))
    boxes = [font.getbbox(text) for text in captions]
    margin = max(box[2] for box in boxes) + 3 * padding
    out = Image.new("RGB", (grid.width + margin, grid.height), (255, 255, 255))
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    for row, (text, box) in enumerate(zip(captions, boxes)):
        top = padding + row * (cell + padding) + (cell - (box[1] + box[3])) // 2
        draw.text((padding, top), text, fill=(0, 0, 0), font=font)
    return out


def save_grid(images: Tensor, path: str | Path, nrow: int, captions: Sequence[str] | None = None,
              min_cell: int = MIN_CELL_PX) -> Path:
    """Write uint8 (N, H, W, 3) images as one PNG grid (atomically), `nrow` images per row.

    Cells are upscaled by nearest neighbour to at least `min_cell` px; `captions` (one per row, e.g.
    `row_labels(labels, nrow)`) are written in a left margin.
    """
    from PIL import Image
    from torchvision.utils import make_grid

    images, padding = upscale_nearest(images, min_cell), 2
    rows = math.ceil(len(images) / min(nrow, len(images)))
    if captions is not None and len(captions) != rows:
        raise ValueError(f"{len(captions)} captions for a grid of {rows} rows")
    grid = make_grid(images.permute(0, 3, 1, 2), nrow=nrow, padding=padding, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if captions is not None:
        image = _caption_rows(image, captions, images.shape[1], padding)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def class_grid_labels(num_classes: int, per_class: int, max_classes: int = 16) -> Tensor:
    """Labels for a preview grid: one row per class (first `max_classes`), `per_class` columns."""
    return torch.arange(min(num_classes, max_classes)).repeat_interleave(per_class)

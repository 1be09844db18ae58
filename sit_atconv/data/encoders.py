"""Autoencoders: one object owns pixels <-> model inputs: the latent scale and, optionally, a per-channel
normalisation (identity for pixel-space runs).

Encoding returns the posterior *mean* by default (deterministic: what latent stores hold); pass
`sample=True` for a draw from the posterior, which is what SiT's training script does on the fly.

Latent normalisation (`data.latent_norm`): `scale` multiplies the VAE's latents by `scale` (SD-VAE's
0.18215); `channel` additionally maps the scaled latent z to (z - mean_c) / std_c with the per-channel
statistics of a latent store (LightningDiT), with no further multiplier: every channel then has unit
variance, like the transport's noise. Decoding inverts the same steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

SD_VAE_ID = "stabilityai/sd-vae-ft-ema"  # the SiT/DiT autoencoder (SPEC §2)
SD_VAE_SCALE = 0.18215  # its latent scale
LATENT_NORMS = ("scale", "channel")  # data.latent_norm


class AutoencoderError(ConfigError):
    """An autoencoder that cannot be loaded; one line naming the source and the fix."""


@dataclass(frozen=True)
class ChannelNorm:
    """Per-channel latent normalisation: model input = (z - mean_c) / std_c, z the scaled latent.

    Works on one latent (C, h, w) or a batch (B, C, h, w); `denormalize` inverts `normalize` up to float
    rounding.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(f"latent normalisation: {len(self.mean)} means but {len(self.std)} stds; give one "
                              "of each per latent channel")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ConfigError(f"latent normalisation: means must be finite and stds finite and > 0, got mean "
                              f"{list(self.mean)} std {list(self.std)}; re-run extract_latents or fix the values")

    @classmethod
    def of(cls, mean: Sequence[float] | None, std: Sequence[float] | None) -> ChannelNorm | None:
        """The normalisation for these statistics, or None when there are none (latent_norm scale)."""
        return None if mean is None and std is None else cls(tuple(mean or ()), tuple(std or ()))

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if like.dim() < 3 or like.shape[-3] != len(self.mean):
            raise ConfigError(f"latent normalisation has {len(self.mean)} channels but the latents are "
                              f"{tuple(like.shape)}; use the statistics of this autoencoder's latents")
        shape = (len(self.mean), 1, 1)
        return (torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape),
                torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape))

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(latents)
        return (latents - mean) / std

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(inputs)
        return inputs * std + mean


class Autoencoder(nn.Module):
    """Interface: images in [-1, 1] (B x 3 x H x W) <-> model inputs (B x C x H/f x W/f): scaled latents,
    per-channel normalised when `norm` is set."""

    name: str = "identity"
    latent_channels: int
    downsample_factor: int
    scale: float
    norm: ChannelNorm | None = None

    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """Shape (C, h, w) of the latent of one image_size x image_size image."""
        if image_size % self.downsample_factor:
            raise ConfigError(f"image size {image_size} is not divisible by the autoencoder's "
                              f"downsampling factor {self.downsample_factor}")
        side = image_size // self.downsample_factor
        return (self.latent_channels, side, side)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> model inputs (identity unless `norm`)."""
        return latents if self.norm is None else self.norm.normalize(latents)

    def denormalize(self, inputs: torch.Tensor) -> torch.Tensor:
        """Model inputs -> scaled latents (inverse of `normalize`)."""
        return inputs if self.norm is None else self.norm.denormalize(inputs)


class IdentityAutoencoder(Autoencoder):
    """Pixel space: latents are the images themselves (scale 1, no downsampling)."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.latent_channels, self.downsample_factor, self.scale = channels, 1, 1.0

    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return images.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clamp(-1.0, 1.0)


def _load_autoencoder_kl(source: str, dtype: torch.dtype):
    """`AutoencoderKL.from_pretrained` with one-line errors for missing folders and offline hub ids."""
    from diffusers import AutoencoderKL

    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise AutoencoderError(f"autoencoder folder {local} has no config.json; give as the autoencoder "
                                   "a folder written by AutoencoderKL.save_pretrained")
        try:
            return AutoencoderKL.from_pretrained(str(local), torch_dtype=dtype, local_files_only=True)
        except Exception as err:
            raise AutoencoderError(f"autoencoder folder {local}: cannot load "
                                   f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise AutoencoderError(f"autoencoder '{source}': no such folder, and not a hub id of the form "
                               "owner/name; use 'identity', a hub id or an existing folder")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return AutoencoderKL.from_pretrained(source, torch_dtype=dtype, local_files_only=offline)
    except Exception as err:
        fix = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once with "
               f"network (`huggingface-cli download {source}`) or pass a local folder" if offline else
               f"download failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); check the "
               "network or pass a local folder")
        raise AutoencoderError(f"autoencoder '{source}': {fix} as the autoencoder (--data.autoencoder in "
                               "train.py, --autoencoder in extract_latents)") from None


class VAEAutoencoder(Autoencoder):
    """A diffusers AutoencoderKL (hub id or local folder); latents are multiplied by `scale`, then
    normalised per channel by `norm` (if given)."""

    def __init__(self, source: str = SD_VAE_ID, scale: float = SD_VAE_SCALE, dtype: torch.dtype = torch.float32,
                 norm: ChannelNorm | None = None):
        super().__init__()
        self.name, self.scale, self.norm = str(source), float(scale), norm
        self.vae = _load_autoencoder_kl(str(source), dtype).eval().requires_grad_(False)
        config = self.vae.config
        self.latent_channels = int(config.latent_channels)
        if norm is not None and len(norm.mean) != self.latent_channels:
            raise ConfigError(f"latent normalisation has {len(norm.mean)} channels but autoencoder '{source}' has "
                              f"{self.latent_channels}; use the statistics of a store encoded with it")
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self.eval()

    def train(self, mode: bool = True) -> VAEAutoencoder:
        """Always frozen in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> model inputs: normalize(scale * (posterior mean, or a sample when `sample`))."""
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(param.device, param.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
        return self.normalize(latents.float() * self.scale)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model inputs -> images clamped to [-1, 1] (denormalised, then unscaled)."""
        param = next(self.vae.parameters())
        latents = self.denormalize(latents.float()) / self.scale
        images = self.vae.decode(latents.to(param.device, param.dtype)).sample
        return images.float().clamp(-1.0, 1.0)


def load_autoencoder(source: str, scale: float = SD_VAE_SCALE, channels: int = 3,
                     dtype: torch.dtype = torch.float32, norm: ChannelNorm | None = None) -> Autoencoder:
    """'identity' (pixel space with `channels` channels) or a diffusers VAE (hub id or folder) scaled by `scale`
    and normalised per channel by `norm`."""
    if source == "identity":
        if norm is not None:
            raise ConfigError("per-channel latent normalisation needs a VAE: pixel data (autoencoder identity) is "
                              "already in [-1, 1]; use latent_norm scale")
        return IdentityAutoencoder(channels)
    return VAEAutoencoder(source, scale, dtype, norm)

"""Autoencoders: one object owns pixels <-> latents and the latent scale (identity for pixel-space runs).

Encoding returns the posterior *mean* by default (deterministic: what latent stores hold); pass
`sample=True` for a draw from the posterior, which is what SiT's training script does on the fly.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

SD_VAE_ID = "stabilityai/sd-vae-ft-ema"  # the SiT/DiT autoencoder (SPEC §2)
SD_VAE_SCALE = 0.18215  # its latent scale


class AutoencoderError(ConfigError):
    """An autoencoder that cannot be loaded; one line naming the source and the fix."""


class Autoencoder(nn.Module):
    """Interface: images in [-1, 1] (B x 3 x H x W) <-> scaled latents (B x C x H/f x W/f)."""

    name: str = "identity"
    latent_channels: int
    downsample_factor: int
    scale: float

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
    """A diffusers AutoencoderKL (hub id or local folder); latents are multiplied by `scale`."""

    def __init__(self, source: str = SD_VAE_ID, scale: float = SD_VAE_SCALE, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.name, self.scale = str(source), float(scale)
        self.vae = _load_autoencoder_kl(str(source), dtype).eval().requires_grad_(False)
        config = self.vae.config
        self.latent_channels = int(config.latent_channels)
        self.downsample_factor = 2 ** (len(config.block_out_channels) - 1)
        self.eval()

    def train(self, mode: bool = True) -> VAEAutoencoder:
        """Always frozen in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, *, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scale * (posterior mean, or a posterior sample when `sample`)."""
        param = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(param.device, param.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mean
        return latents.float() * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images clamped to [-1, 1]."""
        param = next(self.vae.parameters())
        images = self.vae.decode((latents / self.scale).to(param.device, param.dtype)).sample
        return images.float().clamp(-1.0, 1.0)


def load_autoencoder(source: str, scale: float = SD_VAE_SCALE, channels: int = 3,
                     dtype: torch.dtype = torch.float32) -> Autoencoder:
    """'identity' (pixel space with `channels` channels) or a diffusers VAE (hub id or folder) scaled by `scale`."""
    if source == "identity":
        return IdentityAutoencoder(channels)
    return VAEAutoencoder(source, scale, dtype)

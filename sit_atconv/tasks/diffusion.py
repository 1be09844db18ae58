"""Diffusion as a training task: the transport's flow-matching loss on (x, y) batches, EMA preview grids."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..data.encoders import Autoencoder
from ..sampling import ImageSampler, SamplingOptions, class_grid_labels, save_grid
from ..transport import Transport

PREVIEW_PER_CLASS = 8


class DiffusionTask:
    """Flow matching (SiT eq. 4-6 via `Transport.training_losses`) on latents or pixels.

    `encoder`: encode pixel batches on the fly (image-folder training with a VAE); None when the data
    already is what the model sees (latent stores, pixel-space runs). Previews sample the EMA model
    with the run's transport settings (`preview_options`, resolved) and seed.
    """

    name = "diffusion"

    def __init__(self, transport: Transport, decoder: Autoencoder, latent_shape: tuple[int, int, int],
                 num_classes: int, preview_options: SamplingOptions, seed: int,
                 encoder: Autoencoder | None = None, device: torch.device | str = "cpu"):
        self.transport, self.decoder, self.encoder = transport, decoder, encoder
        self.latent_shape, self.num_classes = latent_shape, num_classes
        self.preview_options, self.seed, self.device = preview_options, seed, device

    def prepare(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        if self.encoder is not None:
            with torch.no_grad():
                x = self.encoder.encode(x, sample=True)
        return x, y

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = batch
        return self.transport.training_losses(model, x, {"y": y})["loss"].mean(), {}

    def preview(self, model: nn.Module, step: int, run_dir: Path) -> dict[str, Path]:
        """A grid of EMA samples, one row per class (up to 16), written to RUN/samples/step_XXXXXXX.png."""
        labels = class_grid_labels(self.num_classes, PREVIEW_PER_CLASS)
        sampler = ImageSampler(model, self.transport, self.decoder, self.latent_shape, self.num_classes)
        images = sampler.images(self.preview_options, labels, range(len(labels)), self.seed, self.device,
                                batch_size=64, show_progress=False)
        path = save_grid(images, Path(run_dir) / "samples" / f"step_{step:07d}.png", nrow=PREVIEW_PER_CLASS)
        return {"samples": path}

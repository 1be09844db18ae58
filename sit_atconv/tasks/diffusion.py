"""Diffusion as a training task: the transport's flow-matching loss on (x, y) batches, EMA preview grids."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.encoders import Autoencoder
from ..sampling import ImageSampler, SamplingOptions, class_grid_labels, row_labels, save_grid
from ..transport import Transport

PREVIEW_PER_CLASS = 8


def alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """REPA's loss: minus the cosine similarity of projected tokens and encoder tokens, averaged over both."""
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


class RepaAlignment:
    """REPA settings of a task: the loss weight, and the frozen encoder when features are computed on the fly
    (None when the batches carry stored features)."""

    def __init__(self, coeff: float, encoder: nn.Module | None = None):
        self.coeff, self.encoder = coeff, encoder

    @torch.no_grad()
    def targets(self, images: Tensor) -> Tensor:
        """Encoder patch tokens of pixel batches in [-1, 1] (grey images are repeated to RGB)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.encoder(images)


class DiffusionTask:
    """Flow matching (SiT eq. 4-6 via `Transport.training_losses`) on latents or pixels.

    `encoder`: encode pixel batches on the fly (image-folder training with a VAE); None when the data
    already is what the model sees (latent stores, pixel-space runs). `repa`: add REPA's alignment loss
    (targets stored in the batches as a third item, or computed from the pixels). Previews sample the
    EMA model with the run's transport settings (`preview_options`, resolved) and seed.
    """

    name = "diffusion"

    def __init__(self, transport: Transport, decoder: Autoencoder, latent_shape: tuple[int, int, int],
                 num_classes: int, preview_options: SamplingOptions, seed: int,
                 encoder: Autoencoder | None = None, device: torch.device | str = "cpu",
                 repa: RepaAlignment | None = None):
        self.transport, self.decoder, self.encoder, self.repa = transport, decoder, encoder, repa
        self.latent_shape, self.num_classes = latent_shape, num_classes
        self.preview_options, self.seed, self.device = preview_options, seed, device

    def prepare(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """(x, y[, stored REPA targets]) -> (model input, y[, REPA targets])."""
        x, y, *stored = batch
        targets = stored[0] if stored else (self.repa.targets(x) if self.repa is not None else None)
        if self.encoder is not None:
            with torch.no_grad():
                x = self.encoder.encode(x, sample=True)
        return (x, y) if targets is None else (x, y, targets)

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        if self.repa is None:
            x, y = batch[:2]
            return self.transport.training_losses(model, x, {"y": y})["loss"].mean(), {}
        x, y, targets = batch
        projected = []

        def network(x_t: Tensor, t: Tensor, **kwargs) -> Tensor:  # one forward: prediction and REPA tokens
            out, tokens = model(x_t, t, return_features=True, **kwargs)
            projected.append(tokens)
            return out

        denoising = self.transport.training_losses(network, x, {"y": y})["loss"].mean()
        alignment = alignment_loss(projected[0], targets)
        return denoising + self.repa.coeff * alignment, {"denoising_loss": denoising.detach(),
                                                         "repa_loss": alignment.detach()}

    def preview(self, model: nn.Module, step: int, run_dir: Path) -> dict[str, Path]:
        """A grid of EMA samples, one row per class (up to 16), written to RUN/samples/step_XXXXXXX.png."""
        labels = class_grid_labels(self.num_classes, PREVIEW_PER_CLASS)
        sampler = ImageSampler(model, self.transport, self.decoder, self.latent_shape, self.num_classes)
        images = sampler.images(self.preview_options, labels, range(len(labels)), self.seed, self.device,
                                batch_size=64, show_progress=False)
        path = save_grid(images, Path(run_dir) / "samples" / f"step_{step:07d}.png", nrow=PREVIEW_PER_CLASS,
                         captions=row_labels(labels, PREVIEW_PER_CLASS) if self.num_classes > 1 else None)
        return {"samples": path}

"""Data sources (digits, image folders, latent stores), their wrappers, and the autoencoders.

Every source has `load(index, flip)`; flips are chosen by the index (`MirroredByIndex`), so the seeded,
resumable index order of the training loop also fixes every flip. `sit_atconv.build` picks the source a
config asks for and checks it against the model.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import Dataset

from .digits import DigitsDataset, digits_split, load_digits_tensors
from .encoders import (
    LATENT_NORMS,
    SD_VAE_ID,
    SD_VAE_SCALE,
    Autoencoder,
    AutoencoderError,
    ChannelNorm,
    IdentityAutoencoder,
    VAEAutoencoder,
    load_autoencoder,
)
from .images import ImageFolderDataset, center_crop_arr
from .latents import LatentDataset, StoredFeatures, latent_statistics, stored_features
from .vision_encoder import VisionEncoder, VisionEncoderError, load_vision_encoder

__all__ = ["LATENT_NORMS", "SD_VAE_ID", "SD_VAE_SCALE", "Autoencoder", "AutoencoderError", "ChannelNorm",
           "DigitsDataset", "IdentityAutoencoder", "ImageFolderDataset", "LatentDataset", "MirroredByIndex",
           "SeededItems", "StoredFeatures", "Unconditional", "VAEAutoencoder", "VisionEncoder", "VisionEncoderError",
           "center_crop_arr", "digits_split", "latent_statistics", "load_autoencoder", "load_digits_tensors",
           "load_vision_encoder", "stored_features"]


class Unconditional(Dataset):
    """Wraps a dataset so every label is 0 (num_classes 1), e.g. FFHQ stored in numbered subfolders; items
    beyond (input, label), such as stored encoder features, pass through."""

    num_classes = 1

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.dataset.sample_shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return self.load(index, False)

    def load(self, index: int, flip: bool) -> tuple:
        item = self.dataset.load(index, flip)
        return (item[0], 0, *item[2:])


class MirroredByIndex(Dataset):
    """Both orientations of a dataset as 2N items: item i is image i % N, mirrored when i >= N.

    The flip becomes part of the index, so a deterministic index order (the trainer's) also fixes
    every flip — with any number of DataLoader workers and across resumes.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        n = len(self.dataset)
        return self.dataset.load(index % n, index >= n)


class SeededItems(Dataset):
    """Item (index, seed) is dataset[index] drawn with every RNG (python, numpy, torch) seeded by `seed`.

    For per-item augmentation (timm transforms): the training sampler hands each position its own seed,
    so augmentations are the same with any number of workers and after a resume. The caller's RNG states
    are restored afterwards.
    """

    item_seeds = True

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

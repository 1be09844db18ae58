"""Built-in toy data: sklearn's 1,797 8x8 digits (0..16), upsampled, scaled to [-1, 1], 10 classes."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_CLASSES = 10
HELD_OUT_FRACTION = 0.2


def load_digits_tensors(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (images N x 1 x S x S in [-1, 1], labels N) — bilinear upsampling from 8x8."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    if image_size != images.shape[-1]:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0), torch.from_numpy(bunch.target.astype(np.int64))


def digits_split(seed: int = 0,
                 held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train, held-out) index arrays: the same `seed` gives the same split."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(len(idx) * held_out_fraction))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


class DigitsDataset(Dataset):
    """(1 x S x S image in [-1, 1], label) for one split of the digits; held in memory; `quantized`: rounded
    to 8-bit levels, as generated samples are when saved."""

    def __init__(self, split: Literal["train", "held_out", "all"] = "train", image_size: int = 16, seed: int = 0,
                 quantized: bool = False):
        images, labels = load_digits_tensors(image_size)
        if quantized:  # exactly what an 8-bit image of the digit decodes to (what classifiers and FID see)
            images = ((images + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
        if split != "all":
            if split not in ("train", "held_out"):
                raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
            idx = torch.from_numpy(digits_split(seed)[0 if split == "train" else 1])
            images, labels = images[idx], labels[idx]
        self.images, self.labels = images, labels
        self.image_size = image_size

    num_classes = NUM_CLASSES

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        """Item `index`, mirrored when `flip`."""
        image = self.images[index]
        return (image.flip(-1) if flip else image), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index, False)

"""A latent store written by `extract_latents`, read with random access.

Layout of a store folder:
  manifest.json        format, count, shard_size, shape (C, h, w), dtype, scale, autoencoder, image_size,
                       classes, files_sha1 (of the source file list)
  labels.npy           int64 (count,)
  latents_00000.npy    (n, 2, C, h, w): scaled posterior means of each image [:, 0] and its mirror [:, 1]
Shards are written atomically, so a shard file that exists is complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError

FORMAT = "sit_atconv.latents.v1"
MANIFEST = "manifest.json"
LABELS = "labels.npy"


def shard_path(store: str | os.PathLike, shard: int) -> Path:
    return Path(store) / f"latents_{shard:05d}.npy"


def num_shards(count: int, shard_size: int) -> int:
    return -(-count // shard_size)


def shard_indices(shard: int, count: int, shard_size: int) -> range:
    """Dataset indices held by `shard`."""
    return range(shard * shard_size, min((shard + 1) * shard_size, count))


def read_manifest(store: str | os.PathLike) -> dict:
    path = Path(store) / MANIFEST
    if not path.is_file():
        raise DataError(f"{store}: not a latent store (no {MANIFEST}); create it with "
                        "`python -m sit_atconv.data.extract_latents --data-path IMAGES --out STORE`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown store format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest


def missing_shards(store: str | os.PathLike, manifest: dict) -> list[int]:
    return [s for s in range(num_shards(manifest["count"], manifest["shard_size"]))
            if not shard_path(store, s).is_file()]


class LatentDataset(Dataset):
    """(latent C x h x w float32, label) from a store; `load(i, flip=True)` gives the stored mirror's latent."""

    def __init__(self, store: str | os.PathLike):
        self.store = Path(store)
        self.manifest = read_manifest(store)
        missing = missing_shards(store, self.manifest)
        if missing:
            total = num_shards(self.manifest["count"], self.manifest["shard_size"])
            raise DataError(f"{store}: incomplete latent store ({len(missing)} of {total} shards missing); "
                            "rerun extract_latents with the same arguments to finish it")
        self.labels = np.load(self.store / LABELS)
        self._shards: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        """Drop open memmaps when pickled into DataLoader workers (each reopens its own)."""
        return {**self.__dict__, "_shards": {}}

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["shape"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def scale(self) -> float:
        return float(self.manifest["scale"])

    @property
    def autoencoder(self) -> str:
        return self.manifest["autoencoder"]

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            self._shards[shard] = np.load(shard_path(self.store, shard), mmap_mode="r")
        return self._shards[shard]

    def load(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        """Latent of image `index`, or of its mirror when `flip` (both are stored)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a store of {len(self)} latents")
        shard, offset = divmod(index, self.manifest["shard_size"])
        latent = np.array(self._shard(shard)[offset, int(flip)], dtype=np.float32)
        return torch.from_numpy(latent), int(self.labels[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.load(index, False)

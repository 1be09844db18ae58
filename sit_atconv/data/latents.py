"""A latent store written by `extract_latents`, read with random access.

Layout of a store folder:
  manifest.json        format, count, shard_size, shape (C, h, w), dtype, scale, autoencoder, image_size,
                       classes, files_sha1 (of the source file list); once complete also latent_mean,
                       latent_std and latent_stats_count (per-channel statistics, see below); with REPA
                       features also `features` (encoder, weights, resolution, patch_size, num_tokens, dim, dtype)
  labels.npy           int64 (count,)
  latents_00000.npy    (n, 2, C, h, w): scaled posterior means of each image [:, 0] and its mirror [:, 1]
  stats_00000.npy      float64 (3, C): per channel, the count, sum and sum of squares of that shard's stored
                       latent values (both flips, every position, as stored: after the cast to `dtype`)
  features_00000.npy   (n, 2, num_tokens, dim): a vision encoder's patch tokens of the same two images
Shards are written atomically, so a shard file that exists is complete.

The statistics are exact merges of the per-shard float64 sums (population std, ddof 0), in the units of
the stored latents (scale x posterior mean); `data.latent_norm: channel` feeds (z - mean_c) / std_c.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .encoders import ChannelNorm

FORMAT = "sit_atconv.latents.v1"
MANIFEST = "manifest.json"
LABELS = "labels.npy"


def shard_path(store: str | os.PathLike, shard: int) -> Path:
    return Path(store) / f"latents_{shard:05d}.npy"


def stats_path(store: str | os.PathLike, shard: int) -> Path:
    return Path(store) / f"stats_{shard:05d}.npy"


def feature_path(store: str | os.PathLike, shard: int) -> Path:
    return Path(store) / f"features_{shard:05d}.npy"


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


def missing_shards(store: str | os.PathLike, manifest: dict, path=shard_path) -> list[int]:
    """Shards whose file (`path`: latents by default, or stats / features) does not exist yet."""
    return [s for s in range(num_shards(manifest["count"], manifest["shard_size"]))
            if not path(store, s).is_file()]


def latent_statistics(manifest: dict) -> tuple[list[float], list[float]] | None:
    """(per-channel mean, std) of a store's latents, or None for a store without them (made before they
    were computed, or unfinished)."""
    if "latent_mean" not in manifest or "latent_std" not in manifest:
        return None
    return [float(m) for m in manifest["latent_mean"]], [float(s) for s in manifest["latent_std"]]


@dataclass(frozen=True)
class StoredFeatures:
    """Which vision encoder made a store's REPA features, and their shape (num_tokens, dim) per image."""

    encoder: str
    weights: str
    resolution: int
    patch_size: int
    num_tokens: int
    dim: int
    dtype: str


def stored_features(store: str | os.PathLike) -> StoredFeatures | None:
    """The REPA features a store holds (encoder name, tokens, width), or None when it holds none."""
    record = read_manifest(store).get("features")
    return None if record is None else StoredFeatures(**record)


class LatentDataset(Dataset):
    """(latent C x h x w float32, label) from a store; `load(i, flip=True)` gives the stored mirror's latent.

    `norm`: per-channel normalisation applied to every latent (`data.latent_norm: channel`).
    `with_features`: items are (latent, label, features (num_tokens, dim) float32), the features of the
    same (flipped) image; the store must hold them (extract_latents --repa-encoder).
    """

    def __init__(self, store: str | os.PathLike, norm: ChannelNorm | None = None, with_features: bool = False):
        self.store, self.norm, self.with_features = Path(store), norm, with_features
        self.manifest = read_manifest(store)
        total = num_shards(self.manifest["count"], self.manifest["shard_size"])
        missing = missing_shards(store, self.manifest)
        if missing:
            raise DataError(f"{store}: incomplete latent store ({len(missing)} of {total} shards missing); "
                            "rerun extract_latents with the same arguments to finish it")
        if with_features:
            self._check_features(total)
        self.labels = np.load(self.store / LABELS)
        self._shards: dict[int, np.ndarray] = {}
        self._features: dict[int, np.ndarray] = {}

    def _check_features(self, total: int) -> None:
        if "features" not in self.manifest:
            raise DataError(f"{self.store}: the store holds no encoder features; add them with extract_latents "
                            "--repa-encoder NAME --repa-encoder-weights PATH (same other arguments)")
        missing = missing_shards(self.store, self.manifest, feature_path)
        if missing:
            raise DataError(f"{self.store}: encoder features incomplete ({len(missing)} of {total} shards missing); "
                            "rerun extract_latents with the same arguments to finish them")

    def __getstate__(self) -> dict:
        """Drop open memmaps when pickled into DataLoader workers (each reopens its own)."""
        return {**self.__dict__, "_shards": {}, "_features": {}}

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

    def _shard(self, shard: int, files: dict[int, np.ndarray], path=shard_path) -> np.ndarray:
        if shard not in files:
            files[shard] = np.load(path(self.store, shard), mmap_mode="r")
        return files[shard]

    def load(self, index: int, flip: bool) -> tuple:
        """(latent, label[, features]) of image `index`, or of its mirror when `flip` (both are stored)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a store of {len(self)} latents")
        shard, offset = divmod(index, self.manifest["shard_size"])
        latent = torch.from_numpy(np.array(self._shard(shard, self._shards)[offset, int(flip)], dtype=np.float32))
        if self.norm is not None:
            latent = self.norm.normalize(latent)
        if not self.with_features:
            return latent, int(self.labels[index])
        features = self._shard(shard, self._features, feature_path)[offset, int(flip)]
        return latent, int(self.labels[index]), torch.from_numpy(np.array(features, dtype=np.float32))

    def __getitem__(self, index: int) -> tuple:
        return self.load(index, False)

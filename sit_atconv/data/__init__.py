"""Data sources (digits, image folders, latent stores), autoencoders, and the `build_dataset` factory."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from sit_atconv.config import DataConfig, ModelConfig
from sit_atconv.data.digits import DigitsDataset, digits_split, load_digits_tensors
from sit_atconv.data.encoders import (
    Autoencoder,
    AutoencoderError,
    IdentityAutoencoder,
    VAEAutoencoder,
    build_autoencoder,
)
from sit_atconv.data.images import DataError, ImageFolderDataset, center_crop_arr
from sit_atconv.data.latents import LatentDataset

__all__ = ["Autoencoder", "AutoencoderError", "DataError", "DigitsDataset", "IdentityAutoencoder",
           "ImageFolderDataset", "LatentDataset", "MirroredByIndex", "VAEAutoencoder", "build_autoencoder",
           "build_dataset", "center_crop_arr", "digits_split", "load_digits_tensors"]


class Unconditional(Dataset):
    """Wraps a dataset so every label is 0 (num_classes 1), e.g. FFHQ stored in numbered subfolders."""

    num_classes = 1

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.dataset.sample_shape

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.dataset[index][0], 0

    def load(self, index: int, flip: bool) -> tuple[torch.Tensor, int]:
        return self.dataset.load(index, flip)[0], 0


class MirroredByIndex(Dataset):
    """Both orientations of a dataset as 2N items: item i is image i % N, mirrored when i >= N.

    The flip becomes part of the index, so a deterministic index order (the trainer's) also fixes
    every flip — with any number of DataLoader workers and across resumes.
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return 2 * len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        n = len(self.dataset)
        return self.dataset.load(index % n, index >= n)


def _check_latent_store(ds: LatentDataset, data_cfg: DataConfig) -> None:
    """The store must have been encoded with the autoencoder and scale the run decodes with."""
    if ds.autoencoder != data_cfg.autoencoder:
        raise DataError(f"{ds.store}: latents were encoded with '{ds.autoencoder}' but data.autoencoder is "
                        f"'{data_cfg.autoencoder}' (used to decode samples); "
                        f"pass --data.autoencoder {ds.autoencoder}")
    if abs(ds.scale - data_cfg.latent_scale) > 1e-9 * max(1.0, ds.scale):
        raise DataError(f"{ds.store}: latents were scaled by {ds.scale} but data.latent_scale is "
                        f"{data_cfg.latent_scale}; pass --data.latent_scale {ds.scale}")


def build_dataset(data_cfg: DataConfig, model_cfg: ModelConfig,
                  autoencoder: Autoencoder | None = None) -> Dataset:
    """Training dataset of (input, label) for `data_cfg.source`, checked against the model's input shape.

    Image folders give pixels; the trainer encodes them with `autoencoder` (pass it to check shapes).
    A model with num_classes 1 gets label 0 for every item.
    """
    if data_cfg.source == "digits":
        ds = DigitsDataset("train", data_cfg.image_size, data_cfg.random_flip)
    elif data_cfg.data_path is None:
        kind = "an image folder" if data_cfg.source == "images" else "a latent store"
        raise DataError(f"data.data_path is not set for data.source={data_cfg.source}; "
                        f"pass --data-path to {kind}")
    elif data_cfg.source == "images":
        ds = ImageFolderDataset(data_cfg.data_path, data_cfg.image_size, data_cfg.random_flip)
    else:
        ds = LatentDataset(data_cfg.data_path, data_cfg.random_flip)
        _check_latent_store(ds, data_cfg)

    if data_cfg.source == "latents" or (autoencoder is None and data_cfg.autoencoder == "identity"):
        shape, what = ds.sample_shape, f"{data_cfg.source} data"
    elif autoencoder is not None:
        shape, what = autoencoder.latent_shape(data_cfg.image_size), f"autoencoder '{autoencoder.name}'"
    else:
        shape = None  # a VAE not yet loaded: the caller checks after building it
    expected = (model_cfg.in_channels, model_cfg.input_size, model_cfg.input_size)
    if shape is not None and tuple(shape) != expected:
        c, h, _ = shape
        raise DataError(f"{what} gives {c}x{h}x{h} model inputs but the model expects "
                        f"{'x'.join(map(str, expected))}; "
                        f"pass --model.in_channels {c} --model.input_size {h} (or change data.image_size)")

    if model_cfg.num_classes == 1:
        return Unconditional(ds)
    if ds.num_classes > model_cfg.num_classes:
        raise DataError(f"the data has {ds.num_classes} classes but model.num_classes is "
                        f"{model_cfg.num_classes}; "
                        f"pass --model.num_classes {ds.num_classes}")
    return ds

"""Config -> the objects of a diffusion run: SiT, transport, autoencoder, dataset, task, image sampler;
shapes and classes checked against each other."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import DataConfig, RunConfig
from ..data import (
    SD_VAE_ID,
    SD_VAE_SCALE,
    Autoencoder,
    ChannelNorm,
    DigitsDataset,
    ImageFolderDataset,
    LatentDataset,
    MirroredByIndex,
    Unconditional,
    load_autoencoder,
)
from ..data.latents import latent_statistics, read_manifest
from ..errors import ConfigError, DataError
from ..models.sit import SiT
from ..sampling import ImageSampler, SamplingOptions
from ..tasks import DiffusionTask
from ..transport import Transport, create_transport
from .repa import features_stored, projector_args, repa_alignment


def _channel_statistics(d: DataConfig, autoencoder: str, store: dict | None) -> tuple[list | None, list | None]:
    """(latent_mean, latent_std) for `data.latent_norm`: the given ones (checked), else the latent store's."""
    given = d.latent_mean is not None or d.latent_std is not None
    if d.latent_norm != "channel":
        if given:
            raise ConfigError("data.latent_mean/latent_std are statistics for latent_norm channel; pass "
                              "--data.latent_norm channel or leave them unset")
        return None, None
    if autoencoder == "identity":
        raise ConfigError("data.latent_norm=channel normalises VAE latents, but this run is in pixel space "
                          "(autoencoder identity, e.g. digits); use --data.latent_norm scale")
    if given:
        if d.latent_mean is None or d.latent_std is None:
            raise ConfigError("data.latent_mean and data.latent_std: give both (one value per latent channel) "
                              "or neither (the store's)")
        ChannelNorm(d.latent_mean, d.latent_std)  # same lengths, finite, stds > 0
        return d.latent_mean, d.latent_std
    stats = latent_statistics(store) if store else None
    if stats is None and store:
        raise DataError(f"{d.data_path}: the latent store has no per-channel statistics for data.latent_norm="
                        "channel; re-run extract_latents with the same arguments to compute them")
    if stats is None:
        raise ConfigError("data.latent_norm=channel needs per-channel latent statistics: set data.data_path to a "
                          "latent store (data.source latents) or pass --data.latent_mean and --data.latent_std")
    return stats


def resolve_data(cfg: RunConfig) -> RunConfig:
    """Fill `data.autoencoder` / `data.latent_scale` (and, for latent_norm channel, `data.latent_mean` /
    `latent_std`) left at none: from a latent store's manifest (what its latents were encoded with), identity
    for digits, else SD-VAE. Given values are kept (and checked against the store by `build_dataset`). The
    resolved config is what a run saves, so sampling needs no store."""
    d = cfg.data
    if cfg.train.task != "diffusion":  # classifiers read pixels
        return cfg
    store = None
    need_stats = d.latent_norm == "channel" and d.latent_mean is None
    if (d.autoencoder is None or d.latent_scale is None or need_stats) and d.source == "latents" and d.data_path:
        store = read_manifest(d.data_path)
    autoencoder = d.autoencoder or (store["autoencoder"] if store else
                                    "identity" if d.source == "digits" else SD_VAE_ID)
    scale = d.latent_scale
    if scale is None and autoencoder != "identity":
        scale = float(store["scale"]) if store else SD_VAE_SCALE
    mean, std = _channel_statistics(d, autoencoder, store)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, autoencoder=autoencoder, latent_scale=scale,
                                                             latent_mean=mean, latent_std=std))


def build_model(cfg: RunConfig, projector: bool = True) -> SiT:
    """The SiT a config describes (a zoo row or an explicit architecture), with REPA's projector when the
    run uses REPA (`projector=False`: without it, e.g. for sampling-only exports)."""
    m = cfg.model
    return SiT(**m.architecture(), mixer=m.mixer, input_size=m.input_size, in_channels=m.in_channels,
               num_classes=m.num_classes, learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob,
               kernel_size=m.kernel_size, kernel_pool=m.kernel_pool, kernel_act=m.kernel_act,
               **(projector_args(cfg) if projector else {}))


def build_transport(cfg: RunConfig) -> Transport:
    t = cfg.transport
    return create_transport(t.path_type, t.prediction, t.loss_weight, t.train_eps, t.sample_eps,
                            time_sampling=t.time_sampling, time_mean=t.time_mean, time_std=t.time_std,
                            time_shift=t.time_shift)


def build_autoencoder(cfg: RunConfig, device: torch.device | str = "cpu") -> Autoencoder:
    """Pixels <-> model inputs: identity (1 channel for digits, else 3) or the configured VAE, frozen."""
    d = resolve_data(cfg).data
    scale = SD_VAE_SCALE if d.latent_scale is None else d.latent_scale  # identity ignores it
    return load_autoencoder(d.autoencoder, scale, 1 if d.source == "digits" else 3,
                            norm=ChannelNorm.of(d.latent_mean, d.latent_std)).to(device).eval()


def _source_dataset(cfg: RunConfig) -> Dataset:
    d = cfg.data
    if d.source == "digits":
        return DigitsDataset("train", d.image_size)
    if d.data_path is None:
        kind = "an image folder" if d.source == "images" else "a latent store"
        raise DataError(f"data.data_path is not set for data.source={d.source}; pass --data-path to {kind}")
    if d.source == "images":
        return ImageFolderDataset(d.data_path, d.image_size)
    norm = ChannelNorm.of(d.latent_mean, d.latent_std)
    store = LatentDataset(d.data_path, norm=norm, with_features=features_stored(cfg))
    stats = latent_statistics(store.manifest)
    given, own = [*norm.mean, *norm.std] if norm else [], [*stats[0], *stats[1]] if stats else []
    if given and own and (len(given) != len(own) or any(abs(a - b) > 1e-9 * max(1.0, abs(b))
                                                        for a, b in zip(given, own))):
        raise DataError(f"{store.store}: data.latent_mean/latent_std differ from the store's statistics "
                        f"(mean {stats[0]}, std {stats[1]}); leave them unset to use the store's")
    if store.autoencoder != d.autoencoder:
        raise DataError(f"{store.store}: latents were encoded with '{store.autoencoder}' but data.autoencoder is "
                        f"'{d.autoencoder}' (used to decode samples); pass --data.autoencoder {store.autoencoder} "
                        "or leave it unset")
    if d.latent_scale is not None and abs(store.scale - d.latent_scale) > 1e-9 * max(1.0, store.scale):
        raise DataError(f"{store.store}: latents were scaled by {store.scale} but data.latent_scale is "
                        f"{d.latent_scale}; pass --data.latent_scale {store.scale} or leave it unset")
    return store


def build_dataset(cfg: RunConfig, autoencoder: Autoencoder | None = None) -> Dataset:
    """Training (input, label) pairs for `cfg.data`, checked against the model's input shape and classes.

    Image folders give pixels, which the task encodes with `autoencoder` (pass it to check shapes). With
    `data.random_flip`, both orientations are items (`MirroredByIndex`). num_classes 1: every label is 0.
    """
    cfg = resolve_data(cfg)
    d, m = cfg.data, cfg.model
    ds = _source_dataset(cfg)
    if d.source == "latents" or d.autoencoder == "identity":
        shape, what = ds.sample_shape, f"{d.source} data"
    else:
        ae = autoencoder or build_autoencoder(cfg)
        shape, what = ae.latent_shape(d.image_size), f"autoencoder '{ae.name}'"
    expected = (m.in_channels, m.input_size, m.input_size)
    if tuple(shape) != expected:
        c, h, _ = shape
        raise DataError(f"{what} gives {c}x{h}x{h} model inputs but the model expects "
                        f"{'x'.join(map(str, expected))}; pass --model.in_channels {c} --model.input_size {h} "
                        "(or change data.image_size)")
    if m.num_classes == 1:
        ds = Unconditional(ds)
    elif ds.num_classes > m.num_classes:
        raise DataError(f"the data has {ds.num_classes} classes but model.num_classes is {m.num_classes}; "
                        f"pass --model.num_classes {ds.num_classes}")
    return MirroredByIndex(ds) if d.random_flip else ds


def latent_shape(cfg: RunConfig) -> tuple[int, int, int]:
    m = cfg.model
    return (m.in_channels, m.input_size, m.input_size)


def image_sampler(cfg: RunConfig, model: nn.Module, autoencoder: Autoencoder) -> ImageSampler:
    return ImageSampler(model, build_transport(cfg), autoencoder, latent_shape(cfg), cfg.model.num_classes)


def build_diffusion_task(cfg: RunConfig, autoencoder: Autoencoder, device: torch.device | str = "cpu") -> DiffusionTask:
    """The training task: diffusion on the configured data (VAE-encoding image batches on the fly)."""
    encode = cfg.data.source == "images" and resolve_data(cfg).data.autoencoder != "identity"
    return DiffusionTask(build_transport(cfg), autoencoder, latent_shape(cfg), cfg.model.num_classes,
                         SamplingOptions().resolved(cfg.transport), cfg.train.seed,
                         encoder=autoencoder if encode else None, device=device, repa=repa_alignment(cfg, device))

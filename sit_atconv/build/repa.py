"""REPA's pieces of a diffusion run: which encoder geometry the projector targets, where the encoder's
features come from (stored next to the latents, or computed from the images on the fly), and the
checks that the encoder's patch grid matches the model's token grid."""

from __future__ import annotations

import dataclasses

import timm
import torch

from ..config import RepaConfig, RunConfig
from ..data.latents import StoredFeatures, stored_features
from ..errors import ConfigError
from ..tasks.diffusion import RepaAlignment


def repa_enabled(cfg: RunConfig) -> bool:
    return cfg.train.task == "diffusion" and cfg.repa.coeff > 0


def features_stored(cfg: RunConfig) -> bool:
    """REPA on a latent store without encoder weights: the targets are the features extract_latents stored."""
    return repa_enabled(cfg) and cfg.data.source == "latents" and cfg.repa.encoder_weights is None


def model_tokens(cfg: RunConfig) -> int:
    grid = cfg.model.input_size // cfg.model.architecture()["patch_size"]
    return grid * grid


def encoder_geometry(name: str, resolution: int | None) -> tuple[int, int, int]:
    """(width, patch side, default input side) of a timm encoder, read from a weightless (meta) copy."""
    if not timm.is_model(name.split(".")[0]):
        raise ConfigError(f"repa.encoder: {name!r} is not a timm model; use e.g. vit_base_patch14_dinov2.lvd142m")
    with torch.device("meta"):
        net = timm.create_model(name, pretrained=False, **({"img_size": resolution} if resolution else {}))
    patch = net.patch_embed.patch_size
    return net.num_features, patch[0], net.patch_embed.img_size[0]


def _stored(cfg: RunConfig) -> StoredFeatures:
    """Which encoder made the latent store's features, and their shape."""
    if not cfg.data.data_path:
        raise ConfigError("repa: data.data_path (the latent store) is not set")
    features = stored_features(cfg.data.data_path)
    if features is None:
        raise ConfigError(f"repa: the latent store {cfg.data.data_path} has no encoder features; rerun "
                          "extract_latents with --repa-encoder NAME --repa-encoder-weights FILE, or pass "
                          "--repa.encoder_weights FILE to compute them from images")
    return features


def resolve_repa(cfg: RunConfig) -> RunConfig:
    """Fill `repa.encoder_dim` / `repa.encoder_resolution` (recorded in the run) and check the token grids."""
    if not repa_enabled(cfg):
        return cfg
    r, tokens = cfg.repa, model_tokens(cfg)
    depth = cfg.model.architecture()["depth"]
    if r.depth > depth:
        raise ConfigError(f"repa.depth={r.depth} is beyond the model's {depth} blocks; pass --repa.depth <= {depth}")
    if features_stored(cfg):
        stored = _stored(cfg)
        if stored.encoder != r.encoder:
            raise ConfigError(f"repa.encoder is {r.encoder} but the store's features come from {stored.encoder}; "
                              f"pass --repa.encoder {stored.encoder}")
        dim, got = stored.dim, stored.num_tokens
        resolution, source = stored.resolution, f"the store's features ({stored.encoder})"
    else:
        if cfg.data.source == "latents":
            raise ConfigError("repa.encoder_weights: features cannot be computed on the fly from a latent store "
                              "(it holds no images); store them with extract_latents --repa-encoder")
        if r.encoder_weights is None:
            raise ConfigError(f"repa.encoder_weights is not set: pass --repa.encoder_weights FILE (local weights of "
                              f"{r.encoder}; 'random' for a smoke test)")
        dim, patch, _ = encoder_geometry(r.encoder, None)
        resolution = r.encoder_resolution or patch * int(round(tokens ** 0.5))
        got, source = (resolution // patch) ** 2, f"{r.encoder} at {resolution} px"
    if got != tokens:
        raise ConfigError(f"repa: {source} gives {got} patch tokens but the model has {tokens} tokens; choose "
                          "--repa.encoder_resolution (encoder patch x model grid) or store matching features")
    if r.encoder_dim is not None and r.encoder_dim != dim:
        raise ConfigError(f"repa.encoder_dim={r.encoder_dim} but {source} has width {dim}; leave it unset")
    return dataclasses.replace(cfg, repa=dataclasses.replace(r, encoder_dim=dim, encoder_resolution=resolution))


def _resolved(cfg: RunConfig) -> RepaConfig:
    """The `repa` section with encoder width and side filled (as a run records them; resolved if not)."""
    r = cfg.repa
    return r if r.encoder_dim is not None and r.encoder_resolution is not None else resolve_repa(cfg).repa


def repa_alignment(cfg: RunConfig, device: torch.device | str = "cpu") -> RepaAlignment | None:
    """The task's REPA part: None when off; with a loaded frozen encoder unless features are stored."""
    if not repa_enabled(cfg):
        return None
    if features_stored(cfg):
        return RepaAlignment(cfg.repa.coeff)
    from ..data.vision_encoder import load_vision_encoder  # timm model + local weights, only when needed

    r = _resolved(cfg)
    encoder = load_vision_encoder(r.encoder, r.encoder_weights, r.encoder_resolution)
    return RepaAlignment(r.coeff, encoder.to(device))


def projector_args(cfg: RunConfig) -> dict:
    """SiT keyword arguments of the REPA projector ({} when REPA is off)."""
    if not repa_enabled(cfg):
        return {}
    r = _resolved(cfg)
    return {"repa_depth": r.depth, "repa_dim": r.encoder_dim, "projector_dim": r.projector_dim}

"""A frozen vision encoder (a timm ViT such as DINOv2) that turns images into patch tokens, for REPA.

REPA aligns the diffusion transformer's hidden tokens with these tokens. The encoder takes images in
[-1, 1] of any size, resizes them (bicubic) to its own resolution, applies its own mean/std normalisation
and returns the patch tokens after its final norm, without class or register tokens (DINOv2's
`x_norm_patchtokens`). Weights come from a local file only — a timm state dict or the official DINOv2 hub
checkpoint, whose keys timm's own filter maps (and whose position embedding it resamples to the grid) —
or "random" (tests, debugging): never a download. Any timm model with a patch embedding and prefix tokens
builds (e.g. DINOv3's Eva, with its own family's key filter); the DINOv2 formats are the tested ones.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError

RANDOM = "random"


class VisionEncoderError(ConfigError):
    """A vision encoder that cannot be built or loaded; one line naming the fix."""


class VisionEncoder(nn.Module):
    """Frozen (eval mode, no gradients) timm ViT -> patch tokens (N, num_tokens, dim)."""

    def __init__(self, model: nn.Module, name: str, weights: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name, self.weights = name, weights
        self.dim = int(model.embed_dim)
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.resolution = int(model.patch_embed.img_size[0])
        grid = model.patch_embed.grid_size
        self.num_tokens = int(grid[0] * grid[1])
        self.num_prefix_tokens = int(model.num_prefix_tokens)
        cfg = model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VisionEncoder:
        """Always frozen in eval mode."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """[-1, 1] images (N, 1 or 3, H, W) -> the encoder's normalised input at its resolution (grey -> RGB;
        bicubic without antialiasing, as REPA's preprocessing)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = ((x + 1) / 2 - self.mean) / self.std
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [-1, 1], any size -> patch tokens (N, num_tokens, dim), no class/register
        tokens. Resizes (bicubic) to `resolution` and applies the encoder's own mean/std normalisation."""
        param = next(self.model.parameters())
        tokens = self.model.forward_features(self.preprocess(images.to(param.device)).to(param.dtype))
        return tokens[:, self.num_prefix_tokens:].float()


def _create(name: str, resolution: int | None, timm_kwargs: dict) -> nn.Module:
    """The timm ViT `name`, random weights, no classifier head, at `resolution` (default: timm's)."""
    import timm

    if not timm.is_model(name):
        import difflib

        near = difflib.get_close_matches(name, timm.list_models("*vit*"), n=1, cutoff=0.6)
        raise VisionEncoderError(f"vision encoder '{name}' is not a timm model" +
                                 (f"; did you mean '{near[0]}'?" if near else "") +
                                 " (e.g. vit_base_patch14_dinov2.lvd142m)")
    kwargs = {**timm_kwargs, "pretrained": False, "num_classes": 0}
    if resolution is not None:
        kwargs["img_size"] = resolution
    try:
        model = timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise VisionEncoderError(f"vision encoder '{name}' with {kwargs}: timm refused it "
                                 f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    if getattr(model, "patch_embed", None) is None or not hasattr(model, "num_prefix_tokens"):
        raise VisionEncoderError(f"vision encoder '{name}' is a {type(model).__name__}, not a timm ViT with patch "
                                 "tokens; use a ViT such as vit_base_patch14_dinov2.lvd142m")
    return model


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """A flat name -> tensor dict from .safetensors or a weights-only .pt/.pth (unwrapping model/state_dict)."""
    if not path.is_file():
        raise VisionEncoderError(f"vision encoder weights {path}: no such file; pass a timm state dict or the "
                                 "official DINOv2 checkpoint (.pth / .safetensors), or 'random'")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise VisionEncoderError(f"vision encoder weights {path}: unreadable or not a weights-only file "
                                 f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise VisionEncoderError(f"vision encoder weights {path}: expected a dict of tensors (a state dict)")
    return obj


def _load_weights(model: nn.Module, name: str, path: Path) -> None:
    """Load a timm or official-DINOv2 state dict into `model`: the model family's own timm filter maps the
    keys and resamples the position embedding to the model's grid."""
    import sys

    state = {k: v for k, v in _read_tensors(path).items() if not k.startswith("head.")}  # classifier: unused
    mapping = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", lambda sd, _: sd)
    try:
        state = mapping(state, model)
    except (KeyError, RuntimeError, ValueError, AssertionError) as err:
        raise VisionEncoderError(f"vision encoder weights {path} do not fit '{name}' "
                                 f"({type(err).__name__}: {str(err).splitlines()[0][:160]}); pass weights of "
                                 "this architecture") from None
    expected = model.state_dict()
    problems = ([f"missing {k}" for k in expected if k not in state] + [f"unexpected {k}" for k in state
                if k not in expected] + [f"shape of {k}" for k, v in state.items()
                                         if k in expected and v.shape != expected[k].shape])
    if problems:
        raise VisionEncoderError(f"vision encoder weights {path} do not fit '{name}' ({len(problems)} mismatches, "
                                 f"e.g. {', '.join(problems[:3])}); pass weights of this architecture and size")
    model.load_state_dict(state)


def load_vision_encoder(name: str, weights: str, resolution: int | None = None, **timm_kwargs) -> VisionEncoder:
    """The frozen timm ViT `name` with `weights` (a local file path, or "random") at `resolution` (default:
    the model's default image size); `timm_kwargs` go to `timm.create_model` (pretrained is always False)."""
    if resolution is not None and resolution <= 0:
        raise VisionEncoderError(f"vision encoder resolution must be positive, got {resolution}")
    if resolution is not None and "img_size" in timm_kwargs:
        raise VisionEncoderError("vision encoder: both resolution and img_size given; pass only the resolution")
    if not weights:
        raise VisionEncoderError("vision encoder weights: empty; pass a local weights file or 'random'")
    path = None if weights == RANDOM else Path(os.path.expanduser(weights))
    if path is not None and not path.is_file():
        _read_tensors(path)  # the one-line "no such file" error, before building the model
    model = _create(name, resolution, timm_kwargs)
    patch = model.patch_embed.patch_size[0]
    if model.patch_embed.img_size[0] % patch:
        raise VisionEncoderError(f"vision encoder resolution {model.patch_embed.img_size[0]} is not a multiple of "
                                 f"its patch size {patch}; pass a resolution such as {16 * patch}")
    if path is not None:
        _load_weights(model, name, path)
    return VisionEncoder(model, name, weights)

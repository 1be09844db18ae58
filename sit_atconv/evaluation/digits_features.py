"""The digits domain feature extractor: a tiny AttNet classifier trained on the digits *train* split only.

FID of 16x16 digits through an ImageNet Inception measures little, so the offline default scores digits
with features of a small AttNet (SPEC §3 blocks, 2 stages for 16x16 inputs) trained on the 1,438 training
digits; its 64-d pre-logits features (after the head LayerNorm) give FID/KID/precision/recall, its logits a
digits Inception Score. The held-out split (359 digits) is never used for training: it is the reference.
Weights: `sit_atconv/assets/digits_attnet.safetensors`, reproduced by
`python -m sit_atconv.evaluation.train_digits_classifier` (held-out accuracy in the file's metadata).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..build import build_network
from ..checkpoint import load_tensors, safetensors_metadata
from ..config_io import load_config
from ..data.digits import DigitsDataset
from ..errors import CheckpointError
from ..sampling import to_uint8

DIGITS_EXTRACTOR_NAME = "digits-attnet"
DIGITS_WEIGHTS = Path(__file__).resolve().parent.parent / "assets" / "digits_attnet.safetensors"
IMAGE_SIZE = 16  # the digits run's pixel side; other sizes are resized to it
DIGITS_CONFIG = "attnet_digits"  # the classification config whose EMA weights are the shipped file


def build_classifier() -> nn.Module:
    """The (untrained) digits AttNet of `configs/attnet_digits.yaml`: 16x16 -> 4x4x32 -> 2x2x64 -> 10."""
    return build_network(load_config(DIGITS_CONFIG))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> grey float (N, 1, 16, 16) in [-1, 1] (inverse of `to_uint8` for digits)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3) images; got {images.dtype} {tuple(images.shape)}.")
    x = images.float().mean(-1, keepdim=True).permute(0, 3, 1, 2) / 127.5 - 1.0
    if x.shape[-1] != IMAGE_SIZE or x.shape[-2] != IMAGE_SIZE:
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    return x


def digits_uint8(split: str = "held_out") -> torch.Tensor:
    """A digits split as uint8 (N, 16, 16, 3), quantised exactly as generated samples are."""
    return to_uint8(DigitsDataset(split, image_size=IMAGE_SIZE).images)


def weights_metadata(path: str | os.PathLike = DIGITS_WEIGHTS) -> dict:
    """The training record stored with the weights (seed, steps, held-out accuracy)."""
    return json.loads(safetensors_metadata(path).get("record", "{}"))


class DigitsFeatures:
    """Extractor: uint8 (N, H, W, 3) -> {"pool": (N, 64) pre-logits features, "logits": (N, 10)}."""

    name = DIGITS_EXTRACTOR_NAME

    def __init__(self, weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> None:
        path = Path(weights or DIGITS_WEIGHTS)
        if not path.is_file():
            raise CheckpointError(f"{path}: digits classifier weights missing; rebuild them with "
                                  "python -m sit_atconv.evaluation.train_digits_classifier")
        self.model = build_classifier()
        self.model.load_state_dict(load_tensors(path))
        self.weights = path
        self.device = torch.device(device)
        self.model.to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = preprocess(images).to(self.device)
        pool = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return {"pool": pool.float(), "logits": self.model.head(pool).float()}

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit per image (N,)."""
        return self(images)["logits"].argmax(1).cpu()

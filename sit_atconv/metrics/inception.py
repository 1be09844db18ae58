"""torch-fidelity's TF-compatible InceptionV3 as one extractor: pool (FID), spatial (sFID), logits (IS).

The network, its TF1-exact bilinear resize to 299 and its weights are torch-fidelity's port of the 2015-12-05
TensorFlow graph that ADM's evaluator uses. sFID follows ADM: its `mixed_6/conv:0` tensor is the ReLU output
of the 1x1 branch of the 7th mixed block, `Mixed_6d.branch1x1` here (TF `mixed` = Mixed_5b, ..., `mixed_6` =
Mixed_6d, as in torch-fidelity's weight converter), of which the first 7 channels are kept and flattened in
TF's (H, W, C) order: 17 x 17 x 7 = 2023 dims, so statistics line up with ADM's stored `mu_s`/`sigma_s`.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from ..checkpoint import torch_load_safe
from ..errors import MetricInputError, UserError
from ..io import atomic_write

INCEPTION_NAME = "inception-v3-compat"  # torch-fidelity's registered name for this network
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = URL_INCEPTION_V3
SPATIAL_CHANNELS = 7
DOWNLOAD_TIMEOUT_S = 30


class InceptionWeightsError(UserError):
    """Inception weights neither given, cached nor downloadable; the message says how to provide them."""


def default_weights_path() -> Path:
    """Where torch-fidelity's default download lands: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _missing(reason: str) -> InceptionWeightsError:
    return InceptionWeightsError(
        f"InceptionV3 weights unavailable ({reason}): pass --inception-weights PATH (inception_weights=PATH) "
        f"to a local {INCEPTION_FILENAME} (from {INCEPTION_URL}), or place it at "
        f"$TORCH_HOME/hub/checkpoints/{INCEPTION_FILENAME} (here: {default_weights_path()})."
    )


def _download(url: str, dest: Path) -> None:
    """Fetch once with a timeout (no retries), written atomically into the hub cache."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise _missing(f"not cached, download failed: {getattr(err, 'reason', err)}") from None
    atomic_write(dest, lambda tmp: Path(tmp).write_bytes(data))


def load_inception_weights(path: str | os.PathLike | None = None, download: bool = True) -> dict:
    """The weights as a tensor dict, read weights-only: from `path`, else the hub cache (downloading once)."""
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise _missing(f"no such file: {file}")
    else:
        file = default_weights_path()
        if not file.is_file():
            if not download:
                raise _missing("not cached and downloads are off")
            _download(INCEPTION_URL, file)
    state = torch_load_safe(file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricInputError(f"{file}: expected an InceptionV3 state dict (a dict of tensors).")
    return state


class InceptionV3Features:
    """Extractor: uint8 (N, H, W, 3) -> {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)}.

    `logits` are torch-fidelity's `logits_unbiased` (no fc bias), what ADM's and the original IS code use.
    """

    name = INCEPTION_NAME

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        download: bool = True,
    ) -> None:
        state = load_inception_weights(weights, download=download)
        # torch-fidelity unpickles its weights file with the full unpickler; hand it only bytes we serialised
        # from the weights-only load above.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        self.model = FeatureExtractorInceptionV3(
            INCEPTION_NAME, ["2048", "logits_unbiased"], feature_extractor_weights_path=buffer
        ).to(device)
        self.device = torch.device(device)
        self._spatial: torch.Tensor | None = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) images; got {images.dtype} {tuple(images.shape)}.")
        pool, logits = self.model(images.to(self.device).permute(0, 3, 1, 2).contiguous())
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}

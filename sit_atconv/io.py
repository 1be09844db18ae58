"""Safe checkpoint I/O: safetensors or weights-only pickles in, atomic writes out."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that would need to run arbitrary code to load."""


def torch_load_safe(path: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """`torch.load(weights_only=True)` with one clear error for pickles that try to run code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load — the pickle asks to run code outside tensors and plain containers "
            f"({str(err).splitlines()[0]}). Convert it with a trusted tool to .safetensors, then retry."
        ) from None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a flat tensor dict from .safetensors, or a .pt/.pth (unwrapping 'model'/'state_dict'/'ema')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file; pass a .safetensors or .pt/.pth path.")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch_load_safe(path)
    for key in ("ema", "model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (or one under 'model'/'ema'/'state_dict').")
    return obj


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` then rename onto `path`, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> Path:
    """Atomically write a tensor dict as .safetensors (contiguous, de-aliased copies)."""
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def torch_save_atomic(obj, path: str | os.PathLike) -> Path:
    """Atomically `torch.save` an object made of tensors and plain containers."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))

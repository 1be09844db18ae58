"""Every checkpoint read and write: safe loading, atomic durable saving, run-folder listing and retention.

Three kinds of file pass through here:
- *tensor files*: a flat name -> tensor dict (`.safetensors`, or a `.pt`/`.pth` pickle, possibly wrapped in
  'ema'/'model'/'state_dict'): reference weights, converted weights, Inception weights, shipped assets;
- *training checkpoints*: `RUN/checkpoints/step_XXXXXXX.pt`, one weights-only pickle of model, EMA,
  optimizer, scheduler, step and the resolved config, so sampling and evaluation need nothing but the file;
- *exports*: sampling-only checkpoints (weights under 'ema', step, config), e.g. a post-hoc EMA reconstruction.

Pickles are always read with `torch.load(weights_only=True)`: one that asks to run code is refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, UnsafeCheckpointError
from .io import atomic_write

TRAINING_KEYS = ("model", "ema", "optimizer", "scheduler", "step", "config")
EXPORT_KEYS = ("ema", "step", "config")  # a sampling-only checkpoint (e.g. a post-hoc EMA): no raw weights
TRAINING_ONLY = ("projectors.",)  # weights only the training loss uses (REPA's projector): not exported
_STEP_FILE = re.compile(r"^step_(\d{7,})\.pt$")
_WRAPPERS = ("ema", "model", "state_dict", "model_state_dict")

# ------------------------------------------------------------------------------------------ any file


def torch_load_safe(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)`, with one line naming the file for refused or unreadable pickles."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{path}: refused to load — the pickle asks to run code outside tensors and plain containers "
            f"({str(err).splitlines()[0]}). Convert it with a trusted tool to .safetensors, then retry."
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({reason}); delete it and use "
                              "an earlier one, or re-create it.") from None


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat tensor dict from .safetensors, or from a .pt/.pth (unwrapping 'ema'/'model'/'state_dict')."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass a .safetensors or .pt/.pth path.")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: unreadable .safetensors file ({err}).") from None
    return tensors_from(torch_load_safe(path), path)


def tensors_from(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a loaded pickle (unwrapping 'ema'/'model'/'state_dict'); `path` names it."""
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors (or one under 'model'/'ema'/'state_dict').")
    return obj


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a .safetensors header."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> Path:
    """Atomically write a tensor dict as .safetensors (contiguous, de-aliased copies)."""
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def json_metadata(record: dict) -> dict[str, str]:
    """A JSON record as safetensors metadata (values must be strings)."""
    return {"record": json.dumps(record)}


# ------------------------------------------------------------------------------- run-folder checkpoints

def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:07d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in the run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder -> its latest checkpoint; one clear error otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            runs = sorted(p.name for p in path.iterdir() if latest_checkpoint(p) is not None)
            hint = (f"it holds run folders ({', '.join(runs[:5])}): pass one of them" if runs
                    else "train longer or pass a checkpoint file")
            raise CheckpointError(f"{path}: no checkpoints in {checkpoint_dir(path)}; {hint}.")
        return latest
    raise CheckpointError(f"{path}: no such checkpoint file or run folder.")


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep_last: int, keep_every: int) -> Path:
    """Write a training checkpoint for `step` atomically, then prune: keep the newest `keep_last` (0 = all)
    and every `keep_every`-th step (0 disables that rule)."""
    missing = set(TRAINING_KEYS) - {"step"} - set(state)
    if missing:
        raise ValueError(f"training checkpoint state lacks {sorted(missing)}")
    path = atomic_write(checkpoint_path(run_dir, step), lambda tmp: torch.save({**state, "step": step}, tmp))
    if keep_last > 0:
        found = list_checkpoints(run_dir)
        recent = {s for s, _ in found[-keep_last:]}
        for s, p in found:
            if s not in recent and not (keep_every > 0 and s % keep_every == 0):
                p.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint (file or run folder -> latest), loaded safely onto the CPU."""
    path = resolve_checkpoint(path)
    state = torch_load_safe(path)
    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        raise CheckpointError(f"{path}: not a sit_atconv training checkpoint (no config/step); load reference "
                              "weights with sit_atconv.convert.load_reference_checkpoint, or convert them first.")
    if state.get("export"):
        state = ExportState(state)
    state["path"] = path
    return state


class ExportState(dict):
    """A loaded sampling-only checkpoint: asking it for what it lacks ('model', 'optimizer') is one clear error."""

    def __missing__(self, key: str):
        raise CheckpointError(f"{self.get('path')}: a sampling-only export (weights under 'ema' only) has no "
                              f"'{key}'; drop --raw, and resume training from the run's own checkpoints")


def save_export(path: str | Path, state: dict) -> Path:
    """Atomically write a sampling-only checkpoint (weights under 'ema' without training-only parts such as
    REPA's projector, step, config, anything else to record) that `load_checkpoint` and
    `sit_atconv.build.load_run` read like a training checkpoint."""
    missing = set(EXPORT_KEYS) - set(state)
    if missing:
        raise ValueError(f"export state lacks {sorted(missing)}")
    state = {**state, "ema": {k: v for k, v in state["ema"].items() if not k.startswith(TRAINING_ONLY)}}
    return atomic_write(path, lambda tmp: torch.save({**state, "export": True}, tmp))

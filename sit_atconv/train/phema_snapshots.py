"""Post-hoc EMA snapshots on disk, and the reconstruction of any width from them.

Training writes `RUN/phema/step_XXXXXXX-sigma_S.safetensors`: one file per tracked width per snapshot step
(every `train.phema_every` steps and at the last step), each the profile's state dict plus a header record
(step, σ_rel, γ, the run's config). Checkpoint retention never touches them. `reconstruct` solves EDM2's
least-squares problem (`sit_atconv.posthoc_ema`) over the snapshots up to a step and sums them with those
weights, one file at a time; `python -m sit_atconv.phema` writes the result as a sampling checkpoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from ..checkpoint import json_metadata, load_tensors, safetensors_metadata, save_tensors
from ..errors import CheckpointError, ConfigError, RunError
from ..posthoc_ema import MAX_SIGMA_REL, WeightedSum, posthoc_coefficients, profile_fit_error, sigma_rel_to_gamma
from .ema import PowerFunctionEMA

SNAPSHOT_DIR = "phema"
MAX_FIT_ERROR = 0.05  # relative L2 distance between the reconstructed and the asked profile
_NAME = re.compile(r"^step_(\d{7,})-sigma_(\d[\d.e+-]*)\.safetensors$")


@dataclass(frozen=True)
class Snapshot:
    """One stored profile: the EMA of width `sigma_rel` (exponent `gamma`) at optimizer step `step`."""

    step: int
    sigma_rel: float
    gamma: float
    path: Path


def snapshot_path(run_dir: str | Path, step: int, sigma_rel: float) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"step_{step:07d}-sigma_{sigma_rel!r}.safetensors"


def save_snapshots(run_dir: str | Path, step: int, phema: PowerFunctionEMA, config_record: dict) -> list[Path]:
    """Write every tracked profile at `step` (atomic, durable; an existing file of that step is replaced by
    the same bytes, as a resumed run recomputes it identically)."""
    paths = []
    for sigma_rel, gamma, profile in zip(phema.sigma_rels, phema.gammas, phema.profiles):
        record = {"step": step, "sigma_rel": sigma_rel, "gamma": gamma, "config": config_record}
        tensors = {k: v.detach().cpu() for k, v in profile.state_dict().items()}
        paths.append(save_tensors(tensors, snapshot_path(run_dir, step, sigma_rel), json_metadata(record)))
    return paths


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """Every snapshot of the run, by step then width (temp files of interrupted writes are ignored)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = [(int(m.group(1)), float(m.group(2)), p) for p in folder.iterdir()
             if (m := _NAME.match(p.name))] if folder.is_dir() else []
    return [Snapshot(step, sigma, sigma_rel_to_gamma(sigma), path) for step, sigma, path in sorted(found)
            if 0.0 < sigma <= MAX_SIGMA_REL]


def snapshot_record(path: Path) -> dict:
    """The header record of a snapshot file (step, sigma_rel, gamma, config)."""
    try:
        return json.loads(safetensors_metadata(path)["record"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable post-hoc EMA snapshot ({err}); delete it and retry") from None


@dataclass
class Reconstruction:
    """The EMA of one width at one step, summed from `used` snapshots with weights `coefficients`."""

    weights: dict[str, torch.Tensor]
    step: int
    sigma_rel: float
    config: dict
    used: list[Snapshot]
    coefficients: np.ndarray
    fit_error: float


def reconstruct(run_dir: str | Path, sigma_rel: float, step: int | None = None,
                max_fit_error: float = MAX_FIT_ERROR) -> Reconstruction:
    """The power-function EMA of width `sigma_rel` at snapshot step `step` (default: the last), from every
    snapshot up to that step; refused when those snapshots fit the asked profile worse than `max_fit_error`."""
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ConfigError(f"--sigma-rel {sigma_rel}: must be in (0, {MAX_SIGMA_REL:.4f}] (EDM2 uses 0.05-0.15)")
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise RunError(f"{run_dir}: no post-hoc EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR}; train with "
                       "--train.phema_sigma_rels 0.05,0.1 (snapshots every --train.phema_every steps)")
    steps = sorted({s.step for s in snapshots})
    step = steps[-1] if step is None else step
    if step not in steps:
        shown = ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
        raise ConfigError(f"--step {step}: no snapshot at that step in {run_dir}; snapshot steps: {shown}")
    used = [s for s in snapshots if s.step <= step]
    ts, gammas, target = [s.step for s in used], [s.gamma for s in used], sigma_rel_to_gamma(sigma_rel)
    x = posthoc_coefficients(ts, gammas, step, target)
    error = profile_fit_error(ts, gammas, x, step, target)
    if error > max_fit_error:
        widths = ", ".join(sorted({f"{s.sigma_rel:g}" for s in used}, key=float))
        raise RunError(f"too few snapshots: the {len(used)} up to step {step} (widths {widths}) fit σ_rel "
                       f"{sigma_rel:g} with a {error:.1%} profile error (limit {max_fit_error * 100:g}%); pick a width "
                       "nearer those, a later step, or snapshot more often (--train.phema_every)")
    total = WeightedSum()
    for snapshot, weight in zip(used, x):
        total.add(load_tensors(snapshot.path), float(weight))
    config = snapshot_record(used[-1].path)["config"]
    return Reconstruction(total.result(), step, sigma_rel, config, used, x, error)

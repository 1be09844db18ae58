"""Run folders and trained runs: where a run lives, which checkpoint it continues (refusing anything that
would overwrite other work or mix networks), and checkpoint -> the trained network ready to use."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint
from ..config import RunConfig
from ..config_io import config_from_dict
from ..data import Autoencoder
from ..errors import CheckpointError, RunError
from ..reference_models import build_reference, read_reference, reference_run_config
from ..sampling import ImageSampler
from .classification import build_classifier
from .diffusion import build_autoencoder, build_model, image_sampler
from .repa import projector_args


def network_section(cfg: RunConfig) -> str:
    """The config section that describes the trained network: 'model' (SiT) or 'classifier' (AttNet)."""
    return "classifier" if cfg.train.task == "classification" else "model"


def build_network(cfg: RunConfig) -> nn.Module:
    return build_classifier(cfg) if cfg.train.task == "classification" else build_model(cfg)


def run_dir_for(cfg: RunConfig) -> Path:
    """RESULTS/<log.run_name>, or RESULTS/<network>[-<mixer>]-<data source> when no name is given."""
    if cfg.log.run_name:
        return Path(cfg.log.results_dir) / cfg.log.run_name
    if cfg.train.task == "classification":
        return Path(cfg.log.results_dir) / f"{cfg.classifier.tag()}-{cfg.data.source}"
    return Path(cfg.log.results_dir) / f"{cfg.model.tag()}-{cfg.model.mixer}-{cfg.data.source}"


def _newest_loadable(run_dir: Path, log: Callable[[str], None]) -> dict | None:
    """The newest checkpoint of `run_dir` that loads, saying which ones were skipped; stray temp files of
    interrupted writes are removed."""
    for stray in checkpoint_dir(run_dir).glob(".step_*.tmp"):
        stray.unlink(missing_ok=True)
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            log(f"skipping {path.name}: {err}")
    return None


def resume_state(cfg: RunConfig, run_dir: Path, log: Callable[[str], None] = print) -> dict | None:
    """The checkpoint to continue (`train.resume`), loaded and checked; None for a new run.

    `auto` takes the newest checkpoint that loads (a truncated or corrupt newer one is skipped, and
    said so). Refuses what would overwrite work or mix runs: `none` on a folder with checkpoints, or a
    checkpoint of a different network.
    """
    resume = cfg.train.resume
    if resume == "none":
        if list_checkpoints(run_dir):
            raise RunError(f"{run_dir} already holds checkpoints; continue it with --resume auto, "
                           "or start a new run with --run-name NEW_NAME")
        return None
    if resume == "auto":
        state = _newest_loadable(run_dir, log)
        if state is None:
            if list_checkpoints(run_dir):
                raise RunError(f"{run_dir}: no checkpoint loads (see above); move them away to start anew")
            return None
    elif not Path(resume).is_file():
        raise RunError(f"--resume {resume}: no such checkpoint file; pass a .pt from a run's checkpoints/ folder")
    else:
        state = load_checkpoint(resume)
    _check_same_network(cfg, state)
    return state


def _check_same_network(cfg: RunConfig, state: dict) -> None:
    path, saved, section = state["path"], config_from_dict(state["config"]), network_section(cfg)
    if saved.train.task != cfg.train.task:
        raise RunError(f"{path} is a {saved.train.task} run, not {cfg.train.task}; use --run-name NEW_NAME")
    ours, theirs = dataclasses.asdict(getattr(cfg, section)), dataclasses.asdict(getattr(saved, section))
    if ours != theirs:
        diff = sorted(k for k in ours if theirs.get(k) != ours[k])
        raise RunError(f"{path} was trained with a different {section} ({', '.join(f'{section}.' + k for k in diff)}); "
                       "use --run-name NEW_NAME for a new run or restore those settings")
    space = ("autoencoder", "latent_scale", "latent_norm", "latent_mean", "latent_std")  # what the model's inputs are
    changed = [k for k in space if section == "model" and getattr(cfg.data, k) != getattr(saved.data, k)]
    if changed:
        key = changed[0]
        raise RunError(f"{path} was trained on other model inputs (data.{key}: {getattr(saved.data, key)} then, "
                       f"{getattr(cfg.data, key)} now); use the run's data settings or --run-name NEW_NAME")
    if section == "model" and projector_args(cfg) != projector_args(saved):
        raise RunError(f"{path} was trained with a different REPA projector ({projector_args(saved) or 'none'}); "
                       "keep repa.coeff > 0 or 0 as it was, and repa.depth / projector_dim / encoder as they were, "
                       "or use --run-name NEW_NAME")


@dataclass
class LoadedRun:
    """A trained network with what using it needs: its config, step, file (and autoencoder, for diffusion)."""

    model: nn.Module
    cfg: RunConfig
    step: int
    path: Path
    autoencoder: Autoencoder | None

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent

    def sampler(self) -> ImageSampler:
        if self.autoencoder is None:
            raise RunError(f"{self.path} is a {self.cfg.train.task} run: it has no images to sample")
        return image_sampler(self.cfg, self.model, self.autoencoder)


def load_run(ckpt: str | Path, device: torch.device | str = "cpu", use_ema: bool = True) -> LoadedRun:
    """A checkpoint file or run folder (its latest) -> the network in eval mode (EMA weights by default).

    A file of the reference code's SiT or REPA fork (no config) loads as the model it is, in our time
    convention, with the run config sampling it needs (`reference_run_config`)."""
    try:
        state = load_checkpoint(ckpt)
    except CheckpointError:
        if not Path(ckpt).is_file():
            raise
        return _reference_run(Path(ckpt), device, use_ema)
    cfg = config_from_dict(state["config"])
    weights = state["ema" if use_ema else "model"]
    if cfg.train.task == "diffusion":  # REPA's projector only where the file has it (exports drop it)
        model = build_model(cfg, projector=any(k.startswith("projectors.") for k in weights))
    else:
        model = build_network(cfg)
    model.load_state_dict(weights)
    model = model.to(device).eval().requires_grad_(False)
    autoencoder = build_autoencoder(cfg, device) if cfg.train.task == "diffusion" else None
    return LoadedRun(model, cfg, int(state["step"]), Path(state["path"]), autoencoder)


def _reference_run(path: Path, device: torch.device | str, use_ema: bool) -> LoadedRun:
    """A reference SiT checkpoint (either fork) as a run: built by `build_reference`, one line says what."""
    ref = read_reference(path, use_ema)
    if not ref.is_sit:
        raise CheckpointError(f"{path}: neither a sit_atconv training checkpoint (no config) nor a reference SiT "
                              "checkpoint; pass a run folder, one of its checkpoints, or a SiT/REPA-fork file")
    built = build_reference(ref)
    print(built.summary)
    cfg = reference_run_config(built)
    model = built.model.to(device).eval().requires_grad_(False)
    return LoadedRun(model, cfg, built.step, path, build_autoencoder(cfg, device))

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
from ..sampling import ImageSampler
from .classification import build_classifier
from .diffusion import build_autoencoder, build_model, image_sampler


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
    """A checkpoint file or run folder (its latest) -> the network in eval mode (EMA weights by default)."""
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(state["config"])
    model = build_network(cfg)
    model.load_state_dict(state["ema" if use_ema else "model"])
    model = model.to(device).eval().requires_grad_(False)
    autoencoder = build_autoencoder(cfg, device) if cfg.train.task == "diffusion" else None
    return LoadedRun(model, cfg, int(state["step"]), Path(state["path"]), autoencoder)

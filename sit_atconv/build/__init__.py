"""Config -> objects, and run folder -> checkpoint: the one layer the trainer, sampler and evaluators stand on.

- `diffusion`: SiT, transport, autoencoder, dataset, task and image sampler of a diffusion run;
- `classification`: AttNet, its data and the classification task;
- `runs`: where a run lives, which checkpoint it continues, `load_run` (checkpoint -> network);
- `build_training`: everything a training run needs, for either task.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import RunConfig
from ..tasks import Task
from .classification import build_classification_task, build_classifier, classification_data, eval_transform
from .diffusion import (
    build_autoencoder,
    build_dataset,
    build_diffusion_task,
    build_model,
    build_transport,
    image_sampler,
    latent_shape,
    resolve_data,
)
from .repa import resolve_repa
from .runs import LoadedRun, build_network, load_run, network_section, resume_state, run_dir_for


def build_training(cfg: RunConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, Dataset, Task]:
    """(network on `device`, training set, task) for `cfg`, built in a fixed order (reproducible init)."""
    if cfg.train.task == "classification":
        model = build_classifier(cfg).to(device)
        train_set, held_out = classification_data(cfg, model)
        return model, train_set, build_classification_task(cfg, held_out, device)
    autoencoder = build_autoencoder(cfg, device)
    dataset = build_dataset(cfg, autoencoder)
    model = build_model(cfg).to(device)
    return model, dataset, build_diffusion_task(cfg, autoencoder, device)


__all__ = ["LoadedRun", "build_autoencoder", "build_classification_task", "build_classifier", "build_dataset",
           "build_diffusion_task", "build_model", "build_network", "build_training", "build_transport",
           "classification_data", "eval_transform", "image_sampler", "latent_shape", "load_run", "network_section",
           "resolve_data", "resolve_repa", "resume_state", "run_dir_for"]

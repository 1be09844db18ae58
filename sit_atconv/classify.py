"""Top-1 / top-5 accuracy of an AttNet: a classification run of ours or published (reference-format) weights.

    python -m sit_atconv.classify --checkpoint results/attnet-1x1-32x64-digits --data digits
    python -m sit_atconv.classify --model attnet_t2 --checkpoint attnet_t2.pth --data /data/imagenet
    accelerate launch -m sit_atconv.classify --model attnet_t2 --checkpoint W --data DIR   # several processes

--data takes a folder of class subfolders (or a folder with val/), read with the model's own preprocessing
(its default config: input size, bicubic resize by crop_pct, mean/std), or `digits` (the held-out split).
Each process scores every world-th image, so every image is counted once. Writes metrics.json (top1, top5
as fractions, num_images, model, checkpoint, data) to --out-dir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import timm
import torch
from accelerate import PartialState
from accelerate.utils import reduce
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .build import eval_transform, load_run
from .build.classification import image_folder
from .checkpoint import load_tensors, tensors_from, torch_load_safe
from .cli import CLIParser, positive_int, run_cli
from .config import ATTNET_NAMES
from .convert import from_reference
from .data import DigitsDataset
from .errors import CheckpointError, ConfigError
from .io import write_text_atomic
from .launch import process_state
from .tasks.classification import count_correct


def fitting_variant(state: dict[str, torch.Tensor], num_classes: int) -> str | None:
    """The AttNet variant whose parameter shapes match `state` (built on the meta device), or None."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    for name in ATTNET_NAMES:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=num_classes)
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            return name
    return None


def _published(model_name: str | None, weights: dict[str, torch.Tensor], path: Path) -> tuple[nn.Module, str]:
    """A zoo AttNet with reference-format `weights` (read from `path`); refuses weights of another variant."""
    if model_name is None:
        raise ConfigError(f"{path} holds plain weights: name the variant with --model ({', '.join(ATTNET_NAMES)})")
    if model_name not in ATTNET_NAMES:
        raise ConfigError(f"--model {model_name!r}: not an AttNet variant ({', '.join(ATTNET_NAMES)})")
    state = from_reference(weights)
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    model = timm.create_model(model_name, num_classes=num_classes)
    if {k: v.shape for k, v in model.state_dict().items()} != {k: v.shape for k, v in state.items()}:
        fits = fitting_variant(state, num_classes)
        raise CheckpointError(f"{path}: these weights do not fit {model_name}" + (
            f"; they fit {fits}: pass --model {fits}" if fits else "; they fit no AttNet variant"))
    model.load_state_dict(state)
    return model, model_name


def load_classifier(checkpoint: str | Path, model_name: str | None,
                    device: torch.device | str) -> tuple[nn.Module, str]:
    """(model in eval mode with EMA weights for runs, its name) from a classification run or published weights."""
    path = Path(checkpoint)
    if not path.is_dir():
        loaded = load_tensors(path) if path.suffix == ".safetensors" else torch_load_safe(path)
        if not (isinstance(loaded, dict) and "config" in loaded):  # not one of our training checkpoints
            model, name = _published(model_name, tensors_from(loaded, path), path)
            return model.to(device).eval(), name
    run = load_run(path, device)
    if run.cfg.train.task != "classification":
        raise ConfigError(f"{run.path} is a {run.cfg.train.task} run, not a classifier")
    name = run.cfg.classifier.tag()
    if model_name is not None and model_name != name:
        raise ConfigError(f"{run.path} is a {name} run, not {model_name}: drop --model or pass {name}")
    return run.model, name


def evaluation_set(data: str, model: nn.Module) -> Dataset:
    """`digits` (held-out split at the model's input size) or an image folder with the model's preprocessing."""
    if data == "digits":
        return DigitsDataset("held_out", model.pretrained_cfg["input_size"][-1], quantized=True)
    root = Path(data)
    if not root.is_dir():
        raise ConfigError(f"--data {data}: no such folder; pass a folder of class subfolders (or with val/), or digits")
    return image_folder(root / "val" if (root / "val").is_dir() else root, eval_transform(model))


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int, num_workers: int,
             state: PartialState) -> dict[str, float | int]:
    """Top-1/top-5 over `dataset`, each process taking every world-th image; the sums are all-reduced."""
    mine = Subset(dataset, range(state.process_index, len(dataset), state.num_processes))
    loader = DataLoader(mine, batch_size=batch_size, num_workers=num_workers)
    batches = tqdm(loader, desc="classify", unit="batch", disable=not state.is_main_process)
    counts = torch.tensor(count_correct(model, batches, state.device), device=state.device)
    if state.num_processes > 1:
        counts = reduce(counts, "sum")
    top1, top5, n = counts.tolist()
    return {"top1": top1 / n, "top5": top5 / n, "num_images": n}


def default_out_dir(checkpoint: str | Path, data: str, name: str) -> Path:
    """RUN/eval/classify_<model>_<data> for a run folder, else beside the weights file."""
    path = Path(checkpoint)
    return (path / "eval" if path.is_dir() else path.parent) / f"classify_{name}_{Path(data).name}"


def body(args) -> int:
    state = process_state()
    model, name = load_classifier(args.checkpoint, args.model, state.device)
    dataset = evaluation_set(args.data, model)
    results = accuracy(model, dataset, args.batch_size, args.num_workers, state)
    results.update(model=name, checkpoint=str(args.checkpoint), data=str(args.data))
    if state.is_main_process:
        out = args.out_dir or default_out_dir(args.checkpoint, args.data, name)
        write_text_atomic(Path(out) / "metrics.json", json.dumps(results, indent=2) + "\n")
        print(f"{'metric':<8} {'value':>8}  note\ntop1     {results['top1']:>8.4f}  {name} on {args.data} "
              f"({results['num_images']} images)\ntop5     {results['top5']:>8.4f}\nwrote {Path(out) / 'metrics.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = CLIParser(__doc__, prog="python -m sit_atconv.classify")
    p.add_argument("--checkpoint", required=True, help="a classification run folder or checkpoint, or published "
                                                       "weights (.pth/.pt/.safetensors, reference layout)")
    p.add_argument("--model", help=f"AttNet variant of published weights ({', '.join(ATTNET_NAMES)})")
    p.add_argument("--data", default="digits", help="image folder (class subfolders, or with val/) or digits")
    p.add_argument("--batch-size", type=positive_int, default=100, help="images per batch and process")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding workers per process")
    p.add_argument("--out-dir", type=Path, help="folder for metrics.json (default: beside the checkpoint)")
    return run_cli(p, body, argv)


if __name__ == "__main__":
    sys.exit(main())

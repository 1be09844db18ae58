"""Make the digits feature extractor (`digits-attnet`): train `configs/attnet_digits.yaml` on the shared
training loop and ship its EMA weights — the one way this project trains a classifier.

    python -m sit_atconv.evaluation.train_digits_classifier              # rewrites sit_atconv/assets/...
    python -m sit_atconv.evaluation.train_digits_classifier --out /tmp/digits_attnet.safetensors

Deterministic (seed, one CPU thread, in-process data): the same command writes the same bytes. Trains on the
digits train split only; the held-out split gives the accuracy stored in the file's metadata.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..build import load_run
from ..checkpoint import json_metadata, save_tensors
from ..cli import CLIParser, positive_int, run_cli
from ..config_io import load_config
from ..data.digits import DigitsDataset
from ..tasks.classification import count_correct
from ..train import train
from .digits_features import DIGITS_CONFIG, DIGITS_WEIGHTS, IMAGE_SIZE


def train_classifier(steps: int | None = None, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(EMA classifier in eval mode, record with train/held-out accuracy) of a fresh `attnet_digits` run."""
    with tempfile.TemporaryDirectory(prefix="digits_attnet_") as folder:
        overrides = [f"log.results_dir={folder}", "log.run_name=digits-attnet", f"train.seed={seed}",
                     "log.preview_every=0"] + ([f"train.max_steps={steps}"] if steps is not None else [])
        cfg = load_config(DIGITS_CONFIG, overrides)
        run = load_run(train(cfg))
    accuracy = {}
    for split in ("train", "held_out"):
        loader = DataLoader(DigitsDataset(split, IMAGE_SIZE, quantized=True), batch_size=500)
        top1, _, n = count_correct(run.model, loader, "cpu")
        accuracy[split] = top1 / n
    record = {"config": DIGITS_CONFIG, "seed": seed, "steps": cfg.train.max_steps,
              "train_accuracy": accuracy["train"], "held_out_accuracy": accuracy["held_out"]}
    return run.model, record


def main(argv=None) -> int:
    p = CLIParser(__doc__, prog="python -m sit_atconv.evaluation.train_digits_classifier")
    p.add_argument("--out", type=Path, default=DIGITS_WEIGHTS, help="weights file (.safetensors)")
    p.add_argument("--steps", type=positive_int, help="training steps (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")

    def body(args) -> int:
        torch.set_num_threads(1)  # bit-reproducible on CPU
        model, record = train_classifier(steps=args.steps, seed=args.seed)
        save_tensors(model.state_dict(), args.out, metadata=json_metadata(record))
        print(f"held-out accuracy {record['held_out_accuracy']:.4f} (train {record['train_accuracy']:.4f}); "
              f"wrote {args.out}")
        return 0

    return run_cli(p, body, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Train the digits feature extractor (`digits-attnet`) on the digits train split and ship its weights.

    python -m sit_atconv.evaluation.train_digits_classifier              # rewrites sit_atconv/assets/...
    python -m sit_atconv.evaluation.train_digits_classifier --out /tmp/digits_attnet.safetensors

Deterministic: seed 0, one CPU thread, the same images `eval_fid.py` scores (uint8-quantised 16x16 digits),
600 AdamW steps of batch 64 with +-1 px shifts (~1 min on one core). Prints the held-out accuracy (the
held-out split is used only for that number) and stores it in the file's metadata.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import json_metadata, save_tensors
from ..cli import CLIParser, positive_int, run_cli
from ..data.digits import DigitsDataset
from .digits_features import ARCH, DIGITS_WEIGHTS, build_classifier, digits_uint8, preprocess


def train_classifier(steps: int = 600, batch_size: int = 64, lr: float = 3e-3, seed: int = 0
                     ) -> tuple[torch.nn.Module, dict]:
    """(trained classifier in eval mode, training record with train/held-out accuracy)."""
    torch.manual_seed(seed)
    x_train, y_train = preprocess(digits_uint8("train")), DigitsDataset("train").labels
    x_held, y_held = preprocess(digits_uint8("held_out")), DigitsDataset("held_out").labels
    model = build_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y_train), (batch_size,), generator=gen)
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()  # small translations: robust features
        loss = F.cross_entropy(model(torch.roll(x_train[idx], shift, dims=(2, 3))), y_train[idx],
                               label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        acc = {name: float((model(x).argmax(1) == y).float().mean())
               for name, x, y in (("train", x_train, y_train), ("held_out", x_held, y_held))}
    record = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "arch": ARCH,
              "train_accuracy": acc["train"], "held_out_accuracy": acc["held_out"]}
    return model, record


def main(argv=None) -> int:
    p = CLIParser(__doc__, prog="python -m sit_atconv.evaluation.train_digits_classifier")
    p.add_argument("--out", type=Path, default=DIGITS_WEIGHTS, help="weights file (.safetensors)")
    p.add_argument("--steps", type=positive_int, default=600, help="AdamW steps (default: 600)")
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

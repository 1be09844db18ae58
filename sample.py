"""Sample images from a trained SiT checkpoint and write a PNG grid (optionally an .npz of uint8 images).

    python sample.py                                    # latest checkpoint of the default (digits) run
    python sample.py --ckpt results/RUN --mode sde --sampling-method Heun --num-steps 250 --cfg-scale 4
    python sample.py --ckpt RUN/checkpoints/step_0400000.pt --class-labels 207 360 387 --num-samples 12

Image i is seeded by (--seed, i): the same command gives the same images on any batch size.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from sit_atconv.config import ConfigError, load_config
from sit_atconv.io import atomic_write
from sit_atconv.sampling import (
    add_sampling_args,
    autoencoder_for,
    generate,
    load_run,
    options_from_args,
    save_grid,
)
from sit_atconv.train.trainer import run_dir_for


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--ckpt", help="checkpoint file or run folder (its latest checkpoint); default: the "
                                   "default config's run folder")
    p.add_argument("--num-samples", type=int, default=None, help="images to draw (default: 8 per label)")
    p.add_argument("--class-labels", type=int, nargs="+",
                   help="labels to draw, cycled over the samples (default: one row per class, up to 16)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses (seed, i)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler call")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row (default: per label)")
    p.add_argument("--out", type=Path, help="PNG path (default: RUN/samples/sample_step<step>_seed<seed>.png)")
    p.add_argument("--save-npz", action="store_true", help="also write the uint8 images and labels as .npz")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    add_sampling_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        ckpt = args.ckpt or run_dir_for(load_config())
        model, cfg, step, path = load_run(ckpt, args.device, use_ema=not args.raw)
        num_classes = cfg.model.num_classes
        if args.class_labels:
            bad = [c for c in args.class_labels if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"--class-labels {bad} out of range for a model with {num_classes} classes")
            labels_once = torch.tensor(args.class_labels)
            per_label = max(1, (args.num_samples or 8 * len(labels_once)) // len(labels_once))
            labels = labels_once.repeat_interleave(per_label)
        else:
            per_label = 8
            labels = torch.arange(min(num_classes, 16)).repeat_interleave(per_label)
        if args.num_samples:
            labels = labels.repeat(args.num_samples // len(labels) + 1)[: args.num_samples]
        out = args.out or Path(path).parent.parent / "samples" / f"sample_step{step:07d}_seed{args.seed}.png"
        npz = out.with_suffix(".npz")
        clash = [p for p in ([out, npz] if args.save_npz else [out]) if p.exists()]
        if clash and not args.force:
            raise FileExistsError(f"{clash[0]} exists; pass --out elsewhere or --force to overwrite")
        opts = options_from_args(args).resolved(cfg)
        print(f"{path} (step {step}) | {opts.mode} {opts.sampling_method} {opts.num_steps} steps | "
              f"cfg {opts.cfg_scale} | {len(labels)} images")
        images = generate(model, cfg, opts, labels, range(len(labels)), args.seed,
                          autoencoder_for(cfg, args.device), args.device, args.batch_size)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_grid(images, out, nrow=args.nrow or per_label)
    print(f"wrote {out}")
    if args.save_npz:
        atomic_write(npz, lambda tmp: np.savez(open(tmp, "wb"), arr_0=images.numpy(), labels=labels.numpy()))
        print(f"wrote {npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

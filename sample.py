"""Sample images from a trained SiT checkpoint and write a PNG grid (optionally an .npz of uint8 images).

    python sample.py                                    # latest checkpoint of the default (digits) run
    python sample.py --ckpt results/RUN --mode sde --sampling-method Heun --num-steps 250 --cfg-scale 4
    python sample.py --ckpt RUN/checkpoints/step_0400000.pt --class-labels 207 360 387 --num-samples 12
    python sample.py --ckpt results/digits --image-size 32   # another resolution: a 16x16 token grid, not 8x8

Image i is seeded by (--seed, i): the same command gives the same images on any batch size. The grid
upscales small images to cells of at least 64 px (nearest neighbour) and captions each row with its class.
"""

import sys
from pathlib import Path

import torch

from sit_atconv.build import load_run, run_dir_for
from sit_atconv.cli import CLIParser, positive_int, run_cli
from sit_atconv.config_io import load_config
from sit_atconv.errors import ConfigError
from sit_atconv.io import write_npz_atomic
from sit_atconv.sampling import add_sampling_options, class_grid_labels, options_from_args, row_labels, save_grid

PER_LABEL = 8


def parser() -> CLIParser:
    p = CLIParser(__doc__)
    p.add_argument("--ckpt", help="checkpoint file or run folder (its latest checkpoint); default: the "
                                   "default config's run folder")
    p.add_argument("--num-samples", type=positive_int, help=f"images to draw (default: {PER_LABEL} per label)")
    p.add_argument("--class-labels", type=int, nargs="+",
                   help="labels to draw, cycled over the samples (default: one row per class, up to 16)")
    p.add_argument("--seed", type=int, default=0, help="base seed; image i uses (seed, i)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per sampler call")
    p.add_argument("--nrow", type=positive_int, help="images per grid row (default: per label)")
    p.add_argument("--image-size", type=positive_int, metavar="S", help="pixel side to sample at (default: the "
                   "trained one); the model runs on another token grid: a multiple of patch x VAE factor")
    p.add_argument("--out", type=Path, help="PNG path (default: RUN/samples/sample_step<step>_seed<seed>[_<S>px].png)")
    p.add_argument("--save-npz", action="store_true", help="also write the uint8 images and labels as .npz")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    add_sampling_options(p)
    return p


def labels_for(args, num_classes: int) -> tuple[torch.Tensor, int]:
    """(labels to draw, images per label) from --class-labels / --num-samples."""
    if args.class_labels:
        bad = [c for c in args.class_labels if not 0 <= c < num_classes]
        if bad:
            raise ConfigError(f"--class-labels {bad} out of range for a model with {num_classes} classes")
        once = torch.tensor(args.class_labels)
        per_label = max(1, (args.num_samples or PER_LABEL * len(once)) // len(once))
        labels = once.repeat_interleave(per_label)
    else:
        per_label, labels = PER_LABEL, class_grid_labels(num_classes, PER_LABEL)
    if args.num_samples:
        labels = labels.repeat(args.num_samples // len(labels) + 1)[: args.num_samples]
    return labels, per_label


def body(args) -> int:
    run = load_run(args.ckpt or run_dir_for(load_config()), args.device, use_ema=not args.raw)
    labels, per_label = labels_for(args, run.cfg.model.num_classes)
    size = f"_{args.image_size}px" if args.image_size else ""
    out = args.out or run.run_dir / "samples" / f"sample_step{run.step:07d}_seed{args.seed}{size}.png"
    npz = out.with_suffix(".npz")
    clash = [p for p in ([out, npz] if args.save_npz else [out]) if p.exists()]
    if clash and not args.force:
        raise ConfigError(f"{clash[0]} exists; pass --out elsewhere or --force to overwrite")
    opts = options_from_args(args).resolved(run.cfg.transport)
    sampler = run.sampler().at_image_size(args.image_size) if args.image_size else run.sampler()
    print(f"{run.path} (step {run.step}) | {opts.mode} {opts.sampling_method} {opts.num_steps} steps | "
          f"cfg {opts.cfg_scale} | {len(labels)} images | {sampler.grid_note()}")
    images = sampler.images(opts, labels, range(len(labels)), args.seed, args.device, args.batch_size)
    nrow = args.nrow or per_label
    save_grid(images, out, nrow, captions=row_labels(labels, nrow) if run.cfg.model.num_classes > 1 else None)
    print(f"wrote {out}")
    if args.save_npz:
        write_npz_atomic(npz, arr_0=images.numpy(), labels=labels.numpy())
        print(f"wrote {npz}")
    return 0


def main(argv=None) -> int:
    return run_cli(parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())

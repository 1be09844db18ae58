"""Sample a SiT checkpoint and score the samples: FID, sFID, IS, KID, precision/recall -> metrics.json.

    python eval_fid.py                                  # latest checkpoint of the default digits run, offline
    python eval_fid.py --ckpt results/digits --num-samples 2000 --mode sde --num-steps 100
    python eval_fid.py --samples RUN/eval/.../samples.npz               # metrics only (.npz or image folder)
    accelerate launch eval_fid.py --ckpt RUN --num-samples 50000 \\
        --ref VIRTUAL_imagenet256_labeled.npz --inception-weights PATH    # FID-50K, ADM protocol

Image i has label i % num_classes and seed (--seed, i): the set is the same on any number of processes.
Samples are written in shards under --out-dir (default RUN/eval/step<S>_<sampler>_n<N>_seed<seed>); a
killed run rerun with the same command resumes; other settings for the same folder are refused. Output:
samples.npz (ADM format: arr_0 uint8 N x H x W x 3, labels), metrics.json (with `nfe`, network evaluations
per image), samples_grid.png (one row per class) and a printed table.
With --ref: torch-fidelity's TF-compatible Inception (weights: --inception-weights PATH, or its download
cache). Without: the digits classifier `digits-attnet` against the held-out digits, plus the real data's own
`fid_floor`, `precision_floor` and `recall_floor` (training digits vs held-out digits). Every number is
labelled with the extractor that produced it. FID against NFE over samplers: python -m sit_atconv.evaluation.sweep
"""

import sys
from pathlib import Path

from sit_atconv.cli import CLIParser, positive_int, run_cli
from sit_atconv.evaluation.run import EXTRACTORS, evaluate, format_table
from sit_atconv.metrics import METRICS
from sit_atconv.sampling import add_sampling_options, options_from_args


def parser() -> CLIParser:
    p = CLIParser(__doc__)
    add = p.add_argument
    add("--ckpt", metavar="PATH", help="checkpoint file or run folder (its latest checkpoint); "
                                       "default: the default config's run folder")
    add("--samples", type=Path, metavar="PATH", help="score this .npz (arr_0) or image folder, no sampling")
    add("--ref", type=Path, metavar="PATH", help="reference: ADM batch .npz, image folder or cached "
                                                 "statistics (default: held-out digits, digits-attnet)")
    add("--inception-weights", type=Path, metavar="PATH", help="local torch-fidelity Inception weights")
    add("--extractor", choices=EXTRACTORS, default="auto", help="auto: inception with --ref, else digits")
    add("--metrics", nargs="+", choices=METRICS, metavar="NAME",
        help=f"only these of {', '.join(METRICS)} (default: all the extractor supports)")
    add("--num-samples", type=positive_int, help="images to generate (default: 1000 for digits, else 50000)")
    add("--seed", type=int, default=0, help="base seed; image i uses (seed, i)")
    add("--batch-size", type=positive_int, default=64, help="images per sampler/feature batch, per process")
    add("--out-dir", type=Path, metavar="DIR", help="folder for shards, samples.npz and metrics.json")
    add("--png", action="store_true", help="also write one PNG per sample (out-dir/png)")
    add("--image-size", type=positive_int, metavar="S", help="sample at this pixel side (another token grid; "
        "digits: scored after a bilinear antialiased resize to 16 px); folder suffix _<S>px")
    add("--raw", action="store_true", help="use the raw (non-EMA) weights")
    add_sampling_options(p)
    return p


def body(args) -> int:
    results = evaluate(ckpt=args.ckpt, samples=args.samples, ref=args.ref, extractor=args.extractor,
                       inception_weights=args.inception_weights, num_samples=args.num_samples,
                       seed=args.seed, batch_size=args.batch_size, out_dir=args.out_dir,
                       opts=options_from_args(args), use_ema=not args.raw, png=args.png, metrics=args.metrics,
                       image_size=args.image_size)
    if results is not None:  # the main process
        print(format_table(results))
        print(f"wrote {Path(results['out_dir']) / 'metrics.json'}")
    return 0


def main(argv=None) -> int:
    return run_cli(parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())

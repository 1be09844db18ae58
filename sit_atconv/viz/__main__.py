"""Pictures of a trained SiT's token mixers.

    python -m sit_atconv.viz kernels --ckpt results/RUN                      # -> RUN/viz/kernels_step<S>.png
    python -m sit_atconv.viz kernels --ckpt RUN --samples 2 --times 0.2 0.8 --blocks 1 3 --out kernels.png

kernels: a few inputs noised to several times t (t = 0 noise, t = 1 data; digits runs: held-out digits, other
runs: the model's own unguided samples), run through the model once per t. For every ATConv block, the k x k
kernel it generates for each sample (averaged over the channels; one colour scale per block), and a bar plot of
its learned lateral-inhibition strength sigmoid(difference_control) (mean over channels, whiskers min-max). For
every attention block (attention and hybrid runs), the head-averaged attention map of a few query tokens on the
token grid, for comparison.
"""

import sys
from pathlib import Path

import torch

from ..build import load_run
from ..cli import CLIParser, finite_float, positive_int, run_cli
from .kernels import check_output, default_output, kernel_picture, write_kernel_picture


def parser() -> CLIParser:
    p = CLIParser(__doc__, prog="python -m sit_atconv.viz")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    k = commands.add_parser("kernels", help="ATConv kernels, inhibition strengths and attention maps of a run")
    k.add_argument("--ckpt", required=True, help="checkpoint file or run folder (its latest checkpoint)")
    k.add_argument("--samples", type=positive_int, default=4, help="inputs to draw (labels 0, 1, ...; default 4)")
    k.add_argument("--times", type=finite_float, nargs="+", default=[0.1, 0.5, 0.9], metavar="T",
                   help="times to noise the inputs to, in [0, 1] (default: 0.1 0.5 0.9)")
    k.add_argument("--blocks", type=int, nargs="+", metavar="I", help="0-based block indices (default: all)")
    k.add_argument("--queries", type=positive_int, default=2,
                   help="query tokens per attention block, along the grid's diagonal (default 2)")
    k.add_argument("--seed", type=int, default=0, help="seed of the noise (and of generated inputs)")
    k.add_argument("--out", type=Path, help="PNG path (default: RUN/viz/kernels_step<step>.png)")
    k.add_argument("--force", action="store_true", help="overwrite an existing PNG")
    k.add_argument("--raw", action="store_true", help="use the raw (non-EMA) weights")
    k.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def body(args) -> int:
    run = load_run(args.ckpt, args.device, use_ema=not args.raw)
    out = args.out or default_output(run)
    check_output(out, args.force)  # before any model call
    picture = kernel_picture(run, args.samples, args.times, args.blocks, args.queries, args.seed, args.device)
    write_kernel_picture(picture, out, force=args.force)
    print(f"wrote {out} ({picture.panel_count()} panels)")
    return 0


def main(argv=None) -> int:
    return run_cli(parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())

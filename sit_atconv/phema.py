"""Post-hoc EMA (EDM2): rebuild the power-function EMA of any relative width from a run's snapshots.

    python -m sit_atconv.phema results/RUN --sigma-rel 0.07       # -> RUN/exports/phema-sigma_0.07-step_XXXXXXX.pt
    python -m sit_atconv.phema results/RUN --sigma-rel 0.12 --step 200000 --out FILE.pt
    python sample.py --ckpt FILE.pt          # and eval_fid.py --ckpt FILE.pt: read like the run's own checkpoints

The run must have tracked profiles (--train.phema_sigma_rels 0.05,0.10, snapshots in RUN/phema/). The snapshots
up to the step are summed with EDM2's least-squares weights; a width they cannot represent is refused.
"""

import sys
from pathlib import Path

from .checkpoint import save_export
from .cli import CLIParser, finite_float, positive_int, run_cli
from .errors import ConfigError, RunError
from .train.phema_snapshots import MAX_FIT_ERROR, list_snapshots, reconstruct


def parser() -> CLIParser:
    p = CLIParser(__doc__, prog="python -m sit_atconv.phema")
    p.add_argument("run", type=Path, help="run folder that tracked post-hoc EMA profiles (RUN/phema/)")
    p.add_argument("--sigma-rel", type=finite_float, required=True,
                   help="relative EMA width to rebuild, e.g. 0.07 (EDM2's range: about 0.05-0.15)")
    p.add_argument("--step", type=positive_int, help="snapshot step to rebuild the EMA at (default: the last)")
    p.add_argument("--out", type=Path, help="output .pt (default: RUN/exports/phema-sigma_S-step_XXXXXXX.pt)")
    p.add_argument("--max-fit-error", type=finite_float, default=MAX_FIT_ERROR,
                   help=f"refuse when the snapshots fit the asked profile worse than this (default {MAX_FIT_ERROR})")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    return p


def _out_path(args) -> Path:
    """--out, or RUN/exports/phema-sigma_S-step_XXXXXXX.pt; refuses clashes and the checkpoints folder."""
    if args.out is None:
        step = args.step or max((s.step for s in list_snapshots(args.run)), default=0)
        return args.run / "exports" / f"phema-sigma_{args.sigma_rel!r}-step_{step:07d}.pt"
    if args.out.suffix != ".pt":
        raise ConfigError(f"--out {args.out}: the export is a checkpoint; name it *.pt")
    if args.out.resolve().parent.name == "checkpoints":
        raise ConfigError(f"--out {args.out}: keep exports out of a checkpoints/ folder (training resumes from "
                          "there); write it elsewhere, e.g. RUN/exports/")
    return args.out


def body(args) -> int:
    if not args.run.is_dir():
        raise RunError(f"{args.run}: no such run folder; pass the folder of a run trained with "
                       "--train.phema_sigma_rels")
    if not args.max_fit_error > 0:
        raise ConfigError(f"--max-fit-error must be > 0, got {args.max_fit_error}")
    out = _out_path(args)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists; pass --out elsewhere or --force to overwrite")
    rec = reconstruct(args.run, args.sigma_rel, args.step, args.max_fit_error)
    record = {"sigma_rel": rec.sigma_rel, "fit_error": rec.fit_error, "snapshots": [s.path.name for s in rec.used],
              "coefficients": [float(c) for c in rec.coefficients]}
    save_export(out, {"ema": rec.weights, "step": rec.step, "config": rec.config, "phema": record})
    widths = ", ".join(sorted({f"{s.sigma_rel:g}" for s in rec.used}, key=float))
    print(f"σ_rel {rec.sigma_rel:g} at step {rec.step} from {len(rec.used)} snapshots (steps {rec.used[0].step}-"
          f"{rec.step}, widths {widths}; profile fit error {rec.fit_error:.2%}) -> {out}")
    return 0


def main(argv=None) -> int:
    return run_cli(parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())

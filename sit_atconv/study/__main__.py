"""Compare token mixers on one config: mixers x seeds, equal steps or equal wall-clock, FID along the way.

    python -m sit_atconv.study                         # digits: attn atconv hybrid x 3 seeds, equal steps
    python -m sit_atconv.study --mixers attn atconv --seeds 5 --budget seconds 600 --out results/study-600s
    python -m sit_atconv.study --config imagenet256_sit_b2 --ref VIRTUAL_imagenet256_labeled.npz --num-samples 10000
    accelerate launch -m sit_atconv.study ...          # cells one after another, each on all processes

Budgets. `--budget steps`: every cell trains train.max_steps steps. `--budget seconds N`: every cell gets N
seconds of training, planned in steps so that it is deterministic and resumable: each mixer's speed is measured
once (20 warm-up + 200 timed steps in OUT/calibration/<mixer>), stored in OUT/study.json and reused by reruns,
and its cells train floor(N x steps/s) steps. The report gives both the planned and the measured train seconds.

Cells. OUT/<mixer>-seed<k>/ is an ordinary run folder (sample.py and eval_fid.py work on it). It is evaluated
every --eval-every steps (default: 4 points along the run) and at its last step, into <cell>/eval/study_step<S>/,
every cell with the same sampling seed. Sampling img/s: one timed batch (after a warm-up batch) with the cell's
own sampler at its final checkpoint. Interrupted? Rerun the same command: finished cells are skipped,
unfinished ones resume from their newest checkpoint. An OUT of another study is refused.

Resolution transfer. `--transfer-sizes 24 32`: each cell's final checkpoint is also sampled at 24 and 32 px (the
SiT on a larger token grid; attention/hybrid with a recomputed sin-cos position embedding), scored after a resize
back to the extractor's side, into <cell>/eval/study_step<S>_<size>px/; reported as fid_at_24, fid_at_32. Sizes
asked for later are added to finished cells.

Writes OUT/results.json (every cell, every evaluated step), OUT/results.md and stdout (mean ± sample std,
ddof=1, per mixer at the final step), fid_vs_steps.png, fid_vs_seconds.png and loss.png.
"""

import sys
from pathlib import Path

from ..cli import CLIParser, positive_int, run_cli
from ..config_io import DEFAULT_CONFIG
from ..models.sit import MIXERS
from .budget import Budget
from .grid import NUM_SAMPLES, StudySpec, run_study
from .measure import SAMPLING_BATCH


def parser() -> CLIParser:
    p = CLIParser(__doc__, prog="python -m sit_atconv.study")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"YAML file or name in configs/, shared by every cell (default: {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="config override shared by every cell, repeatable (e.g. --set train.max_steps=2000); the "
                        "study itself sets model.mixer, train.seed, train.resume, the run folders and log.keep_every")
    p.add_argument("--mixers", nargs="+", choices=MIXERS, default=list(MIXERS),
                   help=f"token mixers to compare (default: {' '.join(MIXERS)})")
    p.add_argument("--seeds", type=positive_int, default=3, help="training seeds per mixer: 0 .. N-1 (default: 3)")
    p.add_argument("--budget", nargs="+", default=["steps"], metavar="WORD",
                   help="'steps': train.max_steps steps per cell (default), or 'seconds N': N seconds of training "
                        "per cell, planned from a stored speed calibration")
    p.add_argument("--eval-every", type=positive_int,
                   help="evaluate every this many steps and at the end (default: 4 points along each run)")
    p.add_argument("--num-samples", type=positive_int, default=NUM_SAMPLES,
                   help=f"samples per evaluation (default: {NUM_SAMPLES}, the digits protocol)")
    p.add_argument("--ref", help="reference batch or folder for Inception metrics (needed unless the data is digits)")
    p.add_argument("--sampling-batch", type=positive_int, default=SAMPLING_BATCH,
                   help=f"images in the timed sampling batch (default: {SAMPLING_BATCH})")
    p.add_argument("--transfer-sizes", type=positive_int, nargs="+", default=[], metavar="S",
                   help="also evaluate each cell's final checkpoint sampled at these pixel sides (resolution transfer; "
                        "digits: scored after resizing back to 16 px); reported as fid_at_<S>")
    p.add_argument("--out", type=Path, help="study folder (default: results/study-<config name>)")
    return p


def body(args) -> int:
    out = args.out or Path("results") / f"study-{Path(args.config).stem}"
    spec = StudySpec(out=out, config=args.config, overrides=args.overrides, mixers=args.mixers, seeds=args.seeds,
                     budget=Budget.parse(args.budget), eval_every=args.eval_every, num_samples=args.num_samples,
                     ref=args.ref, sampling_batch=args.sampling_batch, transfer_sizes=args.transfer_sizes)
    done = run_study(spec)
    if done is not None:
        _, table = done
        print(f"\n{table}\n\nmean ± sample std (ddof=1) over seeds at the final step; results in {out}/results.json, "
              f"{out}/results.md, plots in {out}/*.png")
    return 0


def main(argv=None) -> int:
    return run_cli(parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())

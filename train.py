"""Train a SiT (attn / atconv / hybrid) with Accelerate.

    python train.py                                   # embedded default: SiT-ATConv on sklearn digits, CPU
    python train.py --mixer attn                      # the same with attention (its own run folder)
    accelerate launch train.py --config imagenet256_sit_xl2 --data-path LATENTS --mixer atconv

Every config field is an option (--section.field); sections: model, transport, data, optim, train, log.
Rerunning the same command continues the run from its latest checkpoint (--resume auto).
"""

import sys

from sit_atconv.cli import CLIParser, run_cli
from sit_atconv.config_io import add_config_options, config_from_args, config_yaml


def main(argv: list[str] | None = None) -> int:
    parser = add_config_options(CLIParser(__doc__))
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")

    def body(args) -> int:
        cfg = config_from_args(args)
        if args.dry_run:
            print(config_yaml(cfg), end="")
            return 0
        from sit_atconv.train import train  # imports torch/accelerate: after the arguments are checked

        train(cfg)
        return 0

    return run_cli(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())

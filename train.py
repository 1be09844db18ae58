"""Train a SiT (attn / atconv / hybrid) with Accelerate.

    python train.py                                   # embedded default: SiT-ATConv on sklearn digits, CPU
    accelerate launch train.py --config imagenet256_sit_xl2 --data-path LATENTS --mixer atconv

Every config field is an option (`--section.field`); see `python train.py --help`.
Rerunning the same command continues the run from its latest checkpoint (--resume auto).
"""

import sys

from sit_atconv.config import ConfigError, build_parser, parse_args
from sit_atconv.train.trainer import RunError, train


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    cfg, ns = parse_args(argv, parser)
    if ns.dry_run:
        import yaml

        from sit_atconv.config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    try:
        train(cfg)
    except (ConfigError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

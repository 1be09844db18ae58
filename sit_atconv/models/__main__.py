"""`python -m sit_atconv.models`: list the SiT and AttNet zoos with parameter counts (no weights allocated).

    python -m sit_atconv.models                       # the zoos
    python -m sit_atconv.models --card                # AttNet model card: params, MACs, CPU images/s beside
                                                      # resnet50 / convnext_tiny / deit_small (sit_atconv.models.card)
    python -m sit_atconv.models --card --variants xxs t1 --baselines resnet18 --batch 8 --reps 3
"""

from __future__ import annotations

import shlex
import sys

import torch

from ..cli import CLIParser, run_cli
from ..errors import ConfigError
from . import ATTNET_VARIANTS, MIXERS, create_attnet, create_sit
from .card import CARD_OPTIONS, add_card_options, run_card


def print_zoo() -> None:
    print(f"{'SiT (256px, 1000 classes)':<28}" + "".join(f"{m:>10}" for m in MIXERS))
    for name in ("SiT-S/2", "SiT-B/2", "SiT-L/2", "SiT-XL/2"):
        counts = []
        for mixer in MIXERS:
            with torch.device("meta"):
                model = create_sit(name, mixer=mixer, input_size=32, num_classes=1000, learn_sigma=True)
            counts.append(sum(p.numel() for p in model.parameters()) / 1e6)
        print(f"{name:<28}" + "".join(f"{c:>9.2f}M" for c in counts))
    print(f"\n{'AttNet (ImageNet-1K)':<28}{'params':>10}")
    for variant in ATTNET_VARIANTS:
        with torch.device("meta"):
            model = create_attnet(variant)
        print(f"{'attnet_' + variant:<28}{sum(p.numel() for p in model.parameters()) / 1e6:>9.2f}M")


def main(argv: list[str] | None = None) -> int:
    parser = CLIParser(__doc__, prog="python -m sit_atconv.models")
    parser.add_argument("--card", action="store_true", help="measure and write the AttNet model card")
    add_card_options(parser)
    argv = sys.argv[1:] if argv is None else list(argv)

    def body(args) -> int:
        if args.card:
            return run_card(args, shlex.join(["python", "-m", "sit_atconv.models", *argv]))
        given = [name for name in CARD_OPTIONS if getattr(args, name) != parser.get_default(name)]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is a model-card option: add --card")
        print_zoo()
        return 0

    return run_cli(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())

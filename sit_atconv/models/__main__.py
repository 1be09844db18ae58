"""`python -m sit_atconv.models`: list the SiT and AttNet zoos with parameter counts (no weights allocated)."""

import torch

from . import ATTNET_VARIANTS, MIXERS, create_attnet, create_sit


def main() -> None:
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


if __name__ == "__main__":
    main()

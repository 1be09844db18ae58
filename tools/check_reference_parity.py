"""Parity of `model_from_reference` with the reference code's own SiT models (not run in CI).

Builds tiny random-weight models with the two forks' model files — `generation/SiT/models.py` (SiT fork)
and `generation/REPA/models/sit.py` (REPA fork) of price112/Attentive-Convolution, imported from the
checkout you point at, never copied here — saves their state dicts the way their training scripts do,
loads them with `sit_atconv.convert.model_from_reference`, and compares predictions in fp32 after the
convention mapping:

    SiT fork:  ours(x, t, y)     == ref(x, t, y)                 (same time convention)
    REPA fork: ours(x, 1 - s, y) == -ref(x, s, y)[0]             (s = 0 data; target eps - x)

    git --git-dir MIRROR archive HEAD generation | tar -x -C /tmp/refcode
    python tools/check_reference_parity.py /tmp/refcode [--tol 1e-5]

Needs timm (the forks import it). Exit status 1 if any case differs by more than --tol.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch

from sit_atconv.convert import model_from_reference

WIDTH, DEPTH, HEADS, CLASSES, BATCH = 384, 4, 6, 10, 3  # width 384 = SiT-S: heads come from the size table


def import_file(path: Path, name: str):
    """A module from a file outside the package (the reference checkout)."""
    if not path.is_file():
        sys.exit(f"{path}: not found; pass the folder holding generation/SiT and generation/REPA")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (the init zeroes adaLN and the output layer), the fixed pos_embed kept."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name != "pos_embed":
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "difference_control" in name else 0.08))
    return model.eval()


def sit_fork_cases(ref) -> list[tuple[str, torch.nn.Module, dict]]:
    common = dict(input_size=32, patch_size=2, in_channels=4, hidden_size=WIDTH, depth=DEPTH, num_heads=HEADS,
                  num_classes=CLASSES, class_dropout_prob=0.1)
    return [("sit attn", ref.SiT(token_mixer="attn", **common), {}),
            ("sit attn no-sigma", ref.SiT(token_mixer="attn", learn_sigma=False, **common), {}),
            ("sit atconv", ref.SiT(token_mixer="atconv", **common), {}),
            ("sit hybrid", ref.SiT(token_mixer="atconv", hybrid=True, **common), {})]


def repa_fork_cases(ref) -> list[tuple[str, torch.nn.Module, dict]]:
    def build(use_atconv: bool, hybrid: bool, qk_norm: bool) -> torch.nn.Module:
        return ref.SiT(input_size=32, patch_size=2, in_channels=4, hidden_size=WIDTH, decoder_hidden_size=WIDTH,
                       depth=DEPTH, num_heads=HEADS, num_classes=CLASSES, encoder_depth=2, z_dims=[32],
                       projector_dim=64, use_atconv=use_atconv, hybrid=hybrid, qk_norm=qk_norm, fused_attn=True)

    every_block = build(False, False, False)  # the fork builds no all-ATConv SiT; put its ATConv in each block
    for block in every_block.blocks:
        block.attn = ref.ATConv(dim=WIDTH)
    return [("repa attn", build(False, False, False), {"model": "SiT-S/2"}),
            ("repa 'ATConv' (all attention)", build(True, False, False), {"model": "SiT-S/2-ATConv"}),
            ("repa hybrid", build(True, True, False), {"model": "SiT-S/2-ATConv-Hybrid"}),
            ("repa hybrid qk-norm", build(True, True, True), {"model": "SiT-S/2-ATConv-Hybrid", "qk_norm": True}),
            ("repa atconv every block", every_block, {"model": "SiT-S/2-ATConv-Hybrid"})]


def compare(label: str, ref_model: torch.nn.Module, repa_args: dict | None, folder: Path) -> tuple[float, float]:
    """(max |ours - reference| after the convention mapping, max |reference|) for a model saved as its fork
    saves it."""
    state = ref_model.state_dict()
    path = folder / f"{label.replace(' ', '_').replace(chr(39), '')}.pt"
    if repa_args is None:   # SiT fork: {"model", "ema", "opt", "args"}; here a DDP-prefixed plain state dict
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:                   # REPA fork: its checkpoint dict with the argparse arguments
        defaults = dict(path_type="linear", prediction="v", encoder_depth=2, proj_coeff=0.5, enc_type="dinov2-vit-b",
                        num_classes=CLASSES, resolution=256, qk_norm=False)
        args = argparse.Namespace(**{**defaults, **repa_args})
        torch.save({"model": state, "ema": state, "opt": {}, "args": args, "steps": 1000}, path)
    ours = model_from_reference(path)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, 32, 32, generator=gen)
    y = torch.tensor([0, 3, CLASSES])  # the last one is the null (guidance) label
    with torch.no_grad():
        if repa_args is None:
            t = torch.rand(BATCH, generator=gen)
            expected, got = ref_model(x, t, y), ours(x, t, y)
        else:
            s = torch.rand(BATCH, generator=gen)
            expected, got = -ref_model(x, s, y)[0], ours(x, 1 - s, y)
    return (got - expected).abs().max().item(), expected.abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, help="folder holding generation/SiT/models.py and generation/REPA")
    parser.add_argument("--tol", type=float, default=1e-5, help="max absolute difference allowed (fp32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    sit_fork = import_file(args.checkout / "generation/SiT/models.py", "reference_sit_fork")
    repa_fork = import_file(args.checkout / "generation/REPA/models/sit.py", "reference_repa_fork")
    # the fork was written for timm < 1.0.20, whose Attention defaulted to LayerNorm for QK-norm
    repa_fork.Attention = functools.partial(repa_fork.Attention, norm_layer=torch.nn.LayerNorm)
    cases = [(label, model, None) for label, model, _ in sit_fork_cases(sit_fork)]
    cases += [(label, model, extra) for label, model, extra in repa_fork_cases(repa_fork)]
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for seed, (label, model, repa_args) in enumerate(cases):
            diff, scale = compare(label, randomise(model, seed), repa_args, Path(folder))
            worst = max(worst, diff)
            print(f"{label:32s} max |diff| {diff:.2e}  (output max |v| {scale:.2f})")
    print(f"worst {worst:.2e} vs tolerance {args.tol:.0e}: {'PASS' if worst <= args.tol else 'FAIL'}")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())

"""Reference checkpoints -> our state dicts, and a safe CLI to convert them to .safetensors.

Our module names follow the reference code, so conversion is mostly identity. What it does:
unwrap training containers ('ema' preferred, then 'model'/'state_dict'), strip wrapper prefixes
('module.', '_orig_mod.'), turn the REPA variant's 1x1-Conv2d ATConv projections inside SiT
blocks into Linear weights, and drop REPA's alignment projectors (we train REPA-free).

    python -m sit_atconv.convert IN.pt OUT.safetensors
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_tensors, save_tensors
from .cli import CLIParser, run_cli
from .errors import ConfigError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SIT_ATCONV_PROJ = re.compile(r"^blocks\.\d+\.attn\.(kernel_proj|x_proj|proj)\.weight$")
_DROPPED_PREFIXES = ("projectors.",)


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def from_reference(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a reference (SiT-ATConv or AttNet) state dict to ours; identity where names match."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = _strip_prefixes(key)
        if key.startswith(_DROPPED_PREFIXES):
            continue
        if _SIT_ATCONV_PROJ.match(key) and value.dim() == 4 and value.shape[-2:] == (1, 1):
            value = value.flatten(1)  # REPA's SiT keeps ATConv projections as 1x1 Conv2d
        out[key] = value
    return out


def load_reference_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a reference checkpoint (safetensors or weights-only pickle) into `model`.

    A fixed sin-cos `pos_embed` in the file is ignored when the model has none (pure ATConv SiT).
    """
    state = from_reference(load_tensors(path))
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" not in own:
        state.pop("pos_embed")
    model.load_state_dict(state, strict=strict)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = CLIParser(
        prog="python -m sit_atconv.convert",
        description="Convert a reference SiT-ATConv / AttNet checkpoint (.pt/.pth/.safetensors) to our "
                    ".safetensors layout. Pickles are read with weights_only=True; code-running ones are refused.")
    parser.add_argument("input", type=Path, help="reference checkpoint (.pt, .pth or .safetensors)")
    parser.add_argument("output", type=Path, help="destination .safetensors file (must not exist unless --force)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")

    def body(args) -> int:
        if args.output.suffix != ".safetensors":
            raise ConfigError(f"output {args.output} must end in .safetensors")
        if args.output.exists() and not args.force:
            raise ConfigError(f"output {args.output} exists; choose another path or pass --force")
        state = from_reference(load_tensors(args.input))
        save_tensors(state, args.output, metadata={"converted_from": args.input.name})
        print(f"wrote {len(state)} tensors to {args.output}")
        return 0

    return run_cli(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())

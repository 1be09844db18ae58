"""Reference checkpoints -> our models and our .safetensors layout; a safe CLI for the conversion.

Our module names follow the reference code, so key conversion is mostly identity (`from_reference`: unwrap
training containers, strip 'module.' / '_orig_mod.', flatten the REPA fork's 1x1-conv ATConv projections,
drop REPA's projectors). A SiT checkpoint of either fork of the reference code is built as the model it is by
`model_from_reference` (`sit_atconv.reference_models`: architecture inferred from keys and shapes, the REPA
fork's SiLU kernels, position embedding and reversed time), answering in our convention.

    python -m sit_atconv.convert IN.pt OUT.safetensors             # SiT (either fork) or AttNet weights
    python -m sit_atconv.convert IN.pt OUT.safetensors --fork repa # when the file cannot tell its fork

A converted SiT file records what it was built as, so `model_from_reference(OUT)`, `sample.py --ckpt OUT`
and `eval_fid.py --ckpt OUT` rebuild the same model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import nn

from .checkpoint import load_tensors, save_tensors
from .cli import CLIParser, run_cli
from .errors import ConfigError
from .reference_models import (
    FORKS,
    METADATA_KEY,
    build_reference,
    from_reference,
    load_reference,
    model_from_reference,
    read_reference,
    reference_tensors,
)

__all__ = ["from_reference", "load_reference", "load_reference_checkpoint", "main", "model_from_reference"]


def load_reference_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load reference weights (safetensors or weights-only pickle) into a model you built yourself.

    Only the keys are converted: for a SiT checkpoint whose architecture, kernels or time convention you
    do not know, use `model_from_reference`. A fixed sin-cos `pos_embed` in the file is ignored when
    the model has none (pure ATConv SiT).
    """
    state = from_reference(load_tensors(path))
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" not in own:
        state.pop("pos_embed")
    model.load_state_dict(state, strict=strict)
    return model


def convert_file(src: Path, out: Path, fork: str | None = None, use_ema: bool = True) -> str:
    """Write `src` in our layout to `out` (.safetensors); a SiT is built first (so it is known to load) and
    its record stored in the header. Returns what was written, as one line."""
    ref = read_reference(src, use_ema)
    metadata = {"converted_from": src.name}
    if ref.is_sit:
        built = build_reference(ref, fork)
        state = reference_tensors(built)
        metadata[METADATA_KEY] = json.dumps(built.record())
        print(built.summary)
    else:
        if fork is not None:
            raise ConfigError(f"--fork applies to SiT checkpoints; {src} is not one (no x_embedder.proj.weight)")
        state = from_reference(ref.tensors)
    save_tensors(state, out, metadata=metadata)
    return f"wrote {len(state)} tensors to {out}"


def main(argv: list[str] | None = None) -> int:
    parser = CLIParser(
        prog="python -m sit_atconv.convert",
        description="Convert a reference SiT-ATConv (SiT or REPA fork) / AttNet checkpoint (.pt/.pth/.safetensors) "
                    "to our .safetensors layout. Pickles are read with weights_only=True; code-running ones are "
                    "refused.")
    parser.add_argument("input", type=Path, help="reference checkpoint (.pt, .pth or .safetensors)")
    parser.add_argument("output", type=Path, help="destination .safetensors file (must not exist unless --force)")
    parser.add_argument("--fork", choices=sorted(FORKS), help="the reference fork of a SiT checkpoint, when its "
                                                              "keys and training arguments cannot tell")
    parser.add_argument("--raw", action="store_true", help="the raw 'model' weights instead of the EMA")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")

    def body(args) -> int:
        if args.output.suffix != ".safetensors":
            raise ConfigError(f"output {args.output} must end in .safetensors")
        if args.output.exists() and not args.force:
            raise ConfigError(f"output {args.output} exists; choose another path or pass --force")
        print(convert_file(args.input, args.output, args.fork, use_ema=not args.raw))
        return 0

    return run_cli(parser, body, argv)


if __name__ == "__main__":
    sys.exit(main())

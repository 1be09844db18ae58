"""Model card of the AttNet family: parameters, multiply-accumulates and CPU throughput beside timm baselines.

Counting: `torch.utils.flop_counter.FlopCounterMode` on one image (convolutions, matmuls, attention;
element-wise ops, norms and pooling are not counted, as in fvcore/timm). It counts 2 FLOPs per
multiply-accumulate; the card reports MACs (what timm and papers usually call "GFLOPs") and FLOPs = 2 x MACs.
Timing: images/s at fp32, eval mode, torch.no_grad, after warm-up; every model is timed in the same run,
round-robin, so machine noise hits them alike; median and p25-p75 over the rounds.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count
from tqdm import tqdm

from ..cli import positive_int
from ..errors import ConfigError
from ..io import write_text_atomic
from .attnet import ATTNET_VARIANTS

ATTNET_MODELS: tuple[str, ...] = tuple(f"attnet_{v}" for v in ATTNET_VARIANTS)
BASELINES: tuple[str, ...] = ("resnet50", "convnext_tiny", "deit_small_patch16_224")
DEFAULT_OUT = Path("benchmarks/measured/model_card.md")
CARD_OPTIONS = ("out", "batch", "reps", "warmup", "variants", "baselines", "image_size", "threads")
COLUMNS = ("model", "params (M)", "GMACs", "GFLOPs (2 x MACs)", "images/s median", "images/s p25-p75")


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of attention's two products, Q K^T and A V (softmax not counted), as torch counts its GPU kernels."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode has no formula for the CPU flash-attention kernel (as of torch 2.14): add the GPU kernels' one.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_EXTRA_FORMULAS = {} if _CPU_SDPA in flop_registry else {_CPU_SDPA: _cpu_sdpa_flops}


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass of `model` on `example` (FlopCounterMode's FLOPs / 2)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with torch.no_grad(), counter:
        model(example)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """p25, median, p75 interpolated between observed values, never beyond them (the value itself when alone)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    p25, p50, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return p25, p50, p75


def throughput(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """Images/s of each timed batch, summarised as the median and the p25-p75 spread."""
    p25, p50, p75 = _quartiles([batch / s for s in seconds])
    return {"median": p50, "p25": p25, "p75": p75}


def card_row(name: str, params: int, macs: int, seconds: Sequence[float], batch: int) -> dict[str, Any]:
    """One model's entry of the card (the JSON record; the Markdown row is formatted from it)."""
    return {"model": name, "params": params, "macs": macs, "flops": 2 * macs,
            "images_per_s": throughput(seconds, batch), "seconds_per_batch": list(seconds)}


def format_row(row: dict[str, Any]) -> str:
    rate = row["images_per_s"]
    cells = (f"`{row['model']}`", f"{row['params'] / 1e6:.2f}", f"{row['macs'] / 1e9:.2f}",
             f"{row['flops'] / 1e9:.2f}", f"{rate['median']:.1f}", f"{rate['p25']:.1f}-{rate['p75']:.1f}")
    return "| " + " | ".join(cells) + " |"


def format_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The card as Markdown: what was measured and how, then one table row per model."""
    size = meta["image_size"]
    lines = [
        "# AttNet model card",
        "",
        f"Measured in one run on {meta['date']} ({meta['wall_s']:.0f} s to build, count and time); "
        "random weights, no downloads.",
        "",
        f"- **MACs** are multiply-accumulates for one {size}x{size} image, counted with "
        "`torch.utils.flop_counter.FlopCounterMode` (convolutions, matmuls, attention; element-wise ops, norms "
        "and pooling not counted). timm and papers usually report GMACs as \"GFLOPs\"; "
        "here **FLOPs = 2 x MACs** has its own column.",
        f"- **Throughput**: images/s at batch {meta['batch']}, {size}x{size}, fp32, eval mode, `torch.no_grad`, "
        f"{meta['threads']} CPU thread(s) on {meta['cpu']} ({meta['cpu_count']} logical cores). "
        f"{meta['warmup']} warm-up round(s), then {meta['reps']} rounds that time every model once in a rotating "
        "(round-robin) order, so machine noise hits all models alike; median and p25-p75 over the rounds.",
        f"- torch {meta['torch']}, timm {meta['timm']}, Python {meta['python']}. Command: `{meta['command']}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    return "\n".join(lines + [format_row(r) for r in rows]) + "\n"


def time_round_robin(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Wall seconds of each call of each fn over `reps` rounds after `warmup` rounds; round r starts at fn
    r mod n, so no model always runs first (or right after the heaviest one). A tqdm bar counts the calls."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with tqdm(total=(warmup + reps) * len(names), desc="model card", unit="batch") as bar:
        for r in range(warmup + reps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                bar.set_postfix_str(f"{'warm-up' if r < warmup else 'round'} {r + 1 - warmup * (r >= warmup)} "
                                    f"{name}")
                start = time.perf_counter()
                fns[name]()
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[name].append(elapsed)
                bar.update()
    return times


def _check_baselines(names: Sequence[str]) -> None:
    for name in names:
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else " (see timm.list_models())"
            raise ConfigError(f"--baselines: '{name}' is not a timm model{hint}")


def build_and_count(names: Sequence[str], image_size: int) -> dict[str, tuple[nn.Module, int, int]]:
    """name -> (model in eval mode with random weights, parameters, MACs for one image)."""
    out = {}
    for name in tqdm(names, desc="build + count", unit="model"):
        model = timm.create_model(name, pretrained=False).eval()
        try:
            macs = count_macs(model, torch.zeros(1, 3, image_size, image_size))
        except (RuntimeError, AssertionError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ConfigError(f"{name} cannot run on {image_size}x{image_size} images ({first}); "
                              "choose another --image-size or model") from err
        out[name] = (model, count_params(model), macs)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_card(names: Sequence[str], batch: int, reps: int, warmup: int, image_size: int) -> list[dict[str, Any]]:
    """Build every model, count its MACs, then time them all in one round-robin run: the card's rows."""
    built = build_and_count(names, image_size)
    images = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))

    def forward(model: nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return model(images)
        return call

    seconds = time_round_robin({n: forward(m) for n, (m, _, _) in built.items()}, reps, warmup)
    return [card_row(n, params, macs, seconds[n], batch) for n, (_, params, macs) in built.items()]


def _attnet_name(text: str) -> str:
    return text if text.startswith("attnet_") else f"attnet_{text}"


def add_card_options(parser: argparse.ArgumentParser) -> None:
    """The --card run's options (the caller adds --card itself)."""
    g = parser.add_argument_group("model card (with --card)")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown path; the JSON goes beside it "
                   "(default: %(default)s)")
    g.add_argument("--batch", type=positive_int, default=32, help="images per timed forward (default: 32)")
    g.add_argument("--reps", type=positive_int, default=3, help="timed rounds over all models (default: 3)")
    g.add_argument("--warmup", type=positive_int, default=1, help="untimed rounds first (default: 1)")
    g.add_argument("--variants", nargs="+", type=_attnet_name, choices=ATTNET_MODELS, default=list(ATTNET_MODELS),
                   metavar="NAME", help="AttNet variants, e.g. attnet_xxs or xxs (default: all)")
    g.add_argument("--baselines", nargs="*", default=list(BASELINES), metavar="NAME",
                   help=f"timm models timed beside them, random weights (default: {' '.join(BASELINES)})")
    g.add_argument("--image-size", type=positive_int, default=224, help="square input side (default: 224)")
    g.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's own choice)")


def run_card(args: argparse.Namespace, command: str) -> int:
    """Measure, print the Markdown card, write it and its JSON beside it (atomically)."""
    if args.out.suffix != ".md":
        raise ConfigError(f"--out {args.out}: give a .md path (the JSON is written beside it)")
    _check_baselines(args.baselines)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    names = list(dict.fromkeys([*args.variants, *args.baselines]))
    rows = measure_card(names, args.batch, args.reps, args.warmup, args.image_size)
    meta = {"image_size": args.image_size, "batch": args.batch, "reps": args.reps, "warmup": args.warmup,
            "dtype": "fp32", "threads": torch.get_num_threads(), "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "wall_s": time.perf_counter() - start, "command": command,
            "units": "params: count; macs: multiply-accumulates per image; flops = 2 * macs; "
                     "images_per_s: batch / wall seconds of one forward; seconds_per_batch: every timed round"}
    markdown = format_markdown(rows, meta)
    print(markdown, end="")
    json_path = args.out.with_suffix(".json")
    write_text_atomic(args.out, markdown)
    write_text_atomic(json_path, json.dumps({"meta": meta, "models": rows}, indent=2) + "\n")
    print(f"wrote {args.out} and {json_path}")
    return 0

"""Benchmark ATConv against the reference ATConv, attention and the matmul floor; SiT blocks; SiT training.

Run from the repository root, e.g.::

    python benchmarks/bench_atconv.py --sections mixer --widths B,XL --reps 9 --out results/bench_mixer.json
    python benchmarks/bench_atconv.py --device cuda --dtype bf16            # on a GPU

Timings are interleaved round-robin (see `common.time_interleaved`); ratios are of medians in the
same run; a second table gives the median of per-repetition (paired) ratios with their spread.
Memory: CUDA peak allocated bytes on a GPU; on CPU the bytes of distinct activations autograd saves
for backward (parameters excluded), measured in eager mode.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from common import (
    DTYPES,
    count_flops,
    environment,
    format_table,
    paired_ratio,
    peak_cuda_bytes,
    peak_tflops,
    saved_activation_bytes,
    summarize,
    time_interleaved,
    write_json,
)
from torch import Tensor, nn
from workloads import autocast_for, blocks, flow_matching_loss, mixers, sit_models

SECTIONS = ("mixer", "block", "train")
# Baselines each section reports ratios against (a ratio is candidate median / baseline median).
BASELINES = {"mixer": ("floor", "attention", "reference"), "block": ("attn", "atconv[reference]", "attn+attn"),
             "train": ("attn", "atconv[reference]")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sections", default="mixer,block,train", help=f"comma list of {SECTIONS}")
    p.add_argument("--widths", default="S,B,L,XL", help="SiT widths for the mixer section (S=384 ... XL=1152)")
    p.add_argument("--block-widths", default="B", help="SiT widths for the block section")
    p.add_argument("--tokens", default="256", help="comma list of token counts N (square grids), e.g. 256,1024")
    p.add_argument("--batch", type=int, default=8, help="batch size for the mixer and block sections")
    p.add_argument("--train-models", default="SiT-S/2", help="SiT models for the train section (e.g. SiT-S/2,SiT-B/2)")
    p.add_argument("--train-batch", type=int, default=4, help="batch size of the training step")
    p.add_argument("--train-modes", default="fwdbwd,step",
                   help="train section: fwdbwd (loss + backward) and/or step (+ AdamW, grads set to None)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="mixer and block sections: fwd (no_grad), fwdbwd")
    p.add_argument("--compile", default="mixer",
                   help="sections that also run torch.compile (inductor), e.g. mixer,block,train; '' for none")
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per candidate (median of these)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per candidate first")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall-clock, or process CPU time (steadier on a shared CPU with --threads 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="fp32, or autocast to bf16/fp16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak TFLOP/s for MFU (default: known GPUs' dense peak for --dtype; none on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    args.compile = [s for s in args.compile.split(",") if s]
    for s in args.sections + args.compile:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {SECTIONS}")
    args.modes = [m for m in args.modes.split(",") if m]
    args.train_modes = [m for m in args.train_modes.split(",") if m]
    return args


def _fwd(module: nn.Module, inputs: tuple[Tensor, ...], autocast) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad(), autocast:
            return module(*inputs)
    return run


def _fwdbwd(module: nn.Module, inputs: tuple[Tensor, ...], grad: Tensor, autocast) -> Callable[[], Any]:
    def run() -> Any:
        module.zero_grad(set_to_none=True)
        inputs[0].grad = None
        with autocast:
            out = module(*inputs)
        out.backward(grad.to(out.dtype))
    return run


def _memory(module: nn.Module, inputs: tuple[Tensor, ...], autocast, device: torch.device) -> int | None:
    """Peak CUDA bytes of one fwd+bwd, or (CPU) activation bytes saved for backward."""
    if device.type == "cuda":
        def step() -> None:
            with autocast:
                out = module(*inputs)
            out.float().sum().backward()
        return peak_cuda_bytes(step, device)

    def forward() -> Tensor:
        with autocast:
            return module(*inputs)
    return saved_activation_bytes(forward, list(module.parameters()))


def _rows(section: str, label: dict[str, Any], mode: str, times: dict[str, list[float]],
          memory: dict[str, int | None]) -> list[dict[str, Any]]:
    """One row per candidate: stats, memory, and ratios of medians against the section's baselines."""
    stats = {name: summarize(t) for name, t in times.items()}
    rows = []
    for name, s in stats.items():
        row = {"section": section, **label, "mode": mode, "candidate": name, **s, "memory_bytes": memory.get(name)}
        compiled = name.endswith("+compile")
        for base in BASELINES[section]:
            key = base + "+compile" if compiled and base + "+compile" in stats else base
            if key in stats and key != name:
                row[f"x_{base}"] = s["median_ms"] / stats[key]["median_ms"]
                row[f"x_{base}_paired"] = paired_ratio(times[name], times[key])
        rows.append(row)
    return rows


def _compiled(modules: dict[str, nn.Module], names: list[str], fullgraph: bool) -> dict[str, nn.Module]:
    """torch.compile (inductor) copies of `names`, with static shapes: modules of one class share their
    code, so without dynamic=False the second width or model would be compiled for symbolic sizes."""
    return {f"{n}+compile": torch.compile(modules[n], fullgraph=fullgraph, dynamic=False)
            for n in names if n in modules}


def _time_modules(section: str, label: dict[str, Any], modules: dict[str, nn.Module], inputs: tuple[Tensor, ...],
                  args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Time fwd / fwdbwd of each module on the same inputs; memory of the eager ones."""
    autocast = autocast_for(device, dtype)
    with torch.no_grad(), autocast:
        grad = torch.randn_like(modules[next(iter(modules))](*inputs), dtype=torch.float32)
    rows = []
    for mode in args.modes:
        fns = {n: _fwd(m, inputs, autocast) if mode == "fwd" else _fwdbwd(m, inputs, grad, autocast)
               for n, m in modules.items()}
        times = time_interleaved(fns, args.reps, args.warmup, device, args.clock)
        memory = {n: _memory(m, inputs, autocast, device) for n, m in modules.items()
                  if mode == "fwdbwd" and not n.endswith("+compile")}
        rows += _rows(section, label, mode, times, memory)
        print(f"  {section} {label} {mode}: done", file=sys.stderr, flush=True)
    return rows


def bench_mixers(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Token mixers at each width and N: ATConv (eager, compiled), grouped-conv ATConv, reference, attention, floor."""
    rows = []
    for n in args.tokens:
        grid = int(round(n ** 0.5))
        for width in args.widths:
            modules = {k: m.to(device) for k, m in mixers(width, grid).items()}
            if "mixer" in args.compile:
                modules.update(_compiled(modules, ["atconv"], fullgraph=True))
            x = torch.randn(args.batch, n, modules["atconv"].dim, device=device, requires_grad=True)
            _check_reference(modules, x)
            rows += _time_modules("mixer", {"width": width, "N": n, "C": modules["atconv"].dim}, modules, (x,),
                                  args, device, dtype)
    return rows


def _check_reference(modules: dict[str, nn.Module], x: Tensor) -> None:
    """Guard the comparison: our ATConv and the reference forward agree on the same weights."""
    with torch.no_grad():
        ours, ref = modules["atconv"](x), modules["reference"](x)
    if not torch.allclose(ours, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item()):
        raise RuntimeError(f"ATConv and the reference disagree: max diff {(ours - ref).abs().max().item():.3g}")


def bench_blocks(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """SiT blocks: attn vs atconv vs atconv with the reference mixer; pairs attn+attn vs hybrid."""
    rows = []
    for n in args.tokens:
        grid = int(round(n ** 0.5))
        for width in args.block_widths:
            modules = {k: m.to(device) for k, m in blocks(width, grid).items()}
            if "block" in args.compile:
                modules.update(_compiled(modules, list(modules), fullgraph=True))
            dim = modules["attn"].blocks[0].norm1.normalized_shape[0]
            x = torch.randn(args.batch, n, dim, device=device, requires_grad=True)
            c = torch.randn(args.batch, dim, device=device)
            rows += _time_modules("block", {"width": width, "N": n, "C": dim}, modules, (x, c), args, device, dtype)
    return rows


def bench_train(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """One training step of SiT (flow-matching MSE + backward [+ AdamW]): attn vs atconv vs reference mixers."""
    rows = []
    autocast = autocast_for(device, dtype)
    for name in args.train_models:
        for n in args.tokens:
            patch = int(name.split("/")[1])
            input_size = int(round(n ** 0.5)) * patch
            models = {k: m.to(device).train() for k, m in sit_models(name, input_size).items()}
            runs = dict(models)
            if "train" in args.compile:
                runs.update(_compiled(models, list(models), fullgraph=False))
            x1 = torch.randn(args.train_batch, 4, input_size, input_size, device=device)
            y = torch.randint(0, 1000, (args.train_batch,), device=device)
            flops = {k: _train_flops(m, x1, y, autocast) for k, m in models.items()}
            peak = peak_tflops(device, args.dtype, args.peak_tflops)
            for mode in args.train_modes:
                fns = {}
                for key, model in runs.items():
                    params = list(models[key.removesuffix("+compile")].parameters())
                    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if mode == "step" else None
                    fns[key] = _train_step(model, params, opt, x1, y, autocast)
                times = time_interleaved(fns, args.reps, args.warmup, device, args.clock)
                memory = {}
                if mode == "fwdbwd":
                    memory = {k: _memory_train(m, x1, y, autocast, device) for k, m in models.items()}
                new_rows = _rows("train", {"model": name, "N": n, "batch": args.train_batch}, mode, times, memory)
                _add_utilisation(new_rows, flops, peak)
                rows += new_rows
                print(f"  train {name} N={n} {mode}: done", file=sys.stderr, flush=True)
    return rows


def _train_flops(model: nn.Module, x1: Tensor, y: Tensor, autocast) -> int:
    """FLOPs of one loss + backward of `model` (eager)."""
    return count_flops(lambda: flow_matching_loss(model, x1, y, autocast).backward())


def _add_utilisation(rows: list[dict[str, Any]], flops: dict[str, int], peak: float | None) -> None:
    """Model FLOPs of one fwd+bwd (counted on the eager model), achieved TFLOP/s, and MFU when the peak is known.

    MFU = model FLOPs / step time / peak; a full step's AdamW update is not counted as model FLOPs.
    """
    for row in rows:
        f = flops[row["candidate"].removesuffix("+compile")]
        row["model_gflop"] = f / 1e9
        row["tflops_per_s"] = f / (row["median_ms"] / 1e3) / 1e12
        if peak:
            row["mfu"] = row["tflops_per_s"] / peak


def _train_step(model: nn.Module, params: list[nn.Parameter], opt: torch.optim.Optimizer | None,
                x1: Tensor, y: Tensor, autocast) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        flow_matching_loss(model, x1, y, autocast).backward()
        if opt is not None:
            opt.step()
    return run


def _memory_train(model: nn.Module, x1: Tensor, y: Tensor, autocast, device: torch.device) -> int | None:
    if device.type == "cuda":
        return peak_cuda_bytes(lambda: flow_matching_loss(model, x1, y, autocast).backward(), device)
    return saved_activation_bytes(lambda: flow_matching_loss(model, x1, y, autocast), list(model.parameters()))


def print_tables(rows: list[dict[str, Any]]) -> None:
    """One markdown table per section and mode."""
    for section in SECTIONS:
        keys = ["width", "N", "C"] if section != "train" else ["model", "N", "batch"]
        for mode in dict.fromkeys(r["mode"] for r in rows if r["section"] == section):
            sel = [dict(r) for r in rows if r["section"] == section and r["mode"] == mode]  # display copies
            for r in sel:
                r["MiB"] = None if r.get("memory_bytes") is None else r["memory_bytes"] / 2**20
            ratios = [f"x_{b}" for b in BASELINES[section] if any(f"x_{b}" in r for r in sel)]
            cols = keys + ["candidate", "median_ms", "min_ms", "p25_ms", "p75_ms"] + ratios + ["MiB"]
            cols += [c for c in ("model_gflop", "tflops_per_s", "mfu") if any(c in r for r in sel)]
            print(f"\n### {section} — {mode}\n")
            print(format_table(sel, cols))
            for r in sel:
                for b in BASELINES[section]:
                    if f"x_{b}_paired" in r:
                        q = r[f"x_{b}_paired"]
                        r[f"paired x_{b}"] = f"{q['median']:.3g} ({q['p25']:.3g}-{q['p75']:.3g})"
            print(f"\nPaired ratios (median of per-repetition ratios, p25-p75), {section} — {mode}:\n")
            print(format_table(sel, keys + ["candidate"] + [f"paired {c}" for c in ratios]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # One code object (e.g. ATConv.forward) is compiled once per module instance, shape and grad mode.
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 256
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    args.widths = [w for w in args.widths.split(",") if w]
    args.block_widths = [w for w in args.block_widths.split(",") if w]
    args.tokens = [int(n) for n in args.tokens.split(",") if n]
    args.train_models = [m for m in args.train_models.split(",") if m]
    env = environment(device)
    print(f"# bench_atconv on {env['device']} ({args.dtype}, {env['threads']} threads, clock={args.clock}, "
          f"reps={args.reps}); load average before: {env['loadavg']}")
    runners = {"mixer": bench_mixers, "block": bench_blocks, "train": bench_train}
    rows = []
    for section in args.sections:
        rows += runners[section](args, device, dtype)
    print_tables(rows)
    env["loadavg_after"] = environment(device)["loadavg"]
    write_json(args.out, {"command": " ".join(sys.argv), "args": vars(args), "environment": env, "rows": rows})


if __name__ == "__main__":
    main()

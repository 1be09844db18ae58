"""Shared benchmark plumbing: interleaved timing, saved-activation bytes, tables, environment, JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sit_atconv.io import atomic_write

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings are real (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int,
                     device: torch.device, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call for each fn, measured round-robin (rotating order) so load noise hits all alike.

    clock="cpu" counts this process's CPU time (all threads): on a shared CPU it ignores the time other
    processes hold the cores — with one thread the steadiest measure of the work itself.
    """
    now = CLOCKS[clock]
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = now()
            fns[name]()
            synchronize(device)
            times[name].append(now() - start)
    return times


def _quartiles(values: list[float]) -> list[float]:
    """p25, p50, p75 (the single value three times when there is only one)."""
    return statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, min, and the interquartile spread, in milliseconds."""
    ms = sorted(s * 1e3 for s in samples)
    q = _quartiles(ms)
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "p25_ms": q[0], "p75_ms": q[2], "reps": len(ms)}


def paired_ratio(samples: list[float], baseline: list[float]) -> dict[str, float]:
    """Median and interquartile range of per-repetition ratios sample[r] / baseline[r].

    The two calls of one repetition run back to back, so slow drifts of a shared machine (other
    jobs' memory traffic, clock changes) mostly cancel in each ratio: a steadier estimate than the
    ratio of medians when the load changes during a run.
    """
    ratios = [s / b for s, b in zip(samples, baseline, strict=True)]
    q = _quartiles(ratios)
    return {"median": statistics.median(ratios), "p25": q[0], "p75": q[2]}


# Dense bf16/fp16 tensor-core peak TFLOP/s of SXM parts by device-name fragment (vendor data sheets).
# PCIe/NVL variants have lower peaks, and fp32 depends on the TF32 setting: pass --peak-tflops for those.
PEAK_TFLOPS = {"H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(device: torch.device, dtype: str, override: float | None) -> float | None:
    """The device's dense peak for `dtype` (override first); None when unknown (CPUs, fp32, PCIe/NVL)."""
    if override:
        return override
    if device.type != "cuda" or dtype not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    if "PCIe" in name or "NVL" in name:
        return None
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """Grouped-conv-aware count for aten.convolution_backward (torch's formula ignores groups and
    overcounts depthwise convs by a factor of the channel count): each requested gradient costs one
    forward conv, 2 * batch * prod(weight shape) * output positions (weight shape has C_in / groups)."""
    forward = 2 * grad_out_shape[0] * math.prod(w_shape) * math.prod(grad_out_shape[2:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def _addmm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """(n, k) @ (k, m): 2 * n * k * m."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call (matmuls, convolutions, attention), counted by torch's FlopCounterMode.

    Attention runs on the math backend while counting, so its products are counted on every device
    (the CPU flash kernel has no registered formula); depthwise-conv backward uses
    `_conv_backward_flops`. Run it on the eager model: the same math as compiled.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    # In-place addmm_ (ATConv's fused input gradient accumulates into a buffer) has no formula of its own.
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops, torch.ops.aten.addmm_: _addmm_flops}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


def saved_activation_bytes(step: Callable[[], torch.Tensor], params: list[nn.Parameter]) -> int:
    """Bytes of distinct tensor storages autograd saves for backward during `step()` (parameters excluded).

    CPU stand-in for peak memory: it counts what the forward keeps alive for the backward.
    """
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def peak_cuda_bytes(step: Callable[[], Any], device: torch.device) -> int | None:
    """torch.cuda peak allocated bytes during one call (None off CUDA)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": str(device),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Markdown table of `columns` from row dicts (floats to 3 significant-ish digits)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    """Write the results (with the command line and environment) when --out is given; atomically, so an
    interrupted run never leaves a truncated file in place of an earlier result."""
    if path:
        def dump(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=2)
        atomic_write(path, dump)

"""Check every ATConv path on a device (a lent GPU) against the float64 loop oracle on the CPU.

The test suite runs on the CPU only. Run this once on a GPU before trusting its timings: it covers
the device's own kernels (cuDNN grouped and per-sample convs, inductor's Triton code for the shift
form) and CUDA autocast. Run from the repository root, e.g.::

    python benchmarks/check_device.py --device cuda --out results/check_cuda.json

Cases: both layouts (tokens at a SiT width, image at an AttNet-like width), each depthwise impl in
eager mode, and torch.compile(fullgraph=True) of the default impl, in fp32 (TF32 off) and under
autocast. Each case runs forward and backward on the same weights and inputs. The error is the largest
difference from the oracle, relative to the oracle's largest magnitude: for the output, and for the
gradients of x and of every parameter. The script prints a table, writes JSON, and exits 1 if any
case fails. A case that raises (a compile error, say) is recorded with its error and the rest still run;
the JSON is rewritten after every case ("complete": false until the end), so a time limit loses little.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from common import DTYPES, environment, format_table, write_json
from torch import Tensor, nn
from workloads import autocast_for

from sit_atconv.layers.atconv import ATConv
from sit_atconv.layers.atconv_reference import atconv_reference
from sit_atconv.models.sit import SIT_SIZES

EAGER_IMPLS = ("grouped", "per_sample", "shift")
# Largest error relative to the oracle's scale (output, gradients): about 4x what the CPU measures at
# the default sizes (bf16 0.008 / 0.013, fp16 0.0009 / 0.0016, fp32 ~1e-6); a wrong formula errs by O(1).
TOLERANCES = {"fp32": (1e-4, 1e-4), "bf16": (3e-2, 5e-2), "fp16": (5e-3, 1e-2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="device to check (cpu works too: a dry run)")
    p.add_argument("--width", default="B", choices=list(SIT_SIZES), help="SiT width of the tokens-layout case")
    p.add_argument("--tokens", type=int, default=256, help="tokens N of the tokens case (a square grid)")
    p.add_argument("--image-dim", type=int, default=128, help="channels of the image-layout case")
    p.add_argument("--image-size", type=int, default=28, help="height = width of the image-layout case")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtypes", default="fp32,bf16", help=f"comma list of {tuple(DTYPES)}; fp32 runs with TF32 off")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend for the compiled cases ('none' skips them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes {','.join(unknown)} not known; use a comma list of {tuple(DTYPES)}")
    return args


def _module(layout: str, dim: int, grid: int, seed: int) -> ATConv:
    """A float64 CPU ATConv with every parameter random (difference_control too), seeded."""
    torch.manual_seed(seed)
    act = "gelu_tanh" if layout == "tokens" else "gelu"
    module = ATConv(dim, 3, layout=layout, grid_size=grid if layout == "tokens" else None, act=act).double()
    with torch.no_grad():
        for layer in (module.kernel_proj, module.kernel_gen, module.x_proj, module.proj):
            nn.init.xavier_uniform_(layer.weight.view(layer.weight.shape[0], -1))
            layer.bias.normal_(0, 0.02)
        module.difference_control.normal_(0, 1)
    return module


class Oracle(NamedTuple):
    """The float64 CPU reference of one case: module, input, output, upstream gradient, gradients."""
    module: ATConv
    x: Tensor
    out: Tensor
    grad_out: Tensor
    grads: list[Tensor]


def _grads(out: Tensor, x: Tensor, module: nn.Module, grad_out: Tensor) -> list[Tensor]:
    """Gradients of <out, grad_out> with respect to x and every parameter, in float64 on the CPU."""
    grads = torch.autograd.grad(out, [x, *module.parameters()], grad_out)
    return [g.detach().double().cpu() for g in grads]


def _rel_error(value: Tensor, ref: Tensor) -> float:
    return ((value.detach().double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check_layout(layout: str, args: argparse.Namespace, device: torch.device) -> Iterator[dict[str, Any]]:
    """Every impl (eager) and the compiled default, each dtype, against the float64 oracle: a row a case."""
    if layout == "tokens":
        dim, grid = SIT_SIZES[args.width].hidden_size, int(round(args.tokens ** 0.5))
        shape = (args.batch, grid * grid, dim)
    else:
        dim, grid = args.image_dim, args.image_size
        shape = (args.batch, dim, grid, grid)
    module = _module(layout, dim, grid, args.seed)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = atconv_reference(module, x, conv="loop")
    grad_out = torch.randn_like(out)
    oracle = Oracle(module, x, out, grad_out, _grads(out, x, module, grad_out))

    cases = [(impl, False) for impl in EAGER_IMPLS]
    if args.backend != "none":
        cases.append(("auto", True))
    for impl, compiled in cases:
        for dtype in args.dtypes:
            row = {"layout": layout, "C": dim, "impl": impl, "compiled": args.backend if compiled else "",
                   "dtype": dtype}
            try:
                row.update(_errors(oracle, impl, compiled, dtype, args, device))
            except Exception as error:  # one broken path (say, a compile error) must not hide the others
                row.update(ok=False, error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
            result = row.get("error") or f"out {row['out_err']:.2g}, grads {row['max_grad_err']:.2g}"
            print(f"  {layout} {impl}{' compiled' if compiled else ''} {dtype}: {result}, "
                  f"{'ok' if row['ok'] else 'FAIL'}", file=sys.stderr, flush=True)
            yield row


def _errors(oracle: Oracle, impl: str, compiled: bool, dtype: str, args: argparse.Namespace,
            device: torch.device) -> dict[str, Any]:
    """One case: the oracle's weights in fp32 on `device`, run with `impl` (compiled or not) under `dtype`."""
    module = copy.deepcopy(oracle.module).float().to(device)
    module.impl = impl
    run = torch.compile(module, backend=args.backend, fullgraph=True, dynamic=False) if compiled else module
    x = oracle.x.detach().float().to(device).requires_grad_(True)
    with autocast_for(device, DTYPES[dtype]):
        out = run(x)
    grads = _grads(out.float(), x, module, oracle.grad_out.float().to(device))
    out_tol, grad_tol = TOLERANCES[dtype]
    out_err = _rel_error(out, oracle.out)
    grad_errs = [_rel_error(g, r) for g, r in zip(grads, oracle.grads, strict=True)]
    return {"out_err": out_err, "max_grad_err": max(grad_errs), "x_grad_err": grad_errs[0],
            "ok": bool(out_err <= out_tol and max(grad_errs) <= grad_tol)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":  # fp32 means fp32: TF32 would round matmul and conv inputs to 10-bit mantissas
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    env = environment(device)
    print(f"# check_device on {env['device']}; dtypes {args.dtypes}; compile backend {args.backend}")
    rows: list[dict[str, Any]] = []

    def save(complete: bool) -> None:
        write_json(args.out, {"command": " ".join(sys.argv), "args": vars(args), "environment": env, "rows": rows,
                              "complete": complete})

    for layout in ("tokens", "image"):
        for row in check_layout(layout, args, device):
            rows.append(row)
            save(complete=False)  # after every case: a run stopped by a time limit keeps what it checked
    save(complete=True)
    print(format_table(rows, ["layout", "C", "impl", "compiled", "dtype", "out_err", "max_grad_err",
                              "x_grad_err", "ok", "error"]))
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases within tolerance {TOLERANCES}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

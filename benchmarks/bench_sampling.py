"""Sampling speed of SiT attn vs atconv: images/s and NFE for ODE (dopri5, Heun, Euler) and SDE, CFG on/off.

Run from the repository root, e.g.::

    python benchmarks/bench_sampling.py --out results/bench_sampling.json
    python benchmarks/bench_sampling.py --ckpt-attn a.safetensors --ckpt-atconv b.safetensors --steps 50,250

NFE counts calls of the network itself (a CFG call on the doubled batch is one NFE). Without
checkpoints the models are randomly initialised with their zero-initialised layers (adaLN gates,
output layer) perturbed so the velocity field is not zero; adaptive-solver (dopri5) NFE on such a
field says little about a trained model's — pass checkpoints for that. Fixed-step NFE and the time
per NFE do not depend on the weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from common import DTYPES, environment, format_table, synchronize, write_json
from torch import Tensor, nn
from workloads import autocast_for

from sit_atconv.checkpoint import load_tensors
from sit_atconv.models.sit import create_sit
from sit_atconv.transport import CFGModel, Sampler, create_transport


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="SiT-S/2", help="SiT zoo name")
    p.add_argument("--mixers", default="attn,atconv", help="comma list of mixers to compare")
    p.add_argument("--image-size", type=int, default=256, help="pixels; latents are image_size / 8")
    p.add_argument("--batch", type=int, default=2, help="images per sampling call")
    p.add_argument("--solvers", default="euler,heun2,dopri5,sde-euler",
                   help="ODE: torchdiffeq names (euler, heun2 = Heun, dopri5, ...); SDE: sde-euler, sde-heun")
    p.add_argument("--steps", default="10,25", help="step counts for the fixed-step solvers (grid points)")
    p.add_argument("--atol", type=float, default=1e-6, help="dopri5 absolute tolerance")
    p.add_argument("--rtol", type=float, default=1e-3, help="dopri5 relative tolerance")
    p.add_argument("--cfg-scales", default="1.0,4.0", help="1.0 = CFG off; >1 runs the doubled batch")
    p.add_argument("--ckpt-attn", default=None, help="state dict for the attn model (else random init)")
    p.add_argument("--ckpt-atconv", default=None, help="state dict for the atconv model (else random init)")
    p.add_argument("--reps", type=int, default=1, help="sampling calls per configuration (median)")
    p.add_argument("--compile", action="store_true", help="torch.compile (inductor) the model forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype of the model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write results as JSON here")
    return p.parse_args(argv)


class CountingModel(nn.Module):
    """Wraps model(x, t, y): counts calls (NFE) and rows, and applies autocast around the network."""

    def __init__(self, model: nn.Module, autocast):
        super().__init__()
        self.model, self.autocast, self.calls, self.rows = model, autocast, 0, 0

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        with self.autocast:
            return self.model(x, t, y).float()


def build_model(name: str, mixer: str, image_size: int, ckpt: str | None, device: torch.device) -> nn.Module:
    """A SiT in eval mode: checkpoint weights, or random with its zero-initialised layers woken up."""
    model = create_sit(name, mixer=mixer, input_size=image_size // 8)
    if ckpt:
        model.load_state_dict(load_tensors(ckpt))
    else:
        with torch.no_grad():
            for block in [*model.blocks, model.final_layer]:
                for p in block.adaLN_modulation.parameters():
                    p.normal_(0, 0.02)
            model.final_layer.linear.weight.normal_(0, 0.02)
    return model.to(device).eval()


def make_sampler(sampler: Sampler, solver: str, steps: int, args: argparse.Namespace):
    """The sampling function of one solver configuration."""
    if solver.startswith("sde-"):
        return sampler.sample_sde(sampling_method=solver[4:].capitalize(), num_steps=steps)
    return sampler.sample_ode(sampling_method=solver, num_steps=steps, atol=args.atol, rtol=args.rtol)


def configurations(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(solver, steps) pairs: every step count for fixed-step solvers; dopri5 once (2 output times)."""
    steps = [int(s) for s in args.steps.split(",") if s]
    return [(s, 2) if s == "dopri5" else (s, n) for s in args.solvers.split(",") if s
            for n in ([2] if s == "dopri5" else steps)]


def _time_sample(sample, model: Any, counted: CountingModel, z: Tensor, y: Tensor, device: torch.device) -> float:
    """Seconds for one sampling call; checks the sample is finite."""
    counted.calls = counted.rows = 0
    synchronize(device)
    start = time.perf_counter()
    out = sample(z, model, y=y)
    synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(out[-1]).all():
        raise RuntimeError("sampling produced non-finite values")
    return seconds


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (cfg, solver, steps) configuration, the mixers interleaved within each repetition."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    autocast = autocast_for(device, dtype)
    sampler = Sampler(create_transport())
    latent = args.image_size // 8
    counted = {}
    for mixer in [m for m in args.mixers.split(",") if m]:
        net = build_model(args.model, mixer, args.image_size, getattr(args, f"ckpt_{mixer}", None), device)
        counted[mixer] = CountingModel(torch.compile(net, dynamic=False) if args.compile else net, autocast)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    z = torch.randn(args.batch, 4, latent, latent, generator=gen).to(device)
    y = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    rows = []
    for scale in [float(s) for s in args.cfg_scales.split(",") if s]:
        models = {m: c if scale == 1.0 else CFGModel(c, scale=scale, num_classes=1000) for m, c in counted.items()}
        with torch.no_grad():
            for model in models.values():  # warm-up (and compile) at this batch size
                model(z, torch.full((args.batch,), 0.5, device=device), y)
        for solver, steps in configurations(args):
            sample = make_sampler(sampler, solver, steps, args)
            times: dict[str, list[float]] = {m: [] for m in models}
            for _ in range(args.reps):
                for mixer, model in models.items():
                    times[mixer].append(_time_sample(sample, model, counted[mixer], z, y, device))
            for mixer, ts in times.items():
                nfe, seconds = counted[mixer].calls, statistics.median(ts)
                rows.append({"mixer": mixer, "cfg": scale, "solver": solver,
                             "steps": steps if solver != "dopri5" else f"tol {args.atol:g}/{args.rtol:g}",
                             "nfe": nfe, "rows_per_nfe": counted[mixer].rows / max(nfe, 1), "seconds": seconds,
                             "min_seconds": min(ts), "images_per_s": args.batch / seconds,
                             "ms_per_nfe": 1e3 * seconds / max(nfe, 1)})
                print(f"  {mixer} cfg={scale} {solver} {steps}: {nfe} NFE, {seconds:.2f} s", file=sys.stderr,
                      flush=True)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """time(atconv) / time(attn) for the same configuration (same z, y, solver, steps)."""
    key = lambda r: (r["cfg"], r["solver"], r["steps"])  # noqa: E731
    attn = {key(r): r for r in rows if r["mixer"] == "attn"}
    for r in rows:
        if r["mixer"] != "attn" and key(r) in attn:
            r["x_attn_ms_per_nfe"] = r["ms_per_nfe"] / attn[key(r)]["ms_per_nfe"]
            r["x_attn_time"] = r["seconds"] / attn[key(r)]["seconds"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = environment(torch.device(args.device))
    print(f"# bench_sampling {args.model} on {env['device']} ({args.dtype}, {env['threads']} threads, "
          f"batch {args.batch}); load average before: {env['loadavg']}")
    rows = run(args)
    cols = ["mixer", "cfg", "solver", "steps", "nfe", "seconds", "images_per_s", "ms_per_nfe",
            "x_attn_ms_per_nfe", "x_attn_time"]
    print(format_table(rows, cols))
    env["loadavg_after"] = environment(torch.device(args.device))["loadavg"]
    write_json(args.out, {"command": " ".join(sys.argv), "args": vars(args), "environment": env, "rows": rows})


if __name__ == "__main__":
    main()

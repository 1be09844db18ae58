"""Quality against cost: one checkpoint over samplers, NFE budgets and CFG scales -> sweep.{json,md,png}.

    python -m sit_atconv.evaluation.sweep                   # the default digits run, 1000 samples a setting
    python -m sit_atconv.evaluation.sweep RUN --methods ode-euler sde-Heun --nfe 8 16 --cfg-scales 1
    accelerate launch -m sit_atconv.evaluation.sweep RUN --num-samples 10000 --ref VIRTUAL_imagenet256_labeled.npz

Each setting is one `evaluate()` call (eval_fid.py's generation and metrics) into its own folder
RUN/sweep/step<S>_<mode>-<method>-<grid>_cfg<c>[_rtol<r>]_n<N>_seed<seed>; a setting whose metrics.json
exists (scored against the same reference) is read back, not redone, so a killed sweep rerun continues.
Written to RUN/sweep: sweep.json (every row), sweep.md (a table) and sweep.png (FID against NFE, one line
per sampler and CFG scale).

NFE = network evaluations per image along its trajectory, counted while sampling (`ImageSampler.nfe`); a
CFG step is one forward on the doubled batch [cond, uncond] and counts once (about twice the compute of an
unguided evaluation). Fixed-step samplers get the grid whose NFE is nearest each --nfe target: ODE
euler = grid - 1, heun2/midpoint = 2 (grid - 1), rk4 = 4 (grid - 1); SDE Euler = grid - 1 and Heun =
2 (grid - 1), each + 1 for the final Mean step. Adaptive ODE solvers (dopri5) choose their own steps:
they run once per --rtols value and report the evaluations they made.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..build import run_dir_for
from ..checkpoint import load_checkpoint
from ..cli import CLIParser, finite_float, positive_int, run_cli
from ..config_io import config_from_dict, load_config
from ..errors import ConfigError
from ..io import atomic_write, write_text_atomic
from ..launch import process_state
from ..sampling import SamplingOptions
from ..transport import ADAPTIVE_ODE_METHODS, SDE_METHODS
from .run import DIGITS_NUM_SAMPLES, DIGITS_REFERENCE, NUM_SAMPLES, evaluate

DEFAULT_METHODS = ("ode-euler", "ode-heun2", "ode-dopri5", "sde-Euler", "sde-Heun")
DEFAULT_NFE = (8, 16, 32, 64)
DEFAULT_RTOLS = (1e-2, 1e-3)
EVALS_PER_STEP = {("ode", "euler"): 1, ("ode", "midpoint"): 2, ("ode", "heun2"): 2, ("ode", "heun3"): 3,
                  ("ode", "rk4"): 4, ("sde", "Euler"): 1, ("sde", "Heun"): 2}
NFE_DEFINITION = "network evaluations per image along its trajectory; a CFG pair [cond, uncond] counts once"
COLUMNS = ("fid", "precision", "recall", "kid", "is")


def parse_method(spec: str) -> tuple[str, str]:
    """'ode-euler' -> ('ode', 'euler'); one ConfigError line for anything the sweep cannot budget."""
    mode, _, method = spec.partition("-")
    if (mode, method) not in EVALS_PER_STEP and not (mode == "ode" and method in ADAPTIVE_ODE_METHODS):
        fixed = [f"{m}-{s}" for m, s in EVALS_PER_STEP]
        raise ConfigError(f"--methods {spec!r}: use MODE-METHOD, one of {', '.join(fixed)} or ode-<adaptive> "
                          f"({', '.join(ADAPTIVE_ODE_METHODS)})")
    return mode, method


def grid_for_nfe(mode: str, method: str, nfe: int, last_step: str | None = "Mean") -> int:
    """The grid size (SamplingOptions.num_steps, >= 2) whose NFE is nearest `nfe` for a fixed-step sampler."""
    final = 1 if mode == "sde" and last_step is not None else 0  # the SDE's noise-free last step
    return max(2, round((nfe - final) / EVALS_PER_STEP[(mode, method)]) + 1)


def sweep_settings(methods, nfes, cfg_scales, rtols) -> list[SamplingOptions]:
    """Every (sampler, budget, CFG) setting, each once, in table order."""
    out: dict[str, SamplingOptions] = {}
    for cfg in cfg_scales:
        for spec in methods:
            mode, method = parse_method(spec)
            if (mode, method) in EVALS_PER_STEP:
                options = [SamplingOptions(mode=mode, sampling_method=method, cfg_scale=float(cfg),
                                           num_steps=grid_for_nfe(mode, method, n)) for n in nfes]
            else:  # adaptive: the tolerance sets the cost; the grid is just the two end points
                options = [SamplingOptions(mode=mode, sampling_method=method, cfg_scale=float(cfg), num_steps=2,
                                           rtol=float(r)) for r in rtols]
            out.update({setting_name(o): o for o in options})
    return list(out.values())


def setting_name(opts: SamplingOptions) -> str:
    """The folder-name part that tells settings apart, e.g. ode-euler-9_cfg1 or ode-dopri5-2_cfg2_rtol0.01."""
    adaptive = opts.mode == "ode" and opts.sampling_method in ADAPTIVE_ODE_METHODS
    return opts.tag() + (f"_rtol{opts.rtol:g}" if adaptive else "")


def _row(opts: SamplingOptions, results: dict) -> dict:
    adaptive = opts.mode == "ode" and opts.sampling_method in ADAPTIVE_ODE_METHODS
    return {"sampler": f"{opts.mode}-{opts.sampling_method}", "cfg_scale": opts.cfg_scale,
            "num_steps": None if adaptive else opts.num_steps, "rtol": opts.rtol if adaptive else None,
            "nfe": results.get("nfe"), **{k: results.get(k) for k in COLUMNS}, "out_dir": results["out_dir"]}


def _target(ckpt, cfg_scales, rtols, methods) -> tuple[Path, int, Path, str, tuple]:
    """(checkpoint file, step, run folder, data source, CFG scales), checked before any sampling."""
    for spec in methods:
        parse_method(spec)
    if any(r <= 0 for r in rtols):
        raise ConfigError(f"--rtols {list(rtols)}: tolerances must be > 0")
    if ckpt is None and not (ckpt := run_dir_for(load_config())).exists():
        raise ConfigError(f"{ckpt}: the default digits run is not trained yet; run python train.py first, "
                          "or pass RUN.")
    state = load_checkpoint(ckpt)  # one file for every setting, even if training writes newer ones meanwhile
    cfg = config_from_dict(state["config"])
    conditional = cfg.model.num_classes > 1
    if cfg_scales is None:
        cfg_scales = (1.0, 2.0) if conditional else (1.0,)
    if not conditional and any(c != 1 for c in cfg_scales):
        raise ConfigError(f"--cfg-scales {list(cfg_scales)}: {state['path']} is unconditional; use 1")
    return state["path"], int(state["step"]), state["path"].parent.parent, cfg.data.source, tuple(cfg_scales)


def sweep(ckpt: str | Path | None = None, *, methods=DEFAULT_METHODS, nfes=DEFAULT_NFE, cfg_scales=None,
          rtols=DEFAULT_RTOLS, num_samples: int | None = None, seed: int = 0, batch_size: int = 64, ref=None,
          inception_weights=None, use_ema: bool = True, out_dir: str | Path | None = None, state=None,
          show_progress: bool = True) -> dict | None:
    """Evaluate every setting (reading finished ones back) and write the sweep files; the summary on the
    main process, None elsewhere. cfg_scales None: (1, 2) for a class-conditional model, (1,) otherwise."""
    if not (methods and nfes and rtols):
        raise ConfigError("the sweep needs at least one --methods, --nfe and --rtols value")
    state = state or process_state()
    path, step, run_dir, source, cfg_scales = _target(ckpt, cfg_scales, rtols, methods)
    if num_samples is None:
        num_samples = DIGITS_NUM_SAMPLES if source == "digits" else NUM_SAMPLES
    root, rows, last = Path(out_dir or run_dir / "sweep"), [], None
    settings, reference = sweep_settings(methods, nfes, cfg_scales, rtols), str(ref) if ref else DIGITS_REFERENCE
    bar = tqdm(settings, desc="sweep", unit="setting", disable=not (show_progress and state.is_main_process))
    for opts in bar:
        bar.set_postfix_str(setting_name(opts))
        folder = root / f"step{step:07d}_{setting_name(opts)}_n{num_samples}_seed{seed}{'' if use_ema else '_raw'}"
        done = folder / "metrics.json"
        earlier = json.loads(done.read_text()) if done.is_file() else {}
        results = earlier if earlier.get("reference") == reference else evaluate(  # else: scored anew
            ckpt=path, ref=ref, inception_weights=inception_weights, num_samples=num_samples, seed=seed,
            batch_size=batch_size, out_dir=folder, opts=opts, use_ema=use_ema, state=state, show_progress=False)
        if results is not None:  # the main process
            rows.append(_row(opts, results))
            last = results
    if not state.is_main_process:
        return None
    summary = {"checkpoint": str(path), "step": step, "num_samples": num_samples, "seed": seed, "ema": use_ema,
               "feature_extractor": last["feature_extractor"], "reference": last["reference"],
               **{k: last[k] for k in ("fid_floor", "precision_floor", "recall_floor") if k in last},
               "nfe_definition": NFE_DEFINITION, "out_dir": str(root), "rows": rows}
    write_text_atomic(root / "sweep.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(root / "sweep.md", format_sweep(summary))
    plot_sweep(summary, root / "sweep.png")
    return summary


def _num(value, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.{digits}g}"


def format_sweep(summary: dict) -> str:
    """A Markdown table: one row per setting, ordered by CFG scale, sampler and NFE."""
    floors = ", ".join(f"{k} {summary[k]:.3g}" for k in ("fid_floor", "precision_floor", "recall_floor")
                       if k in summary)
    lines = [f"Step {summary['step']} of `{summary['checkpoint']}`: {summary['num_samples']} samples per setting, "
             f"features `{summary['feature_extractor']}` vs {summary['reference']}"
             + (f" (real data: {floors})." if floors else "."), "",
             f"NFE: {summary['nfe_definition']}.", "",
             "| sampler | CFG | grid / rtol | NFE | FID | precision | recall |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(summary["rows"], key=lambda r: (r["cfg_scale"], r["sampler"], r["nfe"] or 0)):
        grid = f"rtol {r['rtol']:g}" if r["rtol"] is not None else str(r["num_steps"])
        lines.append(f"| {r['sampler']} | {r['cfg_scale']:g} | {grid} | {_num(r['nfe'])} | {_num(r['fid'], 4)} | "
                     f"{_num(r['precision'])} | {_num(r['recall'])} |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: dict, path: str | Path) -> Path:
    """FID against NFE (log-log), one line per sampler and CFG scale, the real-data FID floor dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    samplers = sorted({r["sampler"] for r in summary["rows"]})
    colours = {s: f"C{i % 10}" for i, s in enumerate(samplers)}
    for (sampler, cfg) in sorted({(r["sampler"], r["cfg_scale"]) for r in summary["rows"]}):
        points = sorted((r["nfe"], r["fid"]) for r in summary["rows"] if (r["sampler"], r["cfg_scale"]) ==
                        (sampler, cfg) and r["nfe"] is not None and r["fid"] is not None)
        ax.plot(*zip(*points), marker="o", color=colours[sampler], linestyle="-" if cfg == 1 else "--",
                label=f"{sampler}, CFG {cfg:g}")
    if summary.get("fid_floor") is not None:
        ax.axhline(summary["fid_floor"], color="grey", linestyle=":", label="real-data floor")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 8, 16, 32 rather than 2^3, 2^4, 2^5
    if all(r["fid"] and r["fid"] > 0 for r in summary["rows"]):
        ax.set_yscale("log")
    ax.set(xlabel="NFE (network evaluations per image)", ylabel=f"FID ({summary['feature_extractor']})",
           title=f"quality against cost, step {summary['step']}, {summary['num_samples']} samples")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def parser() -> CLIParser:
    p = CLIParser(__doc__)
    add = p.add_argument
    add("ckpt", nargs="?", metavar="RUN", help="run folder or checkpoint (default: the default config's run)")
    add("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="MODE-METHOD",
        help=f"samplers (default: {' '.join(DEFAULT_METHODS)}); SDE methods: {', '.join(SDE_METHODS)}")
    add("--nfe", nargs="+", type=positive_int, default=list(DEFAULT_NFE), metavar="N",
        help=f"NFE targets of fixed-step samplers (default: {' '.join(map(str, DEFAULT_NFE))})")
    add("--rtols", nargs="+", type=finite_float, default=list(DEFAULT_RTOLS), metavar="TOL",
        help=f"relative tolerances of adaptive ODE samplers (default: {' '.join(map(str, DEFAULT_RTOLS))})")
    add("--cfg-scales", nargs="+", type=finite_float, metavar="S",
        help="guidance scales (default: 1 2; 1 if unconditional)")
    add("--num-samples", type=positive_int, help="images per setting (default: 1000 for digits, else 50000)")
    add("--seed", type=int, default=0, help="base seed; image i uses (seed, i) in every setting")
    add("--batch-size", type=positive_int, default=64, help="images per sampler call, per process")
    add("--ref", type=Path, metavar="PATH", help="reference for Inception metrics (as eval_fid.py --ref)")
    add("--inception-weights", type=Path, metavar="PATH", help="local torch-fidelity Inception weights")
    add("--out-dir", type=Path, metavar="DIR", help="folder of the settings and sweep files (default: RUN/sweep)")
    add("--raw", action="store_true", help="use the raw (non-EMA) weights")
    return p


def body(args) -> int:
    summary = sweep(args.ckpt, methods=args.methods, nfes=args.nfe, cfg_scales=args.cfg_scales, rtols=args.rtols,
                    num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size, ref=args.ref,
                    inception_weights=args.inception_weights, use_ema=not args.raw, out_dir=args.out_dir)
    if summary is not None:
        print(format_sweep(summary))
        print(f"wrote {Path(summary['out_dir']) / 'sweep.md'} (.json, .png)")
    return 0


def main(argv=None) -> int:
    return run_cli(parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main())

"""A finished study's numbers, read back from its cells' own files, and the reports made of them.

Every number comes from the cell folders, read afresh each time a report is written: FID / precision /
recall from `<cell>/eval/study_step<S>/metrics.json`, train seconds from `<cell>/metrics.jsonl`, parameters
and sampling speed from `<cell>/study_cell.json`. Nothing is cached in the study's own files, so a report
always says what the cells hold. Writes OUT/results.json, OUT/results.md and the PNG plots.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import list_checkpoints
from ..io import write_text_atomic
from ..train.plots import read_log
from .budget import cumulative_seconds, seconds_at
from .plots import plot_fid, plot_loss
from .stats import (
    EVAL_FIELDS,
    STD_NOTE,
    aggregate,
    curves,
    differences_along,
    format_differences,
    format_differences_along,
    format_table,
    paired_differences,
    transfer_fields,
)

FORMAT = "sit_atconv.study/1"
STUDY_FILE = "study.json"  # OUT/study.json: the study's settings (a rerun must match), calibration and plan
CELL_FILE = "study_cell.json"  # <cell>/study_cell.json: written last, so its presence marks a finished cell
SAMPLING_NOTE = ("sampling img/s: one timed batch (after one warm-up batch) drawn end to end with the cell's own "
                 "sampler settings and EMA weights at its final checkpoint, on the main process's device")
TIME_NOTE = ("train s: the cell's measured training wall-clock (from its metrics.jsonl: each log interval's steps / "
             "its steps/s; evaluation excluded); step ms = train s / steps")


TRANSFER_NOTE = ("FID @S px (resolution transfer): the final checkpoint sampled at S px, i.e. on another token grid "
                 "(ATConv as trained; attention/hybrid with the sin-cos position embedding recomputed for that grid), "
                 "scored after resizing back to the feature extractor's side (digits: 16 px, bilinear, antialiased)")


def eval_dir(run_dir: Path, step: int, image_size: int | None = None) -> Path:
    """Where the study evaluates a cell's checkpoint of `step` (sampled at `image_size` px: a transfer run)."""
    return run_dir / "eval" / (f"study_step{step}" if image_size is None else f"study_step{step}_{image_size}px")


def transfer_record(run_dir: Path, step: int, image_size: int) -> dict:
    """The evaluation of `step` sampled at `image_size` px, from its metrics.json (numbers None if absent)."""
    path = eval_dir(run_dir, step, image_size) / "metrics.json"
    metrics = read_json(path) if path.is_file() else {}
    return {"image_size": image_size, "step": step, "resized_to": metrics.get("resized_to"),
            **{k: metrics.get(k) for k in EVAL_FIELDS}, "metrics": str(path)}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def cell_record(run_dir: Path, plan_row: dict, transfer_sizes: Sequence[int] = ()) -> dict:
    """One finished cell's numbers, from its own files (see the module docstring); `transfer` holds its final
    checkpoint's evaluations at `transfer_sizes`."""
    meta = read_json(run_dir / CELL_FILE)
    cumulative = cumulative_seconds(read_log(run_dir / "metrics.jsonl"))
    found = list_checkpoints(run_dir)
    steps = found[-1][0] if found else 0
    train_seconds = seconds_at(steps, cumulative)
    evals = []
    for step in plan_row["eval_steps"]:
        path = eval_dir(run_dir, step) / "metrics.json"
        metrics = read_json(path)
        evals.append({"step": step, "train_seconds": seconds_at(step, cumulative),
                      **{k: metrics.get(k) for k in EVAL_FIELDS}, "metrics": str(path)})
    return {"mixer": meta["mixer"], "seed": meta["seed"], "run_dir": str(run_dir), "params": meta["params"],
            "max_steps": plan_row["max_steps"], "steps": steps,
            "planned_train_seconds": plan_row["planned_train_seconds"], "train_seconds": train_seconds,
            "step_ms": None if train_seconds is None or not steps else 1000 * train_seconds / steps,
            "sampling_images_per_sec": meta["sampling_images_per_sec"], "sampling": meta["sampling"],
            "device": meta["device"], "evals": evals,
            "transfer": [transfer_record(run_dir, plan_row["max_steps"], size) for size in transfer_sizes]}


def _markdown(study: dict, table: str, plots: Sequence[str], notes: Sequence[str]) -> str:
    """results.md: what was compared, the table, and how each number was made."""
    s = study["settings"]
    budget = (f"equal steps (train.max_steps = {study['plan'][s['mixers'][0]]['max_steps']})"
              if s["budget"]["kind"] == "steps" else f"equal wall-clock: {s['budget']['seconds']:g} s of training "
              "per cell, planned as floor(seconds x calibrated steps/s) steps per mixer")
    calibration = "".join(f"\n- calibration {m}: {c['steps_per_sec']:.4g} steps/s on {c['device']} "
                          f"({c['processes']} process(es))" for m, c in study.get("calibration", {}).items())
    return (f"# Mixer study: {', '.join(s['mixers'])} x {s['seeds']} seeds\n\n"
            f"- config: {study['config_source']} {' '.join(study['overrides'])}\n- budget: {budget}{calibration}\n"
            f"- FID / precision / recall at the final step, {s['num_samples']} samples (sampling seed "
            f"{s['eval_seed']}); mean ± {STD_NOTE}\n\n{table}\n\n" + "".join(f"- {n}\n" for n in notes) + "\n"
            + "".join(f"![{p}]({p})\n" for p in plots))


def write_report(out: Path, study: dict, cells: Sequence[dict]) -> tuple[dict, str]:
    """Write results.json, results.md and the plots for `cells` (records of `cell_record`); (results, table)."""
    mixers = study["settings"]["mixers"]
    summary, fid_curves = aggregate(cells, mixers), curves(cells, mixers)
    differences = {key: paired_differences(cells, mixers, key) for key in ("fid", *transfer_fields(cells))}
    along = differences_along(cells, mixers)
    notes = [TIME_NOTE, SAMPLING_NOTE] + ([TRANSFER_NOTE] if any(c.get("transfer") for c in cells) else [])
    results = {"format": FORMAT, "study": study, "std": STD_NOTE, "notes": notes,
               "summary": summary, "differences": differences,
               "differences_along": {str(step): row for step, row in along.items()}, "curves": fid_curves,
               "cells": list(cells)}
    write_text_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    made = [plot_fid(cells, fid_curves, mixers, "step", out / "fid_vs_steps.png"),
            plot_fid(cells, fid_curves, mixers, "train_seconds", out / "fid_vs_seconds.png"),
            plot_loss(cells, mixers, out / "loss.png")]
    table = format_table(summary, mixers)
    compared = "\n".join(line for d in differences.values() if (line := format_differences(d)))
    table += f"\n\n{compared}" if compared else ""
    along_table = format_differences_along(along, mixers)
    table += f"\n\nPaired FID differences along the run (mean ± std over seeds [95 % t-interval]):\n\n{along_table}" \
        if along_table else ""
    write_text_atomic(out / "results.md", _markdown(study, table, [p.name for p in made if p is not None], notes))
    return results, table

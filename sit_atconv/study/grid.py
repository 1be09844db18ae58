"""The grid of a study and its run / skip / resume logic.

Cells are ordinary run folders OUT/<mixer>-seed<k>/ (sample.py and eval_fid.py work on them): `--config` plus
the `--set` overrides, with model.mixer and train.seed set per cell. They run seed by seed (every mixer of
seed 0, then of seed 1, ...), so an early stop still compares every mixer. A cell trains to its planned
steps (resuming from its newest checkpoint), keeps the checkpoints of its evaluated steps (log.keep_every =
the evaluation interval), evaluates each into <cell>/eval/study_step<S>/ (skipped once its metrics.json
exists), times one sampling batch, and writes <cell>/study_cell.json last: a cell with that file is finished
and never touched again (except that `transfer_sizes`, evaluations of the final checkpoint at other pixel sides,
are added to it when asked for later: they are not part of the settings). OUT/study.json records the settings; a
rerun with other settings is refused.

Under `accelerate launch` every process runs the same cells in the same order (training and sampling are
distributed); the main process decides what is left to do, tells the others, and alone writes study files.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from accelerate import PartialState

from ..checkpoint import checkpoint_path, list_checkpoints
from ..config import RunConfig, config_to_dict, validate
from ..config_io import DEFAULT_CONFIG, load_config
from ..errors import ConfigError, RunError
from ..evaluation import evaluate
from ..evaluation.generate import run_on_main
from ..io import write_text_atomic
from ..launch import process_state
from ..models.sit import MIXERS
from ..train import train
from .budget import Budget, checkpoint_interval, eval_interval, eval_steps, plan_steps
from .measure import SAMPLING_BATCH, calibrate, device_name, sampling_speed
from .report import CELL_FILE, FORMAT, STUDY_FILE, cell_record, eval_dir, read_json, write_report

NUM_SAMPLES = 1000  # the digits protocol's sample count (eval_fid's default for digits runs)
STUDY_KEYS = {"model.mixer": "--mixers", "train.seed": "--seeds", "log.results_dir": "--out",
              "log.run_name": "--out (cells are named <mixer>-seed<k>)", "train.resume": "rerunning the study",
              "log.keep_every": "--eval-every (the evaluated steps are kept)"}  # set by the study, per cell


@dataclass
class StudySpec:
    """What to compare and how; `seeds` counts the training seeds 0 .. seeds-1."""

    out: Path
    config: str = DEFAULT_CONFIG
    overrides: list[str] = field(default_factory=list)
    mixers: list[str] = field(default_factory=lambda: list(MIXERS))
    seeds: int = 3
    budget: Budget = field(default_factory=Budget)
    eval_every: int | None = None
    num_samples: int = NUM_SAMPLES
    ref: str | None = None
    eval_seed: int = 0
    sampling_batch: int = SAMPLING_BATCH
    show_progress: bool = True
    transfer_sizes: list[int] = field(default_factory=list)  # also evaluate the final checkpoint at these sides


@dataclass(frozen=True)
class Cell:
    mixer: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.mixer}-seed{self.seed}"


def grid_cells(spec: StudySpec) -> list[Cell]:
    """Every (mixer, seed), seed by seed."""
    return [Cell(m, s) for s in range(spec.seeds) for m in spec.mixers]


def _given_keys(overrides: list[str]) -> set[str]:
    return {item.partition("=")[0].strip().lstrip("-") for item in overrides}


def base_config(spec: StudySpec) -> RunConfig:
    """The config every cell shares (`--config` + `--set`), refusing settings that the study owns."""
    given = _given_keys(spec.overrides)
    for key, owner in STUDY_KEYS.items():
        if key in given:
            raise ConfigError(f"--set {key}: the study sets it per cell; use {owner}")
    if spec.budget.seconds is not None and "train.max_steps" in given:
        raise ConfigError("--set train.max_steps: a seconds budget plans each mixer's steps; drop it, or use "
                          "--budget steps")
    bad = sorted(set(spec.mixers) - set(MIXERS))
    if bad or len(set(spec.mixers)) != len(spec.mixers) or not spec.mixers:
        raise ConfigError(f"--mixers {' '.join(spec.mixers)}: name each of {', '.join(MIXERS)} at most once")
    if spec.seeds < 1 or spec.num_samples < 1 or spec.sampling_batch < 1 or (spec.eval_every or 1) < 1:
        raise ConfigError("--seeds, --num-samples and --eval-every must be positive integers")
    cfg = load_config(spec.config, [*spec.overrides, f"log.results_dir={spec.out}"])
    if cfg.train.task != "diffusion":
        raise ConfigError(f"{spec.config} trains a {cfg.train.task} model; the study compares SiT token mixers: "
                          "pick a diffusion config such as digits")
    _check_transfer_sizes(spec.transfer_sizes, cfg)
    return cfg


def _check_transfer_sizes(sizes: list[int], cfg: RunConfig) -> None:
    """Refuse, before any training, --transfer-sizes the cells cannot be sampled at: the trained side itself, or
    a side that is not a multiple of patch x autoencoder factor (the factor: data.image_size / model.input_size)."""
    trained, patch = cfg.data.image_size, cfg.model.architecture()["patch_size"]
    step = patch * max(1, trained // cfg.model.input_size)
    bad = [s for s in sizes if s == trained or s < 1 or s % step]
    if bad or len(set(sizes)) != len(sizes):
        raise ConfigError(f"--transfer-sizes {' '.join(map(str, sizes))}: give distinct pixel sides, multiples of "
                          f"{step} (patch x autoencoder factor), other than the trained {trained}")


def settings(spec: StudySpec, base: RunConfig) -> dict:
    """What makes two studies the same: the resolved shared config (less what the study sets per cell), the
    grid, the budget and the evaluation protocol."""
    config = config_to_dict(base)
    for key in STUDY_KEYS:
        section, name = key.split(".")
        config[section].pop(name)
    record = {"config": config, "mixers": spec.mixers, "seeds": spec.seeds, "budget": spec.budget.record(),
              "eval_every": spec.eval_every, "num_samples": spec.num_samples, "ref": spec.ref,
              "eval_seed": spec.eval_seed, "sampling_batch": spec.sampling_batch}
    return json.loads(json.dumps(record))  # tuples -> lists, as a reloaded study.json has them


def first_difference(saved: Any, wanted: Any, where: str = "") -> str | None:
    """'key: saved A, asked B' for the first place two settings records differ, or None."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for key in [*saved, *(k for k in wanted if k not in saved)]:
            found = first_difference(saved.get(key), wanted.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if saved == wanted else f"{where}: saved {saved!r}, asked {wanted!r}"


def _started(out: Path, saved: dict) -> bool:
    """Whether any cell of the saved study has a folder yet (until then its settings may still change)."""
    return any((out / Cell(m, k).name).exists() for m in saved.get("mixers", []) for k in range(saved.get("seeds", 0)))


def open_study(spec: StudySpec, base: RunConfig) -> dict:
    """OUT/study.json: created for a new study, or read back when its settings are the asked ones.

    Another study's folder is refused once any of its cells has started; before that its settings are replaced
    (keeping the speed calibration when the shared config is the same), so e.g. a seconds budget found too short
    by the calibration can be raised in place.
    """
    path, wanted = spec.out / STUDY_FILE, settings(spec, base)
    calibration = {}
    if path.is_file():
        study = read_json(path)
        difference = first_difference(study.get("settings"), wanted)
        if not difference:
            return study
        if _started(spec.out, study.get("settings", {})):
            raise RunError(f"{spec.out} holds another study ({difference}); pass another --out, or repeat its "
                           f"settings (see {path}): refusing to mix studies")
        print(f"{spec.out}: no cell has started, so its settings are replaced ({difference})", flush=True)
        if study["settings"].get("config") == wanted["config"]:
            calibration = study.get("calibration", {})
    elif spec.out.is_dir() and any(spec.out.iterdir()):
        raise RunError(f"{spec.out} holds files but no {STUDY_FILE}; pass a new or empty --out")
    study = {"format": FORMAT, "config_source": spec.config, "overrides": spec.overrides, "settings": wanted,
             "calibration": calibration, "plan": {}}
    write_text_atomic(path, json.dumps(study, indent=2) + "\n")
    return study


def say(state: PartialState, line: str) -> None:
    if state.is_main_process:
        print(line, flush=True)


def _save_study(spec: StudySpec, study: dict) -> dict:
    write_text_atomic(spec.out / STUDY_FILE, json.dumps(study, indent=2) + "\n")
    return study


def calibrated(spec: StudySpec, base: RunConfig, study: dict, state: PartialState) -> dict:
    """The study record with every mixer's training speed (equal-seconds budgets): measured once, then stored."""
    for mixer in spec.mixers:
        if spec.budget.seconds is None or mixer in study["calibration"]:
            continue
        say(state, f"calibrating {mixer}: training speed over a short timed run in {spec.out / 'calibration'}")
        result = calibrate(base, mixer, 0, spec.out, state)
        study = run_on_main(state, partial(_save_study, spec, {**study, "calibration": {**study["calibration"],
                                                                                     mixer: result}}))
        say(state, f"calibrated {mixer}: {study['calibration'][mixer]['steps_per_sec']:.4g} steps/s")
    return study


def make_plan(spec: StudySpec, base: RunConfig, calibration: dict) -> dict[str, dict]:
    """{mixer: max_steps, eval_every, eval_steps, ckpt_every, planned_train_seconds}."""
    plan = {}
    for mixer, max_steps in plan_steps(spec.budget, base.train.max_steps, calibration, spec.mixers).items():
        interval = eval_interval(max_steps, spec.eval_every)
        every = checkpoint_interval(base.log.ckpt_every, interval)
        if every != base.log.ckpt_every and "log.ckpt_every" in _given_keys(spec.overrides):
            raise ConfigError(f"--set log.ckpt_every={base.log.ckpt_every} does not divide the evaluation interval "
                              f"{interval} of {mixer}; pick a divisor of it, or drop it")
        rate = calibration.get(mixer, {}).get("steps_per_sec")
        plan[mixer] = {"max_steps": max_steps, "eval_every": interval, "eval_steps": eval_steps(max_steps, interval),
                       "ckpt_every": every, "planned_train_seconds": max_steps / rate if rate else None}
    return plan


def cell_config(spec: StudySpec, base: RunConfig, cell: Cell, row: dict) -> RunConfig:
    """The run config of one cell: the shared config with its mixer, seed, folder and planned steps."""
    cfg = copy.deepcopy(base)
    cfg.model.mixer, cfg.train.seed, cfg.train.resume = cell.mixer, cell.seed, "auto"
    cfg.train.max_steps = row["max_steps"]
    cfg.log.results_dir, cfg.log.run_name = str(spec.out), cell.name
    cfg.log.ckpt_every, cfg.log.keep_every = row["ckpt_every"], row["eval_every"]
    return validate(cfg)


def _progress(run_dir: Path) -> tuple[bool, int]:
    """(finished, newest checkpoint step) of a cell folder."""
    found = list_checkpoints(run_dir)
    return (run_dir / CELL_FILE).is_file(), found[-1][0] if found else 0


def _needs_evaluation(run_dir: Path, step: int, image_size: int | None = None) -> bool:
    """True when the checkpoint of `step` has no study evaluation (at `image_size`) yet (refusing a checkpoint
    that is gone)."""
    if (eval_dir(run_dir, step, image_size) / "metrics.json").is_file():
        return False
    if not checkpoint_path(run_dir, step).is_file():
        raise RunError(f"{checkpoint_path(run_dir, step)} is missing: the study evaluates the checkpoints it kept; "
                       f"restore it, or move {run_dir} away to redo that cell")
    return True


def run_cell(spec: StudySpec, base: RunConfig, cell: Cell, row: dict, label: str, state: PartialState) -> None:
    """Train (or resume), evaluate and time one cell; a finished cell is skipped."""
    run_dir = spec.out / cell.name
    finished, step = run_on_main(state, lambda: _progress(run_dir))
    if finished:
        say(state, f"{label} finished, skipped")
        evaluate_transfer(spec, run_dir, row["max_steps"], label, state)  # sizes asked for after it finished
        return
    if step < row["max_steps"]:
        say(state, f"{label} training to step {row['max_steps']} " + (f"(resuming from step {step})" if step
                                                                       else "(new)"))
        train(cell_config(spec, base, cell, row))
        _, step = run_on_main(state, lambda: _progress(run_dir))
        if step < row["max_steps"]:
            raise RunError(f"{run_dir} stopped at step {step} of {row['max_steps']}; rerun the same command to "
                           "continue the study")
    for s in row["eval_steps"]:
        if run_on_main(state, partial(_needs_evaluation, run_dir, s)):
            say(state, f"{label} evaluating step {s} ({spec.num_samples} samples)")
            evaluate(ckpt=checkpoint_path(run_dir, s), out_dir=eval_dir(run_dir, s), num_samples=spec.num_samples,
                     seed=spec.eval_seed, ref=spec.ref, show_progress=spec.show_progress)
    evaluate_transfer(spec, run_dir, row["max_steps"], label, state)
    say(state, f"{label} timing sampling ({spec.sampling_batch} images)")
    speed = sampling_speed(checkpoint_path(run_dir, row["max_steps"]), state.device, spec.sampling_batch,
                           spec.eval_seed)
    record = {"mixer": cell.mixer, "seed": cell.seed, **row, **speed, "device": device_name(state)}
    run_on_main(state, lambda: write_text_atomic(run_dir / CELL_FILE, json.dumps(record, indent=2) + "\n"))
    say(state, f"{label} done")


def evaluate_transfer(spec: StudySpec, run_dir: Path, step: int, label: str, state: PartialState) -> None:
    """Evaluate the checkpoint of `step` sampled at each of `spec.transfer_sizes` (resolution transfer, scored
    after resizing back to the extractor's side) into <cell>/eval/study_step<S>_<size>px/, once each."""
    for size in spec.transfer_sizes:
        if run_on_main(state, partial(_needs_evaluation, run_dir, step, size)):
            say(state, f"{label} evaluating step {step} sampled at {size} px ({spec.num_samples} samples)")
            evaluate(ckpt=checkpoint_path(run_dir, step), out_dir=eval_dir(run_dir, step, size),
                     num_samples=spec.num_samples, seed=spec.eval_seed, ref=spec.ref,
                     show_progress=spec.show_progress, image_size=size)


def run_study(spec: StudySpec) -> tuple[dict, str] | None:
    """Run (or continue) the study; (results, table) on the main process, None elsewhere."""
    state = process_state()
    base = base_config(spec)
    study = calibrated(spec, base, run_on_main(state, lambda: open_study(spec, base)), state)
    plan = make_plan(spec, base, study["calibration"])
    study = run_on_main(state, lambda: _save_study(spec, {**study, "plan": plan}))
    cells = grid_cells(spec)
    for i, cell in enumerate(cells, 1):
        run_cell(spec, base, cell, plan[cell.mixer], f"[{i}/{len(cells)}] {cell.name}:", state)
    if not state.is_main_process:
        return None
    return write_report(spec.out, study, [cell_record(spec.out / c.name, plan[c.mixer], spec.transfer_sizes)
                                          for c in cells])

"""Checkpoint -> samples (sharded, distributed) -> features -> metrics.json: the body of `eval_fid.py`.

Feature extractor per number (stored as `feature_extractor`): with `--ref`, torch-fidelity's TF-compatible
InceptionV3 (`inception-v3-compat`: FID, sFID, IS, KID, precision/recall, ADM protocol); without it, the
digits classifier (`digits-attnet`: FID, IS, KID, precision/recall against the 359 held-out digits, plus
`fid_floor` = FID of the 1,438 training digits against the same held-out digits, the best a model of the
training data can expect; `precision_floor` / `recall_floor` likewise: the real data's own precision and
recall). Generation runs on every process; metrics on the main process only. Beside metrics.json:
`samples_grid.png`, a few of the scored images (one row per class when the labels are known), and `nfe`, the
network evaluations per image the sampler made (see `ImageSampler.nfe`).

Resolution transfer (`image_size`): samples are drawn at another pixel side (the SiT on another token grid,
`ImageSampler.at_image_size`) and scored as they are; the digits extractor resizes them back to its 16 px
(bilinear, antialiased: `digits_features.preprocess`). metrics.json records `image_size` (the side drawn) and
`resized_to` (the side the digits extractor scored; None when no resize; Inception resizes everything to 299).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState

from ..build import load_run, run_dir_for
from ..config_io import load_config
from ..errors import ConfigError, GenerationError
from ..io import write_text_atomic
from ..launch import process_state
from ..metrics import INCEPTION_NAME, Images, InceptionV3Features, check_reference, compute_metrics, load_reference
from ..sampling import SamplingOptions, row_labels, save_grid
from .digits_features import IMAGE_SIZE as DIGITS_SIDE
from .digits_features import DigitsFeatures, digits_uint8
from .generate import generate_samples, run_on_main

DIGITS_NUM_SAMPLES = 1000  # digits default N: ~1 min of sampling on 2 CPU cores
NUM_SAMPLES = 50_000  # FID-50K (ADM protocol) for every other run
EXTRACTORS = ("auto", "inception", "digits")
DIGITS_REFERENCE = "held-out digits"
ROWS = ("fid", "fid_floor", "sfid", "is", "kid", "precision", "precision_floor", "recall", "recall_floor", "nfe")
GRID_CLASSES, GRID_PER_CLASS = 10, 8  # samples_grid.png: up to 10 rows (classes) of 8


def _metrics_only_dir(samples: Path) -> Path:
    return samples.parent / f"{samples.stem if samples.is_file() else samples.name}_eval"


def _extractor_kind(extractor: str, ref, metrics, inception_weights) -> str:
    """'inception' or 'digits', refusing combinations that cannot be scored."""
    if extractor not in EXTRACTORS:
        raise ConfigError(f"--extractor must be one of {EXTRACTORS}; got {extractor!r}.")
    kind = extractor if extractor != "auto" else ("inception" if ref else "digits")
    if kind == "inception" and ref is None:
        raise ConfigError("Inception metrics need a reference: pass --ref (ADM batch .npz, folder or stats).")
    if kind == "digits" and metrics and "sfid" in metrics:
        raise ConfigError("sfid needs Inception spatial features: pass --ref, or drop sfid from --metrics.")
    if inception_weights is not None and kind != "inception":
        raise ConfigError("--inception-weights applies to the Inception extractor: pass --ref too.")
    if ref is not None and not Path(ref).exists():
        raise ConfigError(f"{ref}: no such reference .npz file or image folder.")
    if ref is not None:
        check_reference(ref)  # before any sampling: a wrong file fails in seconds, not after 50k samples
    return kind


def _load_for_generation(ckpt, kind: str, ref, num_samples: int | None, seed: int, out_dir, opts: SamplingOptions,
                         use_ema: bool, device, image_size: int | None = None):
    """(loaded run, sampler, resolved options, N, output folder, report info, image_size) for a sampling
    request; an `image_size` other than the trained side draws there (folder suffix _<S>px), the trained side
    itself is the ordinary set (image_size None)."""
    if ckpt is None and not (ckpt := run_dir_for(load_config())).exists():
        raise ConfigError(f"{ckpt}: the default digits run is not trained yet; run python train.py first, "
                          "or pass --ckpt RUN.")
    run = load_run(ckpt, device, use_ema=use_ema)
    if kind == "digits" and ref is None and run.cfg.data.source != "digits":
        raise ConfigError(f"{run.path} is not a digits run: pass --ref (an ADM reference batch such as "
                          "VIRTUAL_imagenet256_labeled.npz) for Inception metrics.")
    if num_samples is None:
        num_samples = DIGITS_NUM_SAMPLES if run.cfg.data.source == "digits" else NUM_SAMPLES
    resolved = opts.resolved(run.cfg.transport)
    sampler = run.sampler()
    if image_size == sampler.image_size:
        image_size = None  # the trained side: the ordinary set
    sampler = sampler if image_size is None else sampler.at_image_size(image_size)
    size = "" if image_size is None else f"_{image_size}px"
    out_dir = Path(out_dir or run.run_dir / "eval" /
                   f"step{run.step:07d}_{resolved.tag()}_n{num_samples}_seed{seed}{size}")
    resized = DIGITS_SIDE if kind == "digits" and sampler.image_size != DIGITS_SIDE else None
    info = {"checkpoint": str(run.path), "step": run.step, "ema": use_ema, "seed": seed, "sampler": asdict(resolved),
            "image_size": sampler.image_size, "resized_to": resized}
    return run, sampler, resolved, num_samples, out_dir, info, image_size


def evaluate(*, ckpt: str | Path | None = None, samples: str | Path | None = None,
             ref: str | Path | None = None, extractor: str = "auto",
             inception_weights: str | Path | None = None, num_samples: int | None = None, seed: int = 0,
             batch_size: int = 64, out_dir: str | Path | None = None, opts: SamplingOptions | None = None,
             use_ema: bool = True, png: bool = False, metrics: Sequence[str] | None = None,
             state: PartialState | None = None, show_progress: bool = True,
             image_size: int | None = None) -> dict | None:
    """Generate (unless `samples` is given) and score; the results dict on the main process, else None.

    `metrics`: a subset of fid, sfid, is, kid, precision, recall (None: all the extractor supports).
    `image_size`: sample at this pixel side (resolution transfer, see the module docstring).
    """
    state = state or process_state()
    kind = _extractor_kind(extractor, ref, metrics, inception_weights)
    if samples is not None and (ckpt or num_samples is not None or png or image_size):
        raise ConfigError("--samples scores existing images: drop --ckpt, --num-samples, --image-size and --png.")
    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--num-samples must be a positive integer, got {num_samples}.")
    info: dict = {}
    if samples is None:
        run, sampler, resolved, num_samples, out_dir, info, image_size = _load_for_generation(
            ckpt, kind, ref, num_samples, seed, out_dir, opts or SamplingOptions(), use_ema, state.device, image_size)
    else:
        samples = Path(samples)
        if not samples.exists():
            raise ConfigError(f"{samples}: no such .npz file or image folder.")
        out_dir = Path(out_dir or _metrics_only_dir(samples))
    device = state.device
    features = {}

    def build() -> str:  # before any sampling: missing Inception weights fail at once
        features["x"] = (InceptionV3Features(inception_weights, device=device) if kind == "inception"
                         else DigitsFeatures(device=device))
        return features["x"].name

    name = run_on_main(state, build)
    if samples is None:
        samples = generate_samples(sampler, resolved, out_dir, num_samples=num_samples, seed=seed,
                                   checkpoint=run.path, step=run.step, use_ema=use_ema, batch_size=batch_size,
                                   png=png, state=state, show_progress=show_progress, image_size=image_size)
        info["nfe"] = sampler.nfe if sampler.nfe is not None else _earlier(out_dir, "nfe")
    if not state.is_main_process:
        return None
    results = score(samples, features["x"], ref, out_dir, batch_size, device, metrics)
    del results["extractor"]  # reported as feature_extractor
    results.update(feature_extractor=name, samples=str(samples), out_dir=str(out_dir), **info)
    write_samples_grid(samples, out_dir / "samples_grid.png")
    write_text_atomic(out_dir / "metrics.json", json.dumps(results, indent=2) + "\n")
    return results


def _earlier(out_dir: Path, key: str):
    """`key` of an earlier metrics.json in out_dir (a rerun over finished samples draws nothing to count)."""
    path = out_dir / "metrics.json"
    return json.loads(path.read_text()).get(key) if path.is_file() else None


def _grid_picks(labels: np.ndarray | None, count: int) -> tuple[list[int], list[int] | None, int]:
    """(image indices row by row, their labels or None, images per row) for the samples grid."""
    if labels is None or len(np.unique(labels)) < 2:
        return list(range(min(count, GRID_CLASSES * GRID_PER_CLASS))), None, GRID_PER_CLASS
    classes = np.unique(labels)[:GRID_CLASSES]
    rows = [np.flatnonzero(labels == c) for c in classes]
    per_row = min(GRID_PER_CLASS, *(len(r) for r in rows))
    picks = [int(i) for r in rows for i in r[:per_row]]
    return picks, [int(labels[i]) for i in picks], per_row


def write_samples_grid(samples: str | Path, path: Path) -> Path:
    """A PNG of some scored images: one row per class (first 10) when the .npz has labels, else the first 80."""
    samples = Path(samples)
    labels = None
    if samples.suffix == ".npz":
        with np.load(samples) as data:
            labels = data["labels"] if "labels" in data.files else None
    images = Images(samples)
    picks, picked_labels, per_row = _grid_picks(labels, len(images))
    wanted, found, start = set(picks), {}, 0
    for batch in images.batches(1000):  # streamed: stops once the last picked index is read
        found.update({i: batch[i - start] for i in range(start, start + len(batch)) if i in wanted})
        start += len(batch)
        if start > max(picks):
            break
    grid = torch.from_numpy(np.stack([found[i] for i in picks]))
    captions = row_labels(picked_labels, per_row) if picked_labels is not None else None
    return save_grid(grid, path, nrow=per_row, captions=captions)


def score(samples: str | Path, extractor, ref: str | Path | None, out_dir: Path, batch_size: int,
          device: torch.device | str = "cpu", metrics: Sequence[str] | None = None) -> dict:
    """Metrics of an image set; against held-out digits (+ `fid_floor`) when `ref` is None."""
    if ref is not None:
        cache = out_dir / "reference_stats.npz" if extractor.name == INCEPTION_NAME else None
        out = compute_metrics(samples, ref, metrics, extractor=extractor, device=device,
                              batch_size=batch_size, reference_cache=cache)
        return {**out, "reference": str(ref)}
    held_out, floor = _digits_reference(extractor, device, batch_size)
    out = compute_metrics(samples, held_out, metrics, extractor=extractor, device=device, batch_size=batch_size)
    return {**out, **floor, "reference": DIGITS_REFERENCE}


_DIGITS_REAL: dict = {}  # (weights, device) -> held-out features and floors: one pass per process (sweeps)


def _digits_reference(extractor, device, batch_size: int) -> tuple:
    """(held-out digits features, {fid_floor, precision_floor, recall_floor, num_floor}: train vs held-out)."""
    key = (str(extractor.weights), str(extractor.device)) if isinstance(extractor, DigitsFeatures) else None
    if key in _DIGITS_REAL:
        return _DIGITS_REAL[key]
    held_out = load_reference(digits_uint8("held_out").numpy(), extractor, need_pool=True, batch_size=batch_size)
    train = digits_uint8("train").numpy()
    real = compute_metrics(train, held_out, ["fid", "precision", "recall"], extractor=extractor, device=device,
                           batch_size=batch_size)
    floor = {"fid_floor": real["fid"], "precision_floor": real["precision"], "recall_floor": real["recall"],
             "num_floor": len(train)}
    if key is not None:
        _DIGITS_REAL[key] = held_out, floor
    return held_out, floor


def format_table(results: Mapping) -> str:
    """The computed metrics, one row each, with the extractor that produced them."""
    name, n_ref = results["feature_extractor"], results["num_reference"]
    count = "stored statistics" if n_ref is None else f"{n_ref} images"
    floor = f"{results.get('num_floor')} train vs {n_ref} held-out digits (real data)"
    notes = {"fid": f"{results['num_samples']} samples vs {results['reference']} ({count})",
             "fid_floor": floor, "precision_floor": floor, "recall_floor": floor,
             "nfe": "network evaluations per image (a CFG pair counts once)"}
    for key in ("is", "kid"):
        if results.get(f"{key}_std"):
            notes[key] = f"+- {results[f'{key}_std']:.3g}"
    lines = [f"{'metric':<16} {'value':>10}  {'features':<20} note"]
    for key in ROWS:
        value = results.get(key)
        if value is not None and math.isfinite(value):
            by = "-" if key == "nfe" else name
            lines.append(f"{key:<16} {value:>10.4f}  {by:<20} {notes.get(key, '')}".rstrip())
    return "\n".join(lines)


__all__ = ["DIGITS_NUM_SAMPLES", "NUM_SAMPLES", "GenerationError", "evaluate", "format_table", "score",
           "write_samples_grid"]

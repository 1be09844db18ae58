"""Sharded, resumable, distributed sample generation -> one ADM-compatible `.npz`.

Layout of an output folder:
    manifest.json            what is being generated (checkpoint, step, sampler options, N, seed, ...)
    shards/shard_00000.npz   images [k * S, (k + 1) * S) as arr_0 (uint8 N x H x W x 3), labels, indices
    samples.npz              the assembled set: arr_0 uint8 (N, H, W, 3) + labels (ADM evaluator format)
    png/000000.png ...       optional, one file per image

Image i has label `i % num_classes` (balanced classes; 0 for unconditional runs) and is seeded by
(seed, i) only, through `ImageSampler.images`. Shards are fixed by (N, shard size), and each shard is drawn
in the same batches whatever the number of processes, so the set is the same for 1 or 8 GPUs — exactly
for fixed-step samplers, and even adaptive ODE solvers see identical batches. Process r draws the pending
shards r, r + W, r + 2W, ... of the list the main process made; each shard is written atomically, so a
killed run restarted with the same command redoes only the missing shards. A restart whose manifest
differs refuses with one line. The batch size is not part of the manifest: it may change between restarts
(adaptive ODE solvers then agree only to their tolerance, as their steps depend on the batch).
"""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from ..errors import GenerationError
from ..io import atomic_write, write_npz_atomic, write_text_atomic
from ..launch import process_state
from ..metrics import Images
from ..sampling import ImageSampler, SamplingOptions
from ..stopping import StopSignals

MANIFEST_FORMAT = "sit_atconv.evaluation.samples/1"
LABEL_RULE = "i % num_classes"


def default_shard_size(num_samples: int) -> int:
    """1,000 images per shard, fewer for small sets (at least 8 shards), a function of N only."""
    return max(1, min(1000, math.ceil(num_samples / 8)))


def sample_labels(indices: torch.Tensor | range, num_classes: int) -> torch.Tensor:
    """Label of image i: i % num_classes (balanced classes; 0 for an unconditional model)."""
    return torch.as_tensor(list(indices), dtype=torch.long) % num_classes


def run_on_main(state: PartialState, fn: Callable[[], Any]) -> Any:
    """`fn()` on the main process; every process gets its (picklable) result, or raises its error."""
    payload: list[Any] = [None]
    error: Exception | None = None
    if state.is_main_process:
        try:
            payload = [("ok", fn())]
        except Exception as err:  # re-raised below: the original here, its message elsewhere
            error, payload = err, [("error", str(err))]
    if state.num_processes > 1:
        broadcast_object_list(payload, from_process=0)
    kind, value = payload[0]
    if kind == "error":
        if state.is_main_process:
            raise error
        raise GenerationError(f"main process failed: {value}")
    return value


def make_manifest(checkpoint: str | Path | None, step: int, num_classes: int, opts: SamplingOptions,
                  num_samples: int, seed: int, shard_size: int, use_ema: bool = True,
                  image_size: int | None = None) -> dict:
    """What defines the sample set (`opts` resolved); a restart must match it exactly. `image_size`: the
    pixel side of a set drawn at another size than the trained one (absent for the trained size)."""
    manifest = {"format": MANIFEST_FORMAT, "checkpoint": checkpoint and str(Path(checkpoint).resolve()),
                "step": int(step), "ema": use_ema, "num_samples": int(num_samples), "seed": int(seed),
                "shard_size": int(shard_size), "num_classes": num_classes, "labels": LABEL_RULE,
                "options": _jsonable(asdict(opts))}
    return manifest if image_size is None else {**manifest, "image_size": int(image_size)}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))  # tuples -> lists, so a reloaded manifest compares equal


def shard_path(out_dir: Path, shard: int) -> Path:
    return out_dir / "shards" / f"shard_{shard:05d}.npz"


def _prepare(out_dir: Path, manifest: dict) -> list[int]:
    """Main process: check or write the manifest; the shards still to draw."""
    path, final = out_dir / "manifest.json", out_dir / "samples.npz"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {manifest.get(k)!r}" for k in diff[:3])
            raise GenerationError(f"{out_dir} holds samples made with other settings ({shown}); pass another "
                                  "--out-dir or delete that folder; refusing to mix sample sets.")
    elif final.exists() or (out_dir / "shards").is_dir():
        raise GenerationError(f"{out_dir} holds samples but no manifest.json; pass another --out-dir.")
    else:
        write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    if final.is_file():
        return []
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    for stale in (out_dir / "shards").glob(".shard_*.tmp"):  # left by a killed writer
        stale.unlink()
    count = math.ceil(manifest["num_samples"] / manifest["shard_size"])
    return [k for k in range(count) if not shard_path(out_dir, k).is_file()]


def _write_shard(path: Path, images: torch.Tensor, labels: torch.Tensor, indices: range) -> None:
    write_npz_atomic(path, arr_0=images.numpy(), labels=labels.numpy(), indices=np.arange(indices.start, indices.stop))


def generate_samples(sampler: ImageSampler, opts: SamplingOptions, out_dir: str | Path, *,
                     num_samples: int, seed: int = 0, checkpoint: str | Path | None = None, step: int = 0,
                     use_ema: bool = True, batch_size: int = 64, shard_size: int | None = None,
                     png: bool = False, state: PartialState | None = None, show_progress: bool = True,
                     image_size: int | None = None) -> Path:
    """Draw the missing shards on all processes, then assemble `out_dir/samples.npz` (returned everywhere).

    `opts` must be resolved (`SamplingOptions.resolved`); `sampler.model` lives on `state.device`.
    `image_size`: set when `sampler` draws at another size than the trained one (`ImageSampler.at_image_size`),
    recorded in the manifest.
    """
    if num_samples < 1:
        raise GenerationError(f"--num-samples must be positive; got {num_samples}.")
    if image_size is not None and image_size != sampler.image_size:
        raise GenerationError(f"image_size {image_size} but the sampler draws {sampler.image_size} px images.")
    state = state or process_state()
    out_dir = Path(out_dir)
    shard_size = shard_size or default_shard_size(num_samples)
    manifest = make_manifest(checkpoint, step, sampler.num_classes, opts, num_samples, seed, shard_size, use_ema,
                             image_size)
    pending = run_on_main(state, lambda: _prepare(out_dir, manifest))
    mine = pending[state.process_index::state.num_processes]
    todo = sum(min(shard_size, num_samples - k * shard_size) for k in mine)
    bar = tqdm(total=todo, unit="img", desc=f"sampling (main process of {state.num_processes})",
               disable=not (show_progress and state.is_main_process and todo))
    with StopSignals("SIGUSR1") as stop:
        for done, k in enumerate(mine):
            indices = range(k * shard_size, min((k + 1) * shard_size, num_samples))
            labels = sample_labels(indices, sampler.num_classes)
            parts = []
            for start in range(0, len(indices), batch_size):
                idx = indices[start:start + batch_size]
                parts.append(sampler.images(opts, labels[start:start + batch_size], idx, seed, state.device,
                                            batch_size, show_progress=False))
                bar.update(len(idx))
            _write_shard(shard_path(out_dir, k), torch.cat(parts), labels, indices)
            if stop.received:
                raise GenerationError(f"stopped by {stop.received}: {done + 1} of this process's {len(mine)} shards "
                                      f"are written to {out_dir} and kept; rerun the same command to continue")
    bar.close()
    state.wait_for_everyone()
    run_on_main(state, lambda: assemble(out_dir, manifest, png=png))
    return out_dir / "samples.npz"


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def assemble(out_dir: str | Path, manifest: dict, png: bool = False) -> Path:
    """Stream the shards in index order into samples.npz (checked: every index once), then drop them."""
    out_dir = Path(out_dir)
    final = out_dir / "samples.npz"
    n, size = manifest["num_samples"], manifest["shard_size"]
    shards = [shard_path(out_dir, k) for k in range(math.ceil(n / size))]
    if not final.is_file():
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise GenerationError(f"{out_dir}: {len(missing)} shards missing ({missing[0]}, ...); "
                                  "rerun the command.")
        with np.load(shards[0]) as first:
            shape = (n, *first["arr_0"].shape[1:])
        labels = []

        def write(tmp: str) -> None:  # arr_0 streamed shard by shard: 50k images never sit in memory
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                with archive.open("arr_0.npy", "w", force_zip64=True) as stream:
                    stream.write(_npy_header(shape, np.uint8))
                    for k, path in enumerate(shards):
                        with np.load(path) as shard:
                            images, expect = shard["arr_0"], np.arange(k * size, min((k + 1) * size, n))
                            if not np.array_equal(shard["indices"], expect) or images.shape[1:] != shape[1:]:
                                raise GenerationError(f"{path}: not the images expected; delete it, rerun.")
                            stream.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
                            labels.append(shard["labels"])
                with archive.open("labels.npy", "w") as stream:
                    np.lib.format.write_array(stream, np.concatenate(labels).astype(np.int64))

        atomic_write(final, write)
    if png:
        write_pngs(final, out_dir / "png")
    shutil.rmtree(out_dir / "shards", ignore_errors=True)
    return final


def write_pngs(npz: str | Path, folder: str | Path) -> Path:
    """One PNG per image (000000.png, ...), skipping files already there."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for batch in Images(npz).batches(1000):  # streamed: a 50k set is not loaded whole
        for image in batch:
            path = folder / f"{i:06d}.png"
            if not path.exists():
                atomic_write(path, lambda tmp, im=image: Image.fromarray(im).save(tmp, format="PNG"))
            i += 1
    return folder

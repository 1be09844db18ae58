"""Encode an image folder once into a latent store (both flips), sharded, resumable and multi-process.

    python -m sit_atconv.data.extract_latents --data-path IMAGES --out STORE [--image-size 256]
    accelerate launch -m sit_atconv.data.extract_latents ...     # ranks take every world-th shard

Each shard is written atomically; rerunning the same command skips shards that exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..cli import CLIParser, finite_float, positive_int, run_cli
from ..errors import ConfigError, DataError
from ..io import atomic_write, write_text_atomic
from ..launch import process_state
from ..stopping import StopSignals
from .encoders import SD_VAE_ID, SD_VAE_SCALE, Autoencoder, load_autoencoder
from .images import load_image, scan_image_folder
from .latents import (
    FORMAT,
    LABELS,
    MANIFEST,
    missing_shards,
    num_shards,
    shard_indices,
    shard_path,
)

DTYPES = {"float16": np.float16, "float32": np.float32}


class _Files(Dataset):
    def __init__(self, files: list[Path], image_size: int):
        self.files, self.image_size = files, image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.files[index], self.image_size)


def _save_npy(array: np.ndarray, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def _prepare_store(out: Path, manifest: dict, labels: list[int]) -> None:
    """Create the manifest and labels, or check that an existing store was started with the same settings."""
    path = out / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in manifest if old.get(k) != manifest[k]]
        if diff:
            k = diff[0]
            shown = ("the source file list" if k in ("files_sha1", "classes")
                     else f"{old.get(k)!r} -> {manifest[k]!r}")
            raise DataError(f"{out}: existing store was made with different settings ({k}: {shown}); "
                            "use a new --out or delete the old store")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _save_npy(np.asarray(labels, dtype=np.int64), out / LABELS)
        write_text_atomic(path, json.dumps(manifest, indent=1))


def extract_latents(data_path: str | os.PathLike, out: str | os.PathLike, autoencoder: Autoencoder, *,
                    image_size: int = 256, batch_size: int = 32, shard_size: int = 1024, num_workers: int = 4,
                    dtype: str = "float16", state=None) -> Path:
    """Encode every image (and its mirror) of `data_path` into the store `out`; returns the store path.

    `state` is an `accelerate.PartialState` (default: the current one); rank r encodes shards r, r+W, ...
    """
    state = state or process_state()
    out = Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size <= 0 or shard_size <= 0:
        raise ConfigError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    data_path = Path(data_path)
    files, labels, classes = scan_image_folder(data_path)
    rel = "\n".join(f.relative_to(data_path).as_posix() for f in files)
    manifest = {"format": FORMAT, "count": len(files), "shard_size": shard_size,
                "shape": list(autoencoder.latent_shape(image_size)), "flips": 2, "dtype": dtype,
                "scale": autoencoder.scale, "autoencoder": autoencoder.name, "image_size": image_size,
                "classes": classes, "files_sha1": hashlib.sha1(rel.encode()).hexdigest()}
    if state.is_main_process:
        _prepare_store(out, manifest, labels)
    state.wait_for_everyone()

    todo = [s for s in range(state.process_index, num_shards(len(files), shard_size), state.num_processes)
            if not shard_path(out, s).is_file()]
    batches = [list(idx[i:i + batch_size]) for s in todo for idx in [shard_indices(s, len(files), shard_size)]
               for i in range(0, len(idx), batch_size)]
    loader = DataLoader(_Files(files, image_size), batch_sampler=batches, num_workers=num_workers)
    autoencoder.to(state.device)
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=f"encoding into {out}",
               disable=not state.is_local_main_process)
    shards, buffer = iter(todo), []
    shard = next(shards, None)
    with StopSignals("SIGUSR1") as stop:
        for images in loader:
            images = images.to(state.device)
            both = autoencoder.encode(torch.cat([images, images.flip(-1)]))
            buffer.append(torch.stack(both.chunk(2), dim=1).cpu().numpy().astype(DTYPES[dtype]))
            bar.update(len(images))
            if sum(len(b) for b in buffer) == len(shard_indices(shard, len(files), shard_size)):
                _save_npy(np.concatenate(buffer), shard_path(out, shard))
                buffer, shard = [], next(shards, None)
                if stop.received:
                    raise DataError(f"stopped by {stop.received}: every finished shard of {out} is kept; rerun the "
                                    "same command to continue")
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        missing = missing_shards(out, manifest)
        print(f"{out}: {len(files)} images -> latents {manifest['shape']} x 2 flips"
              + (f"; {len(missing)} shards still missing, rerun to finish" if missing else "; complete"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = CLIParser(__doc__, prog="python -m sit_atconv.data.extract_latents")
    p.add_argument("--data-path", required=True, help="image folder (class subfolders, or flat)")
    p.add_argument("--out", required=True, help="store folder to create or resume")
    p.add_argument("--image-size", type=positive_int, default=256, help="ADM centre-crop side (default: 256)")
    p.add_argument("--autoencoder", default=SD_VAE_ID, help=f"hub id, local folder, or identity (default: {SD_VAE_ID})")
    p.add_argument("--latent-scale", type=finite_float, default=SD_VAE_SCALE,
                   help=f"latent multiplier (default: {SD_VAE_SCALE})")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per encoder call (x2 with flips)")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="images per shard file")
    p.add_argument("--num-workers", type=int, default=4, help="image-decoding worker processes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="stored latent precision")

    def body(args) -> int:
        ae = load_autoencoder(args.autoencoder, args.latent_scale, channels=3)
        extract_latents(args.data_path, args.out, ae, image_size=args.image_size, batch_size=args.batch_size,
                        shard_size=args.shard_size, num_workers=args.num_workers, dtype=args.dtype)
        return 0

    return run_cli(p, body, argv)


if __name__ == "__main__":
    sys.exit(main())

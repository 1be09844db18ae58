"""Encode an image folder once into a latent store (both flips), sharded, resumable and multi-process.

    python -m sit_atconv.data.extract_latents --data-path IMAGES --out STORE [--image-size 256]
        [--repa-encoder vit_base_patch14_dinov2.lvd142m --repa-encoder-weights FILE --repa-resolution 224]
    accelerate launch -m sit_atconv.data.extract_latents ...     # ranks take every world-th shard

Each shard is written atomically; rerunning the same command skips shards that exist. Every run ends
with the per-channel mean and std of all stored latents (both flips) in the manifest, for
`data.latent_norm: channel`; a rerun adds them to a store made before they existed. With --repa-encoder,
the encoder's patch tokens of every image and its mirror are stored too (REPA targets; float16,
2 x num_tokens x dim x 2 bytes per image, ~0.8 MB for DINOv2-B at 224 px).
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
    feature_path,
    missing_shards,
    num_shards,
    read_manifest,
    shard_indices,
    shard_path,
)
from .vision_encoder import VisionEncoder, load_vision_encoder

DTYPES = {"float16": np.float16, "float32": np.float32}
FEATURE_DTYPE = "float16"  # REPA features: half the bytes of float32, ample for cosine targets


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


def _features_record(encoder: VisionEncoder | None) -> dict | None:
    """What the manifest records of the vision encoder whose features are stored (weights by file name)."""
    if encoder is None:
        return None
    weights = encoder.weights if encoder.weights == "random" else Path(encoder.weights).name
    return {"encoder": encoder.name, "weights": weights, "resolution": encoder.resolution,
            "patch_size": encoder.patch_size, "num_tokens": encoder.num_tokens, "dim": encoder.dim,
            "dtype": FEATURE_DTYPE}


def _check_features(out: Path, old: dict | None, new: dict | None) -> None:
    """A store's features come from one encoder: continuing it needs the same one (adding them is fine)."""
    if old is None or old == new:
        return
    again = (f"--repa-encoder {old['encoder']} --repa-encoder-weights .../{old['weights']} "
             f"--repa-resolution {old['resolution']}")
    raise DataError(f"{out}: existing store holds features of {old['encoder']} ({old['weights']}, "
                    f"{old['resolution']} px){'' if new is None else ', not of ' + new['encoder']}; pass {again} "
                    "to continue it, or use a new --out")


def _prepare_store(out: Path, manifest: dict, labels: list[int], features: dict | None) -> None:
    """Create the manifest and labels, or check that an existing store was started with the same settings
    (features may be added to a store that has none)."""
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
        _check_features(out, old.get("features"), features)
        if features is not None and "features" not in old:
            write_text_atomic(path, json.dumps({**old, "features": features}, indent=1))
    else:
        out.mkdir(parents=True, exist_ok=True)
        _save_npy(np.asarray(labels, dtype=np.int64), out / LABELS)
        extra = {} if features is None else {"features": features}
        write_text_atomic(path, json.dumps({**manifest, **extra}, indent=1))


def _both_flips(x: torch.Tensor, dtype) -> np.ndarray:
    """(2B, ...) computed on [images, mirrors] -> (B, 2, ...) stored array."""
    return torch.stack(x.chunk(2), dim=1).cpu().numpy().astype(dtype)


def _encode_shards(out: Path, files: list[Path], jobs: dict[int, tuple[bool, bool]], autoencoder: Autoencoder,
                   encoder: VisionEncoder | None, *, image_size: int, batch_size: int, shard_size: int,
                   num_workers: int, dtype: str, state) -> None:
    """Encode the shards in `jobs` ({shard: (latents missing, features missing)}), writing only what is missing."""
    batches = [list(idx[i:i + batch_size]) for s in jobs for idx in [shard_indices(s, len(files), shard_size)]
               for i in range(0, len(idx), batch_size)]
    loader = DataLoader(_Files(files, image_size), batch_sampler=batches, num_workers=num_workers)
    autoencoder.to(state.device)
    if encoder is not None:
        encoder.to(state.device)
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc=f"encoding into {out}",
               disable=not state.is_local_main_process)
    shards, latents, features, done = iter(jobs), [], [], 0
    shard = next(shards, None)
    with StopSignals("SIGUSR1") as stop:
        for images in loader:
            images = images.to(state.device)
            both, (need_latents, need_features) = torch.cat([images, images.flip(-1)]), jobs[shard]
            if need_latents:
                latents.append(_both_flips(autoencoder.encode(both), DTYPES[dtype]))
            if need_features:
                features.append(_both_flips(encoder(both), DTYPES[FEATURE_DTYPE]))
            done += len(images)
            bar.update(len(images))
            if done == len(shard_indices(shard, len(files), shard_size)):
                if need_features:
                    _save_npy(np.concatenate(features), feature_path(out, shard))
                if need_latents:
                    _save_npy(np.concatenate(latents), shard_path(out, shard))
                shard, latents, features, done = next(shards, None), [], [], 0
                if stop.received:
                    raise DataError(f"stopped by {stop.received}: every finished shard of {out} is kept; rerun the "
                                    "same command to continue")
    bar.close()


def shard_sums(latents: np.ndarray, rows: int = 256) -> np.ndarray:
    """float64 (3, C): per channel the count, sum and sum of squares of stored latents (n, 2, C, h, w),
    streamed `rows` images at a time."""
    channels = latents.shape[2]
    sums = np.zeros((3, channels), np.float64)
    for start in range(0, len(latents), rows):
        x = np.asarray(latents[start:start + rows], dtype=np.float64).swapaxes(0, 2).reshape(channels, -1)
        sums += np.stack([np.full(channels, x.shape[1], np.float64), x.sum(1), np.square(x).sum(1)])
    return sums


def _merge_across_processes(sums: np.ndarray, state) -> np.ndarray:
    """The sum of every process's `sums` (an all-gather when a process group is running)."""
    import torch.distributed as dist

    if state.num_processes == 1 or not (dist.is_available() and dist.is_initialized()):
        return sums
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, sums)
    return np.sum(parts, axis=0)


def _latent_statistics(out: Path, manifest: dict, state) -> dict | None:
    """Per-channel mean and std over every stored latent (both flips), exact float64 sums merged across
    processes (rank r reads shards r, r+W, ...); None unless every shard is there."""
    total = num_shards(manifest["count"], manifest["shard_size"])
    sums = np.zeros((3, manifest["shape"][0]), np.float64)
    for s in range(state.process_index, total, state.num_processes):
        if shard_path(out, s).is_file():
            sums += shard_sums(np.load(shard_path(out, s), mmap_mode="r"))
    count, total_sum, total_squares = _merge_across_processes(sums, state)
    if count[0] != manifest["count"] * 2 * manifest["shape"][1] * manifest["shape"][2]:
        return None
    mean = total_sum / count
    std = np.sqrt(np.maximum(total_squares / count - mean ** 2, 0.0))
    return {"latent_mean": mean.tolist(), "latent_std": std.tolist(), "latent_stats_count": int(count[0])}


def extract_latents(data_path: str | os.PathLike, out: str | os.PathLike, autoencoder: Autoencoder, *,
                    image_size: int = 256, batch_size: int = 32, shard_size: int = 1024, num_workers: int = 4,
                    dtype: str = "float16", vision_encoder: VisionEncoder | None = None, state=None) -> Path:
    """Encode every image (and its mirror) of `data_path` into the store `out`; returns the store path.

    `vision_encoder`: also store its patch tokens of both images (REPA features; may be added to a store
    that has none). Every run ends by (re)computing the per-channel latent statistics into the manifest.
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
    features = _features_record(vision_encoder)
    if state.is_main_process:
        _prepare_store(out, manifest, labels, features)
    state.wait_for_everyone()

    mine = range(state.process_index, num_shards(len(files), shard_size), state.num_processes)
    jobs = {s: (not shard_path(out, s).is_file(), features is not None and not feature_path(out, s).is_file())
            for s in mine}
    _encode_shards(out, files, {s: job for s, job in jobs.items() if any(job)}, autoencoder, vision_encoder,
                   image_size=image_size, batch_size=batch_size, shard_size=shard_size, num_workers=num_workers,
                   dtype=dtype, state=state)
    state.wait_for_everyone()
    stats = _latent_statistics(out, manifest, state)
    if state.is_main_process:
        if stats is not None:
            write_text_atomic(out / MANIFEST, json.dumps({**read_manifest(out), **stats}, indent=1))
        missing = missing_shards(out, manifest)
        if features is not None:
            missing = sorted(set(missing) | set(missing_shards(out, manifest, feature_path)))
        shown = "" if stats is None else (f"; latent mean {np.round(stats['latent_mean'], 4).tolist()}, std "
                                          f"{np.round(stats['latent_std'], 4).tolist()}")
        print(f"{out}: {len(files)} images -> latents {manifest['shape']} x 2 flips"
              + ("" if features is None else f" + {features['encoder']} features {features['num_tokens']}x"
                 f"{features['dim']}")
              + (f"; {len(missing)} shards still missing, rerun to finish" if missing else "; complete") + shown)
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
    p.add_argument("--repa-encoder", help="also store this timm ViT's patch tokens (REPA), e.g. "
                   "vit_base_patch14_dinov2.lvd142m")
    p.add_argument("--repa-encoder-weights", help="its weights: a local timm or official DINOv2 file, or random")
    p.add_argument("--repa-resolution", type=positive_int, help="encoder input side (default: the model's own)")

    def body(args) -> int:
        encoder = None
        if args.repa_encoder is None and (args.repa_encoder_weights or args.repa_resolution):
            raise ConfigError("--repa-encoder-weights/--repa-resolution without --repa-encoder; name the encoder")
        if args.repa_encoder is not None:
            if not args.repa_encoder_weights:
                raise ConfigError("--repa-encoder needs --repa-encoder-weights PATH (a local file, or random)")
            encoder = load_vision_encoder(args.repa_encoder, args.repa_encoder_weights, args.repa_resolution)
        ae = load_autoencoder(args.autoencoder, args.latent_scale, channels=3)
        extract_latents(args.data_path, args.out, ae, image_size=args.image_size, batch_size=args.batch_size,
                        shard_size=args.shard_size, num_workers=args.num_workers, dtype=args.dtype,
                        vision_encoder=encoder)
        return 0

    return run_cli(p, body, argv)


if __name__ == "__main__":
    sys.exit(main())

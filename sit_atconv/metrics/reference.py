"""Image sets and reference statistics on disk: .npz `arr_0` (streamed), image folders, cached stats files.

A reference is an ADM reference batch (.npz with `arr_0` and, usually, stored `mu`/`sigma`/`mu_s`/`sigma_s`
from the TF Inception), an image folder or array, or a statistics .npz written by `save_reference`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import MetricInputError
from ..io import atomic_write
from .inception import INCEPTION_NAME
from .stats import Extractor, FeatureSet, extract_features, extractor_name

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
CACHE_FORMAT = "sit_atconv.metrics.reference/1"


def _check_images(shape: tuple, dtype: np.dtype, where: str) -> None:
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] == 0:
        raise MetricInputError(
            f"{where}: expected uint8 images (N, H, W, 3); got {np.dtype(dtype)} {tuple(shape)}."
        )


class Images:
    """A uint8 (N, H, W, 3) image set read in batches: an array, an .npz's `arr_0` (streamed), or a folder."""

    def __init__(self, source: np.ndarray | str | os.PathLike, key: str = "arr_0") -> None:
        self.source, self.key = source, key
        if isinstance(source, np.ndarray):
            _check_images(source.shape, source.dtype, "images")
            self.count = source.shape[0]
            return
        path = Path(source)
        if path.is_dir():
            self.files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not self.files:
                raise MetricInputError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder.")
            self.count = len(self.files)
        elif path.is_file():
            shape, _ = self._npz_header()
            self.count = shape[0]
        else:
            raise MetricInputError(f"{path}: no such .npz file or image folder.")

    def __len__(self) -> int:
        return self.count

    def _open_member(self, archive: zipfile.ZipFile):
        member = f"{self.key}.npy"
        if member not in archive.namelist():
            raise MetricInputError(f"{self.source}: no '{self.key}' array (has {sorted(archive.namelist())}).")
        return archive.open(member)

    @staticmethod
    def _read_header(stream, where: str) -> tuple[tuple, np.dtype]:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise MetricInputError(f"{where}: unsupported .npy format version {version}.")
        _check_images(shape, dtype, where)
        if fortran:
            raise MetricInputError(f"{where}: Fortran-ordered array; save it C-contiguous.")
        return shape, dtype

    def _npz_header(self) -> tuple[tuple, np.dtype]:
        try:
            with zipfile.ZipFile(self.source) as archive, self._open_member(archive) as stream:
                return self._read_header(stream, f"{self.source}:{self.key}")
        except zipfile.BadZipFile:
            raise MetricInputError(f"{self.source}: not an .npz archive.") from None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive uint8 (B, H, W, 3) batches; an .npz is read incrementally, not loaded whole."""
        if isinstance(self.source, np.ndarray):
            for start in range(0, self.count, batch_size):
                yield self.source[start : start + batch_size]
        elif hasattr(self, "files"):
            for start in range(0, self.count, batch_size):
                yield self._load_files(self.files[start : start + batch_size])
        else:
            with zipfile.ZipFile(self.source) as archive, self._open_member(archive) as stream:
                shape, dtype = self._read_header(stream, f"{self.source}:{self.key}")
                per_image = int(np.prod(shape[1:]))
                for start in range(0, shape[0], batch_size):
                    n = min(batch_size, shape[0] - start)
                    data = stream.read(n * per_image)
                    if len(data) != n * per_image:
                        raise MetricInputError(f"{self.source}:{self.key}: truncated array data.")
                    yield np.frombuffer(data, dtype=dtype).reshape(n, *shape[1:])

    @staticmethod
    def _load_files(files: list[Path]) -> np.ndarray:
        arrays = []
        for file in files:
            with Image.open(file) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        if len({a.shape for a in arrays}) > 1:
            raise MetricInputError(f"{files[0].parent}: images differ in size; resize them to one size first.")
        return np.stack(arrays)


def save_reference(path: str | os.PathLike, features: FeatureSet, source: str = "") -> Path:
    """Atomically write a statistics .npz (ADM key names + extractor label + optional per-image features)."""
    arrays = {
        "format": np.array(CACHE_FORMAT),
        "extractor": np.array(features.extractor),
        "source": np.array(source),
        "count": np.array(-1 if features.count is None else features.count),
        "mu": features.mu,
        "sigma": features.sigma,
    }
    for key in ("mu_s", "sigma_s", "pool"):
        if getattr(features, key) is not None:
            arrays[key] = getattr(features, key)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    return atomic_write(path, write)


def _read_stats(npz, path: Path, prefix: str = "") -> tuple[np.ndarray, np.ndarray] | None:
    """Stored (mu{prefix}, sigma{prefix}) from an open npz, shape-checked; None if absent."""
    mu_key, sigma_key = f"mu{prefix}", f"sigma{prefix}"
    if mu_key not in npz.files:
        return None
    if sigma_key not in npz.files:
        raise MetricInputError(f"{path}: has '{mu_key}' but no '{sigma_key}'.")
    mu, sigma = npz[mu_key], npz[sigma_key]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricInputError(
            f"{path}: expected {mu_key} (D,) and {sigma_key} (D, D); got {mu.shape}, {sigma.shape}."
        )
    return mu.astype(np.float64), sigma.astype(np.float64)


def _load_cache(path: Path, npz, name: str, need_pool: bool | None) -> FeatureSet:
    stored = str(npz["extractor"])
    if stored != name:
        raise MetricInputError(
            f"{path}: statistics from extractor {stored!r}, but metrics use {name!r}; recompute them."
        )
    if need_pool and "pool" not in npz.files:
        raise MetricInputError(f"{path}: no per-image features (needed for KID/precision/recall); recompute it.")
    mu, sigma = _read_stats(npz, path)
    spatial = _read_stats(npz, path, "_s") or (None, None)
    count = int(npz["count"])
    pool = npz["pool"] if need_pool is not False and "pool" in npz.files else None
    return FeatureSet(name, None if count < 0 else count, mu, sigma, *spatial, pool=pool)


def _source_label(source: np.ndarray | str | os.PathLike) -> str:
    """Identifies a reference for cache reuse: resolved path, size and modification time ("" for arrays)."""
    if isinstance(source, np.ndarray):
        return ""
    path = Path(source).resolve()
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _cached(cache: Path, name: str, label: str, need_pool: bool | None) -> FeatureSet | None:
    """The cache's features if it was written for this extractor and source (with features if needed)."""
    if not label or not cache.is_file():
        return None
    with _open_npz(cache) as npz:
        keys = npz.files
        if "extractor" not in keys or "source" not in keys:
            raise MetricInputError(
                f"{cache}: not a statistics file written by save_reference; choose another path."
            )
        if str(npz["extractor"]) != name or str(npz["source"]) != label:
            return None
        if need_pool is not False and "pool" not in keys:
            return None
        return _load_cache(cache, npz, name, need_pool)


def load_reference(
    source: FeatureSet | np.ndarray | str | os.PathLike,
    extractor: Extractor,
    *,
    need_pool: bool | None = False,
    batch_size: int = 100,
    cache: str | os.PathLike | None = None,
) -> FeatureSet:
    """Reference statistics for `extractor`, from stored stats where valid, else by extracting its images.

    ADM batches: stored `mu`/`sigma`/`mu_s`/`sigma_s` are used with the Inception extractor (they come from
    the same TF network); per-image features for KID/precision/recall come from `arr_0`. `need_pool`: True
    requires those features, None adds them where the source allows, False skips them.
    `cache`: a statistics file reused when written for this extractor and source (path, size, mtime) with
    the features needed, else (re)written.
    """
    if isinstance(source, FeatureSet):
        return source
    name = extractor_name(extractor)
    label = _source_label(source) if (isinstance(source, np.ndarray) or Path(source).exists()) else ""
    if cache is not None and (hit := _cached(Path(cache), name, label, need_pool)) is not None:
        return hit
    features = _load_uncached(source, extractor, name, need_pool, batch_size)
    if cache is not None:
        save_reference(cache, features, source=label)
    return features


def check_reference(source: str | os.PathLike) -> None:
    """Cheap up-front check of a reference (before any sampling): an image folder with images, or an .npz
    with `arr_0` uint8 images, ADM's `mu`/`sigma`, or statistics from `save_reference`."""
    path = Path(source)
    if not path.is_file():
        Images(path)  # a folder: must hold images
        return
    with _open_npz(path) as npz:
        keys = set(npz.files)
    if "arr_0" in keys:
        Images(path)  # header: uint8 (N, H, W, 3)
    elif not {"mu", "sigma"} <= keys:
        raise MetricInputError(f"{path}: neither 'arr_0' images nor 'mu'/'sigma' statistics (has {sorted(keys)}); "
                               "pass an ADM reference batch, an image folder or a statistics file")


def _open_npz(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile):
        raise MetricInputError(f"{path}: not an .npz archive.") from None


def _load_uncached(
    source, extractor: Extractor, name: str, need_pool: bool | None, batch_size: int
) -> FeatureSet:
    stored = spatial = None
    if not isinstance(source, np.ndarray) and Path(source).is_file():
        path = Path(source)
        with _open_npz(path) as npz:
            if "extractor" in npz.files:  # a statistics file from save_reference
                return _load_cache(path, npz, name, need_pool)
            has_images = "arr_0" in npz.files
            if name == INCEPTION_NAME:  # ADM's stored statistics come from the same (TF) Inception
                stored, spatial = _read_stats(npz, path), _read_stats(npz, path, "_s")
        spatial = spatial or (None, None)
        if not has_images:
            if stored is None:
                raise MetricInputError(f"{path}: no 'arr_0' images and no stored statistics usable with {name!r}.")
            if need_pool:
                raise MetricInputError(f"{path}: no 'arr_0' images for per-image features (KID/precision/recall).")
            return FeatureSet(name, None, *stored, *spatial)
        if stored is not None and need_pool is False:
            return FeatureSet(name, len(Images(path)), *stored, *spatial)
    images = Images(source)
    features = extract_features(images.batches(batch_size), extractor, keep_pool=need_pool is not False)
    if stored is not None:
        features.mu, features.sigma = stored
        if spatial[0] is not None:
            features.mu_s, features.sigma_s = spatial
    return features

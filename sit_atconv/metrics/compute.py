"""Images -> metrics dict: one feature pass per image set, then FID, sFID, IS, KID, precision/recall.

Default protocol = ADM's evaluator (FID-50K against `VIRTUAL_imagenet256_labeled.npz`): torch-fidelity's port
of its TF Inception, reference `mu`/`sigma`/`mu_s`/`sigma_s` as stored in the batch, IS over consecutive
splits of 5000, precision/recall with k=3 on pool features.
Any `Extractor` callable can replace the Inception.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import MetricInputError
from .frechet import frechet_distance
from .inception import InceptionV3Features
from .reference import Images, load_reference
from .stats import (
    Extractor,
    FeatureSet,
    extract_features,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

METRICS = ("fid", "sfid", "is", "kid", "precision", "recall")
_NEEDS_POOL = ("kid", "precision", "recall")  # need per-image features of both sets


def available_metrics(samples: FeatureSet, reference: FeatureSet) -> list[str]:
    """The metrics these two feature sets support, in `METRICS` order."""
    have = {
        "fid": True,
        "sfid": samples.mu_s is not None and reference.mu_s is not None,
        "is": samples.logits is not None,
        "kid": samples.pool is not None and reference.pool is not None,
    }
    have["precision"] = have["recall"] = have["kid"]
    return [m for m in METRICS if have[m]]


def _check_metrics(metrics: Sequence[str] | None) -> list[str] | None:
    if metrics is None:
        return None
    metrics = [m.lower() for m in metrics]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise MetricInputError(f"unknown metrics {unknown}; choose from {list(METRICS)}.")
    return metrics


def metrics_from_features(
    samples: FeatureSet,
    reference: FeatureSet,
    metrics: Sequence[str] | None = None,
    *,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_split_size: int = 5000,
    pr_k: int = 3,
    device: str | torch.device | None = None,
) -> dict[str, float | int | str | None]:
    """Pure stage: metrics from two `FeatureSet`s (None = every metric they support)."""
    if samples.extractor != reference.extractor:
        raise MetricInputError(
            f"features from different extractors: {samples.extractor!r} vs {reference.extractor!r}."
        )
    supported = available_metrics(samples, reference)
    metrics = _check_metrics(metrics)
    missing = sorted(set(metrics or ()) - set(supported))
    if missing:
        raise MetricInputError(
            f"cannot compute {missing} with extractor {samples.extractor!r} and these inputs "
            f"(sfid needs spatial statistics on both sides, is needs logits, kid/precision/recall need "
            f"per-image features on both sides); computable: {supported}."
        )
    wanted = [m for m in METRICS if m in (metrics if metrics is not None else supported)]
    out: dict[str, float | int | str | None] = {}
    if "fid" in wanted:
        out["fid"] = frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)
    if "sfid" in wanted:
        out["sfid"] = frechet_distance(samples.mu_s, samples.sigma_s, reference.mu_s, reference.sigma_s)
    if "is" in wanted:
        out["is"], out["is_std"] = inception_score(samples.logits, split_size=is_split_size)
    if "kid" in wanted:
        out["kid"], out["kid_std"] = kernel_inception_distance(
            reference.pool, samples.pool, subsets=kid_subsets, subset_size=kid_subset_size
        )
    if "precision" in wanted or "recall" in wanted:
        precision, recall = precision_recall(reference.pool, samples.pool, k=pr_k, device=device)
        out.update({k: v for k, v in (("precision", precision), ("recall", recall)) if k in wanted})
    out.update(extractor=samples.extractor, num_samples=samples.count, num_reference=reference.count)
    return out


def compute_metrics(
    samples: FeatureSet | np.ndarray | str | os.PathLike,
    reference: FeatureSet | np.ndarray | str | os.PathLike,
    metrics: Sequence[str] | None = None,
    *,
    extractor: Extractor | None = None,
    inception_weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 100,
    reference_cache: str | os.PathLike | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_split_size: int = 5000,
    pr_k: int = 3,
) -> dict[str, float | int | str | None]:
    """Metrics of uint8 (N, H, W, 3) samples (array, .npz `arr_0`, folder) against a reference.

    `reference`: ADM batch .npz, image array/folder, or a statistics .npz from `save_reference`.
    `metrics`: subset of `METRICS`; None = all that the extractor and reference support.
    `extractor`: any images -> features callable (see `stats.Extractor`); default torch-fidelity's InceptionV3
    with weights from `inception_weights` (a local file) or torch-fidelity's download cache.
    Returns {"fid", "sfid", "is", "is_std", "kid", "kid_std", "precision", "recall"} (those computed) plus
    "extractor", "num_samples", "num_reference".
    """
    metrics = _check_metrics(metrics)
    images = None if isinstance(samples, FeatureSet) else Images(samples)  # bad inputs fail before any work
    if isinstance(reference, (str, os.PathLike)) and not os.path.exists(reference):
        raise MetricInputError(f"{reference}: no such reference .npz file or image folder.")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if extractor is None:
        extractor = InceptionV3Features(inception_weights, device=device)
    elif inception_weights is not None:
        raise MetricInputError("inception_weights applies to the default Inception extractor, not a custom one.")
    # Per-image features: required for an explicit KID/PR request, taken where available when metrics=None.
    want_pool = None if metrics is None else any(m in _NEEDS_POOL for m in metrics)
    if images is not None:
        samples = extract_features(
            images.batches(batch_size),
            extractor,
            keep_pool=want_pool is not False,
            keep_logits=metrics is None or "is" in metrics,
        )
    reference = load_reference(
        reference,
        extractor,
        need_pool=want_pool if samples.pool is not None else False,
        batch_size=batch_size,
        cache=reference_cache,
    )
    return metrics_from_features(
        samples,
        reference,
        metrics,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        is_split_size=is_split_size,
        pr_k=pr_k,
        device=device,
    )

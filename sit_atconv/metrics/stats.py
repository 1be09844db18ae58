"""Feature statistics: streaming Gaussian moments, per-image feature sets, and the sample-based metrics.

Flow: uint8 image batches -> extractor -> `FeatureStats` (count, sum, sum of outer products, float64;
mergeable across processes) and optionally the per-image features ->
`FeatureSet` -> metrics. Nothing here reads files.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

# An extractor maps a uint8 (N, H, W, 3) CPU tensor to features: a (N, D) tensor (used as "pool"), or a dict
# with "pool" (FID, KID, precision/recall) and optionally "spatial" (sFID) and "logits" (Inception Score).
Extractor = Callable[[torch.Tensor], "torch.Tensor | Mapping[str, torch.Tensor]"]
FEATURE_KINDS = ("pool", "spatial", "logits")


def extractor_name(extractor: Extractor) -> str:
    """The label results carry: `extractor.name`, else the function or class name."""
    name = getattr(extractor, "name", None)
    return str(name) if name else getattr(extractor, "__name__", type(extractor).__name__)


class FeatureStats:
    """Running (count, sum x, sum x x^T) in float64; `mean_cov` gives (mu, sigma) as np.mean/np.cov."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    @property
    def dim(self) -> int | None:
        return None if self.sum is None else self.sum.shape[0]

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add a (N, D) batch of features (on any device; the sums live where the first batch lived)."""
        x = torch.as_tensor(features)
        if x.ndim != 2:
            raise ValueError(f"features must be (N, D); got shape {tuple(x.shape)}.")
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
            self.outer = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.dim:
            raise ValueError(f"feature dimension changed from {self.dim} to {x.shape[1]}.")
        x = x.to(device=self.sum.device, dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another accumulator (e.g. another process's) into this one; returns self."""
        if other.sum is None:
            return self
        if self.sum is None:
            self.count, self.sum, self.outer = other.count, other.sum.clone(), other.outer.clone()
            return self
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {other.dim} into {self.dim}.")
        self.count += other.count
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def to_tensor(self) -> torch.Tensor:
        """One flat float64 tensor [count, sum, outer] to `all_reduce(SUM)` across processes."""
        if self.sum is None:
            raise ValueError("no features accumulated yet.")
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device)
        return torch.cat([count, self.sum, self.outer.flatten()])

    @classmethod
    def from_tensor(cls, flat: torch.Tensor) -> FeatureStats:
        """Inverse of `to_tensor` (e.g. after an all-reduce); the dimension is inferred from the length."""
        dim = int(round((math.sqrt(4 * flat.numel() - 3) - 1) / 2))
        if 1 + dim + dim * dim != flat.numel():
            raise ValueError(f"a flat statistics tensor has 1 + D + D^2 entries; got {flat.numel()}.")
        stats = cls()
        stats.count = int(round(float(flat[0])))
        stats.sum = flat[1 : 1 + dim].to(torch.float64).clone()
        stats.outer = flat[1 + dim :].to(torch.float64).reshape(dim, dim).clone()
        return stats

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) in float64 numpy; sigma is the unbiased (N - 1) covariance, as ADM's np.cov."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance; got {self.count}.")
        n = self.count
        mu = self.sum / n
        sigma = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        sigma = (sigma + sigma.T) / 2
        return mu.cpu().numpy(), sigma.cpu().numpy()


@dataclass
class FeatureSet:
    """What metrics need from one image set: Gaussian statistics and, where kept, per-image features."""

    extractor: str
    count: int | None  # images behind the statistics; None when only stored statistics were read
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None  # spatial (sFID) statistics
    sigma_s: np.ndarray | None = None
    pool: np.ndarray | None = None  # (N, D) float32, for KID and precision/recall
    logits: np.ndarray | None = None  # (N, classes) float32, for the Inception Score


def _feature_dict(out, n: int, name: str) -> dict[str, torch.Tensor]:
    """Normalise an extractor's output to {"pool", ["spatial"], ["logits"]} of (N, D) tensors."""
    out = {"pool": out} if isinstance(out, torch.Tensor) else dict(out)
    if "pool" not in out:
        raise ValueError(f"extractor {name!r} must return a tensor or a dict with a 'pool' entry.")
    unknown = set(out) - set(FEATURE_KINDS)
    if unknown:
        raise ValueError(f"extractor {name!r} returned unknown feature kinds {sorted(unknown)}.")
    for kind, value in out.items():
        if value.ndim != 2 or value.shape[0] != n:
            raise ValueError(
                f"extractor {name!r}: {kind} features must be ({n}, D); got {tuple(value.shape)}."
            )
    return out


@torch.no_grad()
def extract_features(
    batches: Iterable[np.ndarray | torch.Tensor],
    extractor: Extractor,
    *,
    keep_pool: bool = False,
    keep_logits: bool = False,
) -> FeatureSet:
    """Stream uint8 (N, H, W, 3) image batches through `extractor` into a `FeatureSet` (one pass)."""
    name = extractor_name(extractor)
    stats = {"pool": FeatureStats(), "spatial": FeatureStats()}
    kept: dict[str, list[np.ndarray]] = {"pool": [], "logits": []}
    for batch in batches:
        if isinstance(batch, np.ndarray) and not batch.flags.writeable:
            batch = batch.copy()
        images = torch.as_tensor(batch)
        out = _feature_dict(extractor(images), images.shape[0], name)
        for kind in ("pool", "spatial"):
            if kind in out:
                stats[kind].update(out[kind])
        if keep_pool:
            kept["pool"].append(out["pool"].float().cpu().numpy())
        if keep_logits and "logits" in out:
            kept["logits"].append(out["logits"].float().cpu().numpy())
    if stats["pool"].count == 0:
        raise ValueError("no images to extract features from.")
    mu, sigma = stats["pool"].mean_cov()
    mu_s, sigma_s = stats["spatial"].mean_cov() if stats["spatial"].count else (None, None)
    return FeatureSet(
        extractor=name,
        count=stats["pool"].count,
        mu=mu,
        sigma=sigma,
        mu_s=mu_s,
        sigma_s=sigma_s,
        pool=np.concatenate(kept["pool"]) if kept["pool"] else None,
        logits=np.concatenate(kept["logits"]) if kept["logits"] else None,
    )


def _knn_radii(x: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (the (k+1)-th smallest, self included)."""
    return torch.cat([torch.cdist(rows, x).kthvalue(k + 1, dim=1).values for rows in x.split(batch_size)])


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, batch_size: int) -> float:
    """Fraction of points inside at least one ball (center, radius)."""
    inside = [(torch.cdist(rows, centers) <= radii[None]).any(1) for rows in points.split(batch_size)]
    return torch.cat(inside).double().mean().item()


@torch.no_grad()
def precision_recall(
    real: np.ndarray | torch.Tensor,
    fake: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 2048,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision/recall (Kynkäänniemi et al. 2019), k-NN balls as ADM's evaluator (k=3, `<=`).

    Precision: fraction of fake samples inside the real manifold (union of balls reaching each real sample's
    k-th neighbour); recall: fraction of real samples inside the fake manifold. Distances in float64.
    """
    real = torch.as_tensor(real).to(device=device, dtype=torch.float64)
    fake = torch.as_tensor(fake).to(device=device, dtype=torch.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"precision/recall needs (N, D) arrays of one D; got {tuple(real.shape)}, {tuple(fake.shape)}."
        )
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set.")
    precision = _coverage(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return precision, recall


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = 5000) -> tuple[float, float]:
    """IS (Salimans et al. 2016) = exp(E_x KL(p(y|x) || p(y))) per consecutive `split_size` split (ADM)."""
    logits = torch.as_tensor(logits).to(torch.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"logits must be a non-empty (N, classes) array; got {tuple(logits.shape)}.")
    scores = []
    for part in logits.split(split_size):
        log_p = part.log_softmax(dim=1)
        p = log_p.exp()
        terms = p * (log_p - p.mean(0).log())
        kl = torch.where(p > 0, terms, 0.0).sum(1).mean()  # 0 log 0 = 0 for classes no image predicts
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 2020
) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): torch-fidelity's unbiased cubic-polynomial MMD^2 over random subsets.

    `subset_size` is clipped to the smaller set; returns (mean, std) over subsets.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError("KID needs at least 2 samples per set.")
    out = kid_features_to_metric(
        torch.as_tensor(np.asarray(fake, dtype=np.float32)),
        torch.as_tensor(np.asarray(real, dtype=np.float32)),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]

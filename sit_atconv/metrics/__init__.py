"""Sample-quality metrics: images -> feature statistics -> FID, sFID, IS, KID, precision/recall.

`frechet` (pure math) <- `stats` (streaming statistics, feature sets, sample-based metrics) <- `inception`
(torch-fidelity's TF-compatible InceptionV3) / any extractor callable <- `reference` (files) <- `compute`.
"""

from .compute import METRICS, available_metrics, compute_metrics, metrics_from_features
from .frechet import frechet_distance, trace_sqrt_product
from .inception import (
    INCEPTION_FILENAME,
    INCEPTION_NAME,
    InceptionV3Features,
    InceptionWeightsError,
    default_weights_path,
    load_inception_weights,
)
from .reference import Images, check_reference, load_reference, save_reference
from .stats import (
    Extractor,
    FeatureSet,
    FeatureStats,
    extract_features,
    extractor_name,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

__all__ = [
    "METRICS",
    "INCEPTION_FILENAME",
    "INCEPTION_NAME",
    "Extractor",
    "FeatureSet",
    "FeatureStats",
    "Images",
    "InceptionV3Features",
    "InceptionWeightsError",
    "available_metrics",
    "check_reference",
    "compute_metrics",
    "default_weights_path",
    "extract_features",
    "extractor_name",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "load_inception_weights",
    "load_reference",
    "metrics_from_features",
    "precision_recall",
    "save_reference",
    "trace_sqrt_product",
]

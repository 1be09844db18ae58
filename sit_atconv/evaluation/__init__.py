"""Evaluation: sharded distributed generation, the digits feature extractor, FID end to end (eval_fid.py).

`generate` (checkpoint -> resumable shards -> samples.npz) <- `run` (samples -> features -> metrics.json);
`sweep` runs `evaluate` over samplers, NFE budgets and CFG scales (FID against NFE);
`digits_features` is the offline extractor for the digits default, `train_digits_classifier` rebuilds it.
"""

from ..errors import GenerationError
from .digits_features import DIGITS_EXTRACTOR_NAME, DigitsFeatures
from .generate import generate_samples
from .run import evaluate, format_table

__all__ = ["DIGITS_EXTRACTOR_NAME", "DigitsFeatures", "GenerationError", "evaluate", "format_table",
           "generate_samples"]

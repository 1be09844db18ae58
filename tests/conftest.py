"""Pin the test environment: one thread, offline hubs, no wandb, temporary caches, fixed seeds."""

import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="sit_atconv_test_cache_")
for key, value in {
    "OMP_NUM_THREADS": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": os.path.join(_CACHE, "hf"),
    "TORCH_HOME": os.path.join(_CACHE, "torch"),
    "XDG_CACHE_HOME": os.path.join(_CACHE, "xdg"),
    "WANDB_MODE": "disabled",
    "WANDB_DIR": os.path.join(_CACHE, "wandb"),
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[key] = value

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level CLIs (train.py, sample.py, ...)

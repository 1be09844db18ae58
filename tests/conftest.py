"""Pin the test environment (one thread, offline hubs, no wandb, temporary caches, fixed seeds) and share
the fixtures several test modules need: a clean Accelerate state, the tiny config, one trained tiny run."""

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

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the top-level CLIs (train.py, sample.py, ...)
torch.set_num_threads(1)

TRAINED_STEPS = 200  # the shared trained run: ~12 s on one core, enough for digits-like samples


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide singletons (a new Accelerator may then use other settings)."""
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


@pytest.fixture(autouse=True)
def _seed_and_fresh_accelerate():
    torch.manual_seed(0)
    reset_accelerate()
    yield
    reset_accelerate()


def exit_code(main, argv) -> int:
    """A CLI's exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def tiny_config(results_dir, run_name: str, *overrides: str):
    """The `tiny` debug config in `results_dir/run_name`, with 'section.field=value' overrides."""
    from sit_atconv.config_io import load_config

    return load_config("tiny", [f"log.results_dir={results_dir}", f"log.run_name={run_name}", *overrides])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One tiny digits run trained for TRAINED_STEPS steps, shared by sampling and evaluation tests."""
    from sit_atconv.train import train

    reset_accelerate()
    cfg = tiny_config(tmp_path_factory.mktemp("runs"), "trained", "train.global_batch_size=64",
                      f"train.max_steps={TRAINED_STEPS}", f"log.ckpt_every={TRAINED_STEPS}", "log.log_every=1000",
                      "train.ema_decay=0.95", "optim.lr=4e-3")
    out = train(cfg)
    reset_accelerate()
    return out


def fake_state(rank: int = 0, world: int = 1):
    """The parts of accelerate.PartialState that extraction uses, for one rank of a sequential 'world'."""
    from types import SimpleNamespace

    return SimpleNamespace(process_index=rank, num_processes=world, is_main_process=rank == 0,
                           is_local_main_process=rank == 0, device=torch.device("cpu"),
                           wait_for_everyone=lambda: None)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory) -> str:
    """A small random diffusers AutoencoderKL (8x downsampling, 4 latent channels) saved to a folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                        norm_num_groups=32)
    folder = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(folder)
    return str(folder)


def write_image_folder(root: Path, counts: dict[str, int], side: int, scale=(1.0, 1.0, 1.0),
                       offset=(0.0, 0.0, 0.0)) -> Path:
    """An ImageFolder of random RGB PNGs, root/<class>/<i>.png, `counts` images per class, drawn in order from
    one seeded generator; `scale` and `offset` per channel tint them (distinct channel statistics)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir()
        for i in range(n):
            pixels = rng.integers(0, 256, (side, side, 3)) * np.array(scale) + np.array(offset)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / cls / f"{i}.png")
    return root

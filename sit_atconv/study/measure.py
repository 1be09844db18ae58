"""What a study measures beside training and FID: a mixer's training speed (the equal-seconds calibration)
and a trained cell's size and sampling speed."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from accelerate import PartialState

from ..build import load_run
from ..config import RunConfig, validate
from ..sampling import SamplingOptions
from ..train import train
from ..train.plots import read_log
from .budget import CALIBRATION_STEPS, CALIBRATION_WARMUP, timed_steps_per_sec

CALIBRATION_DIR = "calibration"  # OUT/calibration/<mixer>: the throw-away runs that time each mixer
SAMPLING_BATCH = 64  # images in the timed sampling batch (eval_fid's default batch)


def device_name(state: PartialState) -> str:
    """'cuda: NVIDIA H200' or 'cpu': where a speed was measured."""
    device = state.device
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def calibration_config(base: RunConfig, mixer: str, seed: int, out: Path) -> RunConfig:
    """`base` as a short timing run in OUT/calibration/<mixer>: warm-up steps, then timed steps, one log line
    per CALIBRATION_WARMUP steps, no previews, no trackers, one checkpoint at the end."""
    cfg = copy.deepcopy(base)
    total = CALIBRATION_WARMUP + CALIBRATION_STEPS
    cfg.model.mixer, cfg.train.seed, cfg.train.max_steps, cfg.train.resume = mixer, seed, total, "auto"
    lg = cfg.log
    lg.results_dir, lg.run_name = str(out / CALIBRATION_DIR), mixer
    lg.log_every, lg.ckpt_every = CALIBRATION_WARMUP, total
    lg.keep_last, lg.keep_every, lg.preview_every, lg.trackers = 1, None, 0, []
    return validate(cfg)


def calibrate(base: RunConfig, mixer: str, seed: int, out: Path, state: PartialState) -> dict | None:
    """Train the calibration run of `mixer` (all processes); its timed steps/s on the main process, else None."""
    run_dir = train(calibration_config(base, mixer, seed, out))
    if not state.is_main_process:
        return None
    rate = timed_steps_per_sec(read_log(run_dir / "metrics.jsonl"), CALIBRATION_WARMUP)
    return {"steps_per_sec": rate, "warmup_steps": CALIBRATION_WARMUP, "timed_steps": CALIBRATION_STEPS,
            "device": device_name(state), "processes": state.num_processes, "run_dir": str(run_dir)}


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the SiT itself (a REPA projector, used only in training, is left out)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("projectors."))


@torch.no_grad()
def sampling_speed(ckpt: Path, device: torch.device, batch: int = SAMPLING_BATCH, seed: int = 0) -> dict:
    """{params, sampling_images_per_sec, ...} of a checkpoint: one warm-up batch, then one timed batch of `batch`
    images drawn end to end (noise -> sampler -> decoded uint8) with the run's own sampler settings and EMA."""
    run = load_run(ckpt, device)
    sampler, opts = run.sampler(), SamplingOptions().resolved(run.cfg.transport)
    labels = torch.arange(batch) % run.cfg.model.num_classes

    def draw() -> None:
        sampler.images(opts, labels, range(batch), seed, device, batch_size=batch, show_progress=False)

    draw()
    start = time.perf_counter()
    draw()  # returns CPU images: the device work is finished when it returns
    seconds = time.perf_counter() - start
    return {"params": count_params(run.model), "sampling_images_per_sec": batch / seconds,
            "sampling": {"batch": batch, "seconds": seconds, "sampler": opts.tag(), "step": run.step}}

"""Faults: a real SIGTERM mid-run then an identical continuation, non-finite weights never checkpointed,
one trainer per run folder, a corrupt newest checkpoint skipped on resume, no duplicate metric steps."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate, tiny_config

from sit_atconv.build import build_model
from sit_atconv.checkpoint import list_checkpoints, load_checkpoint
from sit_atconv.errors import RunError
from sit_atconv.train import train
from sit_atconv.train.ema import create_ema
from sit_atconv.train.guards import RunLock
from sit_atconv.train.loop import LoopSettings, TrainState, _checkpoint
from sit_atconv.train.optim import build_optimizer, lr_schedule

ROOT = Path(__file__).resolve().parent.parent


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_continues_exactly(tmp_path):
    argv = [sys.executable, str(ROOT / "train.py"), "--config", "tiny", "--results-dir", str(tmp_path),
            "--max-steps", "300", "--ckpt-every", "1000", "--log.log_every", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv + ["--run-name", "stopped"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics, deadline = tmp_path / "stopped" / "metrics.jsonl", time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = list_checkpoints(tmp_path / "stopped")
    assert len(saved) == 1 and 0 < saved[0][0] < 300, out
    assert f"stopped by SIGTERM at step {saved[0][0]}: checkpoint written; rerun the same command" in out
    for name in ("stopped", "straight"):  # the same command again; and an uninterrupted run
        done = subprocess.run(argv + ["--run-name", name], cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    a, b = load_checkpoint(tmp_path / "stopped"), load_checkpoint(tmp_path / "straight")
    assert a["step"] == b["step"] == 300 and all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    steps = _steps(tmp_path / "stopped")
    assert steps == sorted(set(steps))  # no step logged twice


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    cfg = tiny_config(tmp_path, "nan")
    model = build_model(cfg)
    optimizer = build_optimizer(model, 1e-3, 0.0)
    state = TrainState(model, create_ema(model), optimizer, lr_schedule(optimizer, cfg), step=7)
    with torch.no_grad():
        model.final_layer.linear.weight[0, 0] = float("nan")
    from accelerate import Accelerator

    with pytest.raises(RunError, match="non-finite by step 7; no checkpoint written"):
        _checkpoint(state, tmp_path / "nan", LoopSettings.from_config(cfg), {}, Accelerator(cpu=True))
    assert not list_checkpoints(tmp_path / "nan")


def test_a_diverging_run_stops_with_one_line_and_keeps_its_finite_checkpoints(tmp_path):
    train(tiny_config(tmp_path, "boom", "train.max_steps=10", "log.ckpt_every=5"))
    reset_accelerate()
    with pytest.raises(RunError, match=r"non-finite (steps in a row )?by step"):
        train(tiny_config(tmp_path, "boom", "train.max_steps=40", "log.ckpt_every=5", "optim.lr=1e30"))
    kept = list_checkpoints(tmp_path / "boom")
    assert kept and all(torch.isfinite(v).all() for s, p in kept for v in load_checkpoint(p)["ema"].values())


def test_one_trainer_per_run_folder(tmp_path):
    run = tmp_path / "locked"
    with RunLock(run):
        with pytest.raises(RunError, match=r"is being trained by .* pid \d+"):
            train(tiny_config(tmp_path, "locked", "train.max_steps=2"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(f"{os.uname().nodename} {dead.pid}\n")  # left by a process that is gone
    reset_accelerate()
    assert train(tiny_config(tmp_path, "locked", "train.max_steps=2", "log.ckpt_every=2")) == run
    assert not (run / ".lock").exists() and list_checkpoints(run)


def test_a_corrupt_newest_checkpoint_is_skipped_and_the_log_has_no_duplicates(tmp_path, capsys):
    straight = train(tiny_config(tmp_path, "straight", "train.max_steps=20"))
    reset_accelerate()
    run = train(tiny_config(tmp_path, "hurt", "train.max_steps=20"))
    newest = list_checkpoints(run)[-1][1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated mid-write by a crash
    (newest.parent / f".{newest.name}.x.tmp").write_bytes(b"half")
    reset_accelerate()
    capsys.readouterr()
    train(tiny_config(tmp_path, "hurt", "train.max_steps=20"))
    out = capsys.readouterr().out
    assert f"skipping {newest.name}" in out and "resuming from step_0000010.pt (step 10)" in out
    a, b = load_checkpoint(run), load_checkpoint(straight)
    assert a["step"] == 20 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not list(newest.parent.glob(".*.tmp"))
    assert _steps(run) == _steps(straight) == [5, 10, 15, 20]


def test_a_changed_optimizer_setting_is_applied_and_said_on_resume(tmp_path, capsys):
    train(tiny_config(tmp_path, "lr", "train.max_steps=10"))
    reset_accelerate()
    capsys.readouterr()
    run = train(tiny_config(tmp_path, "lr", "train.max_steps=20", "optim.lr=5e-4", "optim.weight_decay=0.1"))
    out = capsys.readouterr().out
    assert "changed settings, applied from here on: optim.lr 0.002 -> 0.0005; optim.weight_decay 0.0 -> 0.1" in out
    groups = load_checkpoint(run)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [5e-4, 5e-4] and [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [
        0.002, 0.002, 5e-4, 5e-4]


@pytest.fixture(scope="module")
def broken_inputs(tmp_path_factory):
    """A zero-byte checkpoint, an .npz that is no reference, an image folder with a corrupt file, and a tiny
    unconditional run."""
    root = tmp_path_factory.mktemp("bad")
    (root / "zero.pt").write_bytes(b"")
    np_mod = pytest.importorskip("numpy")
    np_mod.savez(root / "notref.npz", something=np_mod.zeros(3))
    from PIL import Image

    (root / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "images" / "a" / "ok.png")
    (root / "images" / "a" / "broken.png").write_bytes(b"not a png")
    reset_accelerate()
    train(tiny_config(root, "uncond", "model.num_classes=1", "train.max_steps=2", "log.ckpt_every=2"))
    reset_accelerate()
    return root


@pytest.mark.parametrize("cli,argv,phrase", [
    ("sample", ["--ckpt", "{root}/zero.pt"], "zero.pt: unreadable or truncated checkpoint"),
    ("eval_fid", ["--ckpt", "{root}/zero.pt"], "zero.pt: unreadable or truncated checkpoint"),
    ("convert", ["{root}/zero.pt", "{root}/out.safetensors"], "zero.pt: unreadable or truncated checkpoint"),
    ("eval_fid", ["--ckpt", "{root}/uncond", "--ref", "{root}/notref.npz"], "neither 'arr_0' images nor"),
    ("sample", ["--ckpt", "{root}/uncond", "--cfg-scale", "4"], "this model is unconditional"),
    ("train", ["--config", "tiny", "--optim.lr", "inf"], "optim.lr: expected a finite number"),
    ("train", ["--config", "tiny", "--results-dir", "{root}", "--run-name", "img", "--data.source", "images",
               "--data-path", "{root}/images", "--data.autoencoder", "identity", "--model.in_channels", "3",
               "--data.num_workers", "2", "--data.random_flip", "false"], "broken.png: cannot read image"),
    ("sample", ["--ckpt", "{root}"], "it holds run folders (uncond): pass one of them"),
])
def test_bad_input_is_one_line_and_exit_2(broken_inputs, capsys, cli, argv, phrase):
    import importlib

    from conftest import exit_code

    module = importlib.import_module("sit_atconv.convert" if cli == "convert" else cli)
    argv = [a.format(root=broken_inputs) for a in argv]
    assert exit_code(module.main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and phrase in err[-1] and err[-1].startswith("error: ") and len(
        [line for line in err if line.startswith("error: ")]) == 1, err


def test_writes_get_umask_permissions_and_leave_no_temp_files(tmp_path):
    from sit_atconv.io import write_text_atomic

    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "a" / "config.yaml", "x: 1\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644 and path.read_text() == "x: 1\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]


def test_non_finite_sampler_numbers_are_refused(capsys):
    from conftest import exit_code

    import sample

    for flag in ("--cfg-scale", "--atol"):
        assert exit_code(sample.main, [flag, "inf"]) == 2
        assert "must be a finite number" in capsys.readouterr().err


class NaNAtSteps:
    """A task whose loss is NaN on chosen calls (1-based), else the mean square of the model's output."""

    name = "nan"

    def __init__(self, bad_calls):
        self.bad_calls, self.calls = set(bad_calls), 0

    def prepare(self, batch):
        return batch

    def loss(self, model, batch):
        self.calls += 1
        x, y = batch
        loss = (model(x, torch.full((len(x),), 0.5), y) - x).square().mean()  # gradients flow from step 1
        return (loss * float("nan") if self.calls in self.bad_calls else loss), {}

    def preview(self, model, step, run_dir):
        return {}


def _run_task(tmp_path, task, max_bad, mode="step", fused=None):
    from accelerate import Accelerator

    from sit_atconv.build import build_dataset
    from sit_atconv.config import config_to_dict
    from sit_atconv.train.loop import training_loop
    from sit_atconv.train.trackers import Tracker

    cfg = tiny_config(tmp_path, "guard", "train.max_steps=6", "log.ckpt_every=6", "log.log_every=6",
                      f"train.max_bad_steps={max_bad}", f"train.nonfinite_check={mode}")
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, 1e-3, 0.0, fused=fused)
    state = TrainState(model, create_ema(model), optimizer, lr_schedule(optimizer, cfg))
    (tmp_path / "guard").mkdir(parents=True, exist_ok=True)
    tracker = Tracker(tmp_path / "guard", [], {})
    try:
        training_loop(task, state, build_dataset(cfg), Accelerator(cpu=True), tmp_path / "guard",
                      LoopSettings.from_config(cfg), tracker, config_to_dict(cfg))
    finally:
        tracker.close()
    return state


def test_non_finite_steps_are_skipped_in_place_then_stop_the_run(tmp_path):
    state = _run_task(tmp_path, NaNAtSteps({3, 4}), max_bad=2)
    logs = [json.loads(line) for line in (tmp_path / "guard" / "metrics.jsonl").read_text().splitlines()]
    assert state.step == 6 and logs[-1]["skipped_steps"] == 2 and math.isfinite(logs[-1]["loss"])
    assert all(torch.isfinite(p).all() for p in state.model.parameters())
    assert load_checkpoint(tmp_path / "guard")["step"] == 6
    reset_accelerate()
    with pytest.raises(RunError, match="3 non-finite steps in a row by step 5"):
        _run_task(tmp_path / "b", NaNAtSteps({3, 4, 5}), max_bad=2)


def test_the_device_side_guard_skips_exactly_what_the_host_side_guard_skips(tmp_path):
    """nonfinite_check=device (no host sync per step: the fused optimizer's found_inf, a 0/1 EMA weight,
    counts read at log steps) ends in the same weights as the per-step host check."""
    host = _run_task(tmp_path / "host", NaNAtSteps({2, 3}), max_bad=2, fused=True)
    reset_accelerate()
    device = _run_task(tmp_path / "device", NaNAtSteps({2, 3}), max_bad=2, mode="device", fused=True)
    for a, b in [(host.model, device.model), (host.ema, device.ema)]:
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    logs = [json.loads(line) for line in (tmp_path / "device" / "guard" / "metrics.jsonl").read_text().splitlines()]
    assert logs[-1]["skipped_steps"] == 2 and math.isfinite(logs[-1]["loss"])
    reset_accelerate()
    plain = _run_task(tmp_path / "plain", NaNAtSteps(set()), max_bad=2, mode="device", fused=True)
    assert not all(torch.equal(x, y) for x, y in zip(plain.model.parameters(), host.model.parameters()))
    reset_accelerate()
    with pytest.raises(RunError, match="3 non-finite steps in a row by step 6"):  # seen at the next sync point
        _run_task(tmp_path / "stop", NaNAtSteps({3, 4, 5}), max_bad=2, mode="device", fused=True)
    assert not list_checkpoints(tmp_path / "stop" / "guard")

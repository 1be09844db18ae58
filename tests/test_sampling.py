"""Checkpoint -> images: per-image seeds, sample.py end to end."""

import numpy as np
import pytest
import torch
from conftest import exit_code

import sample as sample_cli
from sit_atconv.build import load_run
from sit_atconv.sampling import SamplingOptions


@pytest.mark.parametrize("mode,method", [("ode", "euler"), ("ode", "heun2"), ("sde", "Euler"), ("sde", "Heun")])
def test_images_do_not_depend_on_batch_size(trained_run, mode, method):
    sampler = load_run(trained_run).sampler()
    opts = SamplingOptions(mode=mode, sampling_method=method, num_steps=6, cfg_scale=2.0)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    a = sampler.images(opts, labels, range(7), 3, batch_size=7, show_progress=False)
    b = sampler.images(opts, labels, range(7), 3, batch_size=3, show_progress=False)
    c = sampler.images(opts, labels[4:], range(4, 7), 3, batch_size=2, show_progress=False)
    assert a.dtype == torch.uint8 and a.shape == (7, 16, 16, 3)
    assert torch.equal(a, b) and torch.equal(a[4:], c)  # fixed-step samplers: exact per-image determinism
    d = sampler.images(opts, labels, range(7), 4, batch_size=7, show_progress=False)
    assert not torch.equal(a, d)


def test_unset_options_come_from_the_run_and_zero_is_not_default(trained_run):
    cfg = load_run(trained_run).cfg
    resolved = SamplingOptions().resolved(cfg.transport)
    assert (resolved.mode, resolved.sampling_method, resolved.num_steps) == ("ode", "euler", 32)
    assert resolved.cfg_scale == 2.0
    assert SamplingOptions(cfg_scale=0.0).resolved(cfg.transport).cfg_scale == 0.0
    assert SamplingOptions(mode="sde").resolved(cfg.transport).sampling_method == "Euler"


def test_sample_cli_is_deterministic(trained_run, tmp_path, capsys):
    args = ["--ckpt", str(trained_run), "--num-steps", "5", "--class-labels", "1", "7", "--num-samples", "6",
            "--save-npz", "--seed", "11"]
    assert sample_cli.main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert sample_cli.main(args + ["--out", str(tmp_path / "b.png")]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].shape == (6, 16, 16, 3)
    assert a["labels"].tolist() == [1, 1, 1, 7, 7, 7]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sample_cli.main(args + ["--out", str(tmp_path / "a.png")]) == 2  # refuses to overwrite


@pytest.mark.parametrize("argv,needle", [
    (["--class-labels", "12"], "--class-labels [12] out of range"),
    (["--num-samples", "0"], "--num-samples: must be a positive integer, got 0"),
    (["--num-steps", "0"], "--num-steps: must be a positive integer"),
    (["--batch-size", "-3"], "--batch-size: must be a positive integer"),
    (["--num-stepz", "4"], "did you mean '--num-steps'"),
])
def test_sample_cli_bad_input_is_one_line(trained_run, capsys, argv, needle):
    assert exit_code(sample_cli.main, ["--ckpt", str(trained_run), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error: ") and err.count("\n") == 1

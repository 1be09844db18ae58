"""Checkpoint -> images: per-image seeds, sample.py end to end."""

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, PartialState

import sample as sample_cli
from sit_atconv.config import load_config
from sit_atconv.sampling import SamplingOptions, autoencoder_for, generate, load_run
from sit_atconv.train.trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config("digits", ["model.depth=2", "model.hidden_size=32", "model.num_heads=2",
                                 "optim.global_batch_size=16", "optim.max_steps=4", "log.ckpt_every=4",
                                 "log.sample_every=4", f"log.results_dir={root}", "log.run_name=tiny"])
    out = train(cfg)
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    with torch.no_grad():  # give the zero-initialised output layer weights so samples depend on the model
        state = torch.load(out / "checkpoints" / "step_0000004.pt", weights_only=True)
        for key in ("final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"):
            state["ema"][key] = torch.randn_like(state["ema"][key]) * 0.3
        torch.save(state, out / "checkpoints" / "step_0000004.pt")
    return out


@pytest.mark.parametrize("mode,method", [("ode", "euler"), ("ode", "heun2"), ("sde", "Euler"), ("sde", "Heun")])
def test_images_do_not_depend_on_batch_size(run_dir, mode, method):
    model, cfg, step, _ = load_run(run_dir)
    opts = SamplingOptions(mode=mode, sampling_method=method, num_steps=6, cfg_scale=2.0)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6])
    ae = autoencoder_for(cfg, "cpu")
    a = generate(model, cfg, opts, labels, range(7), 3, ae, batch_size=7, show_progress=False)
    b = generate(model, cfg, opts, labels, range(7), 3, ae, batch_size=3, show_progress=False)
    c = generate(model, cfg, opts, labels[4:], range(4, 7), 3, ae, batch_size=2, show_progress=False)
    assert a.dtype == torch.uint8 and a.shape == (7, 16, 16, 3)
    assert torch.equal(a, b) and torch.equal(a[4:], c)  # fixed-step samplers: exact per-image determinism
    d = generate(model, cfg, opts, labels, range(7), 4, ae, batch_size=7, show_progress=False)
    assert not torch.equal(a, d)


def test_sample_cli_is_deterministic(run_dir, tmp_path, capsys):
    args = ["--ckpt", str(run_dir), "--num-steps", "5", "--class-labels", "1", "7", "--num-samples", "6",
            "--save-npz", "--seed", "11"]
    assert sample_cli.main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert sample_cli.main(args + ["--out", str(tmp_path / "b.png")]) == 0
    assert "wrote" in capsys.readouterr().out
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].shape == (6, 16, 16, 3)
    assert a["labels"].tolist() == [1, 1, 1, 7, 7, 7]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sample_cli.main(args + ["--out", str(tmp_path / "a.png")]) == 2  # refuses to overwrite
    assert sample_cli.main(["--ckpt", str(run_dir), "--class-labels", "12"]) == 2

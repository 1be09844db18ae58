"""Post-hoc EMA (EDM2): the math, the tracking in training (snapshots, bit-exact resume), and the CLI export
that sample.py and eval_fid.py read."""

import math

import pytest
import torch
from conftest import exit_code, reset_accelerate, tiny_config
from torch import nn

from sit_atconv.checkpoint import load_checkpoint, load_tensors
from sit_atconv.errors import CheckpointError, ConfigError, RunError
from sit_atconv.posthoc_ema import (
    MAX_SIGMA_REL,
    WeightedSum,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    power_ema_beta,
    profile_fit_error,
    sigma_rel_to_gamma,
)
from sit_atconv.train import train
from sit_atconv.train.ema import PowerFunctionEMA
from sit_atconv.train.phema_snapshots import list_snapshots, reconstruct, snapshot_record

TRACKED = "train.phema_sigma_rels=0.05,0.10"

# ------------------------------------------------------------------------------------------------ math


def test_sigma_rel_and_gamma_round_trip():
    for sigma in (0.01, 0.05, 0.07, 0.10, 0.2, MAX_SIGMA_REL):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-12)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's pair of widths, Sec. 3.1
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == pytest.approx(0.0, abs=1e-12)  # the plain average
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(ValueError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)


def test_beta_updates_weight_each_step_by_the_power_function():
    """Tracking one-hot 'weights' e_1..e_t exposes the weight of each step: the mass of (γ+1) τ^γ / t^(γ+1)
    on (τ-1, τ] — what the continuous inner products assume."""
    t, gamma = 30, sigma_rel_to_gamma(0.1)
    ema = torch.zeros(t, dtype=torch.float64)
    for step in range(1, t + 1):
        ema.lerp_(torch.eye(t, dtype=torch.float64)[step - 1], 1.0 - power_ema_beta(gamma, step))
    tau = torch.arange(1, t + 1, dtype=torch.float64)
    expected = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / t ** (gamma + 1)
    torch.testing.assert_close(ema, expected, rtol=1e-12, atol=1e-15)
    assert power_ema_beta(gamma, 1) == 0.0  # step 1 is the first: the profile starts at θ_1


def _toy_tracking(every=20, total=400):
    """A linear layer whose weights follow a drifting random walk, tracked at widths 0.05, 0.10 (snapshots)
    and 0.07 (directly)."""
    torch.manual_seed(0)
    model = nn.Linear(16, 16)
    model.register_buffer("constant", torch.randn(3))
    phema = PowerFunctionEMA(model, [0.05, 0.10, 0.07])
    snapshots = []
    for step in range(1, total + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p) + 0.002)
        phema.update(model, step)
        if step % every == 0:
            snapshots += [(step, g, {k: v.clone() for k, v in p.state_dict().items()})
                          for g, p in zip(phema.gammas[:2], phema.profiles[:2])]
    return phema, snapshots


def _combine(snapshots, target_step, target_gamma):
    steps, gammas = [s[0] for s in snapshots], [s[1] for s in snapshots]
    x = posthoc_coefficients(steps, gammas, target_step, target_gamma)
    total = WeightedSum()
    for (_, _, state), w in zip(snapshots, x):
        total.add(state, float(w))
    return total.result(), profile_fit_error(steps, gammas, x, target_step, target_gamma)


def test_reconstruction_matches_a_directly_tracked_profile():
    phema, snapshots = _toy_tracking()
    rebuilt, fit_error = _combine(snapshots, 400, phema.gammas[2])
    tracked = phema.profiles[2].state_dict()
    narrow, wide = phema.profiles[0].state_dict(), phema.profiles[1].state_dict()
    assert fit_error < 0.005
    for key in ("weight", "bias"):
        error = (rebuilt[key] - tracked[key]).norm() / (narrow[key] - wide[key]).norm()
        assert error < 2e-3, key  # the tracked widths themselves differ by 1 on this scale
    assert torch.equal(rebuilt["constant"], tracked["constant"])  # buffers equal in every snapshot: kept exactly


def test_a_tracked_width_is_reconstructed_exactly():
    phema, snapshots = _toy_tracking()
    for i in range(2):
        rebuilt, fit_error = _combine(snapshots, 400, phema.gammas[i])
        assert fit_error < 1e-6
        assert all(torch.equal(rebuilt[k], v) for k, v in phema.profiles[i].state_dict().items())
    earlier, _ = _combine([s for s in snapshots if s[0] <= 200], 200, phema.gammas[1])
    assert torch.equal(earlier["weight"], snapshots[19][2]["weight"])  # step 200, width 0.10


def test_weighted_sum_keeps_counters_from_the_last_state():
    total = WeightedSum()
    total.add({"w": torch.ones(2), "n": torch.tensor(3)}, 0.25)
    total.add({"w": 3 * torch.ones(2), "n": torch.tensor(5)}, 0.75)
    out = total.result()
    assert torch.equal(out["w"], torch.full((2,), 2.5)) and out["n"].item() == 5 and out["w"].dtype == torch.float32


# ------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 20-step tiny run tracking widths 0.05 and 0.10 (snapshots every 5 steps), and the same run stopped at
    step 10 and resumed."""
    root = tmp_path_factory.mktemp("phema")
    out = {}
    for name, steps in (("full", 20), ("part", 10), ("part", 20)):
        reset_accelerate()
        out[name] = train(tiny_config(root, name, f"train.max_steps={steps}", TRACKED, "train.phema_every=5"))
    reset_accelerate()
    return out


def test_snapshots_are_written_and_resume_is_bit_exact(runs):
    full, resumed = list_snapshots(runs["full"]), list_snapshots(runs["part"])
    assert [(s.step, s.sigma_rel) for s in full] == [(t, w) for t in (5, 10, 15, 20) for w in (0.05, 0.1)]
    assert [(s.step, s.sigma_rel) for s in resumed] == [(s.step, s.sigma_rel) for s in full]
    for a, b in zip(full, resumed):
        x, y = load_tensors(a.path), load_tensors(b.path)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        assert snapshot_record(a.path)["step"] == a.step
    a, b = load_checkpoint(runs["full"]), load_checkpoint(runs["part"])
    assert a["phema"]["sigma_rels"] == [0.05, 0.1]
    for x, y in [(a["model"], b["model"]), (a["ema"], b["ema"]), *zip(a["phema"]["profiles"], b["phema"]["profiles"])]:
        assert all(torch.equal(x[k], y[k]) for k in x)
    last = load_tensors(full[-1].path)  # the step-20 snapshot is the checkpoint's profile
    assert all(torch.equal(last[k], a["phema"]["profiles"][1][k]) for k in last)
    narrow = load_tensors(full[-2].path)  # and the widths differ: the comparisons above can fail
    assert not torch.equal(narrow["final_layer.linear.weight"], last["final_layer.linear.weight"])


def test_changed_widths_are_refused_on_resume(runs, tmp_path):
    for widths in ("train.phema_sigma_rels=0.05,0.12", "train.phema_sigma_rels=none"):
        with pytest.raises(RunError, match=r"^train\.phema_sigma_rels: step_0000020\.pt tracks \[0\.05, 0\.1\]"):
            train(tiny_config(runs["part"].parent, "part", "train.max_steps=30", widths, "train.phema_every=5"))
        reset_accelerate()
    train(tiny_config(tmp_path, "plain", "train.max_steps=2", "log.ckpt_every=2"))
    reset_accelerate()
    with pytest.raises(RunError, match="tracks none, asked \\[0.05, 0.1\\]"):  # profiles cannot start mid-run
        train(tiny_config(tmp_path, "plain", "train.max_steps=4", TRACKED))


def test_config_refuses_bad_widths():
    for bad in ("train.phema_sigma_rels=0.5", "train.phema_sigma_rels=0,0.1", "train.phema_sigma_rels=0.1,0.1",
                "train.phema_every=0"):
        with pytest.raises(ConfigError, match="train.phema_"):
            tiny_config("/tmp", "x", bad)


class NaNAtCall:
    """A task whose loss is NaN on one call (1-based): that step is skipped (no optimizer step, no EMA)."""

    name = "nan"

    def __init__(self, bad_call):
        self.bad_call, self.calls = bad_call, 0

    def prepare(self, batch):
        return batch

    def loss(self, model, batch):
        self.calls += 1
        x, y = batch
        loss = model(x, torch.full((len(x),), 0.5), y).square().mean() + 1.0
        return (loss * float("nan") if self.calls == self.bad_call else loss), {}

    def preview(self, model, step, run_dir):
        return {}


def test_a_skipped_step_leaves_the_profiles_alone(tmp_path):
    from accelerate import Accelerator

    from sit_atconv.build import build_dataset, build_model
    from sit_atconv.config import config_to_dict
    from sit_atconv.train.ema import create_ema
    from sit_atconv.train.loop import LoopSettings, TrainState, training_loop
    from sit_atconv.train.optim import build_optimizer, lr_schedule
    from sit_atconv.train.trackers import Tracker

    cfg = tiny_config(tmp_path, "skip", "train.max_steps=3", "log.ckpt_every=3", TRACKED, "train.phema_every=1")
    model = build_model(cfg)
    with torch.no_grad():  # the output layer starts at zero: give the loss a gradient
        model.final_layer.linear.bias.fill_(0.5)
    optimizer = build_optimizer(model, 1e-3, 0.0)
    state = TrainState(model, create_ema(model), optimizer, lr_schedule(optimizer, cfg),
                       phema=PowerFunctionEMA(model, [0.05, 0.1]))
    (tmp_path / "skip").mkdir()
    tracker = Tracker(tmp_path / "skip", [], {})
    training_loop(NaNAtCall(3), state, build_dataset(cfg), Accelerator(cpu=True), tmp_path / "skip",
                  LoopSettings.from_config(cfg), tracker, config_to_dict(cfg))
    tracker.close()
    by_step = {(s.step, s.sigma_rel): load_tensors(s.path) for s in list_snapshots(tmp_path / "skip")}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(by_step[3, 0.1], by_step[2, 0.1]) and not same(by_step[2, 0.1], by_step[1, 0.1])


# ------------------------------------------------------------------------------------------------- CLI

def test_cli_export_loads_with_load_run_and_samples(runs, tmp_path, capsys):
    import sample
    from sit_atconv import phema
    from sit_atconv.build import load_run

    assert phema.main([str(runs["full"]), "--sigma-rel", "0.07", "--step", "20"]) == 0
    line = capsys.readouterr().out.strip()
    out = runs["full"] / "exports" / "phema-sigma_0.07-step_0000020.pt"
    assert line.startswith("σ_rel 0.07 at step 20 from 8 snapshots (steps 5-20, widths 0.05, 0.1;") and str(out) in line
    run = load_run(out)
    expected = reconstruct(runs["full"], 0.07).weights
    assert run.step == 20 and all(torch.equal(v, expected[k]) for k, v in run.model.state_dict().items())
    assert math.isclose(load_checkpoint(out)["phema"]["sigma_rel"], 0.07)
    png = tmp_path / "grid.png"
    assert sample.main(["--ckpt", str(out), "--num-samples", "2", "--num-steps", "2", "--out", str(png)]) == 0
    assert png.is_file()
    assert exit_code(sample.main, ["--ckpt", str(out), "--raw", "--out", str(tmp_path / "raw.png")]) == 2
    assert "sampling-only export" in capsys.readouterr().err

    tracked = tmp_path / "tracked.pt"  # a tracked width comes out exactly as the run tracked it
    assert phema.main([str(runs["full"]), "--sigma-rel", "0.1", "--out", str(tracked)]) == 0
    profile = load_checkpoint(runs["full"])["phema"]["profiles"][1]
    assert all(torch.equal(v, profile[k]) for k, v in load_run(tracked).model.state_dict().items())
    with pytest.raises(CheckpointError, match="has no 'model'"):
        load_run(tracked, use_ema=False)


def test_cli_errors_are_one_line(runs, tmp_path, capsys):
    from sit_atconv import phema

    train(tiny_config(tmp_path, "plain", "train.max_steps=2", "log.ckpt_every=2"))
    capsys.readouterr()
    cases = [([str(tmp_path / "plain"), "--sigma-rel", "0.07"], "no post-hoc EMA snapshots"),
             ([str(runs["full"]), "--sigma-rel", "0.5"], "must be in (0, 0.2887]"),
             ([str(runs["full"]), "--sigma-rel", "0.07", "--step", "7"], "snapshot steps: 5, 10, 15, 20"),
             ([str(runs["full"]), "--sigma-rel", "0.2", "--out", str(tmp_path / "x.pt")], "too few snapshots"),
             ([str(runs["full"]), "--sigma-rel", "0.07", "--out", str(tmp_path / "x.safetensors")], "name it *.pt"),
             ([str(runs["full"]), "--sigma-rel", "0.07", "--out", str(runs["full"] / "checkpoints" / "a.pt")],
              "out of a checkpoints/ folder")]
    for argv, message in cases:
        assert exit_code(phema.main, argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.pt").exists()
    assert list_snapshots(tmp_path / "plain") == []

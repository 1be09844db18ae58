"""eval_fid.py: sharded resumable distributed generation, digits extractor, metrics.json, FID on digits."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from accelerate import debug_launcher
from accelerate.state import PartialState
from conftest import TRAINED_STEPS

import eval_fid
from sit_atconv.build import build_model, load_run
from sit_atconv.data import DigitsDataset
from sit_atconv.errors import GenerationError
from sit_atconv.evaluation import generate as gen_module
from sit_atconv.evaluation import run as run_module
from sit_atconv.evaluation import train_digits_classifier
from sit_atconv.evaluation.digits_features import (
    DIGITS_EXTRACTOR_NAME,
    DigitsFeatures,
    digits_uint8,
    weights_metadata,
)
from sit_atconv.evaluation.generate import generate_samples, shard_path
from sit_atconv.metrics import INCEPTION_NAME
from sit_atconv.sampling import SamplingOptions

OPTS = SamplingOptions(mode="sde", sampling_method="Euler", num_steps=4, cfg_scale=2.0)  # per-step noise too
N, SHARD = 10, 3  # shards [0,3) [3,6) [6,9) [9,10)


@pytest.fixture(scope="module")
def run_dir(trained_run):
    """The shared tiny trained run (conftest)."""
    return trained_run


def _same(data, reference_set) -> bool:
    images, labels = reference_set
    return np.array_equal(data["arr_0"], images) and np.array_equal(data["labels"], labels)


@pytest.fixture(scope="module")
def reference_set(run_dir, tmp_path_factory):
    """N images from one process, batch size 4, uninterrupted."""
    run = load_run(run_dir)
    out = tmp_path_factory.mktemp("gen") / "ref"
    npz = generate_samples(run.sampler(), OPTS, out, num_samples=N, seed=5, checkpoint=run.path, step=run.step,
                           batch_size=4, shard_size=SHARD, state=PartialState(), show_progress=False)
    with np.load(npz) as data:
        return data["arr_0"], data["labels"]


def test_generation_is_adm_format_with_per_index_labels(reference_set):
    images, labels = reference_set
    assert images.dtype == np.uint8 and images.shape == (N, 16, 16, 3)
    assert labels.tolist() == [i % 10 for i in range(N)]
    assert len({images[i].tobytes() for i in range(N)}) == N  # no duplicated image


def test_interrupted_generation_resumes_without_gaps_or_duplicates(run_dir, reference_set, tmp_path,
                                                                   monkeypatch):
    run = load_run(run_dir)
    sampler, out = run.sampler(), tmp_path / "gen"
    kwargs = dict(num_samples=N, seed=5, checkpoint=run.path, step=run.step, shard_size=SHARD, show_progress=False)
    real_write, written = gen_module._write_shard, []

    def killed_after_two(path_, *args):
        if len(written) == 2:
            (path_.parent / f".{path_.name}.x.tmp").write_bytes(b"half")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        written.append(path_.name)
        real_write(path_, *args)

    monkeypatch.setattr(gen_module, "_write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate_samples(sampler, OPTS, out, batch_size=3, **kwargs)
    assert sorted(p.name for p in (out / "shards").glob("shard_*.npz")) == written == [
        "shard_00000.npz", "shard_00001.npz"]
    assert not (out / "samples.npz").exists()
    monkeypatch.setattr(gen_module, "_write_shard", real_write)
    with pytest.raises(GenerationError, match="seed: 5 -> 6.*refusing to mix"):  # mid-run: other settings
        generate_samples(sampler, OPTS, out, batch_size=3, **dict(kwargs, seed=6))
    assert sorted(p.name for p in (out / "shards").glob("shard_*.npz")) == written
    shard_path(out, 0).unlink()  # a lost shard is redrawn too
    npz = generate_samples(sampler, OPTS, out, batch_size=2, **kwargs)  # another batch size on restart
    with np.load(npz) as data:
        assert _same(data, reference_set)
    assert not (out / "shards").exists()  # folded into samples.npz
    again = generate_samples(sampler, OPTS, out, batch_size=2, png=True, **kwargs)  # finished: no work
    assert again == npz and len(list((out / "png").glob("*.png"))) == N
    # Other settings for a finished folder refuse too.
    for changed in (dict(kwargs, num_samples=N + 1), dict(kwargs, seed=6)):
        with pytest.raises(GenerationError, match="refusing to mix"):
            generate_samples(sampler, OPTS, out, **changed)
    with pytest.raises(GenerationError, match=r"num_steps.*refusing to mix"):
        generate_samples(sampler, SamplingOptions(mode="sde", sampling_method="Euler", num_steps=5,
                                                     cfg_scale=2.0), out, **kwargs)


def _two_rank_worker(spec_path):
    import torch.distributed as dist

    PartialState._reset_state()
    spec = json.loads(open(spec_path).read())
    state = PartialState(cpu=True)
    real_write = gen_module._write_shard

    def logged(path, *args):
        with open(f"{spec['out']}.rank{state.process_index}", "a") as f:
            f.write(path.name + "\n")
        real_write(path, *args)

    gen_module._write_shard = logged
    run = load_run(spec["run"])
    generate_samples(run.sampler(), OPTS, spec["out"], num_samples=N, seed=5, checkpoint=run.path, step=run.step,
                     batch_size=3, shard_size=SHARD, state=state, show_progress=False)
    if state.is_main_process:
        with open(spec["out"] + ".world", "w") as f:
            f.write(str(dist.get_world_size()))


def test_two_processes_generate_the_same_set(run_dir, reference_set, tmp_path):
    spec = tmp_path / "spec.json"
    out = str(tmp_path / "ddp")
    spec.write_text(json.dumps({"run": str(run_dir), "out": out}))
    debug_launcher(_two_rank_worker, args=(str(spec),), num_processes=2)
    assert open(out + ".world").read() == "2"
    ranks = [open(f"{out}.rank{r}").read().split() for r in (0, 1)]
    assert ranks[0] and ranks[1] and sorted(ranks[0] + ranks[1]) == [f"shard_{k:05d}.npz" for k in range(4)]
    with np.load(f"{out}/samples.npz") as data:
        assert _same(data, reference_set)


def test_digits_extractor_ships_and_classifies_held_out_digits():
    extractor = DigitsFeatures()
    assert extractor.name == DIGITS_EXTRACTOR_NAME == "digits-attnet"
    held = digits_uint8("held_out")
    labels = DigitsDataset("held_out").labels
    accuracy = float((extractor.classify(held) == labels).float().mean())
    assert accuracy >= 0.98  # measured 0.9916 (356/359) by train_digits_classifier
    assert weights_metadata()["held_out_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    features = extractor(held[:4])
    assert features["pool"].shape == (4, 64) and features["logits"].shape == (4, 10)


def test_classifier_script_is_deterministic(tmp_path, capsys):
    """The script that made the shipped weights (600 steps there; 15 here) gives the same bytes twice."""
    for name in ("a", "b"):
        assert train_digits_classifier.main(["--steps", "15", "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert weights_metadata(tmp_path / "a.safetensors")["steps"] == 15


def test_metrics_only_from_npz_writes_metrics_json(tmp_path, capsys):
    held = digits_uint8("held_out").numpy()
    np.savez(tmp_path / "real.npz", arr_0=held, labels=np.zeros(len(held), dtype=np.int64))
    assert eval_fid.main(["--samples", str(tmp_path / "real.npz"), "--out-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "fid_floor" in printed and DIGITS_EXTRACTOR_NAME in printed and "metrics.json" in printed
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"fid", "fid_floor", "is", "kid", "precision", "recall"} <= set(result)
    assert result["feature_extractor"] == DIGITS_EXTRACTOR_NAME and result["num_samples"] == len(held)
    assert result["fid"] == pytest.approx(0.0, abs=1e-6) and 0 < result["fid_floor"] < 1
    assert result["precision"] == result["recall"] == 1.0


def test_cli_errors_are_one_line_and_come_before_sampling(run_dir, tmp_path, capsys):
    cases = [
        (["--samples", str(tmp_path / "nowhere.npz")], "no such"),
        (["--ckpt", str(run_dir), "--extractor", "inception"], "--ref"),
        (["--ckpt", str(run_dir), "--metrics", "sfid"], "sfid"),
        (["--ckpt", str(run_dir), "--ref", str(tmp_path / "VIRTUAL.npz")], "no such reference"),
        (["--ckpt", str(run_dir), "--ref", str(tmp_path / "refimgs"), "--inception-weights", str(tmp_path / "w.pth"),
          "--out-dir", str(tmp_path / "never")], "--inception-weights PATH"),
        (["--ckpt", str(run_dir), "--ref", str(tmp_path / "empty")], "no .png/.jpg"),  # checked before sampling
    ]
    from PIL import Image

    (tmp_path / "refimgs").mkdir()
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "refimgs" / "a.png")
    for argv, message in cases:
        start = time.perf_counter()
        assert eval_fid.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
        assert time.perf_counter() - start < 5
    assert not (tmp_path / "never").exists()


class FakeInception:
    """Stands in for torch-fidelity's Inception (its real path is tested in test_metrics.py): mean colours."""

    name = INCEPTION_NAME
    weights = None

    def __init__(self, weights=None, device="cpu"):
        FakeInception.weights = weights

    def __call__(self, images):
        x = images.float().mean((1, 2))
        return {"pool": torch.cat([x, x ** 2], 1), "spatial": x[:, :2] * 3, "logits": x}


def test_inception_path_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "InceptionV3Features", FakeInception)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    argv = ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"),
            "--inception-weights", str(tmp_path / "w.pth"), "--out-dir", str(tmp_path / "out")]
    assert eval_fid.main(argv) == 0
    assert FakeInception.weights == tmp_path / "w.pth"
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert result["feature_extractor"] == INCEPTION_NAME and "fid_floor" not in result
    assert {"fid", "sfid", "is", "kid", "precision", "recall"} <= set(result)
    assert result["num_samples"] == 12 and result["reference"] == str(tmp_path / "ref.npz")
    assert (tmp_path / "out" / "reference_stats.npz").is_file()  # reference features cached for reruns


def test_trained_digits_fid_is_far_below_untrained(run_dir, tmp_path):
    """The default path (digits-attnet vs held-out digits) on the tiny trained run and its untrained init."""
    untrained = tmp_path / "untrained"
    state = torch.load(next((run_dir / "checkpoints").glob("*.pt")), weights_only=True)
    state["ema"], state["step"] = build_model(load_run(run_dir).cfg).state_dict(), 0
    (untrained / "checkpoints").mkdir(parents=True)
    torch.save(state, untrained / "checkpoints" / "step_0000000.pt")
    fid = {}
    for name, ckpt in (("trained", run_dir), ("untrained", untrained)):
        argv = ["--ckpt", str(ckpt), "--num-samples", "200", "--batch-size", "200", "--num-steps", "16",
                "--cfg-scale", "1", "--metrics", "fid"]
        assert eval_fid.main(argv) == 0
        out = next((ckpt / "eval").iterdir())
        step = 0 if name == "untrained" else TRAINED_STEPS
        assert out.name == f"step{step:07d}_ode-euler-16_cfg1_n200_seed0"
        result = json.loads((out / "metrics.json").read_text())
        assert result["feature_extractor"] == DIGITS_EXTRACTOR_NAME and result["num_samples"] == 200
        assert set(result) >= {"fid", "fid_floor", "checkpoint", "step", "sampler", "seed"}
        assert result["sampler"]["num_steps"] == 16
        fid[name] = result["fid"]
    # measured: trained 19.8, untrained 51.2, floor 0.095 (200 samples, 16 Euler steps)
    assert result["fid_floor"] < 1 < fid["trained"] < 0.5 * fid["untrained"], fid


def test_a_signal_stops_generation_after_a_shard_and_the_rerun_completes(run_dir, reference_set, tmp_path,
                                                                          monkeypatch):
    import os
    import signal

    run = load_run(run_dir)
    out, real_write = tmp_path / "gen", gen_module._write_shard
    kwargs = dict(num_samples=N, seed=5, checkpoint=run.path, step=run.step, shard_size=SHARD, show_progress=False,
                  batch_size=3)

    def signalled(path_, *args):
        real_write(path_, *args)
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; handled: the shard in hand is finished

    monkeypatch.setattr(gen_module, "_write_shard", signalled)
    with pytest.raises(GenerationError, match="stopped by SIGTERM: 1 of this process's 4 shards"):
        generate_samples(run.sampler(), OPTS, out, **kwargs)
    assert [p.name for p in (out / "shards").glob("shard_*.npz")] == ["shard_00000.npz"]
    monkeypatch.setattr(gen_module, "_write_shard", real_write)
    with np.load(generate_samples(run.sampler(), OPTS, out, **kwargs)) as data:
        assert _same(data, reference_set)

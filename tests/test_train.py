"""The training loop: exact resume, two real ranks, run-folder safety, the task seam, and that digits learn."""

import json

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from conftest import reset_accelerate, tiny_config

from sit_atconv.build import run_dir_for
from sit_atconv.checkpoint import TRAINING_KEYS, latest_checkpoint, load_checkpoint
from sit_atconv.errors import RunError
from sit_atconv.train import train


def _weights(run_dir):
    state = load_checkpoint(run_dir)
    return state["model"], state["ema"], state["optimizer"]["state"]


@pytest.mark.parametrize("data", [[], ["data.random_flip=true", "data.num_workers=2"]],
                         ids=["in-process", "flips+workers"])
def test_resume_is_bit_exact(tmp_path, data):
    full = train(tiny_config(tmp_path, "full", "train.max_steps=20", *data))
    reset_accelerate()
    part = train(tiny_config(tmp_path, "part", "train.max_steps=10", *data))
    reset_accelerate()
    resumed = train(tiny_config(tmp_path, "part", "train.max_steps=20", *data))
    assert resumed == part
    a, b = _weights(full), _weights(resumed)
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    for k in a[2]:
        assert torch.equal(a[2][k]["exp_avg_sq"], b[2][k]["exp_avg_sq"])
    saved = load_checkpoint(resumed)
    assert saved["step"] == 20 and set(saved) - {"path"} == set(TRAINING_KEYS)  # nothing saved that is not read
    # a run that diverged in its data order would differ: guard that the comparison can fail
    reset_accelerate()
    other = train(tiny_config(tmp_path, "other", "train.max_steps=20", "train.seed=1", *data))
    assert not torch.equal(_weights(other)[0]["final_layer.linear.weight"], a[0]["final_layer.linear.weight"])


def test_run_folder_is_never_overwritten(tmp_path):
    run = train(tiny_config(tmp_path, "keep", "train.max_steps=5", "log.ckpt_every=5"))
    before = latest_checkpoint(run).read_bytes()
    reset_accelerate()
    with pytest.raises(RunError, match="--resume auto"):
        train(tiny_config(tmp_path, "keep", "train.max_steps=5", "train.resume=none"))
    reset_accelerate()
    with pytest.raises(RunError, match=r"different model \(model.hidden_size\)"):
        train(tiny_config(tmp_path, "keep", "train.max_steps=10", "model.hidden_size=48"))
    assert latest_checkpoint(run).read_bytes() == before


def test_each_mixer_gets_its_own_run_folder(tmp_path):
    """Without log.run_name the folder names model, mixer and data, so `--mixer attn` starts its own run."""
    a = tiny_config(tmp_path, "x", "log.run_name=none")
    b = tiny_config(tmp_path, "x", "log.run_name=none", "model.mixer=attn")
    assert run_dir_for(a).name == "SiT-d2w32p2-atconv-digits" and run_dir_for(b).name == "SiT-d2w32p2-attn-digits"
    train(tiny_config(tmp_path, "x", "log.run_name=none", "train.max_steps=2", "log.ckpt_every=2"))
    reset_accelerate()
    assert train(tiny_config(tmp_path, "x", "log.run_name=none", "model.mixer=attn", "train.max_steps=2",
                             "log.ckpt_every=2")) == run_dir_for(b)


class ConstantTask:
    """A task that is not diffusion: pull every output of the model towards zero; no previews."""

    name = "constant"

    def __init__(self):
        self.seen = 0

    def prepare(self, batch):
        self.seen += 1
        return batch

    def loss(self, model, batch):
        x, y = batch
        out = model(x, torch.full((len(x),), 0.5), y)
        return out.square().mean(), {"abs_mean": out.abs().mean().detach()}

    def preview(self, model, step, run_dir):
        x = torch.zeros(1, 1, 16, 16)
        return {"preview_abs": float(model(x, torch.full((1,), 0.5), torch.zeros(1, dtype=torch.long)).abs().mean())}


def test_the_loop_drives_any_task(tmp_path):
    """The seam: the loop trains, logs the task's own metrics and checkpoints, knowing nothing of diffusion."""
    from sit_atconv.build import build_dataset, build_model
    from sit_atconv.config import config_to_dict
    from sit_atconv.train.ema import create_ema
    from sit_atconv.train.loop import LoopSettings, TrainState, training_loop
    from sit_atconv.train.optim import build_optimizer, lr_schedule
    from sit_atconv.train.trackers import Tracker

    cfg = tiny_config(tmp_path, "task", "train.max_steps=6", "log.ckpt_every=6", "log.log_every=3",
                      "log.preview_every=3")
    model = build_model(cfg)
    with torch.no_grad():  # the output layer starts at zero: give the loss something to reduce
        model.final_layer.linear.bias.fill_(0.5)
    optimizer = build_optimizer(model, 1e-2, 0.0)
    state = TrainState(model, create_ema(model), optimizer, lr_schedule(optimizer, cfg))
    task, run_dir = ConstantTask(), tmp_path / "task"
    run_dir.mkdir()
    tracker = Tracker(run_dir, [], {})
    training_loop(task, state, build_dataset(cfg), Accelerator(cpu=True), run_dir, LoopSettings.from_config(cfg),
                  tracker, config_to_dict(cfg))
    tracker.close()
    logs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert task.seen == 6 and [r["step"] for r in logs if "loss" in r] == [3, 6] and state.step == 6
    assert [r["step"] for r in logs if "preview_abs" in r] == [3, 6]  # the task's preview numbers are logged
    logs = [r for r in logs if "loss" in r]
    assert logs[1]["loss"] < logs[0]["loss"] and logs[1]["abs_mean"] < logs[0]["abs_mean"]
    assert load_checkpoint(run_dir)["step"] == 6 and not (run_dir / "samples").exists()


def test_mirrored_by_index():
    from sit_atconv.data import DigitsDataset, MirroredByIndex

    base = DigitsDataset("train")
    both = MirroredByIndex(base)
    assert len(both) == 2 * len(base)
    assert torch.equal(both[3][0], base.images[3]) and torch.equal(both[len(base) + 3][0], base.images[3].flip(-1))
    assert both[len(base) + 3][1] == base[3][1]


def _two_rank_worker(cfg_path):
    import torch.distributed as dist

    from sit_atconv.config_io import load_config
    from sit_atconv.train import train as run

    spec = json.loads(open(cfg_path).read())
    accelerator = Accelerator(cpu=True)
    run_dir = run(load_config("tiny", spec["overrides"]), accelerator)
    state = load_checkpoint(run_dir)
    checksum = float(sum(v.double().sum() for v in state["model"].values()))
    live = float(sum(p.double().sum() for p in accelerator.unwrap_model(accelerator._models[0]).parameters()))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"rank": dist.get_rank(), "live": live, "saved": checksum})
    if dist.get_rank() == 0:
        with open(spec["out"], "w") as f:
            json.dump({"world": dist.get_world_size(), "ranks": gathered}, f)


@pytest.mark.slow
def test_two_process_training_keeps_ranks_identical(tmp_path):
    spec = tmp_path / "spec.json"
    overrides = [f"log.results_dir={tmp_path}", "log.run_name=ddp", "train.max_steps=6", "log.ckpt_every=6"]
    spec.write_text(json.dumps({"overrides": overrides, "out": str(tmp_path / "out.json")}))
    debug_launcher(_two_rank_worker, args=(str(spec),), num_processes=2)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["world"] == 2
    live = [r["live"] for r in result["ranks"]]
    assert live[0] == live[1] and result["ranks"][0]["saved"] == live[0]


def test_digits_loss_falls_and_metrics_are_logged(tmp_path):
    run = train(tiny_config(tmp_path, "learn", "train.max_steps=60", "log.ckpt_every=60", "log.log_every=10",
                            "optim.lr=4e-3"))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0]
    assert (run / "config.yaml").is_file()

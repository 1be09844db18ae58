"""AttNet classification on the shared loop: schedule, task wiring (smoothing, mixup), seeded augmentation,
an image folder through training and the classify CLI, wrong-variant refusal, the digits default."""

import json
import math
import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import exit_code, reset_accelerate
from PIL import Image

from sit_atconv import classify
from sit_atconv.build import build_classification_task, load_run
from sit_atconv.checkpoint import load_checkpoint, save_tensors
from sit_atconv.config_io import load_config
from sit_atconv.data import SeededItems
from sit_atconv.tasks.classification import topk_correct
from sit_atconv.train import train
from sit_atconv.train.data_order import epoch_permutation
from sit_atconv.train.optim import lr_factor, scaled_lr

TINY_NET = ["classifier.name=none", "classifier.depths=1,1", "classifier.dims=16,32", "classifier.exp_rates=2,2",
            "classifier.glu_norm=false", "classifier.layer_scale=false"]


def test_lr_schedule_warmup_cosine_and_batch_scaling():
    f = [lr_factor(s, warmup_steps=10, warmup_start=0.01, total_steps=110, schedule="cosine", final=0.001)
         for s in range(110)]
    assert f[0] == pytest.approx(0.01 + 0.99 / 10) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.001 + 0.999 * 0.5)  # half way down
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[109] == pytest.approx(0.001, abs=3e-4)
    assert lr_factor(500, 0, 0.0, 100, "constant", 0.0) == 1.0 and lr_factor(0, 4, 0.0, 100, "constant", 0.0) == 0.25
    cfg = load_config("attnet_t2_imagenet", ["train.global_batch_size=1024"])
    assert scaled_lr(cfg) == pytest.approx(1e-3)  # 4e-3 at 4096, linear scaling


def test_task_smoothing_mixup_and_topk():
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    cfg = load_config("attnet_digits", ["augment.label_smoothing=0.2"])
    task = build_classification_task(cfg, None)
    loss, metrics = task.loss(lambda x: logits, (torch.zeros(8, 1, 16, 16), y))
    assert loss == pytest.approx(float(F.cross_entropy(logits, y, label_smoothing=0.2)))
    assert metrics["train_top1"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    mixed = build_classification_task(load_config("attnet_digits", ["augment.mixup=0.8", "augment.cutmix=1.0",
                                                                    "augment.label_smoothing=0.1"]), None)
    torch.manual_seed(0)
    x, soft = mixed.prepare((torch.randn(8, 1, 16, 16), y))
    assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
    assert soft.min() >= 0.1 / 10 - 1e-6 and soft.max() < 1.0  # smoothed, and mixed
    torch.manual_seed(0)
    assert torch.equal(mixed.prepare((torch.randn(8, 1, 16, 16), y))[1], soft)  # seeded through torch
    assert mixed.loss(lambda x: logits, (x, soft))[0] == pytest.approx(float(-(soft * logits.log_softmax(1)).sum(1)
                                                                            .mean()))
    assert topk_correct(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2]), (1, 2)) == [1, 1]


def test_repeated_augmentation_order():
    order = epoch_permutation(30, seed=1, epoch=0, repeats=3)
    assert len(order) == 30 and len(set(order.tolist())) == 10
    assert all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 30, 3))
    assert torch.equal(epoch_permutation(30, 1, 0), epoch_permutation(30, 1, 0, repeats=1))


def test_seeded_items_fix_augmentation_and_restore_rng():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2) + random.random() + np.random.rand(), i

    ds = SeededItems(Noisy())
    random.seed(7)
    torch.manual_seed(7)
    before = (random.random(), torch.rand(1))
    random.seed(7)
    torch.manual_seed(7)
    a, b, c = ds[(1, 123)][0], ds[(1, 123)][0], ds[(1, 124)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (random.random(), torch.rand(1)) == before  # the caller's streams are untouched


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """train/ and val/ with 3 classes of coloured 40x40 images (class = dominant colour)."""
    root = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 3)):
        for c, name in enumerate(("n01_red", "n02_green", "n03_blue")):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 80, (40, 40, 3), dtype=np.uint8)
                img[..., c] = 200
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def _image_cfg(root, results, name, *extra):
    return load_config("attnet_xxs_imagenet", [
        f"data.data_path={root}", f"log.results_dir={results}", f"log.run_name={name}", *TINY_NET,
        "classifier.num_classes=3", "classifier.input_size=32", "train.global_batch_size=6", "train.max_steps=6",
        "train.mixed_precision=no", "train.ema_decay=0.5", "optim.warmup_steps=2", "log.ckpt_every=3",
        "log.preview_every=6", "log.log_every=3", "data.num_workers=2", "augment.rand_augment=rand-m9-mstd0.5-inc1",
        "augment.random_erase=0.25", "augment.color_jitter=0.4", "augment.mixup=0.8", "augment.repeats=2", *extra])


def test_image_folder_trains_resumes_exactly_and_classifies(image_root, tmp_path, capsys):
    full = train(_image_cfg(image_root, tmp_path, "full"))
    a = load_checkpoint(full)
    a["path"].unlink()  # as if stopped after the step-3 checkpoint: the rerun continues from there
    reset_accelerate()
    assert train(_image_cfg(image_root, tmp_path, "full")) == full
    b = load_checkpoint(full)
    assert a["step"] == b["step"] == 6 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not torch.equal(a["model"]["head.weight"], load_checkpoint(full / "checkpoints" / "step_0000003.pt")[
        "model"]["head.weight"])  # the comparison can fail: the weights did move between step 3 and 6
    logs = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("val_top1" in r for r in logs) and all(math.isfinite(r.get("loss", 0.0)) for r in logs)
    assert classify.main(["--checkpoint", str(full), "--data", str(image_root), "--num-workers", "0"]) == 0
    out = json.loads((full / "eval" / f"classify_{load_run(full).cfg.classifier.tag()}_{image_root.name}"
                      / "metrics.json").read_text())
    assert out["num_images"] == 9 and 0 <= out["top1"] <= out["top5"] <= 1 and "table" not in out
    assert "top1" in capsys.readouterr().out


def test_published_weights_of_another_variant_are_refused(tmp_path, capsys):
    weights = tmp_path / "attnet_xxs.safetensors"
    save_tensors(timm.create_model("attnet_xxs", num_classes=3).state_dict(), weights)
    assert exit_code(classify.main, ["--model", "attnet_xs", "--checkpoint", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "do not fit attnet_xs; they fit attnet_xxs: pass --model attnet_xxs" in err and err.count("\n") == 1
    assert exit_code(classify.main, ["--checkpoint", str(weights)]) == 2
    assert "name the variant with --model" in capsys.readouterr().err


@pytest.mark.slow
def test_digits_default_reaches_98_percent(tmp_path, capsys):
    """The embedded classification default, end to end: train.py --config attnet_digits, then classify."""
    import train as train_cli

    assert train_cli.main(["--config", "attnet_digits", "--results-dir", str(tmp_path)]) == 0
    run = next(tmp_path.iterdir())
    assert classify.main(["--checkpoint", str(run), "--data", "digits", "--out-dir", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert result["num_images"] == 359 and result["top1"] >= 0.98


def test_options_of_the_other_task_are_refused(capsys):
    import train as train_cli

    assert exit_code(train_cli.main, ["--config", "attnet_digits", "--mixer", "attn", "--dry-run"]) == 2
    assert "--model.mixer has no effect on a classification run" in capsys.readouterr().err
    assert exit_code(train_cli.main, ["--augment.mixup", "0.8", "--dry-run"]) == 2
    assert "--augment.mixup has no effect on a diffusion run" in capsys.readouterr().err
    assert exit_code(train_cli.main, ["--config", "attnet_digits", "--augment.mixup", "0.8", "--dry-run"]) == 0


def _two_rank_classify(run, out):
    import torch.distributed as dist

    from sit_atconv import classify as cli

    assert dist.get_world_size() == 2
    assert cli.main(["--checkpoint", run, "--data", "digits", "--out-dir", out, "--num-workers", "0"]) == 0


@pytest.mark.slow
def test_two_processes_count_every_image_once(tmp_path):
    from accelerate import debug_launcher

    run = train(load_config("attnet_digits", [f"log.results_dir={tmp_path}", "train.max_steps=20",
                                              "log.preview_every=0"]))
    reset_accelerate()
    assert classify.main(["--checkpoint", str(run), "--data", "digits", "--out-dir", str(tmp_path / "one")]) == 0
    reset_accelerate()
    debug_launcher(_two_rank_classify, args=(str(run), str(tmp_path / "two")), num_processes=2)
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["num_images"] == two["num_images"] == 359 and one["top1"] == two["top1"]

"""Pictures a person can read: upscaled, captioned sample grids; training.png; eval's samples_grid.png and the
real-data precision/recall floors beside fid_floor in metrics.json."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

import eval_fid
from sit_atconv.evaluation.digits_features import digits_uint8
from sit_atconv.sampling import MIN_CELL_PX, row_labels, save_grid, upscale_nearest
from sit_atconv.train.plots import plot_training


def _images(n: int, side: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, side, side, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_small_images_are_upscaled_by_nearest_neighbour():
    images = _images(2, 16)
    big = upscale_nearest(images)
    assert big.shape == (2, 64, 64, 3)
    assert torch.equal(big[:, ::4, ::4], images) and torch.equal(big[:, 3::4, 3::4], images)  # blocks of 4x4
    assert upscale_nearest(_images(1, 20)).shape[1] == 80  # smallest integer factor >= 64 / 20
    assert upscale_nearest(_images(1, 96)).shape[1] == 96  # large images stay as they are


def test_grid_cells_are_at_least_64_px_and_rows_are_captioned(tmp_path):
    images = _images(12, 16)
    plain = Image.open(save_grid(images, tmp_path / "plain.png", nrow=4))
    pad = 2
    assert plain.size == (4 * (MIN_CELL_PX + pad) + pad, 3 * (MIN_CELL_PX + pad) + pad)
    captions = row_labels([3] * 4 + [5] * 4 + [7] * 4, nrow=4)
    assert captions == ["class 3", "class 5", "class 7"]
    labelled = np.asarray(Image.open(save_grid(images, tmp_path / "labelled.png", nrow=4, captions=captions)))
    margin = labelled.shape[1] - plain.size[0]
    assert margin > 20 and labelled.shape[0] == plain.size[1]
    assert np.array_equal(labelled[:, margin:], np.asarray(plain))  # the images are untouched
    for row in range(3):  # dark text pixels in the margin beside each row
        band = labelled[pad + row * (MIN_CELL_PX + pad): (row + 1) * (MIN_CELL_PX + pad), :margin]
        assert (band < 128).any(), row
    with pytest.raises(ValueError, match="2 captions for a grid of 3 rows"):
        save_grid(images, tmp_path / "bad.png", nrow=4, captions=captions[:2])


def test_row_labels_name_mixed_rows_and_use_names():
    assert row_labels([1, 1, 2, 2], nrow=4) == ["classes 1, 2"]
    assert row_labels([0, 0, 1, 1], nrow=2, names=["zero", "one"]) == ["zero", "one"]


def test_training_plot_is_drawn_from_the_metric_log(tmp_path):
    assert plot_training(tmp_path) is None  # no log yet: nothing to draw, no error
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "repa_loss": -0.5, "images_per_sec": 100.0 + s})
             for s in (5, 10, 15)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 20, "lo')  # a line cut short
    path = plot_training(tmp_path)
    assert path == tmp_path / "training.png" and Image.open(path).size == (1000, 400)


def test_a_run_with_previews_draws_training_png_and_readable_grids(tmp_path):
    from sit_atconv.train import train

    cfg = tiny_config(tmp_path, "run", "train.max_steps=4", "log.preview_every=2", "log.log_every=2",
                      "transport.num_steps=4")
    run_dir = train(cfg)
    assert Image.open(run_dir / "training.png").size == (1000, 400)
    grid = Image.open(run_dir / "samples" / "step_0000004.png")
    cells_high = 10  # digits: one row per class
    assert grid.size[1] == cells_high * (MIN_CELL_PX + 2) + 2
    assert grid.size[0] > 8 * (MIN_CELL_PX + 2) + 2  # plus the caption margin


def test_eval_writes_samples_grid_and_real_data_precision_recall_floors(tmp_path):
    held = digits_uint8("held_out").numpy()[:60]
    labels = np.arange(60) % 10
    np.savez(tmp_path / "s.npz", arr_0=held, labels=labels)
    assert eval_fid.main(["--samples", str(tmp_path / "s.npz"), "--out-dir", str(tmp_path / "out"),
                          "--metrics", "fid", "precision", "recall"]) == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"fid_floor", "precision_floor", "recall_floor"} <= set(result)
    assert 0.5 < result["precision_floor"] <= 1 and 0.5 < result["recall_floor"] <= 1  # train vs held-out digits
    grid = Image.open(tmp_path / "out" / "samples_grid.png")
    assert grid.size[1] == 10 * (MIN_CELL_PX + 2) + 2  # one row per class; 6 of each -> 6 columns
    assert grid.size[0] > 6 * (MIN_CELL_PX + 2) + 2

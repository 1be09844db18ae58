"""The AttNet model card: exact MAC counts on hand-computable modules, the card's files, one-line CLI errors."""

import json

import pytest
import torch
from torch import nn

from sit_atconv.models.__main__ import main
from sit_atconv.models.card import COLUMNS, count_macs, format_markdown, throughput

TINY = ["--card", "--variants", "xxs", "--baselines", "resnet18", "--batch", "2", "--reps", "2", "--image-size", "64"]


def test_macs_of_a_linear_layer_are_in_times_out():
    assert count_macs(nn.Linear(10, 20), torch.zeros(3, 10)) == 3 * 10 * 20  # bias adds are not MACs


@pytest.mark.parametrize("groups", [1, 4])
def test_macs_of_a_conv_are_positions_times_out_channels_times_kernel_fan_in(groups):
    conv = nn.Conv2d(8, 16, 3, padding=1, groups=groups)
    assert count_macs(conv, torch.zeros(1, 8, 12, 12)) == 12 * 12 * 16 * (8 // groups) * 3 * 3


def test_macs_of_cpu_attention_count_both_products():
    """The CPU flash-attention kernel has no torch formula; the card counts Q K^T and A V."""
    q = torch.zeros(2, 3, 5, 4)
    attn = nn.Module()
    attn.forward = lambda x: nn.functional.scaled_dot_product_attention(x, x, x)
    assert count_macs(attn, q) == 2 * (2 * 3 * 5 * 5 * 4)


def test_throughput_is_batch_over_seconds_with_quartiles():
    assert throughput([0.5], 4) == {"median": 8.0, "p25": 8.0, "p75": 8.0}
    assert throughput([1.0, 0.5, 0.25, 2.0, 0.4], 2) == {"median": 4.0, "p25": 2.0, "p75": 5.0}
    assert throughput([1.0, 0.5], 2) == {"median": 3.0, "p25": 2.5, "p75": 3.5}  # never beyond what was seen


def test_markdown_names_macs_and_flops_separately():
    row = {"model": "m", "params": 2_500_000, "macs": 1_000_000_000, "flops": 2_000_000_000,
           "images_per_s": {"median": 10.0, "p25": 9.0, "p75": 11.0}}
    meta = {"image_size": 224, "batch": 32, "reps": 3, "warmup": 1, "threads": 2, "cpu": "cpu", "cpu_count": 2,
            "torch": "t", "timm": "t", "python": "p", "date": "d", "wall_s": 1.0, "command": "c"}
    text = format_markdown([row], meta)
    assert "| `m` | 2.50 | 1.00 | 2.00 | 10.0 | 9.0-11.0 |" in text
    assert "FLOPs = 2 x MACs" in text and "round-robin" in text and "2 CPU thread(s)" in text


def test_tiny_card_writes_markdown_and_json(tmp_path, capsys):
    out = tmp_path / "card.md"
    assert main([*TINY, "--out", str(out)]) == 0
    text = out.read_text()
    assert "| " + " | ".join(COLUMNS) + " |" in text and "`attnet_xxs`" in text and "`resnet18`" in text
    assert text in capsys.readouterr().out
    card = json.loads(out.with_suffix(".json").read_text())
    assert {"threads", "batch", "reps", "image_size", "command"} <= set(card["meta"])
    assert card["meta"]["batch"] == 2 and card["meta"]["threads"] == torch.get_num_threads()
    assert [m["model"] for m in card["models"]] == ["attnet_xxs", "resnet18"]
    for m in card["models"]:
        assert m["params"] > 0 and m["macs"] > 0 and m["flops"] == 2 * m["macs"]
        assert len(m["seconds_per_batch"]) == 2 and all(s > 0 for s in m["seconds_per_batch"])
        assert 0 < m["images_per_s"]["p25"] <= m["images_per_s"]["median"] <= m["images_per_s"]["p75"]


@pytest.mark.parametrize("argv", [
    ["--card", "--batch", "0"],
    ["--card", "--reps", "-1"],
    ["--card", "--variants", "attnet_huge"],
    ["--card", "--baselines", "resnet5"],
    ["--card", "--out", "card.json"],
    ["--batch", "4"],  # a card option without --card is not silently ignored
])
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_default_still_prints_the_zoo(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "SiT-XL/2" in out and "attnet_t4" in out and "images/s" not in out

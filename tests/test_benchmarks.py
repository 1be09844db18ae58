"""The benchmark scripts' own arithmetic (FLOP counts, paired ratios) and a tiny end-to-end run."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_atconv  # noqa: E402
import check_device  # noqa: E402
from common import count_flops, paired_ratio, write_json  # noqa: E402


def test_depthwise_conv_backward_flops_count_groups():
    """torch's own formula ignores groups; ours: each gradient costs one forward conv."""
    b, c, h, w, k = 2, 6, 5, 7, 3
    x = torch.randn(b, c, h, w, requires_grad=True)
    weight = torch.randn(c, 1, k, k, requires_grad=True)
    forward = 2 * b * c * k * k * h * w
    assert count_flops(lambda: F.conv2d(x, weight, padding=1, groups=c).sum()) == forward
    assert count_flops(lambda: F.conv2d(x, weight, padding=1, groups=c).sum().backward()) == 3 * forward
    x.requires_grad_(False)
    assert count_flops(lambda: F.conv2d(x, weight, padding=1, groups=c).sum().backward()) == 2 * forward


def test_inplace_addmm_and_attention_are_counted():
    a, b, acc = torch.randn(4, 5), torch.randn(5, 3), torch.zeros(4, 3)
    assert count_flops(lambda: acc.addmm_(a, b)) == 2 * 4 * 5 * 3
    q = torch.randn(2, 3, 16, 8, requires_grad=True)
    attention = 2 * 2 * (2 * 3 * 16 * 16 * 8)                    # q k^T and p v, forward
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()) == 3 * attention


def test_paired_ratio_is_the_median_of_per_repetition_ratios():
    out = paired_ratio([2.0, 4.0, 9.0, 3.0, 5.0], [1.0, 2.0, 3.0, 3.0, 5.0])
    assert out["median"] == pytest.approx(2.0)                  # ratios 2, 2, 3, 1, 1
    assert out["p25"] <= out["median"] <= out["p75"]
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_bench_atconv_runs_end_to_end_on_tiny_shapes(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_atconv.main(["--sections", "mixer,block,train", "--widths", "S", "--block-widths", "S", "--tokens", "16",
                       "--batch", "1", "--train-batch", "1", "--modes", "fwdbwd", "--train-modes", "fwdbwd",
                       "--reps", "2", "--warmup", "0", "--compile", "", "--threads", "1", "--peak-tflops", "1",
                       "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    by = {(r["section"], r["candidate"]): r for r in rows}
    assert {"atconv", "reference", "attention", "floor"} <= {c for s, c in by if s == "mixer"}
    mixer = by["mixer", "atconv"]
    assert mixer["x_floor"] > 0 and 0 < mixer["x_floor_paired"]["median"]
    train = by["train", "atconv"]
    # pool-first ATConv does fewer FLOPs than the reference order (kernel_proj on k^2 rows, not N tokens)
    assert 0 < train["model_gflop"] < by["train", "atconv[reference]"]["model_gflop"]
    assert train["mfu"] == pytest.approx(train["tflops_per_s"])
    assert "Paired ratios" in capsys.readouterr().out


@pytest.mark.parametrize("name,dtype,expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H200", "fp16", 989.0), ("NVIDIA H100 PCIe", "bf16", None),
    ("NVIDIA H200", "fp32", None), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("Tesla T4", "bf16", None)])
def test_peak_tflops_by_device_name(monkeypatch, name, dtype, expected):
    from common import peak_tflops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda"), dtype, None) == expected
    assert peak_tflops(torch.device("cuda"), dtype, 123.0) == 123.0
    assert peak_tflops(torch.device("cpu"), "bf16", None) is None


CHECK_TINY = ["--device", "cpu", "--width", "S", "--tokens", "16", "--image-dim", "8", "--image-size", "6",
              "--batch", "2", "--backend", "aot_eager"]


def test_check_device_passes_every_path_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    assert check_device.main([*CHECK_TINY, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    cases = {(r["layout"], r["impl"], r["compiled"], r["dtype"]) for r in rows}
    for layout in ("tokens", "image"):
        for dtype in ("fp32", "bf16"):
            for impl in check_device.EAGER_IMPLS:
                assert (layout, impl, "", dtype) in cases
            assert (layout, "auto", "aot_eager", dtype) in cases
    assert all(r["ok"] for r in rows)
    assert max(r["out_err"] for r in rows if r["dtype"] == "fp32") < 1e-5
    assert json.loads(out.read_text())["complete"] is True


def test_check_device_fails_a_wrong_depthwise_conv(monkeypatch, tmp_path):
    """A 1% error in the conv (the oracle has its own loop conv) fails every case, eager and compiled."""
    import sit_atconv.layers.atconv as atconv_module

    real = atconv_module.dynamic_depthwise_conv
    monkeypatch.setattr(atconv_module, "dynamic_depthwise_conv", lambda v, k, impl: 1.01 * real(v, k, impl))
    out = tmp_path / "check.json"
    assert check_device.main([*CHECK_TINY, "--dtypes", "fp32", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and not any(r["ok"] for r in rows)


def test_check_device_records_a_crashing_path_and_checks_the_rest(monkeypatch, tmp_path):
    import sit_atconv.layers.depthwise as depthwise

    def crash(values, kernels):
        raise RuntimeError("kernel launch failed")
    monkeypatch.setattr(depthwise, "depthwise_conv_shift", crash)
    out = tmp_path / "check.json"
    assert check_device.main([*CHECK_TINY, "--dtypes", "fp32", "--backend", "none", "--out", str(out)]) == 1
    rows = {(r["layout"], r["impl"]): r for r in json.loads(out.read_text())["rows"]}
    for layout in ("tokens", "image"):
        assert "kernel launch failed" in rows[layout, "shift"]["error"] and not rows[layout, "shift"]["ok"]
        assert rows[layout, "grouped"]["ok"] and rows[layout, "per_sample"]["ok"]


def test_check_device_keeps_the_cases_checked_before_it_is_stopped(monkeypatch, tmp_path):
    real, calls = check_device._errors, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands in for the run being stopped part-way (timeout, Ctrl-C)
        return real(*args, **kwargs)
    monkeypatch.setattr(check_device, "_errors", stop_at_the_third)
    out = tmp_path / "check.json"
    with pytest.raises(KeyboardInterrupt):
        check_device.main([*CHECK_TINY, "--backend", "none", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and len(saved["rows"]) == 2 and all(r["ok"] for r in saved["rows"])


def test_write_json_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json(str(path), {"rows": [1]})
    monkeypatch.setattr(json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_json(str(path), {"rows": [2]})
    assert json.loads(path.read_text()) == {"rows": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

"""The quality-against-cost sweep: NFE budgets are met and counted honestly, one eval folder per setting,
sweep.{json,md,png} on a tiny trained run, finished settings read back on a rerun, one-line errors."""

import json

import pytest
import torch
from conftest import exit_code
from PIL import Image

from sit_atconv.build import load_run
from sit_atconv.evaluation import sweep as sweep_module
from sit_atconv.evaluation.sweep import EVALS_PER_STEP, grid_for_nfe, sweep
from sit_atconv.sampling import SamplingOptions


@pytest.fixture(scope="module")
def run_dir(trained_run):
    return trained_run


def _nfe(sampler, opts: SamplingOptions) -> float:
    sampler.images(opts, torch.tensor([1, 2]), range(2), seed=0, show_progress=False)
    return sampler.nfe


@pytest.mark.parametrize("mode, method", list(EVALS_PER_STEP))
def test_fixed_step_budgets_are_met_and_counted(run_dir, mode, method):
    sampler = load_run(run_dir).sampler()
    per_step = EVALS_PER_STEP[(mode, method)]
    for target in (4, 8):
        grid = grid_for_nfe(mode, method, target)
        counted = _nfe(sampler, SamplingOptions(mode=mode, sampling_method=method, num_steps=grid, cfg_scale=1.0))
        sampler.model_calls = sampler.images_drawn = 0
        assert counted == per_step * (grid - 1) + (mode == "sde")  # + the SDE's final Mean step
        assert abs(counted - target) <= per_step / 2 + 1


def test_cfg_pair_counts_once_and_adaptive_steps_are_counted(run_dir):
    run = load_run(run_dir)
    euler = dict(mode="ode", sampling_method="euler", num_steps=9)
    assert _nfe(run.sampler(), SamplingOptions(**euler, cfg_scale=1.0)) == 8
    assert _nfe(run.sampler(), SamplingOptions(**euler, cfg_scale=3.0)) == 8
    loose, tight = (_nfe(run.sampler(), SamplingOptions(mode="ode", sampling_method="dopri5", num_steps=2,
                                                        rtol=r, atol=1e-6, cfg_scale=1.0)) for r in (1e-1, 1e-4))
    assert 6 <= loose < tight  # dopri5: at least one step of 6 evaluations, more for a tighter tolerance


def test_sweep_writes_table_plot_and_skips_finished_settings(run_dir, tmp_path, monkeypatch):
    kwargs = dict(methods=["ode-euler", "ode-dopri5"], nfes=[4, 8], cfg_scales=[1, 2], rtols=[0.1],
                  num_samples=20, batch_size=20, out_dir=tmp_path / "sweep", show_progress=False)
    summary = sweep(run_dir, **kwargs)
    rows = summary["rows"]
    assert len(rows) == 6  # (2 euler budgets + 1 dopri5 tolerance) x 2 CFG scales
    assert {(r["sampler"], r["cfg_scale"]) for r in rows} == {
        (s, c) for s in ("ode-euler", "ode-dopri5") for c in (1.0, 2.0)}
    euler = sorted(r["nfe"] for r in rows if r["sampler"] == "ode-euler" and r["cfg_scale"] == 1)
    assert euler == [4, 8]
    assert all(r["fid"] > 0 and r["nfe"] > 0 and 0 <= r["precision"] <= 1 for r in rows)
    assert summary["fid_floor"] < 1 and 0 < summary["precision_floor"] <= 1 and 0 < summary["recall_floor"] <= 1
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(folders) == 6 and "step0000200_ode-euler-5_cfg1_n20_seed0" in folders
    assert all((tmp_path / "sweep" / f / "samples_grid.png").is_file() for f in folders)
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert table.count("\n| ode-") == 6 and "| ode-euler | 2 | 9 | 8 |" in table and "rtol 0.1" in table
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"] == rows
    assert Image.open(tmp_path / "sweep" / "sweep.png").size == (800, 500)

    def no_more_sampling(**_):
        raise AssertionError("a finished setting was evaluated again")

    monkeypatch.setattr(sweep_module, "evaluate", no_more_sampling)
    assert sweep(run_dir, **kwargs)["rows"] == rows


def test_cli_errors_are_one_line_before_any_work(run_dir, tmp_path, capsys):
    for argv, message in [([str(run_dir), "--methods", "ode-dopri9"], "use MODE-METHOD"),
                          ([str(run_dir), "--methods", "sde-euler"], "sde-Euler"),
                          ([str(run_dir), "--rtols", "0"], "must be > 0"),
                          ([str(tmp_path / "nowhere")], "nowhere")]:
        assert exit_code(sweep_module.main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err

"""The mixer study (`python -m sit_atconv.study`): a tiny grid runs end to end, resumes after an interruption
without redoing finished cells, reports statistics computed from the cells' own files, refuses the folder of
another study, and plans an equal-seconds budget from a stored calibration."""

import json
import math

import pytest
from conftest import exit_code

from sit_atconv.build import load_run
from sit_atconv.checkpoint import list_checkpoints
from sit_atconv.errors import ConfigError, RunError
from sit_atconv.study import Budget, StudySpec
from sit_atconv.study import grid as study_grid
from sit_atconv.study import measure as study_measure
from sit_atconv.study.__main__ import main
from sit_atconv.study.budget import (
    cumulative_seconds,
    eval_interval,
    eval_steps,
    plan_steps,
    planned_steps,
    seconds_at,
    timed_steps_per_sec,
)
from sit_atconv.study.measure import calibrate
from sit_atconv.study.stats import sample_std, summarize
from sit_atconv.train import train as real_train

TINY = ["--config", "tiny", "--mixers", "attn", "atconv", "--seeds", "2", "--num-samples", "32",
        "--sampling-batch", "4", "--set", "transport.num_steps=4"]  # 4 sampler steps: seconds, not minutes
CELLS = ["attn-seed0", "atconv-seed0", "attn-seed1", "atconv-seed1"]  # the run order: seed by seed


@pytest.fixture
def fake_evaluate(monkeypatch):
    """Replace FID evaluation by a metrics.json with known numbers (FID = 100 + step); returns the calls."""
    calls = []

    def evaluate(*, ckpt, out_dir, num_samples, seed, ref, show_progress):
        step = int(ckpt.stem.split("_")[1])
        calls.append((ckpt.parent.parent.name, step))
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"fid": 100.0 + step, "precision": 0.5, "recall": 0.25, "step": step, "num_samples": num_samples}
        (out_dir / "metrics.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(study_grid, "evaluate", evaluate)
    return calls


def _count_training(monkeypatch) -> list[str]:
    """Count the cells that train (the real training); returns the run names, in order."""
    calls = []

    def train(cfg, accelerator=None):
        calls.append(cfg.log.run_name)
        return real_train(cfg, accelerator)

    monkeypatch.setattr(study_grid, "train", train)
    return calls


@pytest.fixture
def train_calls(monkeypatch):
    return _count_training(monkeypatch)


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path, capsys, train_calls):
    """2 mixers x 2 seeds x 4 steps with the real FID pipeline: run folders, results, table, plots."""
    out = tmp_path / "study"
    assert main([*TINY, "--set", "train.max_steps=4", "--eval-every", "4", "--out", str(out)]) == 0
    assert train_calls == CELLS
    results = _results(out)
    assert [(c["mixer"], c["seed"]) for c in results["cells"]] == [(n.split("-")[0], int(n[-1])) for n in CELLS]
    for cell in results["cells"]:
        run = load_run(out / f"{cell['mixer']}-seed{cell['seed']}")  # an ordinary run folder: sample.py works on it
        assert (run.cfg.model.mixer, run.cfg.train.seed, run.step) == (cell["mixer"], cell["seed"], 4)
        assert cell["steps"] == 4 and [e["step"] for e in cell["evals"]] == [4]
        assert math.isfinite(cell["evals"][0]["fid"]) and cell["train_seconds"] > 0 and cell["params"] > 0
        assert cell["sampling_images_per_sec"] > 0 and cell["planned_train_seconds"] is None
    attn = [c["evals"][0]["fid"] for c in results["cells"] if c["mixer"] == "attn"]
    summary = results["summary"]["attn"]["fid"]
    assert summary["n"] == 2 and summary["mean"] == pytest.approx(sum(attn) / 2)
    assert summary["std"] == pytest.approx(abs(attn[0] - attn[1]) / math.sqrt(2))  # ddof=1
    params = {c["mixer"]: c["params"] for c in results["cells"]}
    assert params["attn"] != params["atconv"]
    table = capsys.readouterr().out
    assert "| mixer | seeds | params | steps | train s |" in table and "| attn | 2 |" in table
    assert "| atconv | 2 |" in (out / "results.md").read_text()
    for name in ("fid_vs_steps.png", "fid_vs_seconds.png", "loss.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def _interrupt_second_cell(monkeypatch):
    """Train the second cell halfway (2 of 4 steps, one checkpoint), then fail as a killed study would."""
    seen = []

    def train(cfg, accelerator=None):
        seen.append(cfg.log.run_name)
        if len(seen) == 2:
            cfg.train.max_steps = 2
            real_train(cfg, accelerator)
            raise KeyboardInterrupt
        return real_train(cfg, accelerator)

    monkeypatch.setattr(study_grid, "train", train)


def test_interrupted_study_resumes_without_redoing_finished_cells(tmp_path, monkeypatch, fake_evaluate):
    out = tmp_path / "study"
    argv = [*TINY, "--set", "train.max_steps=4", "--eval-every", "2", "--out", str(out)]
    _interrupt_second_cell(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert fake_evaluate == [("attn-seed0", 2), ("attn-seed0", 4)]
    assert [s for s, _ in list_checkpoints(out / "atconv-seed0")] == [2]
    finished = {p: p.stat().st_mtime_ns for p in (out / "attn-seed0").rglob("*") if p.is_file()}
    halfway = (out / "atconv-seed0" / "checkpoints" / "step_0000002.pt").stat().st_mtime_ns

    calls = _count_training(monkeypatch)  # the real training again, counted
    fake_evaluate.clear()
    assert main(argv) == 0
    assert calls == CELLS[1:]  # the finished cell is not trained again
    assert {p: p.stat().st_mtime_ns for p in (out / "attn-seed0").rglob("*") if p.is_file()} == finished
    assert (out / "atconv-seed0" / "checkpoints" / "step_0000002.pt").stat().st_mtime_ns == halfway  # resumed
    assert [s for s, _ in list_checkpoints(out / "atconv-seed0")] == [2, 4]
    assert sorted(fake_evaluate) == sorted((c, s) for c in CELLS[1:] for s in (2, 4))
    assert [[e["fid"] for e in c["evals"]] for c in _results(out)["cells"]] == [[102.0, 104.0]] * 4


def test_statistics_come_from_the_cells_own_files(tmp_path, fake_evaluate):
    """Known FIDs and a known metrics log written into finished cells are what the rerun reports."""
    out = tmp_path / "study"
    argv = [*TINY, "--set", "train.max_steps=2", "--out", str(out)]
    assert main(argv) == 0
    for name, fid in zip(CELLS, [10.0, 20.0, 14.0, 21.0]):
        path = out / name / "eval" / "study_step2" / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "fid": fid}))
    (out / "attn-seed0" / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1.0, "steps_per_sec": 4.0}\n{"step": 2, "loss": 0.5, "steps_per_sec": 2.0}\n')
    fake_evaluate.clear()
    assert main(argv) == 0
    assert fake_evaluate == []  # every cell finished: nothing evaluated again
    summary = _results(out)["summary"]
    assert summary["attn"]["fid"]["mean"] == pytest.approx(12.0)
    assert summary["attn"]["fid"]["std"] == pytest.approx(math.sqrt(8.0))  # ddof=1 (ddof=0 would give 2)
    assert summary["atconv"]["fid"]["mean"] == pytest.approx(20.5)
    assert summary["atconv"]["fid"]["std"] == pytest.approx(math.sqrt(0.5))
    cell = _results(out)["cells"][0]
    assert cell["train_seconds"] == pytest.approx(0.25 + 0.5) and cell["step_ms"] == pytest.approx(375.0)
    assert [e["train_seconds"] for e in cell["evals"]] == pytest.approx([0.25, 0.75])
    assert "12 ± 2.8" in (out / "results.md").read_text()
    paired = _results(out)["differences"]["fid"]["atconv"]  # per seed: 20 - 10 and 21 - 14
    assert (paired["baseline"], paired["n"], paired["mean"]) == ("attn", 2, pytest.approx(8.5))
    assert paired["std"] == pytest.approx(math.sqrt(4.5))
    half = 12.706204736174707 * math.sqrt(4.5) / math.sqrt(2)  # t(0.975, 1 dof) x standard error
    assert paired["ci95"] == pytest.approx([8.5 - half, 8.5 + half])
    assert "fid atconv - attn, paired by seed: +8.5000 ± 2.1 (n=2, 95 % CI [-10.5593, +27.5593])" in (
        out / "results.md").read_text()
    along = _results(out)["differences_along"]  # step 1 kept the fake FID 101 in every cell
    assert along["2"]["atconv"]["mean"] == pytest.approx(8.5) and along["1"]["atconv"]["mean"] == 0.0
    assert "| 2 | +8.5 ± 2.1 [-10.6, +27.6] |" in (out / "results.md").read_text()


def test_a_folder_of_another_study_is_refused(tmp_path, capsys):
    out = tmp_path / "study"
    spec = StudySpec(out=out, config="tiny", mixers=["attn", "atconv"], seeds=2, num_samples=32)
    study_grid.open_study(spec, study_grid.base_config(spec))
    again = study_grid.open_study(spec, study_grid.base_config(spec))  # the same settings: opened again
    assert again["settings"]["seeds"] == 2
    changed = StudySpec(out=out, config="tiny", mixers=["attn", "atconv"], seeds=4, num_samples=32)
    study_grid.open_study(changed, study_grid.base_config(changed))  # no cell started yet: settings replaced
    assert json.loads((out / "study.json").read_text())["settings"]["seeds"] == 4
    study_grid.open_study(spec, study_grid.base_config(spec))
    (out / "atconv-seed1").mkdir()  # from the first cell on, the settings are fixed
    for argv, match in [(["--seeds", "3"], "seeds: saved 2, asked 3"),
                        (["--set", "train.max_steps=6"], "config.train.max_steps: saved 20, asked 6"),
                        (["--mixers", "attn", "hybrid"], "mixers: saved ['attn', 'atconv'], asked ['attn', 'hybrid']"),
                        (["--budget", "seconds", "60"], "budget.kind: saved 'steps', asked 'seconds'"),
                        (["--num-samples", "64"], "num_samples: saved 32, asked 64")]:
        args = ["--config", "tiny", "--mixers", "attn", "atconv", "--seeds", "2", "--num-samples", "32", *argv]
        assert exit_code(main, [*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refusing to mix studies" in err and match in err, err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(RunError, match="no study.json"):
        study_grid.open_study(StudySpec(out=tmp_path / "other", config="tiny"), study_grid.base_config(spec))
    for bad, match in [(["--set", "model.mixer=attn"], "use --mixers"), (["--set", "train.seed=3"], "use --seeds"),
                       (["--budget", "seconds", "10", "--set", "train.max_steps=9"], "seconds budget"),
                       (["--budget", "minutes", "3"], "use 'steps'"), (["--budget", "seconds", "0"], "> 0")]:
        assert exit_code(main, ["--config", "tiny", *bad, "--out", str(tmp_path / "new")]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_equal_seconds_budget_is_planned_from_the_calibration():
    calibration = {"attn": {"steps_per_sec": 3.0}, "atconv": {"steps_per_sec": 1.49}}
    assert plan_steps(Budget(10.0), 999, calibration, ["attn", "atconv"]) == {"attn": 30, "atconv": 14}  # floor
    assert plan_steps(Budget(), 999, {}, ["attn", "atconv"]) == {"attn": 999, "atconv": 999}
    assert planned_steps(2.0, 2.0, "attn") == 4
    with pytest.raises(ConfigError, match="shorter than one training step of attn"):
        planned_steps(0.4, 2.0, "attn")
    assert Budget.parse(["seconds", "90"]) == Budget(90.0) and Budget.parse(["steps"]) == Budget()
    assert eval_steps(1000, eval_interval(1000, None)) == [250, 500, 750, 1000]
    assert eval_steps(10, eval_interval(10, None)) == [3, 6, 9, 10]
    assert eval_steps(10, eval_interval(10, 20)) == [10]
    log = [{"step": 5, "steps_per_sec": 1.0}, {"step": 10, "steps_per_sec": 5.0}, {"step": 15, "loss": 1.0},
           {"step": 20, "steps_per_sec": 2.5}]
    assert timed_steps_per_sec(log, warmup=5) == pytest.approx(15 / (1 + 4))  # the slow warm-up is left out
    assert cumulative_seconds(log) == [(5, 5.0), (10, 6.0), (20, 10.0)]
    assert seconds_at(15, cumulative_seconds(log)) == pytest.approx(8.0)  # linear between the log lines
    assert seconds_at(21, cumulative_seconds(log)) is None
    assert sample_std([10.0, 14.0]) == pytest.approx(math.sqrt(8)) and sample_std([3.0]) is None
    assert summarize([1.0, None, float("nan"), 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "min": 1.0,
                                                           "max": 3.0, "n": 2}


def test_seconds_study_calibrates_once_and_reuses_it(tmp_path, monkeypatch, fake_evaluate):
    """The calibration is measured once (a real short timing run), stored in study.json and reused by a rerun."""
    out, measured = tmp_path / "study", []

    def counted(base, mixer, *args):
        measured.append(mixer)
        return calibrate(base, mixer, *args)

    monkeypatch.setattr(study_grid, "calibrate", counted)
    monkeypatch.setattr(study_measure, "CALIBRATION_WARMUP", 5)  # a shorter calibration than the real one
    monkeypatch.setattr(study_measure, "CALIBRATION_STEPS", 20)
    argv = ["--config", "tiny", "--mixers", "atconv", "--seeds", "1", "--budget", "seconds", "2",
            "--num-samples", "8", "--sampling-batch", "2", "--set", "transport.num_steps=4", "--out", str(out)]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    rate = study["calibration"]["atconv"]["steps_per_sec"]
    assert measured == ["atconv"] and study["calibration"]["atconv"]["timed_steps"] == 20
    assert [s for s, _ in list_checkpoints(out / "calibration" / "atconv")] == [25]  # 5 warm-up + 20 timed
    cell = _results(out)["cells"][0]
    assert cell["max_steps"] == cell["steps"] == math.floor(2 * rate) == study["plan"]["atconv"]["max_steps"]
    assert cell["planned_train_seconds"] == pytest.approx(cell["steps"] / rate)
    assert main(argv) == 0
    assert measured == ["atconv"]  # not measured again
    assert json.loads((out / "study.json").read_text())["calibration"] == study["calibration"]

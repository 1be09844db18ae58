"""Budgets of a study as pure functions: equal steps or equal wall-clock seconds, evaluation points, and the
train seconds a run's own metrics log says it took.

Equal wall-clock is made deterministic and resumable by planning it in steps: each mixer's training speed is
measured once (a short calibration run: CALIBRATION_WARMUP steps not timed, then CALIBRATION_STEPS timed
steps), stored in OUT/study.json, and that mixer's cells train max_steps = floor(N seconds x steps/s) steps.
A rerun reuses the stored speed, so the plan never changes under a study; the report gives both the planned
and the measured train seconds of every cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

CALIBRATION_WARMUP = 20  # steps run before timing (allocation, autotuning, first data loads)
CALIBRATION_STEPS = 200  # timed steps, a multiple of CALIBRATION_WARMUP (the calibration run's log interval); 20
# timed steps were seen to misjudge a mixer's speed by 20 % on a CPU, so a few hundred
EVAL_POINTS = 4  # default evaluations along a run (the last one at its final step)


@dataclass(frozen=True)
class Budget:
    """What every mixer gets the same of: training steps (`seconds` None) or wall-clock training seconds."""

    seconds: float | None = None

    @classmethod
    def parse(cls, words: Sequence[str]) -> Budget:
        """['steps'] or ['seconds', N] (the --budget words); one ConfigError line otherwise."""
        if list(words) == ["steps"]:
            return cls()
        if len(words) == 2 and words[0] == "seconds":
            try:
                seconds = float(words[1])
            except ValueError:
                seconds = math.nan
            if math.isfinite(seconds) and seconds > 0:
                return cls(seconds)
            raise ConfigError(f"--budget seconds {words[1]}: N must be a finite number of seconds > 0")
        raise ConfigError(f"--budget {' '.join(words)}: use 'steps' (train.max_steps each) or 'seconds N'")

    def record(self) -> dict:
        return {"kind": "steps"} if self.seconds is None else {"kind": "seconds", "seconds": self.seconds}


def planned_steps(seconds: float, steps_per_sec: float, mixer: str) -> int:
    """floor(seconds x steps/s): the steps of one cell under an equal wall-clock budget; at least one step."""
    steps = math.floor(seconds * steps_per_sec)
    if steps < 1:
        raise ConfigError(f"--budget seconds {seconds:g} is shorter than one training step of {mixer} "
                          f"({1 / steps_per_sec:.3g} s/step); give more seconds")
    return steps


def plan_steps(budget: Budget, max_steps: int, calibration: dict[str, dict], mixers: Sequence[str]) -> dict[str, int]:
    """{mixer: max_steps}: the config's max_steps for each (equal steps), or from the stored calibration."""
    if budget.seconds is None:
        return {m: max_steps for m in mixers}
    return {m: planned_steps(budget.seconds, calibration[m]["steps_per_sec"], m) for m in mixers}


def eval_interval(max_steps: int, eval_every: int | None) -> int:
    """`eval_every`, or ceil(max_steps / EVAL_POINTS): EVAL_POINTS evaluations along the run."""
    return eval_every if eval_every is not None else max(1, math.ceil(max_steps / EVAL_POINTS))


def eval_steps(max_steps: int, interval: int) -> list[int]:
    """The evaluated steps: every multiple of `interval` up to max_steps, and max_steps itself."""
    return sorted({*range(interval, max_steps + 1, interval), max_steps})


def checkpoint_interval(config_every: int, interval: int) -> int:
    """The config's checkpoint interval when the evaluated steps fall on it, else the evaluation interval."""
    return config_every if interval % config_every == 0 else interval


def _rate_records(records: Sequence[dict]) -> list[tuple[int, float]]:
    """(step, steps/s) of the log lines that carry a training rate, by step."""
    pairs = {r["step"]: float(r["steps_per_sec"]) for r in records
             if isinstance(r.get("steps_per_sec"), (int, float)) and r["steps_per_sec"] > 0}
    return sorted(pairs.items())


def cumulative_seconds(records: Sequence[dict]) -> list[tuple[int, float]]:
    """[(step, train seconds up to it)] from a metrics log: each line's interval of steps / its steps/s.

    The loop's rate covers the wall-clock between two log lines (data, forward, backward, optimizer, EMA and
    the checkpoint writes in between), so these are the seconds the run spent training, evaluation excluded.
    """
    out, previous, total = [], 0, 0.0
    for step, rate in _rate_records(records):
        total += (step - previous) / rate
        out.append((step, total))
        previous = step
    return out


def seconds_at(step: int, cumulative: Sequence[tuple[int, float]]) -> float | None:
    """Train seconds at `step`, linear between the log lines around it; None without a line at or past it."""
    if not cumulative or cumulative[-1][0] < step:
        return None
    previous = (0, 0.0)
    for s, total in cumulative:
        if s >= step:
            fraction = (step - previous[0]) / (s - previous[0]) if s > previous[0] else 1.0
            return previous[1] + fraction * (total - previous[1])
        previous = (s, total)
    return None


def timed_steps_per_sec(records: Sequence[dict], warmup: int = CALIBRATION_WARMUP) -> float:
    """Steps/s of a calibration run over its steps after `warmup` (the log lines past it)."""
    seconds, steps, previous = 0.0, 0, 0
    for step, rate in _rate_records(records):
        if step > warmup:
            seconds += (step - max(previous, warmup)) / rate
            steps += step - max(previous, warmup)
        previous = step
    if steps == 0:
        raise ValueError(f"no timed steps past step {warmup} in the calibration log")
    return steps / seconds

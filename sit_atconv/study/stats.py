"""Pure statistics of a study: mean and sample standard deviation over seeds, per mixer, from the cells' numbers,
and each mixer's difference to the baseline mixer paired by seed.

The spread is the *sample* standard deviation (ddof=1, Bessel's correction): the seeds are a sample of the
training randomness, and a reviewer reads "± std" that way. With one seed there is no spread (None), never 0.
Numbers that are missing (None) or not finite are left out of a summary, and its `n` says how many were used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

FINAL_FIELDS = ("params", "steps", "planned_train_seconds", "train_seconds", "step_ms", "sampling_images_per_sec",
                "fid", "precision", "recall")
EVAL_FIELDS = ("fid", "precision", "recall")
STD_NOTE = "sample standard deviation over seeds (ddof=1); none with one seed"


def _numbers(values: Iterable) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)]


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return math.fsum(values) / len(values)


def sample_std(values: Sequence[float]) -> float | None:
    """Standard deviation with ddof=1 (the unbiased variance's root); None for fewer than two values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(values: Iterable) -> dict:
    """{mean, std (ddof=1), min, max, n} of the finite numbers among `values` (all None when there are none)."""
    xs = _numbers(values)
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": mean(xs), "std": sample_std(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


TRANSFER_PREFIX = "fid_at_"  # fid_at_<S>: FID of the final checkpoint sampled at S px (resolution transfer)


def transfer_key(image_size: int) -> str:
    """The summary field of FID at another sampling size (resolution transfer), e.g. fid_at_24."""
    return f"{TRANSFER_PREFIX}{image_size}"


def transfer_fields(cells: Sequence[dict]) -> list[str]:
    """fid_at_<S> for every transfer size any cell was evaluated at, smallest first."""
    return [transfer_key(s) for s in sorted({t["image_size"] for c in cells for t in c.get("transfer", [])})]


def final_numbers(cell: dict) -> dict:
    """A cell's numbers at its last evaluated step: its own fields plus that evaluation's FID/precision/recall,
    and its FID at each transfer size (fid_at_<S>)."""
    last = max(cell["evals"], key=lambda e: e["step"]) if cell["evals"] else {}
    transfer = {transfer_key(t["image_size"]): t["fid"] for t in cell.get("transfer", [])}
    return {**{k: cell.get(k) for k in FINAL_FIELDS}, **{k: last.get(k) for k in EVAL_FIELDS}, **transfer}


def aggregate(cells: Sequence[dict], mixers: Sequence[str]) -> dict[str, dict]:
    """{mixer: {field: summary over its seeds}} at the final step, for every field of FINAL_FIELDS and every
    fid_at_<S> of a transfer size."""
    out, fields = {}, (*FINAL_FIELDS, *transfer_fields(cells))
    for mixer in mixers:
        rows = [final_numbers(c) for c in cells if c["mixer"] == mixer]
        out[mixer] = {key: summarize(r.get(key) for r in rows) for key in fields}
    return out


def curves(cells: Sequence[dict], mixers: Sequence[str]) -> dict[str, list[dict]]:
    """{mixer: [{step, train_seconds, fid, precision, recall} summaries over seeds, one per evaluated step]}."""
    out = {}
    for mixer in mixers:
        evals = [e for c in cells if c["mixer"] == mixer for e in c["evals"]]
        steps = sorted({e["step"] for e in evals})
        out[mixer] = [{"step": s, **{k: summarize(e.get(k) for e in evals if e["step"] == s)
                                     for k in ("train_seconds", *EVAL_FIELDS)}} for s in steps]
    return out


def t_quantile(probability: float, dof: int) -> float:
    """Student's t quantile (scipy), for confidence intervals over a few seeds."""
    from scipy.stats import t

    return float(t.ppf(probability, dof))


def _value_at(cell: dict, key: str, step: int | None):
    """A cell's `key` at its final step (`step` None) or at the evaluated `step` (None if not evaluated there)."""
    if step is None:
        return final_numbers(cell).get(key)
    return next((e.get(key) for e in cell["evals"] if e["step"] == step), None)


def paired_differences(cells: Sequence[dict], mixers: Sequence[str], key: str = "fid",
                       step: int | None = None) -> dict[str, dict]:
    """{mixer: summary of (mixer - baseline) per training seed, plus `ci95`}, at the final step or at `step`,
    for every mixer after the baseline mixers[0]. Cells of one seed share their data order, each step's noise
    and times (pure functions of seed and step) and every evaluation's sampling seed, so pairing by seed takes
    that shared part out of the comparison; ci95 is the paired t-interval, None with fewer than two pairs."""
    base, *others = mixers
    values = {(c["mixer"], c["seed"]): _value_at(c, key, step) for c in cells}
    out = {}
    for mixer in others:
        pairs = [(values[(mixer, seed)], values[(base, seed)]) for m, seed in values
                 if m == mixer and (base, seed) in values]
        diffs = [a - b for a, b in pairs if len(_numbers([a, b])) == 2]  # both finite numbers
        s = summarize(diffs)
        half = None if s["std"] is None else t_quantile(0.975, s["n"] - 1) * s["std"] / math.sqrt(s["n"])
        out[mixer] = {**s, "baseline": base, "key": key,
                      "ci95": None if half is None else [s["mean"] - half, s["mean"] + half]}
    return out


def format_differences(differences: dict[str, dict]) -> str:
    """One line per mixer: its paired difference to the baseline, mean ± std, n and the 95 % interval."""
    lines = []
    for mixer, d in differences.items():
        if d["mean"] is None:
            continue
        interval = "" if d["ci95"] is None else f", 95 % CI [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
        spread = "" if d["std"] is None else f" ± {d['std']:.2g}"
        lines.append(f"- {d['key']} {mixer} - {d['baseline']}, paired by seed: {d['mean']:+.4f}{spread} "
                     f"(n={d['n']}{interval})")
    return "\n".join(lines)


def differences_along(cells: Sequence[dict], mixers: Sequence[str]) -> dict[int, dict[str, dict]]:
    """{step: paired FID differences to the baseline there} at every step some cell was evaluated at."""
    steps = sorted({e["step"] for c in cells for e in c["evals"]})
    return {s: paired_differences(cells, mixers, "fid", s) for s in steps}


def format_differences_along(along: dict[int, dict[str, dict]], mixers: Sequence[str]) -> str:
    """A Markdown table: per evaluated step, each mixer's paired FID difference to the baseline, mean ± std
    [95 % interval]; '-' where no seed has both numbers, steps where none has are left out. Empty with one
    mixer or no shared step."""
    if len(mixers) < 2:
        return ""
    head = ["step", *(f"FID {m} - {mixers[0]}" for m in mixers[1:])]
    rows = []
    for step, row in along.items():
        if all(row[m]["mean"] is None for m in mixers[1:]):
            continue  # no seed was evaluated at this step by both (equal seconds: each mixer's own last step)
        entries = []
        for mixer in mixers[1:]:
            d = row[mixer]
            interval = "" if d["ci95"] is None else f" [{d['ci95'][0]:+.3g}, {d['ci95'][1]:+.3g}]"
            entries.append("-" if d["mean"] is None else f"{format_value(d, '+.3g')}{interval}")
        rows.append(f"| {step} | " + " | ".join(entries) + " |")
    if not rows:
        return ""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows])


def band(series: Sequence[Sequence[tuple[int, float]]]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) over several (step, value) series, at the steps every series has (loss curves)."""
    by_step = [dict(s) for s in series]
    steps = sorted(set.intersection(*(set(d) for d in by_step))) if by_step else []
    values = [[d[s] for d in by_step] for s in steps]
    return steps, [mean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def format_value(summary: dict, fmt: str = ".4g") -> str:
    """'mean ± std'; 'mean' alone with one seed; '-' when there is no number."""
    m, s = summary["mean"], summary["std"]
    if m is None:
        return "-"
    return f"{m:{fmt}}" if s is None else f"{m:{fmt}} ± {s:.2g}"


def exact(summary: dict, scale: float = 1.0, fmt: str = ".0f", unit: str = "") -> str:
    """A number the seeds share (parameters, steps) alone; 'min-max' when they differ; '-' when unknown."""
    if summary["mean"] is None:
        return "-"
    low, high = (f"{v / scale:{fmt}}{unit}" for v in (summary["min"], summary["max"]))
    return low if low == high else f"{low}-{high}"


MEAN_COLUMNS = (("planned s", "planned_train_seconds", ".4g"), ("train s", "train_seconds", ".4g"),
                ("step ms", "step_ms", ".3g"), ("sampling img/s", "sampling_images_per_sec", ".3g"),
                ("FID", "fid", ".4g"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"))


def format_table(summary: dict[str, dict], mixers: Sequence[str]) -> str:
    """A Markdown table: one row per mixer, mean ± std over its seeds at the final step ('planned s' only under
    an equal-seconds budget)."""
    planned = any(summary[m]["planned_train_seconds"]["n"] for m in mixers)
    columns = [c for c in MEAN_COLUMNS if planned or c[1] != "planned_train_seconds"]
    sizes = sorted({int(k.removeprefix(TRANSFER_PREFIX)) for m in mixers for k in summary[m]
                    if k.startswith(TRANSFER_PREFIX)})
    columns += [(f"FID @{s}px", transfer_key(s), ".4g") for s in sizes]
    head = ["mixer", "seeds", "params", "steps", *(c[0] for c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for mixer in mixers:
        s = summary[mixer]
        row = [mixer, str(s["fid"]["n"]), exact(s["params"], 1e6, ".3f", "M"), exact(s["steps"])]
        row += [format_value(s[key], fmt) for _, key, fmt in columns]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)

"""The training benchmark's figures from recorded FD curves (`bench/train.py`, docs/training.md): how much sooner a
method reaches uniform's FD, its final FD against uniform's, with Student-t intervals over seeds, and their Markdown
tables.

A curve is a record {"method", "seed", "fd": [[iteration, FD], …]}; methods are compared with uniform (or another
base) at the same seed — the same initial weights, batches and noises — so every difference is paired. With three
seeds a percentile bootstrap would only return the seeds' range: the intervals here are Student-t intervals of the
mean over seeds (`timetuner.measuring.metrics.t_interval`).
"""

from __future__ import annotations

import numpy as np

from timetuner.measuring.metrics import t_interval
from timetuner.measuring.report import markdown_table


def steps_to_reach(curve: list[list[float]], target: float) -> float | None:
    """First iteration where FD ≤ target, linear between evaluations; None if never."""
    previous = None
    for step, fd in curve:
        if fd <= target:
            if previous is None:
                return float(step)
            s0, f0 = previous
            return s0 + (step - s0) * (f0 - target) / (f0 - fd)
        previous = (step, fd)
    return None


def fd_at(curve: list[list[float]], step: int) -> float:
    """FD at `step`, linear between evaluations."""
    steps, fds = zip(*curve, strict=True)
    return float(np.interp(step, steps, fds))


def seed_interval(values: list[float]) -> list[float] | None:
    """95 % Student-t interval of the mean over seeds, rounded; None for one seed."""
    return [round(v, 3) for v in t_interval(values)] if len(values) > 1 else None


def by_method(curves: list[dict]) -> dict[str, dict[int, dict]]:
    """{method: {seed: curve}} in the order the methods first appear."""
    grouped: dict[str, dict[int, dict]] = {}
    for curve in curves:
        grouped.setdefault(curve["method"], {})[curve["seed"]] = curve
    return grouped


def _speedup(method: str, runs: dict, base: dict, seeds: list[int], target: int) -> dict:
    ratios = []
    for seed in seeds:
        reached = steps_to_reach(runs[seed]["fd"], fd_at(base[seed]["fd"], target))
        ratios.append(None if reached is None else target / reached)
    found = [r for r in ratios if r is not None]
    complete = len(found) == len(ratios)
    # The 2x test, robust where curves are flat: FD at half the iterations minus uniform's at the target (paired);
    # an interval below zero shows >= 2x, one above zero shows < 2x.
    half = [fd_at(runs[seed]["fd"], target // 2) - fd_at(base[seed]["fd"], target) for seed in seeds]
    return {"figure": "speedup", "method": method, "target": target, "seeds": seeds,
            "ratio_per_seed": [None if r is None else round(r, 3) for r in ratios],
            "ratio_mean": round(float(np.mean(found)), 3) if complete else None,
            "ratio_ci95": seed_interval(found) if complete else None, "not_reached": len(ratios) - len(found),
            "fd_at_half_minus_uniform": round(float(np.mean(half)), 3),
            "fd_at_half_minus_uniform_ci95": seed_interval(half)}


def summarise(curves: list[dict], targets: list[int]) -> list[dict]:
    """Per method, one "speedup" line per target iteration s (s ÷ the iterations it needs to reach uniform's FD at
    s, per seed, their mean and t-interval; the 2× test) and a "final_fd" line (its last FD, range over seeds, and
    the paired difference from uniform's with its t-interval). Methods without a uniform run at a shared seed are
    left out."""
    lines = []
    grouped = by_method(curves)
    uniform = grouped.get("uniform", {})
    for method, runs in grouped.items():
        seeds = sorted(set(runs) & set(uniform))
        if not seeds:
            continue
        lines += [_speedup(method, runs, uniform, seeds, target) for target in targets]
        final = [runs[s]["fd"][-1][1] for s in seeds]
        diff = [runs[s]["fd"][-1][1] - uniform[s]["fd"][-1][1] for s in seeds]
        lines.append({"figure": "final_fd", "method": method, "seeds": seeds,
                      "fd_mean": round(float(np.mean(final)), 3),
                      "fd_range": [round(min(final), 3), round(max(final), 3)],
                      "minus_uniform_mean": round(float(np.mean(diff)), 3),
                      "minus_uniform_ci95": seed_interval(diff)})
    return lines


def _with_interval(mean: float, interval: list[float] | None, signed: bool = True, suffix: str = "") -> str:
    form = "+.2f" if signed else ".2f"
    cell = f"{mean:{form}}{suffix}"
    return cell if interval is None else f"{cell} [{interval[0]:{form}}, {interval[1]:{form}}]"


def speedup_table(lines: list[dict], targets: list[int]) -> str:
    """The README's training table from `summarise`'s lines."""
    speedups = {(r["method"], r["target"]): r for r in lines if r["figure"] == "speedup"}
    header = ["method", "seeds", *[f"×, uniform's FD at {t}" for t in targets], "final FD (range)",
              "final FD − uniform [95 % t-interval over seeds]"]
    rows = []
    for r in (r for r in lines if r["figure"] == "final_fd"):
        cells = []
        for t in targets:
            s = speedups[r["method"], t]
            cells.append(f"not reached on {s['not_reached']} of {len(s['seeds'])} seeds" if s["ratio_mean"] is None
                         else _with_interval(s["ratio_mean"], s["ratio_ci95"], signed=False, suffix="×"))
        rows.append([r["method"], str(len(r["seeds"])), *cells,
                     f"{r['fd_mean']:.2f} ({r['fd_range'][0]:.2f}–{r['fd_range'][1]:.2f})",
                     _with_interval(r["minus_uniform_mean"], r["minus_uniform_ci95"])])
    return markdown_table(header, rows)


def half_table(lines: list[dict], targets: list[int]) -> str:
    """The 2× test's table: FD at half of each target minus uniform's at the target (paired, t-interval)."""
    speedups = {(r["method"], r["target"]): r for r in lines if r["figure"] == "speedup"}
    header = ["method", "seeds", *[f"FD at {t // 2} − uniform's at {t}" for t in targets]]
    rows = [[method, str(len(speedups[method, targets[0]]["seeds"])),
             *[_with_interval(speedups[method, t]["fd_at_half_minus_uniform"],
                              speedups[method, t]["fd_at_half_minus_uniform_ci95"]) for t in targets]]
            for method in dict.fromkeys(m for m, _ in speedups)]
    return markdown_table(header, rows)


def against_table(curves: list[dict], base: str) -> str:
    """Each method's FD minus `base`'s at every evaluation, paired by seed: mean [95 % Student-t interval over
    seeds] (the open values of a method against its defaults, where uniform's yardstick is too coarse)."""
    grouped = by_method(curves)
    reference = grouped.get(base, {})
    steps = [s for s, _ in next(iter(reference.values()))["fd"]] if reference else []
    rows = []
    for method, runs in grouped.items():
        seeds = sorted(set(runs) & set(reference))
        if method == base or not seeds:
            continue
        cells = []
        for step in steps:
            diff = [fd_at(runs[s]["fd"], step) - fd_at(reference[s]["fd"], step) for s in seeds]
            cells.append(_with_interval(float(np.mean(diff)), seed_interval(diff)))
        rows.append([method, str(len(seeds)), *cells])
    return markdown_table(["method", "seeds", *[f"FD − {base}'s at {s}" for s in steps]], rows)

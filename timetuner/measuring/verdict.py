"""The verdict: plain against tuned from the same held-out noises, paired changes with intervals, whether the tuned
table is better, over one or several noise sets."""

from __future__ import annotations

import numpy as np
import torch

from timetuner.core.distance import rms_distance
from timetuner.measuring.metrics import (
    describe_change,
    paired_bootstrap,
)
from timetuner.measuring.yardstick import Yardstick


def combine_sets(records: list[dict]) -> dict:
    """Figures over several independent held-out noise sets (`held_out_figures` records): per figure the mean plain,
    tuned and change, and a 95 % interval of the mean change from the sets' own bootstrap intervals (normal
    approximation, independent sets), with every set's change listed."""
    out = {"sets": len(records), "seeds": [r["seed"] for r in records]}
    for key in ("dist_gap", "x0_gap", "data_fd"):
        if key not in records[0]:
            continue
        parts = [r[key] for r in records]
        mean = {name: float(np.mean([p[name] for p in parts])) for name in ("plain", "tuned", "change")}
        se = float(np.sqrt(sum(((p["high"] - p["low"]) / 3.92) ** 2 for p in parts))) / len(parts)
        low, high = mean["change"] - 1.96 * se, mean["change"] + 1.96 * se
        out[key] = {**mean, "low": low, "high": high, "level": 0.95, "significant": not (low <= 0.0 <= high),
                    "per_set": [p["change"] for p in parts]}
    out["better"] = is_better(out)
    return out


def judge(yardstick: Yardstick | None, plain: torch.Tensor, tuned: torch.Tensor, reference: torch.Tensor,
          reference_label: str, bootstrap: int = 1000) -> dict:
    """The held-out record of plain against tuned final images (n, same noises), the one measurement path.

    x0 gap: RMS per image to the reference solver's image from the same noise (`reference`: the first g), mean
    over the g; distribution gap: FD (and KID) of the n images' features against the reference set; data FD:
    against held-out data. Each change with a 95 % paired bootstrap interval over the noises; `better`: the
    verdict, decided on the x0 gap and the distribution gap (`is_better`).
    """
    g = reference.shape[0]
    ref = reference.clamp(-1, 1)
    gaps = [rms_distance(x[:g].clamp(-1, 1), ref).cpu().numpy() for x in (plain, tuned)]
    record = {"reference": reference_label, "n": int(plain.shape[0]), "gap_n": g,
              "x0_gap": paired_bootstrap(gaps[0], gaps[1], resamples=bootstrap)}
    if yardstick is not None:
        fa, fb = yardstick.features(plain), yardstick.features(tuned)
        record.update(yardstick.describe(), **yardstick.changes(fa, fb, bootstrap))
        record["dist_kid"] = {"plain": yardstick.dist_kid(fa), "tuned": yardstick.dist_kid(fb)}
        if yardstick.data is not None and yardstick.reference is not None:
            record["data_fd_reference"] = yardstick.data.fd(yardstick.reference[: record["n"]])
    record["better"] = is_better(record)
    return record


def is_better(held: dict) -> bool:
    """The verdict: a lower held-out x0 gap and a lower distribution gap (where one was measured); or, since the
    distribution gap cannot resolve small changes at affordable n (docs/measuring.md), an x0 gap lower with a
    95 % interval that excludes zero and a distribution gap not significantly higher."""
    x0 = held["x0_gap"]
    if "dist_gap" not in held:
        return x0["tuned"] < x0["plain"]
    dist = held["dist_gap"]
    if x0["tuned"] < x0["plain"] and dist["tuned"] < dist["plain"]:
        return True
    return bool(x0["high"] < 0 and dist["low"] <= 0)


def describe_judgement(record: dict) -> list[str]:
    """The held-out figures of a `judge` record as lines: distribution gap, x0 gap, data FD, each with its interval."""
    lines = []
    if "dist_gap" in record:
        kid = record.get("dist_kid", {})
        lines.append(describe_change(f"distribution gap (FD, {record['measure']}, {record['n']} samples vs "
                                     f"{record['reference_n']} of the {record['reference']} reference)",
                                     record["dist_gap"], digits=3)
                     + (f"; KID {kid['plain']:.5f} -> {kid['tuned']:.5f}" if kid else ""))
    lines.append(describe_change(f"x0 gap (RMS to the {record['reference']} sample from the same noise, "
                                 f"{record['gap_n']} samples)", record["x0_gap"]))
    if "data_fd" in record:
        line = describe_change(f"data FD (secondary; {record['data_measure']}, {record['n']} samples)",
                               record["data_fd"], digits=3)
        if "data_fd_reference" in record:
            line += f"; reference sampler {record['data_fd_reference']:.3f}"
        lines.append(line)
    return lines

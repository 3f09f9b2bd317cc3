"""The training benchmark's figures (`timetuner.trainers.report`): speed-ups against uniform, Student-t intervals over
seeds (never the seeds' range), and the README's table regenerated from the recorded runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scipy import stats

from timetuner.trainers.report import fd_at, speedup_table, steps_to_reach, summarise

ROOT = Path(__file__).resolve().parent.parent


def curve(method: str, seed: int, fds: list[float]) -> dict:
    return {"method": method, "seed": seed, "fd": [[1000 * (i + 1), fd] for i, fd in enumerate(fds)]}


def test_steps_to_reach_interpolates_between_evaluations():
    fds = [[1000, 40.0], [2000, 20.0], [3000, 10.0]]
    assert steps_to_reach(fds, 30.0) == pytest.approx(1500.0)
    assert steps_to_reach(fds, 50.0) == 1000.0
    assert steps_to_reach(fds, 5.0) is None
    assert fd_at(fds, 2500) == pytest.approx(15.0)


def test_speedup_per_seed_its_mean_and_student_t_interval():
    # uniform's FD at 2000 is 20; the method reaches 20 at 1000 (2×), 1500 (1.33×) and 1333.3 (1.5×)
    curves = [curve("uniform", seed, [40.0, 20.0, 10.0]) for seed in range(3)]
    curves += [curve("m", 0, [20.0, 10.0, 8.0]), curve("m", 1, [25.0, 15.0, 9.0]), curve("m", 2, [22.0, 16.0, 9.0])]
    ratios = [2.0, 2000 / 1500, 2000 / (1000 + 1000 * 2 / 6)]
    lines = summarise(curves, [2000])
    m = next(r for r in lines if r["method"] == "m" and r["figure"] == "speedup")
    assert m["ratio_per_seed"] == pytest.approx(ratios, abs=1e-3)
    mean, half = sum(ratios) / 3, stats.t.ppf(0.975, 2) * stats.tstd(ratios) / 3 ** 0.5
    assert m["ratio_mean"] == pytest.approx(mean, abs=1e-3)
    assert m["ratio_ci95"] == pytest.approx([mean - half, mean + half], abs=1e-3)
    # the 2× test: FD at 1000 minus uniform's at 2000, paired per seed
    assert m["fd_at_half_minus_uniform"] == pytest.approx((0.0 + 5.0 + 2.0) / 3, abs=1e-3)
    assert "1.61× [" in speedup_table(lines, [2000])


def test_the_interval_is_a_t_interval_not_the_seeds_range():
    curves = [curve("uniform", s, [30.0, 20.0]) for s in range(3)]
    curves += [curve("m", s, [30.0, fd]) for s, fd in enumerate([18.0, 19.0, 23.0])]
    final = next(r for r in summarise(curves, [1000]) if r["method"] == "m" and r["figure"] == "final_fd")
    diffs = [-2.0, -1.0, 3.0]
    mean, sd = sum(diffs) / 3, stats.tstd(diffs)
    half = stats.t.ppf(0.975, 2) * sd / 3 ** 0.5
    assert final["minus_uniform_ci95"] == pytest.approx([mean - half, mean + half], abs=1e-3)
    assert final["minus_uniform_ci95"][0] < min(diffs) and final["minus_uniform_ci95"][1] > max(diffs)


def test_a_method_that_never_reaches_the_target_says_so():
    curves = [curve("uniform", s, [30.0, 10.0]) for s in range(2)]
    curves += [curve("slow", 0, [30.0, 12.0]), curve("slow", 1, [30.0, 9.0])]
    lines = summarise(curves, [2000])
    slow = next(r for r in lines if r["method"] == "slow" and r["figure"] == "speedup")
    assert slow["not_reached"] == 1 and slow["ratio_mean"] is None
    assert "not reached on 1 of 2 seeds" in speedup_table(lines, [2000])


def test_the_readme_training_table_is_the_report_of_the_recorded_runs():
    """README's table = `bench/train.py --report --markdown` on bench/results/train.jsonl (headline grid)."""
    headline = ["uniform", "speed", "clts+mdlrc", "adaptive", "clts+mdlrc-default"]
    records = [json.loads(line) for line in (ROOT / "bench/results/train.jsonl").read_text().splitlines() if line]
    curves = [r for r in records if r["method"] in headline and r["steps"] == 8000]
    targets = [1000, 2000, 4000, 8000]
    table = speedup_table(summarise(curves, targets), targets)
    assert table in (ROOT / "README.md").read_text()
    assert table.splitlines()[0] in (ROOT / "docs/training.md").read_text()


def test_the_fresh_seed_check_of_the_clts_ramp_is_the_report_of_its_runs():
    """docs/training.md's fresh-seed table (the CLTS ramp, chosen on seeds 0-2, rerun on seeds 3-5) = the report of
    bench/results/train-fresh-seeds.jsonl."""
    records = [json.loads(line) for line in
               (ROOT / "bench/results/train-fresh-seeds.jsonl").read_text().splitlines() if line]
    assert sorted({r["seed"] for r in records}) == [3, 4, 5]
    table = speedup_table(summarise(records, [1000, 2000]), [1000, 2000])
    assert table in (ROOT / "docs/training.md").read_text()

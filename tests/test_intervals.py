"""Intervals over seeds: a Student-t interval of the mean (`measuring.metrics.t_interval`), which the training report
uses; with three seeds a percentile bootstrap is only the seeds' range."""

from __future__ import annotations

import numpy as np
import pytest

from timetuner.errors import UserError
from timetuner.measuring.metrics import t_interval


def test_the_t_interval_of_three_seeds_is_mean_plus_minus_t_times_the_standard_error():
    low, high = t_interval([1.0, 2.0, 3.0])
    half = 4.302653 / np.sqrt(3)  # t_{2, 0.975} · sd (1) / √3
    assert low == pytest.approx(2 - half, abs=1e-5) and high == pytest.approx(2 + half, abs=1e-5)
    # the percentile bootstrap of the same three values never leaves their range: it cannot say more than it
    rng = np.random.default_rng(0)
    v = np.array([1.0, 2.0, 3.0])
    means = v[rng.integers(0, 3, (10_000, 3))].mean(1)
    assert np.percentile(means, 2.5) == 1.0 and np.percentile(means, 97.5) == 3.0
    assert low < 1.0 and high > 3.0


def test_the_training_report_uses_the_t_interval():
    # the report bench/train.py prints lives in the library now (timetuner.trainers.report)
    from timetuner.trainers.report import seed_interval

    assert seed_interval([1.0, 2.0, 3.0]) == [round(v, 3) for v in t_interval([1.0, 2.0, 3.0])]


def test_one_seed_has_no_interval():
    with pytest.raises(UserError, match=">= 2 values"):
        t_interval([1.0])

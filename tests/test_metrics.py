"""Paired bootstrap intervals: they cover zero for no change, exclude it for a real one, and are reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from timetuner.errors import UserError
from timetuner.metrics import describe_change, frechet_distance, paired_bootstrap


def test_no_change_covers_zero_and_says_so():
    rng = np.random.default_rng(0)
    plain = rng.normal(1.0, 0.3, 500)
    tuned = plain + rng.normal(0.0, 0.01, 500)  # the same samples up to tiny noise
    result = paired_bootstrap(plain, tuned)
    assert result["low"] <= 0 <= result["high"] and not result["significant"]
    assert describe_change("x0 gap", result).endswith("no significant change")


def test_a_real_paired_change_is_significant_even_when_samples_vary_a_lot():
    rng = np.random.default_rng(1)
    plain = rng.normal(1.0, 1.0, 200)  # large spread between samples ...
    tuned = plain - 0.05 + rng.normal(0.0, 0.01, 200)  # ... but every pair improves by 0.05
    result = paired_bootstrap(plain, tuned)
    assert result["significant"] and result["high"] < 0
    assert result["change"] == pytest.approx(-0.05, abs=0.01)
    assert "no significant change" not in describe_change("x0 gap", result)


def test_bootstrap_is_reproducible_and_works_for_fd_on_feature_rows():
    rng = np.random.default_rng(2)
    reference = rng.normal(0, 1, (400, 4))
    plain = rng.normal(0.5, 1, (300, 4))
    tuned = plain - 0.4  # closer to the reference
    stat = lambda rows: frechet_distance(rows, reference)  # noqa: E731
    a = paired_bootstrap(plain, tuned, statistic=stat, resamples=100, seed=3)
    b = paired_bootstrap(plain, tuned, statistic=stat, resamples=100, seed=3)
    assert a == b
    assert a["tuned"] < a["plain"] and a["significant"]


def test_bootstrap_refuses_unpaired_input():
    with pytest.raises(UserError, match="equal-length"):
        paired_bootstrap(np.ones(5), np.ones(6))


def test_clean_fid_distances_offline_with_the_digits_extractor():
    """Held-out vs training digits sit near the floor; noise is far above it (FD and KID, via clean-fid)."""
    import torch

    from timetuner.data import load_digits_tensor
    from timetuner.metrics import digits_features, kernel_distance

    test, train = load_digits_tensor("test")[0], load_digits_tensor("train")[0]
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f_test, f_train, f_noise = digits_features(test), digits_features(train), digits_features(noise)
    floor, far = frechet_distance(f_test, f_train), frechet_distance(f_noise, f_train)
    assert floor < 10 and far > 20 * floor
    kid_floor, kid_far = kernel_distance(f_test, f_train), kernel_distance(f_noise, f_train)
    assert kid_far > 20 * abs(kid_floor)  # KID is unbiased: the floor scatters around 0 (here about -250)
    assert kernel_distance(f_test, f_train, seed=1) == kernel_distance(f_test, f_train, seed=1)

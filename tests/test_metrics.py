"""Paired bootstrap intervals: they cover zero for no change, exclude it for a real one, and are reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from timetuner.errors import UserError
from timetuner.measuring.metrics import describe_change, frechet_distance, paired_bootstrap


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

    from timetuner.core.data import load_digits_tensor
    from timetuner.measuring.metrics import digits_features, kernel_distance

    test, train = load_digits_tensor("test")[0], load_digits_tensor("train")[0]
    noise = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    f_test, f_train, f_noise = digits_features(test), digits_features(train), digits_features(noise)
    floor, far = frechet_distance(f_test, f_train), frechet_distance(f_noise, f_train)
    assert floor < 10 and far > 20 * floor
    kid_floor, kid_far = kernel_distance(f_test, f_train), kernel_distance(f_noise, f_train)
    assert kid_far > 20 * abs(kid_floor)  # KID is unbiased: the floor scatters around 0 (here about -250)
    assert kernel_distance(f_test, f_train, seed=1) == kernel_distance(f_test, f_train, seed=1)


def test_kernel_distance_is_clean_fids_estimator_on_its_subsets():
    """The whole-set sums (and the cached reference terms) give clean-fid's KID on clean-fid's own draws, both when
    every draw takes all of `a` (n samples against a larger reference) and when draws are subsets of both."""
    import numpy as np
    from cleanfid.fid import kernel_distance as clean_fid_kernel

    from timetuner.measuring.metrics import kernel_distance

    rng = np.random.default_rng(3)
    for n_a, n_b in ((120, 500), (90, 60)):
        a, b = rng.normal(0.1, 0.5, (n_a, 16)), rng.normal(0.0, 0.5, (n_b, 16))
        state = np.random.get_state()
        np.random.seed(7)
        expected = clean_fid_kernel(a, b, max_subset_size=50)
        np.random.set_state(state)
        cache = {}
        first = kernel_distance(a, b, seed=7, max_subset=50, cache=cache)
        again = kernel_distance(a, b, seed=7, max_subset=50, cache=cache)  # the reference's terms from the cache
        assert cache and first == again
        assert abs(first - expected) <= 1e-12 * max(1.0, abs(expected))
        whole = kernel_distance(a, b, seed=7, max_subset=n_a)  # where n_a <= n_b every draw takes all of a
        np.random.seed(7)
        assert abs(whole - clean_fid_kernel(a, b, max_subset_size=n_a)) <= 1e-12 * max(1.0, abs(whole))
        np.random.set_state(state)
    assert kernel_distance(a, b) != kernel_distance(a, b, seed=1)  # the seed picks the subsets

"""The TimestepSampler protocol, the registry and the uniform sampler; the weighting registry."""

from __future__ import annotations

import pytest
import torch

from timetuner.errors import UserError
from timetuner.trainers import SAMPLERS, WEIGHTINGS, TimestepSampler, make_sampler, make_weighting


def test_uniform_sampler_follows_the_protocol_and_covers_all_timesteps():
    sampler = make_sampler("uniform", num_train_timesteps=10)
    assert isinstance(sampler, TimestepSampler)
    gen = torch.Generator().manual_seed(0)
    t, w = sampler.sample(100_000, step=0, generator=gen)
    assert t.dtype == torch.int64 and t.min() == 0 and t.max() == 9
    assert torch.equal(w, torch.ones(100_000))
    counts = torch.bincount(t, minlength=10).double()
    chi2 = ((counts - 10_000) ** 2 / 10_000).sum().item()
    assert chi2 < 27.88  # χ²(9 dof) 99.9 % quantile
    sampler.update(t, torch.rand(100_000), step=0)
    assert sampler.state_dict() == {}


def test_same_generator_seed_same_timesteps():
    sampler = make_sampler("uniform", num_train_timesteps=1000)
    a, _ = sampler.sample(8, 0, torch.Generator().manual_seed(3))
    b, _ = sampler.sample(8, 0, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_registries_refuse_unknown_names():
    assert "uniform" in SAMPLERS and "none" in WEIGHTINGS
    with pytest.raises(UserError, match="'nope'.*accepted: .*uniform"):
        make_sampler("nope", 1000)
    with pytest.raises(UserError, match="'nope'.*accepted: .*none"):
        make_weighting("nope")


def test_no_weighting_is_ones():
    w = make_weighting("none")(torch.tensor([0, 500, 999]), None)
    assert torch.equal(w, torch.ones(3))

"""The recipes of docs/architecture.md, worked: a new training sampler and a new few-step solver are each added in
one place (a registered class; a registry entry) and are then taken by everything that names them."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from timetuner.core import Solver, trajectories
from timetuner.core.denoiser import Denoiser
from timetuner.tiny import tiny_pixel_unet
from timetuner.trainers import SAMPLERS, TrainConfig, build_sampler, noise_scheduler_for
from timetuner.trainers.samplers import StaticSampler, register_sampler


class LateSampler(StaticSampler):
    """t uniform over the noisier half (a recipe example, not a method)."""

    name: ClassVar[str] = "late"

    def _probabilities(self, step):
        p = torch.zeros(self.num_train_timesteps, dtype=torch.float64)
        p[self.num_train_timesteps // 2:] = 1.0
        return p


def test_a_new_training_sampler_is_one_registered_class(tmp_path):
    register_sampler(LateSampler)  # what `@register_sampler` above the class does in its own module
    try:
        config = TrainConfig(out=str(tmp_path / "run"), sampler="late")
        sampler = build_sampler(config, noise_scheduler_for(config))
        t, w = sampler.sample(256, 0, torch.Generator().manual_seed(0))
        assert isinstance(sampler, LateSampler) and t.min() >= 500 and torch.all(w == 1)
    finally:
        SAMPLERS.pop("late")


def test_a_new_solver_is_one_registry_entry(monkeypatch):
    # diffusers' LMS scheduler, one entry in each of core/trajectories.py's three tables
    monkeypatch.setitem(trajectories.SCHEDULERS, "lms", ("LMSDiscreteScheduler", {}))
    monkeypatch.setitem(trajectories.TRAJECTORIES, "lms", {"uniform": {}, "karras": {"use_karras_sigmas": True}})
    monkeypatch.setitem(trajectories.DEFAULT_TRAJECTORY, "lms", "uniform")
    from diffusers import DDPMScheduler

    solver = Solver.named(Denoiser(tiny_pixel_unet()), DDPMScheduler(num_train_timesteps=1000).config, "lms",
                          None, 4)
    assert solver.evaluations == 4 and type(solver.template).__name__ == "LMSDiscreteScheduler"
    out = solver.rollout(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["uniform", "clts"])
def test_every_registered_sampler_is_a_train_option(name):
    from timetuner.cli.train import HELP

    assert name in HELP["sampler"]

"""The reference trajectory (`core.reference.reference_trajectory`): the one loop outside `Solver.rollout`, checked
against diffusers' own DDIM on a grid of integer timesteps (where the two must agree)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from timetuner.core.reference import reference_trajectory
from timetuner.core.solver import Solver


class Affine:
    """A deterministic ε-prediction network: ε(x, t) = 0.3 x + t / 2000."""

    device = torch.device("cpu")

    def __call__(self, x, t):
        return 0.3 * x + float(torch.as_tensor(t).reshape(-1)[0]) / 2000


def test_the_reference_trajectory_is_diffusers_ddim_where_its_grid_is_integer():
    config = DDIMScheduler(clip_sample=False).config
    solver = Solver(Affine(), DDIMScheduler.from_config(config), 5)  # leading: t = 800, 600, 400, 200, 0
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    states = reference_trajectory(solver, noise, steps=999)  # the fine grid: every integer from 999 down to 0
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(1000)  # steps of one timestep each
    x, seen = noise.clone(), {}
    for t in range(int(solver.t[0]), 0, -1):
        x = ddim.step(Affine()(x, t), t, x).prev_sample
        seen[t - 1] = x
    times = solver.state_times()
    assert times[:4] == [800.0, 600.0, 400.0, 200.0]
    assert torch.equal(states[0], noise)
    for k in (1, 2, 3):
        assert torch.allclose(states[k], seen[int(times[k])], rtol=1e-4, atol=1e-5)

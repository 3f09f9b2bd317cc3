"""`timetuner train --objective flow`: the rectified-flow loss at σ, the σ densities and loss weightings against
diffusers' own SD3 helpers, and a run folder that plain diffusers loads and samples (DDPMPipeline +
FlowMatchEulerDiscreteScheduler)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from tests.conftest import tiny_config
from timetuner.errors import UserError
from timetuner.trainers.config import noise_scheduler_for, resolved
from timetuner.trainers.objectives import FlowObjective, make_objective, training_sigmas
from timetuner.trainers.samplers import make_sampler
from timetuner.trainers.weighting import make_weighting

T = 1000


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_objective_at_sigma(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=shift)
    objective = make_objective("flow", scheduler)
    assert isinstance(objective, FlowObjective)
    t = torch.tensor([0, 499, 999])
    plain = torch.tensor([1, 500, 1000], dtype=torch.float64) / T  # σ_t = (t + 1)/T before the shift
    sigma = shift * plain / (1 + (shift - 1) * plain)
    assert torch.allclose(training_sigmas(scheduler)[t], sigma, atol=1e-6)
    # The training grid is the one the pipeline's scheduler holds (descending there).
    assert torch.allclose(training_sigmas(scheduler).flip(0).float(), scheduler.sigmas, atol=0)
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    s = sigma.float().reshape(-1, 1, 1, 1)
    assert torch.allclose(objective.noisy(x0, noise, t), (1 - s) * x0 + s * noise, atol=1e-6)
    assert torch.equal(objective.target(x0, noise, t), noise - x0)
    assert torch.allclose(objective.network_time(t).double(), sigma * T, atol=1e-3)  # σ·T, as the pipeline feeds it
    # The velocity target integrates the path: x_σ + (0 − σ)·v = x0 for the true v.
    assert torch.allclose(objective.noisy(x0, noise, t) - s * (noise - x0), x0, atol=1e-5)


@pytest.mark.parametrize(("name", "scheme", "options"), [
    ("logit-normal", "logit_normal", dict(mean=0.3, std=0.8)),
    ("mode", "mode", dict(scale=1.29)),
    ("uniform", "none", {}),
])
def test_sigma_densities_draw_as_diffusers_does(name, scheme, options):
    sampler = make_sampler(name, T, **options)
    t, w = sampler.sample(4096, 0, torch.Generator().manual_seed(7))
    kwargs = {"logit_mean": options.get("mean"), "logit_std": options.get("std"), "mode_scale": options.get("scale")}
    u = compute_density_for_timestep_sampling(scheme, 4096, generator=torch.Generator().manual_seed(7), **kwargs)
    if name != "uniform":  # uniform draws integers directly; its u is another stream of the same generator
        assert torch.equal(t, (u.double() * T).long().clamp(0, T - 1))
    assert torch.equal(w, torch.ones(4096))
    # The distribution the sampler reports (its plot and its log) is the one it draws from.
    p = sampler.probabilities(0)
    big = sampler.sample(200_000, 0, torch.Generator().manual_seed(1))[0]
    bands = torch.bincount(big // 100, minlength=10).double() / big.numel()
    assert torch.allclose(bands, p.reshape(10, -1).sum(1), atol=0.005)


@pytest.mark.parametrize(("name", "scheme"), [("sigma-sqrt", "sigma_sqrt"), ("cosmap", "cosmap")])
def test_flow_weightings_are_diffusers_sd3_weightings_at_the_runs_sigma(name, scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=T, shift=3.0)
    t = torch.tensor([0, 10, 500, 999])
    expected = compute_loss_weighting_for_sd3(scheme, sigmas=training_sigmas(scheduler).float()[t])
    assert torch.allclose(make_weighting(name)(t, scheduler), expected.float())


def test_a_flow_run_is_a_plain_diffusers_pipeline_that_samples(tmp_path):
    from timetuner.trainers import train

    out = train(tiny_config(tmp_path / "run", objective="flow", sampler="logit-normal", weighting="cosmap",
                            flow_shift=2.0, sample_n=4, sample_steps=4))
    pipe = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 2.0
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and math.isfinite(float(images.sum()))
    assert (out / "samples.png").is_file()


def test_flow_runs_see_the_noises_of_ddpm_runs(tmp_path):
    """The objective changes what is learned, not the draws: batches and noises per (seed, step) are shared."""
    from timetuner.core.data import load_training_data
    from timetuner.trainers.loop import _Training

    draws = []
    for objective in ("ddpm", "flow"):
        config = resolved(tiny_config(tmp_path / objective, objective=objective))
        data = load_training_data(config.data, config.resolution, config.channels)
        draws.append(_Training(config).draw(data, 3)[:2])
    assert all(torch.equal(a, b) for a, b in zip(*draws, strict=True))


def test_flow_refusals_name_the_reason():
    with pytest.raises(UserError, match="never below its 1e-4 threshold"):
        resolved(tiny_config("unused", objective="flow", sampler="speed"))
    with pytest.raises(UserError, match="variational bound"):
        resolved(tiny_config("unused", objective="flow", sampler="adaptive"))
    with pytest.raises(UserError, match="--weighting caw"):
        resolved(tiny_config("unused", objective="flow", weighting="caw"))
    assert isinstance(noise_scheduler_for(resolved(tiny_config("unused", objective="flow"))),
                      FlowMatchEulerDiscreteScheduler)

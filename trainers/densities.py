"""Samplers of continuous noise-level densities, drawn on the integer training grid: EDM's log-normal and SD3's
logit-normal and mode densities (the latter two also for `--objective flow`). Registered with `make_sampler` like
every sampler (`timetuner.trainers` imports this module)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from timetuner.trainers.samplers import StaticSampler, check_range, generator_device, register_sampler, schedule_of


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


@register_sampler
class LogNormalSampler(StaticSampler):
    """EDM's training distribution (Karras et al., 2022): ln σ ~ N(P_mean, P_std²), σ mapped to the nearest t.

    σ_t = √((1 − ᾱ_t)/ᾱ_t) of the model's own schedule; nearest in ln σ, so the discrete distribution is
    the normal mass between the midpoints of neighbouring ln σ_t (σ beyond the schedule's ends clamps).
    """

    name: ClassVar[str] = "lognormal"

    def __init__(self, num_train_timesteps: int, noise_scheduler=None, importance: bool = False,
                 mean: float = -1.2, std: float = 1.2):
        super().__init__(num_train_timesteps, noise_scheduler, importance)
        self.mean = check_range("--lognormal-mean", mean, -math.inf, math.inf, low_open=True, high_open=True)
        self.std = check_range("--lognormal-std", std, 0.0, math.inf, low_open=True, high_open=True)
        alphas = schedule_of(noise_scheduler, self.num_train_timesteps)
        self.log_sigmas = 0.5 * torch.log((1.0 - alphas) / alphas)

    def _probabilities(self, step):
        edges = (self.log_sigmas[1:] + self.log_sigmas[:-1]) / 2
        cdf = _normal_cdf((edges - self.mean) / self.std)
        cdf = torch.cat([torch.zeros(1, dtype=cdf.dtype), cdf, torch.ones(1, dtype=cdf.dtype)])
        return cdf[1:] - cdf[:-1]

    def sample(self, batch_size, step, generator=None, x0=None):
        device = generator_device(generator)
        log_sigma = self.mean + self.std * torch.randn(batch_size, generator=generator, device=device).double()
        edges = ((self.log_sigmas[1:] + self.log_sigmas[:-1]) / 2).to(device)
        t = torch.bucketize(log_sigma, edges)
        return t, self._weight(self.probabilities(step), t)


@register_sampler
class LogitNormalSampler(StaticSampler):
    """SD3's logit-normal (Esser et al., 2024): u = sigmoid(N(m, s²)) ∈ (0, 1), t = ⌊u·T⌋ (u → 1 is noise).

    Drawn with diffusers' `compute_density_for_timestep_sampling`. Direction: here u is the noise level as
    in the SD3 paper, so `mean` > 0 favours noisier timesteps. diffusers' SD3 scripts index their
    *descending* `timesteps` with ⌊u·T⌋, which flips that: their logit_mean = −ours.
    """

    name: ClassVar[str] = "logit-normal"

    def __init__(self, num_train_timesteps: int, noise_scheduler=None, importance: bool = False,
                 mean: float = 0.0, std: float = 1.0):
        super().__init__(num_train_timesteps, noise_scheduler, importance)
        self.mean = check_range("--logit-normal-mean", mean, -math.inf, math.inf, low_open=True, high_open=True)
        self.std = check_range("--logit-normal-std", std, 0.0, math.inf, low_open=True, high_open=True)

    def _probabilities(self, step):
        T = self.num_train_timesteps
        u = torch.arange(T + 1, dtype=torch.float64) / T
        cdf = _normal_cdf((torch.logit(u) - self.mean) / self.std)  # logit(0) = −inf, logit(1) = inf
        return cdf[1:] - cdf[:-1]

    def sample(self, batch_size, step, generator=None, x0=None):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        device = generator_device(generator)
        u = compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=self.mean,
                                                  logit_std=self.std, device=device, generator=generator)
        t = (u.double() * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return t, self._weight(self.probabilities(step), t)


@register_sampler
class ModeSampler(StaticSampler):
    """SD3's mode sampling with heavy tails (Esser et al., 2024, Eq. 20): u = 1 − v − s(cos²(πv/2) − 1 + v),
    v ~ U(0, 1), t = ⌊u·T⌋, drawn with diffusers' `compute_density_for_timestep_sampling("mode")`;
    s ∈ [−1, 2/(π − 2)] keeps u monotone in v (s = 1.29 is SD3's)."""

    name: ClassVar[str] = "mode"

    def __init__(self, num_train_timesteps: int, noise_scheduler=None, importance: bool = False,
                 scale: float = 1.29):
        super().__init__(num_train_timesteps, noise_scheduler, importance)
        self.scale = check_range("--mode-scale", scale, -1.0, 2.0 / (math.pi - 2.0))

    def _probabilities(self, step):
        T, fine = self.num_train_timesteps, 200 * self.num_train_timesteps
        v = (torch.arange(fine, dtype=torch.float64) + 0.5) / fine
        u = 1 - v - self.scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        return torch.bincount((u * T).long().clamp(0, T - 1), minlength=T).double()

    def sample(self, batch_size, step, generator=None, x0=None):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        device = generator_device(generator)
        u = compute_density_for_timestep_sampling("mode", batch_size, mode_scale=self.scale, device=device,
                                                  generator=generator)
        t = (u.double() * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return t, self._weight(self.probabilities(step), t)

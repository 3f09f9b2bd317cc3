"""What the network learns: DDPM's noise (or v / x0) prediction, or the rectified-flow velocity.

    objective = make_objective(config.objective, noise_scheduler, prediction_type)
    x_t = objective.noisy(x0, noise, t)                       # t: integer training times in [0, T)
    loss = (model(x_t, objective.network_time(t)).sample - objective.target(x0, noise, t)) ** 2

Rectified flow (SD3, Flux; Esser et al., 2024; Liu et al., 2022): x_σ = (1 − σ) x0 + σ ε, the network is fed σ·T
(a float, as `FlowMatchEulerDiscreteScheduler` hands it out) and predicts the velocity ε − x0. The integer training
time t ∈ [0, T) stands for σ_t = (t + 1)/T, shifted as the pipeline's scheduler shifts it (`shift`) — the grid
diffusers' SD3 scripts train on (`noise_scheduler.sigmas`), so the samplers and the per-bucket log carry over.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from timetuner.errors import UserError, check_choice


class DDPMObjective:
    """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε; the target is ε, v or x0 (`prediction_type`); the network is fed t."""

    name: ClassVar[str] = "ddpm"

    def __init__(self, noise_scheduler, prediction_type: str = "epsilon"):
        self.noise_scheduler, self.prediction_type = noise_scheduler, prediction_type

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        return x0

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def level_at(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer times (what the log reports at its bucket edges)."""
        return self.noise_scheduler.alphas_cumprod[t.cpu()]

    level_name: ClassVar[str] = "alpha_bar_at_bucket_edges"


def training_sigmas(noise_scheduler) -> torch.Tensor:
    """σ_t for t = 0 … T−1 (ascending, float64): (t + 1)/T through the scheduler's static shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fresh = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
    return fresh.sigmas.double().flip(0)


class FlowObjective:
    """Rectified flow: x_σ = (1 − σ) x0 + σ ε, the network fed σ·T predicts ε − x0."""

    name: ClassVar[str] = "flow"
    level_name: ClassVar[str] = "sigma_at_bucket_edges"

    def __init__(self, noise_scheduler, prediction_type: str = "epsilon"):
        self.noise_scheduler = noise_scheduler
        self.sigmas = training_sigmas(noise_scheduler).float()
        self.total = int(noise_scheduler.config.num_train_timesteps)

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t, x0)
        return (1.0 - sigma) * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(t.device)[t] * self.total

    def level_at(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas[t.cpu()]


OBJECTIVES = {"ddpm": DDPMObjective, "flow": FlowObjective}
# The samplers and weightings a flow run takes, and why the others are refused (each reason is checked, not assumed:
# `check_flow_method` measures SpeeD's pivot on the run's own σ schedule).
FLOW_SAMPLERS = ("uniform", "logit-normal", "mode")
FLOW_WEIGHTINGS = ("none", "sigma-sqrt", "cosmap")
WHY_NOT = {
    "adaptive": "its reward is the drop of DDPM's variational bound terms, which a flow model has no counterpart of",
    "clts": "its curriculum (mu, sigma as fractions of T) was set on DDPM's noise schedule, not on flow's sigma",
    "lognormal": "EDM's log-normal is a density of the variance-exploding sigma, not of flow's sigma in (0, 1]",
    "caw": "SpeeD's change-aware weighting rescales the increment of DDPM's 1 - alpha_bar, constant for a flow",
    "min-snr": "Min-SNR is defined for epsilon / v / x0 targets, not for the flow velocity",
    "p2": "P2 is defined for epsilon / v / x0 targets, not for the flow velocity",
}


def make_objective(name: str, noise_scheduler, prediction_type: str = "epsilon"):
    return OBJECTIVES[check_choice("--objective", name, OBJECTIVES)](noise_scheduler, prediction_type)


def check_flow_method(sampler: str, weighting: str, prediction_type: str, noise_scheduler) -> None:
    """Refuse, in one line, a sampler or weighting that does not carry over to flow matching."""
    if prediction_type != "epsilon":
        raise UserError(f"--prediction-type {prediction_type} does not apply to --objective flow (the network "
                        "predicts the velocity noise - x0); accepted: leave it at its default")
    if sampler == "speed":
        increment = torch.diff(training_sigmas(noise_scheduler))  # SpeeD's ∂_t of the noise coefficient
        pivot = (increment < 1e-4).nonzero()
        raise UserError(f"--sampler speed does not carry over to --objective flow: SpeeD's areas come from the "
                        f"increment of the noise level, and on this flow schedule it is {float(increment.min()):.2e} "
                        f"to {float(increment.max()):.2e} per step, "
                        + ("never below its 1e-4 threshold (no convergence area)" if not len(pivot) else
                           "below its 1e-4 threshold only where the shift compresses sigma near 1, a "
                           "reparameterisation of time rather than a convergence area of the process")
                        + f"; accepted: {', '.join(FLOW_SAMPLERS)}")
    if sampler not in FLOW_SAMPLERS:
        raise UserError(f"--sampler {sampler} does not carry over to --objective flow: {WHY_NOT.get(sampler, '')}; "
                        f"accepted: {', '.join(FLOW_SAMPLERS)}")
    if weighting not in FLOW_WEIGHTINGS:
        raise UserError(f"--weighting {weighting} does not carry over to --objective flow: "
                        f"{WHY_NOT.get(weighting, '')}; accepted: {', '.join(FLOW_WEIGHTINGS)}")

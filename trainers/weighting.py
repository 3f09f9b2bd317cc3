"""Loss weightings over timesteps; they compose with any sampler (the two weights multiply).

    weighting = make_weighting("min-snr", gamma=5.0)
    loss = (weighting(t, noise_scheduler) * per_sample_loss).mean()

A weighting reads ᾱ_t (and the prediction type, where it matters) from the diffusers noise scheduler.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol, runtime_checkable

import torch

from timetuner.errors import UserError, check_choice
from timetuner.trainers.objectives import training_sigmas
from timetuner.trainers.samplers import SPEED_SETTINGS


@runtime_checkable
class LossWeighting(Protocol):
    """Maps training timesteps to per-sample loss weights, given the noise scheduler."""

    name: ClassVar[str]

    def __call__(self, t: torch.Tensor, noise_scheduler) -> torch.Tensor: ...


WEIGHTINGS: dict[str, type] = {}


def register_weighting(cls: type) -> type:
    """Class decorator: make `cls` available as `make_weighting(cls.name)` and `--weighting NAME`."""
    WEIGHTINGS[cls.name] = cls
    return cls


def make_weighting(name: str, **hyperparameters) -> LossWeighting:
    """Build the weighting registered as `name`."""
    return WEIGHTINGS[check_choice("--weighting", name, WEIGHTINGS)](**hyperparameters)


def _positive(flag: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{flag} {value!r} is invalid; accepted: a positive number")
    return float(value)


def _snr(t: torch.Tensor, noise_scheduler) -> torch.Tensor:
    from diffusers.training_utils import compute_snr

    return compute_snr(noise_scheduler, t)


@register_weighting
class NoWeighting:
    """w(t) = 1: the plain ε-prediction MSE."""

    name: ClassVar[str] = "none"

    def __call__(self, t: torch.Tensor, noise_scheduler) -> torch.Tensor:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)


@register_weighting
class MinSNRWeighting:
    """Min-SNR-γ (Hang et al., 2023) exactly as diffusers' training scripts compute it.

    w = min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction, min(SNR, γ) for x0.
    """

    name: ClassVar[str] = "min-snr"

    def __init__(self, gamma: float = 5.0):
        self.gamma = _positive("--min-snr-gamma", gamma)

    def __call__(self, t: torch.Tensor, noise_scheduler) -> torch.Tensor:
        snr = _snr(t, noise_scheduler)
        clipped = torch.stack([snr, self.gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        prediction = noise_scheduler.config.prediction_type
        if prediction == "epsilon":
            return clipped / snr
        if prediction == "v_prediction":
            return clipped / (snr + 1)
        return clipped


@register_weighting
class P2Weighting:
    """Perception-prioritised weighting (Choi et al., 2022): w = 1/(k + SNR)^γ."""

    name: ClassVar[str] = "p2"

    def __init__(self, k: float = 1.0, gamma: float = 1.0):
        self.k = _positive("--p2-k", k)
        self.gamma = _positive("--p2-gamma", gamma)

    def __call__(self, t: torch.Tensor, noise_scheduler) -> torch.Tensor:
        return 1.0 / (self.k + _snr(t, noise_scheduler)) ** self.gamma


@register_weighting
class ChangeAwareWeighting:
    """SpeeD's change-aware weighting (Wang et al., 2024, Sec. 2.6), as in the official code.

    g_t = ∂_t(1 − ᾱ_t) (the change of the process variance, numerical gradient); below the threshold τ,
    w_t = (1 − λ) + (2λ − 1)(g_t − min g)/(max g − min g) — g rescaled to [1 − λ, λ] with min/max over all
    T — and w_t = 1 at and above τ (the suppressed convergence area). Per sample, not renormalised.
    λ ∈ [0.5, 1] is the symmetry ceiling; τ should match the sampler's (defaults: SpeeD's published setting,
    `samplers.SPEED_SETTINGS["paper"]`).
    """

    name: ClassVar[str] = "caw"

    def __init__(self, lam: float = SPEED_SETTINGS["paper"]["lam"], tau: int = SPEED_SETTINGS["paper"]["tau"]):
        if not (math.isfinite(lam) and 0.5 <= lam <= 1.0):
            raise UserError(f"--caw-lambda {lam!r} is invalid; accepted: a number in [0.5, 1]")
        if int(tau) != tau or tau < 1:
            raise UserError(f"--caw-tau {tau!r} is invalid; accepted: an integer in [1, T]")
        self.lam, self.tau = float(lam), int(tau)
        self._table: tuple[int, torch.Tensor] | None = None

    def table(self, alphas_cumprod: torch.Tensor) -> torch.Tensor:
        """w_t for every t of the schedule (float64)."""
        T = alphas_cumprod.numel()
        if self.tau > T:
            raise UserError(f"--caw-tau {self.tau} is invalid; accepted: an integer in [1, {T}]")
        g = torch.gradient(1.0 - alphas_cumprod.double())[0]
        scaled = (g - g.min()) / (g.max() - g.min())
        w = torch.ones(T, dtype=torch.float64)
        w[: self.tau] = (1.0 - self.lam) + (2.0 * self.lam - 1.0) * scaled[: self.tau]
        return w

    def __call__(self, t: torch.Tensor, noise_scheduler) -> torch.Tensor:
        alphas = noise_scheduler.alphas_cumprod
        key = (id(alphas), alphas.numel())
        if self._table is None or self._table[0] != key:
            self._table = (key, self.table(alphas.cpu()).float())
        return self._table[1].to(t.device)[t]


class _FlowWeighting:
    """SD3's loss weightings of the flow velocity (diffusers' `compute_loss_weighting_for_sd3`) at the run's σ_t."""

    scheme: ClassVar[str] = ""

    def __init__(self):
        self._table: tuple[int, torch.Tensor] | None = None

    def __call__(self, t: torch.Tensor, noise_scheduler) -> torch.Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        if self._table is None or self._table[0] != id(noise_scheduler):
            sigmas = training_sigmas(noise_scheduler).float()
            self._table = (id(noise_scheduler), compute_loss_weighting_for_sd3(self.scheme, sigmas=sigmas).float())
        return self._table[1].to(t.device)[t]


@register_weighting
class SigmaSqrtWeighting(_FlowWeighting):
    """w = σ⁻² (SD3's "sigma_sqrt"); flow objective only."""

    name: ClassVar[str] = "sigma-sqrt"
    scheme: ClassVar[str] = "sigma_sqrt"


@register_weighting
class CosMapWeighting(_FlowWeighting):
    """w = 2 / (π (1 − 2σ + 2σ²)) (SD3's "cosmap"); flow objective only."""

    name: ClassVar[str] = "cosmap"
    scheme: ClassVar[str] = "cosmap"

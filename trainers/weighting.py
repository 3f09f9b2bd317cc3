"""Loss weightings over timesteps; they compose with any sampler (the two weights multiply)."""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from timetuner.errors import check_choice


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


@register_weighting
class NoWeighting:
    """w(t) = 1: the plain ε-prediction MSE."""

    name: ClassVar[str] = "none"

    def __call__(self, t: torch.Tensor, noise_scheduler) -> torch.Tensor:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)

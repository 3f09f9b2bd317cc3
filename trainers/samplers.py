"""Timestep samplers for training: a small protocol plus a name registry.

A sampler draws the training timesteps of a batch and may learn from the per-sample losses:

    sampler = make_sampler("uniform", num_train_timesteps=1000)
    t, weight = sampler.sample(batch_size, step, generator)          # weight: per-sample loss factor
    loss = (weight * per_sample_loss).mean()
    sampler.update(t, per_sample_loss.detach(), step)                # a no-op for static samplers

`state_dict()` / `load_state_dict()` let `accelerator.save_state` checkpoint it with the model.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

import torch

from timetuner.errors import UserError, check_choice


@runtime_checkable
class TimestepSampler(Protocol):
    """Draws integer training timesteps in [0, T) and a per-sample loss weight."""

    name: ClassVar[str]
    num_train_timesteps: int

    def sample(
        self, batch_size: int, step: int, generator: torch.Generator | None = None, x0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (t, weight): int64 timesteps and float weights, both of shape (batch_size,).

        `x0` is the clean batch, for samplers whose distribution depends on the data (adaptive).
        """
        ...

    def update(self, t: torch.Tensor, per_sample_loss: torch.Tensor, step: int) -> None:
        """Learn from the losses of the last batch (no-op for static samplers)."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


SAMPLERS: dict[str, type] = {}


def register_sampler(cls: type) -> type:
    """Class decorator: make `cls` available as `make_sampler(cls.name, ...)` and `--sampler NAME`."""
    SAMPLERS[cls.name] = cls
    return cls


def make_sampler(name: str, num_train_timesteps: int, **hyperparameters) -> TimestepSampler:
    """Build the sampler registered as `name`."""
    cls = SAMPLERS[check_choice("--sampler", name, SAMPLERS)]
    return cls(num_train_timesteps=num_train_timesteps, **hyperparameters)


class StaticSampler:
    """Base for samplers without learned state: `update` does nothing, the state is empty."""

    name: ClassVar[str] = ""

    def __init__(self, num_train_timesteps: int):
        if num_train_timesteps < 1:
            raise UserError(f"num_train_timesteps {num_train_timesteps} is invalid; accepted: 1 or more")
        self.num_train_timesteps = int(num_train_timesteps)

    def update(self, t: torch.Tensor, per_sample_loss: torch.Tensor, step: int) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@register_sampler
class UniformSampler(StaticSampler):
    """t ~ U{0, …, T−1}, weight 1: the DDPM recipe (Ho et al., 2020, Alg. 1)."""

    name: ClassVar[str] = "uniform"

    def sample(self, batch_size, step, generator=None, x0=None):
        device = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)
        return t, torch.ones(batch_size, device=device)

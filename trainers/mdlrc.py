"""MDLRC: momentum decay with learning-rate compensation (Xu et al., arXiv 2404.07946; seeds/003).

The DM loss landscape is smooth, so late in training Adam's large β1 mostly adds oscillation. MDLRC lowers β1
from β1₀ to `beta1_end` linearly over `decay_steps` and multiplies the learning rate by (1 − β1₀)/(1 − β1_t):
a lower β1 lets more of each step's gradient noise through (the paper's "over-amplification", which hurts the
EMA model), and the factor takes the step back down. The schedule is set in steps, never as a fraction of the
run, so a longer run changes nothing at a given step. `compensation=False` keeps the momentum decay alone (an
ablation: the factor is also a learning-rate decay, and the two are told apart only by measuring both).
docs/training.md says which parts of this follow the paper's text and which were chosen here:

    mdlrc = MDLRC(optimizer, decay_steps=8000)
    ...; optimizer.step(); lr_scheduler.step(); mdlrc.step(step + 1)     # inside any loop

It works on top of a learning-rate scheduler that sets `lr` from its base values each step (`LambdaLR`, all of
diffusers' `get_scheduler` schedules, or none): `step` rescales the scheduled `lr` it finds without compounding.
Torch's "chainable" schedulers (ExponentialLR, …) multiply the current `lr` and would compound the factor.
The schedule is a function of the step alone; the checkpoint state is the initial β1 and the last factor.
"""

from __future__ import annotations

import math

import torch

from timetuner.errors import UserError


class MDLRC:
    """Decay Adam's β1 linearly and compensate the learning rate by (1 − β1₀)/(1 − β1_t)."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay_steps: int, beta1_end: float = 0.5,
                 compensation: bool = True):
        if int(decay_steps) != decay_steps or decay_steps < 1:
            raise UserError(f"--mdlrc-steps {decay_steps!r} is invalid; accepted: an integer >= 1")
        if not (math.isfinite(beta1_end) and 0.0 <= beta1_end < 1.0):
            raise UserError(f"--mdlrc-beta1-end {beta1_end!r} is invalid; accepted: a number in [0, 1)")
        groups = optimizer.param_groups
        if any("betas" not in g for g in groups):
            raise UserError(f"--mdlrc needs an Adam-type optimizer (with betas); got {type(optimizer).__name__}")
        self.optimizer, self.decay_steps, self.beta1_end = optimizer, int(decay_steps), float(beta1_end)
        self.compensation = bool(compensation)
        self.beta1_start = [float(g["betas"][0]) for g in groups]
        self._scale = [1.0] * len(groups)
        self._set: list[float | None] = [None] * len(groups)

    def beta1(self, step: int, group: int = 0) -> float:
        """β1 at `step`: linear from β1₀ to beta1_end over decay_steps, then constant."""
        progress = min(max(step, 0) / self.decay_steps, 1.0)
        return self.beta1_start[group] + (self.beta1_end - self.beta1_start[group]) * progress

    def lr_factor(self, step: int, group: int = 0) -> float:
        """The learning-rate compensation (1 − β1₀)/(1 − β1_t); 1 without compensation."""
        if not self.compensation:
            return 1.0
        return (1.0 - self.beta1_start[group]) / (1.0 - self.beta1(step, group))

    def step(self, step: int) -> None:
        """Set β1 and rescale the current learning rate of every parameter group for `step`."""
        for i, group in enumerate(self.optimizer.param_groups):
            group["betas"] = (self.beta1(step, i), *group["betas"][1:])
            factor = self.lr_factor(step, i)
            # If lr is still what we set, no scheduler reset it since: undo our previous factor first.
            scheduled = group["lr"] / self._scale[i] if group["lr"] == self._set[i] else group["lr"]
            group["lr"] = scheduled * factor
            self._scale[i], self._set[i] = factor, group["lr"]

    def state_dict(self) -> dict:
        return {"beta1_start": self.beta1_start, "scale": self._scale, "set": self._set}

    def load_state_dict(self, state: dict) -> None:
        self.beta1_start = [float(v) for v in state["beta1_start"]]
        self._scale = [float(v) for v in state["scale"]]
        self._set = [None if v is None else float(v) for v in state["set"]]

"""Training companion: timestep samplers, loss weightings and the `timetuner train` loop."""

from timetuner.trainers.loop import TrainConfig, train
from timetuner.trainers.presets import PRESETS, Preset, get_preset
from timetuner.trainers.samplers import (
    SAMPLERS,
    TimestepSampler,
    UniformSampler,
    make_sampler,
    register_sampler,
)
from timetuner.trainers.weighting import (
    WEIGHTINGS,
    LossWeighting,
    NoWeighting,
    make_weighting,
    register_weighting,
)

__all__ = [
    "PRESETS",
    "SAMPLERS",
    "WEIGHTINGS",
    "LossWeighting",
    "NoWeighting",
    "Preset",
    "TimestepSampler",
    "TrainConfig",
    "UniformSampler",
    "get_preset",
    "make_sampler",
    "make_weighting",
    "register_sampler",
    "register_weighting",
    "train",
]

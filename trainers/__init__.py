"""Training companion: timestep samplers, loss weightings, MDLRC and the `timetuner train` loop."""

from timetuner.trainers.adaptive import AdaptiveSampler, BetaPolicy
from timetuner.trainers.densities import LogitNormalSampler, LogNormalSampler, ModeSampler
from timetuner.trainers.loop import TrainConfig, train
from timetuner.trainers.mdlrc import MDLRC
from timetuner.trainers.presets import PRESETS, Preset, get_preset
from timetuner.trainers.samplers import (
    SAMPLERS,
    CLTSSampler,
    SpeedSampler,
    TimestepSampler,
    UniformSampler,
    make_sampler,
    register_sampler,
)
from timetuner.trainers.weighting import (
    WEIGHTINGS,
    ChangeAwareWeighting,
    LossWeighting,
    MinSNRWeighting,
    NoWeighting,
    P2Weighting,
    make_weighting,
    register_weighting,
)

__all__ = [
    "MDLRC",
    "PRESETS",
    "SAMPLERS",
    "WEIGHTINGS",
    "AdaptiveSampler",
    "BetaPolicy",
    "CLTSSampler",
    "ChangeAwareWeighting",
    "LogNormalSampler",
    "LogitNormalSampler",
    "LossWeighting",
    "MinSNRWeighting",
    "ModeSampler",
    "NoWeighting",
    "P2Weighting",
    "Preset",
    "SpeedSampler",
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

"""Training companion: timestep samplers, loss weightings, MDLRC and the `timetuner train` loop."""

from timetuner.trainers.adaptive import AdaptiveSampler, BetaPolicy
from timetuner.trainers.checkpoints import checkpoint_dirs
from timetuner.trainers.config import build_sampler, build_weighting, noise_scheduler_for
from timetuner.trainers.densities import LogitNormalSampler, LogNormalSampler, ModeSampler
from timetuner.trainers.loop import TrainConfig, train
from timetuner.trainers.mdlrc import MDLRC
from timetuner.trainers.presets import PRESETS, Preset, get_preset
from timetuner.trainers.report import against_table, by_method, half_table, speedup_table, summarise
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
    "against_table",
    "build_sampler",
    "build_weighting",
    "by_method",
    "checkpoint_dirs",
    "get_preset",
    "half_table",
    "make_sampler",
    "make_weighting",
    "noise_scheduler_for",
    "register_sampler",
    "register_weighting",
    "speedup_table",
    "summarise",
    "train",
]

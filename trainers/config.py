"""A training run's settings: `TrainConfig` (written to `train_config.json` beside the run), their checks, the
defaults that depend on other settings (SpeeD's published setting, the weighting that goes with it), and the
sampler, weighting, MDLRC and noise schedule they build."""


from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch

from timetuner.errors import UserError, check_choice
from timetuner.trainers import adaptive, densities  # noqa: F401 (their samplers register on import)
from timetuner.trainers.mdlrc import MDLRC
from timetuner.trainers.objectives import FLOW_WEIGHTINGS, OBJECTIVES, check_flow_method
from timetuner.trainers.presets import get_preset
from timetuner.trainers.samplers import SAMPLERS, make_sampler, schedule_of, speed_setting, speed_threshold
from timetuner.trainers.weighting import WEIGHTINGS, make_weighting


def method_default(method: str, kwarg: str):
    """The default of `kwarg` in the `__init__` of the sampler or weighting registered as `method` (or MDLRC): the
    one home of a method's hyperparameter defaults, which `TrainConfig` and `timetuner train` read from there."""
    owner = MDLRC if method == "mdlrc" else SAMPLERS.get(method) or WEIGHTINGS[method]
    return inspect.signature(owner.__init__).parameters[kwarg].default


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; written to `train_config.json` beside its output."""

    out: str
    preset: str = "digits"
    data: str = "digits"  # "digits" or an image folder
    resolution: int | None = None  # None: the preset's default
    channels: int | None = None  # None: 1 for digits, 3 for image folders
    steps: int = 20_000
    batch_size: int | None = None  # per process; None: the preset's default
    learning_rate: float | None = None  # None: the preset's default
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # "constant" or "cosine" (after warm-up)
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    objective: str = "ddpm"  # "ddpm" (ε / v / x0 prediction) or "flow" (rectified flow, velocity; objectives.py)
    flow_shift: float = 1.0  # flow: the static shift of the σ schedule (SD3: 3.0), saved in the pipeline's scheduler
    sampler: str = "uniform"
    weighting: str | None = None  # None: "caw" with the speed sampler (the published method), "none" otherwise
    importance: bool = False  # weight 1/(T·p(t)): non-uniform sampling as an unbiased uniform objective
    # Method hyperparameters: a field "<name>_<kwarg>" is passed as <kwarg> to the sampler or weighting <name>.
    # the published values the None fields below take (samplers.SPEED_SETTINGS)
    speed_setting: str = method_default("speed", "setting")
    speed_k: float | None = None
    speed_tau: int | None = None
    speed_r: float | None = None  # set: τ from SpeeD's threshold formula instead of speed_tau
    speed_dual: bool | None = None
    caw_lam: float | None = None
    caw_tau: int | None = None  # None: speed_tau (or τ from speed_r)
    adaptive_update_every: int = method_default("adaptive", "update_every")
    adaptive_subset: int = method_default("adaptive", "subset")
    adaptive_buffer: int = method_default("adaptive", "buffer")
    adaptive_lr: float = method_default("adaptive", "lr")
    adaptive_entropy: float = method_default("adaptive", "entropy")
    adaptive_probe_stride: int = method_default("adaptive", "probe_stride")
    adaptive_reward: str = method_default("adaptive", "reward")
    clts_mu: float = method_default("clts", "mu")
    clts_sigma: float = method_default("clts", "sigma")
    clts_lambda_start: float = method_default("clts", "lambda_start")
    clts_lambda_end: float = method_default("clts", "lambda_end")
    clts_ramp_steps: int = method_default("clts", "ramp_steps")  # in steps, never a fraction of --steps
    lognormal_mean: float = method_default("lognormal", "mean")
    lognormal_std: float = method_default("lognormal", "std")
    logit_normal_mean: float = method_default("logit-normal", "mean")
    logit_normal_std: float = method_default("logit-normal", "std")
    mode_scale: float = method_default("mode", "scale")
    min_snr_gamma: float = method_default("min-snr", "gamma")
    p2_k: float = method_default("p2", "k")
    p2_gamma: float = method_default("p2", "gamma")
    mdlrc: bool = False
    mdlrc_beta1_end: float = method_default("mdlrc", "beta1_end")
    mdlrc_steps: int = 8000  # in steps, never a fraction of --steps (mdlrc.MDLRC)
    mdlrc_compensation: bool = method_default("mdlrc", "compensation")  # False: the momentum decay alone
    hflip: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    sample_n: int = 64
    sample_steps: int = 100  # DDIM steps for the final sample grid
    seed: int = 0
    resume: bool = False
    cpu: bool = False
    mixed_precision: str = "no"


def resolved(config: TrainConfig) -> TrainConfig:
    """Fill the preset-dependent defaults and check every setting; raises UserError for a bad one."""
    preset = get_preset(config.preset)
    resolution = config.resolution or preset.resolution
    preset.check_resolution(config.preset, resolution)
    channels = config.channels or (1 if config.data == "digits" else 3)
    for name, value, low in (("--steps", config.steps, 1), ("--batch-size", config.batch_size, 1),
                             ("--checkpoint-every", config.checkpoint_every, 1),
                             ("--keep-checkpoints", config.keep_checkpoints, 1),
                             ("--log-every", config.log_every, 1), ("--sample-n", config.sample_n, 0),
                             ("--sample-steps", config.sample_steps, 1), ("--warmup-steps", config.warmup_steps, 0)):
        if value is not None and value < low:
            raise UserError(f"{name} {value} is invalid; accepted: integers >= {low}")
    if config.learning_rate is not None and not config.learning_rate > 0:
        raise UserError(f"--learning-rate {config.learning_rate} is invalid; accepted: a positive number")
    if not 0.0 <= config.ema_decay < 1.0:
        raise UserError(f"--ema-decay {config.ema_decay} is invalid; accepted: 0 <= decay < 1")
    check_choice("--lr-schedule", config.lr_schedule, {"constant", "cosine"})
    check_choice("--beta-schedule", config.beta_schedule, {"linear", "scaled_linear", "squaredcos_cap_v2"})
    check_choice("--prediction-type", config.prediction_type, {"epsilon", "v_prediction", "sample"})
    check_choice("--mixed-precision", config.mixed_precision, {"no", "fp16", "bf16"})
    check_choice("--objective", config.objective, OBJECTIVES)
    if not (math.isfinite(config.flow_shift) and config.flow_shift > 0):
        raise UserError(f"--flow-shift {config.flow_shift} is invalid; accepted: a positive number (1: no shift)")
    noise_scheduler = noise_scheduler_for(config)
    if config.objective == "flow":  # before the defaults: SpeeD's τ from --speed-r reads a DDPM schedule
        check_flow_method(config.sampler, config.weighting or "none", config.prediction_type, noise_scheduler)
    config = _method_defaults(config)
    if config.objective == "ddpm" and config.weighting in FLOW_WEIGHTINGS and config.weighting != "none":
        raise UserError(f"--weighting {config.weighting} weights the flow velocity; accepted with --objective ddpm: "
                        f"{', '.join(sorted(set(WEIGHTINGS) - set(FLOW_WEIGHTINGS) | {'none'}))}")
    build_sampler(config, noise_scheduler)
    build_weighting(config)
    if config.mdlrc:
        make_mdlrc(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]), config)
    return dataclasses.replace(
        config,
        resolution=resolution,
        channels=channels,
        batch_size=config.batch_size or preset.batch_size,
        learning_rate=config.learning_rate or preset.learning_rate,
    )


def make_mdlrc(optimizer: torch.optim.Optimizer, config: TrainConfig) -> MDLRC:
    return MDLRC(optimizer, config.mdlrc_steps, config.mdlrc_beta1_end, compensation=config.mdlrc_compensation)


def _method_options(config: TrainConfig, name: str) -> dict:
    """The config fields "<name>_<kwarg>" as {kwarg: value} (name with '-' read as '_')."""
    prefix = name.replace("-", "_") + "_"
    return {f[len(prefix):]: getattr(config, f) for f in TrainConfig.__dataclass_fields__ if f.startswith(prefix)}


def _method_defaults(config: TrainConfig) -> TrainConfig:
    """Fill the method settings whose default depends on others (SpeeD's published setting, CAW's τ and the
    weighting that goes with SpeeD)."""
    published = speed_setting(config.speed_setting)
    speed_tau = config.speed_tau if config.speed_tau is not None else published["tau"]
    return dataclasses.replace(
        config,
        weighting=config.weighting or ("caw" if config.sampler == "speed" else "none"),
        speed_k=config.speed_k if config.speed_k is not None else published["k"],
        speed_tau=speed_tau,
        speed_dual=config.speed_dual if config.speed_dual is not None else published["dual"],
        caw_lam=config.caw_lam if config.caw_lam is not None else published["lam"],
        caw_tau=config.caw_tau if config.caw_tau is not None else (
            _speed_threshold(config) if config.speed_r is not None else speed_tau),
    )


def _speed_threshold(config: TrainConfig) -> int:
    return speed_threshold(schedule_of(noise_scheduler_for(config), config.num_train_timesteps), config.speed_r)


def build_sampler(config: TrainConfig, noise_scheduler):
    """The timestep sampler `config` names, with its hyperparameters from the config."""
    config = _method_defaults(config)
    cls = SAMPLERS[check_choice("--sampler", config.sampler, SAMPLERS)]
    accepted = inspect.signature(cls).parameters
    extra = {"noise_scheduler": noise_scheduler, "importance": config.importance, "seed": config.seed}
    options = {**{k: v for k, v in extra.items() if k in accepted}, **_method_options(config, config.sampler)}
    return make_sampler(config.sampler, config.num_train_timesteps, **options)


def build_weighting(config: TrainConfig):
    """The loss weighting `config` names, with its hyperparameters from the config."""
    config = _method_defaults(config)
    return make_weighting(config.weighting, **_method_options(config, config.weighting))


def noise_scheduler_for(config: TrainConfig):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if config.objective == "flow":  # what the saved pipeline samples with; its σ grid is the training grid
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_train_timesteps, shift=config.flow_shift)

    # clip_sample=False: DDIM built from a config that clips x0 at every step recomputes ε from the clipped x0,
    # which at small σ adds haze that grows with the step count — the embedded model's 1000-step DDIM scored worse
    # than 100 steps for that reason alone (assets/README.md). The solver's limit must be the model's ODE solution.
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=False)

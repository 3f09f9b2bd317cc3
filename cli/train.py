"""`timetuner train`: train a UNet2DModel DDPM and save it as a diffusers pipeline folder.

Every option is a field of `TrainConfig` (its name, type and default live there; a method's hyperparameter defaults
in its sampler's or weighting's `__init__`): this module only describes them.
"""

from __future__ import annotations

import typer

from timetuner.cli.options import options_from, user_command
from timetuner.trainers.config import TrainConfig
from timetuner.trainers.objectives import FLOW_SAMPLERS, FLOW_WEIGHTINGS
from timetuner.trainers.presets import PRESETS
from timetuner.trainers.samplers import SAMPLERS, SPEED_SETTINGS
from timetuner.trainers.weighting import WEIGHTINGS

M = "Timestep sampling, loss weighting, MDLRC"


def _settings(name: str) -> str:
    return ", ".join(f"{k} {v}" for k, v in SPEED_SETTINGS[name].items())


HELP = {
    "out": "Run folder: the pipeline, checkpoints, log, samples.",
    "preset": f"Architecture: {', '.join(PRESETS)}.",
    "data": '"digits" (scikit-learn\'s 8×8 digits) or an image folder.',
    "resolution": "Image side; default: the preset's.",
    "channels": "1 or 3; default: 1 for digits, 3 for folders.",
    "steps": "Optimizer steps in total (a resumed run counts on).",
    "batch_size": "Per process; default: the preset's.",
    "learning_rate": "AdamW learning rate; default: the preset's.",
    "weight_decay": "AdamW weight decay.",
    "warmup_steps": "Linear learning-rate warm-up steps.",
    "lr_schedule": "After warm-up: constant or cosine.",
    "grad_clip": "Gradient-norm clip; 0 turns it off.",
    "ema_decay": "EMA decay; the saved pipeline holds the EMA weights.",
    "num_train_timesteps": "Diffusion steps T.",
    "beta_schedule": "linear, scaled_linear or squaredcos_cap_v2.",
    "prediction_type": "epsilon, v_prediction or sample.",
    "objective": "ddpm (noise prediction) or flow (rectified flow: velocity, a FlowMatchEuler pipeline).",
    "flow_shift": "Flow: static shift of the sigma schedule (SD3: 3).",
    "sampler": f"Timestep sampler: {', '.join(SAMPLERS)} (flow: {', '.join(FLOW_SAMPLERS)}).",
    "weighting": f"Loss weighting: {', '.join(WEIGHTINGS)}; flow: {', '.join(FLOW_WEIGHTINGS)}; default: caw with "
                 "--sampler speed, else none.",
    "importance": "Weight samples by 1/(T·p(t)) (unbiased uniform objective); off in every paper.",
    "speed_setting": "SpeeD: the published setting the unset knobs take: "
                     + "; ".join(f"{name} ({_settings(name)})" for name in SPEED_SETTINGS) + ".",
    "speed_k": "SpeeD: suppression intensity k (> 1); default: the setting's.",
    "speed_tau": "SpeeD: threshold τ in [1, T]; default: the setting's.",
    "speed_r": "SpeeD: derive τ from magnitude r (paper Sec. 2.5) instead of --speed-tau.",
    "speed_dual": "SpeeD: the authors' dual partner timesteps; default: the setting's.",
    "caw_lam": "CAW: symmetry ceiling λ in [0.5, 1]; default: the setting's.",
    "caw_tau": "CAW: threshold τ; default: SpeeD's.",
    "adaptive_update_every": "Adaptive: policy update every N steps.",
    "adaptive_subset": "Adaptive: |S| reward timesteps.",
    "adaptive_buffer": "Adaptive: F-statistic buffer rows.",
    "adaptive_lr": "Adaptive: policy Adam learning rate.",
    "adaptive_entropy": "Adaptive: entropy bonus coefficient.",
    "adaptive_probe_stride": "Adaptive: probe every k-th timestep for the F-statistic (1 = all, as published).",
    "adaptive_reward": "Adaptive: loss drop in vlb or mse.",
    "clts_mu": "CLTS: Gaussian centre as a fraction of T.",
    "clts_sigma": "CLTS: Gaussian width as a fraction of T.",
    "clts_lambda_start": "CLTS: mixture weight at step 0.",
    "clts_lambda_end": "CLTS: mixture weight after the ramp.",
    "clts_ramp_steps": "CLTS: ramp length in steps (not a fraction of --steps); about an eighth of your model's "
                       "training (how it was chosen: docs/training.md).",
    "lognormal_mean": "Log-normal (EDM): P_mean of ln σ.",
    "lognormal_std": "Log-normal (EDM): P_std of ln σ.",
    "logit_normal_mean": "Logit-normal (SD3): mean; > 0 favours noise.",
    "logit_normal_std": "Logit-normal (SD3): std.",
    "mode_scale": "Mode (SD3): scale s in [-1, 1.75].",
    "min_snr_gamma": "Min-SNR: γ (> 0).",
    "p2_k": "P2: k (> 0).",
    "p2_gamma": "P2: γ (> 0).",
    "mdlrc": "MDLRC: decay Adam's β1 with learning-rate compensation.",
    "mdlrc_beta1_end": "MDLRC: final β1 in [0, 1).",
    "mdlrc_steps": "MDLRC: β1 decay length in steps (not a fraction of --steps); about your model's training.",
    "mdlrc_compensation": "MDLRC: the learning-rate compensation; --no-mdlrc-compensation: the momentum decay alone.",
    "hflip": "Random horizontal flips (not for digits).",
    "checkpoint_every": "Save a resumable checkpoint every N steps.",
    "keep_checkpoints": "How many checkpoints to keep.",
    "log_every": "Write log.jsonl (loss per timestep bucket) every N steps.",
    "sample_n": "Images in the final samples.png grid; 0: none.",
    "sample_steps": "DDIM (flow: Euler) steps for the sample grid.",
    "resume": "Continue the run in --out from its latest checkpoint.",
    "mixed_precision": "no, fp16 or bf16.",
    "seed": "Seed of every random draw; same seed, same result.",
    "cpu": "Run on CPU even when a GPU is available.",
}
METHOD_FIELDS = ("sampler", "weighting", "importance", "speed_", "caw_", "adaptive_", "clts_", "lognormal_",
                 "logit_normal_", "mode_", "min_snr_", "p2_", "mdlrc")


@user_command
@options_from(TrainConfig, HELP, names={"out": ("--out", "-o"), "cpu": ("--cpu",), "seed": ("--seed",),
                                        "speed_dual": ("--speed-dual/--no-speed-dual",),
                                        "caw_lam": ("--caw-lambda",)},
              panels={name: M for name in HELP if name.startswith(METHOD_FIELDS)})
def train(**settings) -> None:
    """Train a diffusion model (DDPM or rectified flow, UNet2DModel) and save it as a diffusers pipeline.

    Runs on one CPU process or under `accelerate launch` on many GPUs. Examples:

        timetuner train --preset digits-tiny --steps 300 --out runs/tiny

        timetuner train --preset digits --steps 20000 --out runs/digits-ddpm --resume

        timetuner train --preset digits --sampler speed --out runs/speed        # SpeeD as published

        timetuner train --preset digits --sampler speed --speed-setting ffhq --weighting none --out runs/s

        timetuner train --preset digits --sampler clts --mdlrc --out runs/clts

        timetuner train --preset digits --objective flow --sampler logit-normal --out runs/flow

        accelerate launch -m timetuner.cli.main train --preset small --data ./images --out runs/small
    """
    from timetuner.trainers.loop import train as run

    folder = run(TrainConfig(**settings))
    typer.echo(f"saved pipeline to {folder}")

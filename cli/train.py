"""`timetuner train`: train a UNet2DModel DDPM and save it as a diffusers pipeline folder."""

from __future__ import annotations

from typing import Annotated

import typer

from timetuner.cli.options import Cpu, Seed, user_command

M = "Timestep sampling, loss weighting, MDLRC"


@user_command
def train(
    out: Annotated[str, typer.Option("--out", "-o", help="Run folder: the pipeline, checkpoints, log, samples.")],
    preset: Annotated[str, typer.Option(help="Architecture: digits-tiny, digits, small.")] = "digits",
    data: Annotated[str, typer.Option(help='"digits" (scikit-learn\'s 8×8 digits) or an image folder.')] = "digits",
    resolution: Annotated[int | None, typer.Option(help="Image side; default: the preset's.")] = None,
    channels: Annotated[int | None, typer.Option(help="1 or 3; default: 1 for digits, 3 for folders.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps in total (a resumed run counts on).")] = 20_000,
    batch_size: Annotated[int | None, typer.Option(help="Per process; default: the preset's.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="AdamW learning rate; default: the preset's.")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(help="Linear learning-rate warm-up steps.")] = 200,
    lr_schedule: Annotated[str, typer.Option(help="After warm-up: constant or cosine.")] = "constant",
    grad_clip: Annotated[float, typer.Option(help="Gradient-norm clip; 0 turns it off.")] = 1.0,
    ema_decay: Annotated[float, typer.Option(help="EMA decay; the saved pipeline holds the EMA weights.")] = 0.9995,
    num_train_timesteps: Annotated[int, typer.Option(help="Diffusion steps T.")] = 1000,
    beta_schedule: Annotated[str, typer.Option(help="linear, scaled_linear or squaredcos_cap_v2.")] = "linear",
    prediction_type: Annotated[str, typer.Option(help="epsilon, v_prediction or sample.")] = "epsilon",
    objective: Annotated[str, typer.Option(
        help="ddpm (noise prediction) or flow (rectified flow: velocity, a FlowMatchEuler pipeline).")] = "ddpm",
    flow_shift: Annotated[float, typer.Option(help="Flow: static shift of the sigma schedule (SD3: 3).")] = 1.0,
    sampler: Annotated[str, typer.Option(
        help="Timestep sampler: uniform, speed, adaptive, clts, lognormal, logit-normal, mode (flow: uniform, "
             "logit-normal, mode).", rich_help_panel=M)
    ] = "uniform",
    weighting: Annotated[str | None, typer.Option(
        help="Loss weighting: none, caw (SpeeD), min-snr, p2; flow: none, sigma-sqrt, cosmap; default: caw with "
             "--sampler speed, else none.", rich_help_panel=M)] = None,
    importance: Annotated[bool, typer.Option(
        help="Weight samples by 1/(T·p(t)) (unbiased uniform objective); off in every paper.", rich_help_panel=M)
    ] = False,
    speed_setting: Annotated[str, typer.Option(
        help="SpeeD: published setting the unset knobs take: paper (k 5, τ 700, dual, CAW λ 0.6) or ffhq (k 2).",
        rich_help_panel=M)] = "paper",
    speed_k: Annotated[float | None, typer.Option(
        help="SpeeD: suppression intensity k (> 1); default: the setting's.", rich_help_panel=M)] = None,
    speed_tau: Annotated[int | None, typer.Option(
        help="SpeeD: threshold τ in [1, T]; default: the setting's (700).", rich_help_panel=M)] = None,
    speed_r: Annotated[float | None, typer.Option(
        help="SpeeD: derive τ from magnitude r (paper Sec. 2.5) instead of --speed-tau.", rich_help_panel=M)] = None,
    speed_dual: Annotated[bool | None, typer.Option(
        "--speed-dual/--no-speed-dual", help="SpeeD: the authors' dual partner timesteps; default: on.",
        rich_help_panel=M)] = None,
    caw_lam: Annotated[float | None, typer.Option(
        "--caw-lambda", help="CAW: symmetry ceiling λ in [0.5, 1]; default: the setting's (0.6).", rich_help_panel=M)
    ] = None,
    caw_tau: Annotated[int | None, typer.Option(
        help="CAW: threshold τ; default: SpeeD's.", rich_help_panel=M)] = None,
    adaptive_update_every: Annotated[int, typer.Option(
        help="Adaptive: policy update every N steps.", rich_help_panel=M)] = 40,
    adaptive_subset: Annotated[int, typer.Option(help="Adaptive: |S| reward timesteps.", rich_help_panel=M)] = 3,
    adaptive_buffer: Annotated[int, typer.Option(help="Adaptive: F-statistic buffer rows.", rich_help_panel=M)] = 20,
    adaptive_lr: Annotated[float, typer.Option(help="Adaptive: policy Adam learning rate.", rich_help_panel=M)] = 1e-2,
    adaptive_entropy: Annotated[float, typer.Option(
        help="Adaptive: entropy bonus coefficient.", rich_help_panel=M)] = 1e-2,
    adaptive_probe_stride: Annotated[int, typer.Option(
        help="Adaptive: probe every k-th timestep for the F-statistic (1 = all, as published).", rich_help_panel=M)
    ] = 1,
    adaptive_reward: Annotated[str, typer.Option(help="Adaptive: loss drop in vlb or mse.", rich_help_panel=M)] = "vlb",
    clts_mu: Annotated[float, typer.Option(help="CLTS: Gaussian centre as a fraction of T.", rich_help_panel=M)] = 0.3,
    clts_sigma: Annotated[float, typer.Option(help="CLTS: Gaussian width as a fraction of T.", rich_help_panel=M)
                          ] = 0.2,
    clts_lambda_start: Annotated[float, typer.Option(help="CLTS: mixture weight at step 0.", rich_help_panel=M)] = 0.0,
    clts_lambda_end: Annotated[float, typer.Option(help="CLTS: mixture weight after the ramp.", rich_help_panel=M)
                               ] = 0.8,
    clts_ramp_steps: Annotated[int, typer.Option(
        help="CLTS: ramp length in steps (not a fraction of --steps); 1000 measured fastest on digits "
        "(docs/training.md): ~an eighth of your model's training.", rich_help_panel=M)] = 1000,
    lognormal_mean: Annotated[float, typer.Option(help="Log-normal (EDM): P_mean of ln σ.", rich_help_panel=M)] = -1.2,
    lognormal_std: Annotated[float, typer.Option(help="Log-normal (EDM): P_std of ln σ.", rich_help_panel=M)] = 1.2,
    logit_normal_mean: Annotated[float, typer.Option(
        help="Logit-normal (SD3): mean; > 0 favours noise.", rich_help_panel=M)] = 0.0,
    logit_normal_std: Annotated[float, typer.Option(help="Logit-normal (SD3): std.", rich_help_panel=M)] = 1.0,
    mode_scale: Annotated[float, typer.Option(help="Mode (SD3): scale s in [-1, 1.75].", rich_help_panel=M)] = 1.29,
    min_snr_gamma: Annotated[float, typer.Option(help="Min-SNR: γ (> 0).", rich_help_panel=M)] = 5.0,
    p2_k: Annotated[float, typer.Option(help="P2: k (> 0).", rich_help_panel=M)] = 1.0,
    p2_gamma: Annotated[float, typer.Option(help="P2: γ (> 0).", rich_help_panel=M)] = 1.0,
    mdlrc: Annotated[bool, typer.Option(
        help="MDLRC: decay Adam's β1 with learning-rate compensation.", rich_help_panel=M)] = False,
    mdlrc_beta1_end: Annotated[float, typer.Option(help="MDLRC: final β1 in [0, 1).", rich_help_panel=M)] = 0.5,
    mdlrc_steps: Annotated[int, typer.Option(
        help="MDLRC: β1 decay length in steps (not a fraction of --steps); ~your model's training.",
        rich_help_panel=M)] = 8000,
    mdlrc_compensation: Annotated[bool, typer.Option(
        help="MDLRC: the learning-rate compensation; --no-mdlrc-compensation: the momentum decay alone.",
        rich_help_panel=M)] = True,
    hflip: Annotated[bool, typer.Option(help="Random horizontal flips (not for digits).")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.")] = 1000,
    keep_checkpoints: Annotated[int, typer.Option(help="How many checkpoints to keep.")] = 2,
    log_every: Annotated[int, typer.Option(help="Write log.jsonl (loss per timestep bucket) every N steps.")] = 50,
    sample_n: Annotated[int, typer.Option(help="Images in the final samples.png grid; 0: none.")] = 64,
    sample_steps: Annotated[int, typer.Option(help="DDIM (flow: Euler) steps for the sample grid.")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16.")] = "no",
    seed: Seed = 0,
    cpu: Cpu = False,
) -> None:
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
    from timetuner.trainers.loop import TrainConfig
    from timetuner.trainers.loop import train as run

    config = TrainConfig(**{k: v for k, v in locals().items() if k in TrainConfig.__dataclass_fields__})
    folder = run(config)
    typer.echo(f"saved pipeline to {folder}")

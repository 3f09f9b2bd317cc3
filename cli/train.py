"""`timetuner train`: train a UNet2DModel DDPM and save it as a diffusers pipeline folder."""

from __future__ import annotations

from typing import Annotated

import typer

from timetuner.cli.options import Cpu, Seed, user_command


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
    sampler: Annotated[str, typer.Option(help="Timestep sampler (see timetuner.trainers.SAMPLERS).")] = "uniform",
    weighting: Annotated[str, typer.Option(help="Loss weighting (see timetuner.trainers.WEIGHTINGS).")] = "none",
    hflip: Annotated[bool, typer.Option(help="Random horizontal flips (not for digits).")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="Save a resumable checkpoint every N steps.")] = 1000,
    keep_checkpoints: Annotated[int, typer.Option(help="How many checkpoints to keep.")] = 2,
    log_every: Annotated[int, typer.Option(help="Write log.jsonl (loss per timestep bucket) every N steps.")] = 50,
    sample_n: Annotated[int, typer.Option(help="Images in the final samples.png grid; 0: none.")] = 64,
    sample_steps: Annotated[int, typer.Option(help="DDIM steps for the sample grid.")] = 100,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    mixed_precision: Annotated[str, typer.Option(help="no, fp16 or bf16.")] = "no",
    seed: Seed = 0,
    cpu: Cpu = False,
) -> None:
    """Train a diffusion model (DDPM, UNet2DModel) and save it as a diffusers pipeline.

    Runs on one CPU process or under `accelerate launch` on many GPUs. Examples:

        timetuner train --preset digits-tiny --steps 300 --out runs/tiny

        timetuner train --preset digits --steps 20000 --out runs/digits-ddpm --resume

        accelerate launch -m timetuner.cli.main train --preset small --data ./images --out runs/small
    """
    from timetuner.trainers.loop import TrainConfig
    from timetuner.trainers.loop import train as run

    config = TrainConfig(**{k: v for k, v in locals().items() if k in TrainConfig.__dataclass_fields__})
    folder = run(config)
    typer.echo(f"saved pipeline to {folder}")

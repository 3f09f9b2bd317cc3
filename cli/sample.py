"""`timetuner sample`: draw a grid of samples from a pipeline with a few-step scheduler."""

from __future__ import annotations

from typing import Annotated

import typer
from timetuner.cli.options import Cpu, Model, Seed, user_command


@user_command
def sample(
    model: Model = None,
    n: Annotated[int, typer.Option("--n", help="Number of samples in the grid.")] = 64,
    steps: Annotated[int, typer.Option("--steps", help="Scheduler steps (num_inference_steps).")] = 50,
    scheduler: Annotated[str, typer.Option(help="ddim, ddpm, dpm2, heun or euler.")] = "ddim",
    out: Annotated[str, typer.Option("--out", "-o", help="PNG file for the grid.")] = "samples.png",
    batch_size: Annotated[int, typer.Option(help="Samples per network call.")] = 256,
    seed: Seed = 0,
    cpu: Cpu = False,
) -> None:
    """Sample a grid from a UNet2DModel pipeline (default: the embedded digits model).

        timetuner sample --steps 10 --out grid.png

        timetuner sample --model runs/digits-ddpm --scheduler heun --steps 10
    """
    import torch

    from timetuner.errors import UserError
    from timetuner.loading import load_pipeline, make_scheduler
    from timetuner.plots import save_grid
    from timetuner.sampling import initial_noise, sample_loop

    if n < 1 or steps < 1 or batch_size < 1:
        raise UserError(f"--n {n}, --steps {steps}, --batch-size {batch_size}: accepted: integers >= 1")
    if not out.lower().endswith(".png"):
        raise UserError(f"--out {out!r} is not a .png file; accepted: a path ending in .png")
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    pipe = load_pipeline(model)
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet.config, "sample_size"):
        raise UserError(f"--model {model!r} has no UNet2DModel; accepted: unconditional image pipelines "
                        "(conditional and latent models come with `timetuner fit --prompts`)")
    sched = make_scheduler(scheduler, pipe.scheduler.config)
    size = unet.config.sample_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = initial_noise(n, (unet.config.in_channels, size, size), gen)
    images = sample_loop(unet.to(device).eval(), sched, noise, steps, generator=gen, batch_size=batch_size)
    typer.echo(f"wrote {save_grid(images, out)}")

"""`timetuner sample`: draw a grid of samples from a pipeline with a few-step scheduler, plain or tuned."""

from __future__ import annotations

from typing import Annotated

import typer

from timetuner.cli.options import Cpu, Model, Seed, user_command


@user_command
def sample(
    model: Model = None,
    table: Annotated[str | None, typer.Option(help="A τ table (.safetensors) from `timetuner fit`; its "
                                              "scheduler and step count are used.")] = None,
    compare: Annotated[bool, typer.Option(help="With --table: plain and tuned from the same noise, side by side."
                                          )] = False,
    n: Annotated[int, typer.Option("--n", help="Number of samples in the grid.")] = 64,
    steps: Annotated[int, typer.Option("--steps", help="Scheduler steps (without --table).")] = 50,
    scheduler: Annotated[str, typer.Option(help="ddim, ddpm, dpm2, heun or euler (without --table).")] = "ddim",
    out: Annotated[str, typer.Option("--out", "-o", help="PNG file for the grid.")] = "samples.png",
    batch_size: Annotated[int, typer.Option(help="Samples per network call.")] = 256,
    seed: Seed = 0,
    cpu: Cpu = False,
) -> None:
    """Sample a grid from a UNet2DModel pipeline (default: the embedded digits model).

        timetuner sample --steps 10 --out grid.png

        timetuner sample --table tau-ddim-uniform-nfe10.safetensors --compare --out compare.png
    """
    import torch

    from timetuner.errors import UserError
    from timetuner.loading import load_pipeline, make_scheduler
    from timetuner.plots import save_grid, save_side_by_side
    from timetuner.sampling import initial_noise, sample_loop

    if n < 1 or steps < 1 or batch_size < 1:
        raise UserError(f"--n {n}, --steps {steps}, --batch-size {batch_size}: accepted: integers >= 1")
    if not out.lower().endswith(".png"):
        raise UserError(f"--out {out!r} is not a .png file; accepted: a path ending in .png")
    if compare and table is None:
        raise UserError("--compare needs --table; accepted: --table FILE --compare")
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    tau_table = None
    if table is not None:
        from timetuner.table import TauTable

        tau_table = TauTable.load(table)
    pipe = load_pipeline(model)
    unet = getattr(pipe, "unet", None)
    latent = getattr(pipe, "vae", None) is not None or getattr(pipe, "vqvae", None) is not None
    if unet is None or type(unet).__name__ != "UNet2DModel" or latent:
        raise UserError(f"--model {model!r} is not an unconditional pixel-space UNet2DModel pipeline; accepted: "
                        "those (sample conditional and latent models with their own pipeline and TunedScheduler, "
                        "README 'Text-to-image and class-conditional models')")
    size = unet.config.sample_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = initial_noise(n, (unet.config.in_channels, size, size), gen)
    unet = unet.to(device).eval()
    if tau_table is None:
        images = sample_loop(unet, make_scheduler(scheduler, pipe.scheduler.config), noise, steps, generator=gen,
                             batch_size=batch_size)
        typer.echo(f"wrote {save_grid(images, out)}")
        return
    from timetuner.scheduler import TunedScheduler, check_model
    from timetuner.trajectories import build

    check_model(tau_table, unet)
    name = tau_table.metadata.get("scheduler_name", scheduler)
    plain, _ = build(name, tau_table.metadata.get("trajectory"), pipe.scheduler.config, tau_table.num_inference_steps)
    tuned = TunedScheduler.from_table(plain, tau_table)
    k = tau_table.num_inference_steps
    images = sample_loop(unet, tuned, noise, k, generator=torch.Generator().manual_seed(seed), batch_size=batch_size)
    if compare:
        wrapped_plain = TunedScheduler.from_table(plain, tau_table.with_tau(tau_table.t))
        base = sample_loop(unet, wrapped_plain, noise, k, generator=torch.Generator().manual_seed(seed),
                           batch_size=batch_size)
        path = save_side_by_side(base, images, out, labels=("plain", "tuned"))
        typer.echo(f"plain (left) vs tuned (right), same noise, {k} steps: wrote {path}")
        return
    typer.echo(f"wrote {save_grid(images, out)}")

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
    steps: Annotated[int | None, typer.Option("--steps", help="Scheduler steps; default 50, or the table's.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="ddim (default), ddpm, dpm2, dpm++, dpm++3m, unipc, deis, heun "
                                                  "or euler; with --table, the table's.")] = None,
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

    from timetuner.core.loading import quiet_loading
    from timetuner.errors import UserError
    from timetuner.measuring.plots import save_grid, save_side_by_side
    from timetuner.measuring.sampling import sample as draw
    from timetuner.table import TauTable

    if not out.lower().endswith(".png"):
        raise UserError(f"--out {out!r} is not a .png file; accepted: a path ending in .png")
    quiet_loading()
    tau_table = None if table is None else TauTable.load(table)
    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    plain, tuned = draw(model, n=n, steps=steps, scheduler=scheduler, table=tau_table, compare=compare, seed=seed,
                        batch_size=batch_size, device=device)
    if compare:
        path = save_side_by_side(plain, tuned, out, labels=("plain", "tuned"))
        typer.echo(f"plain (left) vs tuned (right), same noise, {tau_table.num_inference_steps} steps: wrote {path}")
        return
    typer.echo(f"wrote {save_grid(plain if tuned is None else tuned, out)}")

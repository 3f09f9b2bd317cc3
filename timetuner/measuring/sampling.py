"""Sample grids from a model, plain or with a τ table: what `timetuner sample` draws."""

from __future__ import annotations

import torch

from timetuner.core.loading import latent_decoder, load_pipeline
from timetuner.core.solver import initial_noise, sample_images
from timetuner.core.trajectories import build, make_scheduler
from timetuner.errors import UserError
from timetuner.scheduler import TunedScheduler, check_model


def pixel_unet(pipeline, model: str | None):
    """The pipeline's unconditional pixel-space UNet2DModel; a UserError for conditional or latent pipelines."""
    unet = getattr(pipeline, "unet", None)
    if unet is None or type(unet).__name__ != "UNet2DModel" or latent_decoder(pipeline) is not None:
        raise UserError(f"--model {model!r} is not an unconditional pixel-space UNet2DModel pipeline; accepted: "
                        "those (sample conditional and latent models with their own pipeline and TunedScheduler, "
                        "docs/conditional.md)")
    return unet


def sample(model: str | None = None, n: int = 64, steps: int | None = None, scheduler: str | None = None, table=None,
           compare: bool = False, seed: int = 0, batch_size: int = 256, device=None):
    """n images in [-1, 1] (CPU) from the same seeded noise: (plain, tuned) with `table`, else (plain, None).

    With a table, its solver, grid and step count are used and the tuned samples run through `TunedScheduler`;
    `compare` adds the plain samples (the identity table, same wrapper), else plain is None. Without a table:
    `steps` (default 50) of `scheduler` (default ddim); with one, either given must be the table's.
    """
    if n < 1 or (steps is not None and steps < 1) or batch_size < 1:
        raise UserError(f"--n {n}, --steps {steps}, --batch-size {batch_size}: accepted: integers >= 1")
    if compare and table is None:
        raise UserError("--compare needs --table; accepted: --table FILE --compare")
    if table is not None:
        _check_against_table(table, steps, scheduler)
    steps, scheduler = steps or 50, scheduler or "ddim"
    pipe = load_pipeline(model)
    unet = pixel_unet(pipe, model)
    size = unet.config.sample_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    noise = initial_noise(n, (unet.config.in_channels, size, size), gen)
    unet = unet.to(device or "cpu").eval()
    if table is None:
        plain = sample_images(unet, make_scheduler(scheduler, pipe.scheduler.config), noise, steps, generator=gen,
                              batch_size=batch_size)
        return plain, None
    check_model(table, unet)
    base, _ = build(table.metadata.get("scheduler_name", "ddim"), table.metadata.get("trajectory"),
                    pipe.scheduler.config, table.num_inference_steps)

    def run(t):
        wrapped = TunedScheduler.from_table(base, t)
        return sample_images(unet, wrapped, noise, table.num_inference_steps,
                             generator=torch.Generator().manual_seed(seed), batch_size=batch_size)

    return (run(table.with_tau(table.t).with_coefficients(None, None)) if compare else None), run(table)


def _check_against_table(table, steps: int | None, scheduler: str | None) -> None:
    """A table brings its own step count and solver: a different one asked for is a mistake, not a choice."""
    if steps is not None and steps != table.num_inference_steps:
        raise UserError(f"--steps {steps} differs from the table's {table.num_inference_steps} steps; accepted: "
                        f"--steps {table.num_inference_steps} or no --steps (a table is fitted for one step count)")
    own = table.metadata.get("scheduler_name", "ddim")
    if scheduler is not None and scheduler != own:
        raise UserError(f"--scheduler {scheduler!r} differs from the table's {own!r}; accepted: --scheduler {own} or "
                        "no --scheduler (a table is fitted for one solver)")

"""`timetuner eval`: truncation gap per step and at x0 against a 1000-step DDIM reference, and FD."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from timetuner.cli.options import Model, user_command


@user_command
def evaluate(
    table: Annotated[str, typer.Option(help="A τ table (.safetensors) from `timetuner fit`.")],
    model: Model = None,
    n: Annotated[int, typer.Option("--n", help="Held-out noises.")] = 256,
    reference_steps: Annotated[int, typer.Option(help="Steps of the DDIM reference (cached on disk).")] = 1000,
    seed: Annotated[int | None, typer.Option(help="Noise seed; default: the table's held-out seed.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Paired bootstrap resamples for the intervals (FD: at most 200).")
                         ] = 1000,
    plots: Annotated[str | None, typer.Option(
        help="Folder for PNGs: tau_shift.png, gap_per_step.png, samples.png (plain | tuned, same noises).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare plain and tuned sampling from the same held-out noises against a fine DDIM reference.

    Before/after figures come with a 95 % paired bootstrap interval over the noises; an interval that covers
    zero is reported as "no significant change".

        timetuner eval --table tau-ddim-uniform-nfe10.safetensors --plots eval-plots
    """
    import torch

    from timetuner.denoiser import Denoiser
    from timetuner.errors import UserError
    from timetuner.fit import Sampler, _uses_digits_features
    from timetuner.loading import load_pipeline, resolve_model
    from timetuner.metrics import (
        describe_change,
        digits_features,
        frechet_distance,
        paired_bootstrap,
        truncation_gap,
    )
    from timetuner.reference import cache_key, reference_trajectory
    from timetuner.scheduler import check_model, model_hash
    from timetuner.table import TauTable

    if n < 2 or reference_steps < 1 or bootstrap < 1:
        raise UserError(f"--n {n} / --reference-steps {reference_steps} / --bootstrap {bootstrap}: accepted: "
                        "--n >= 2, --reference-steps >= 1, --bootstrap >= 1")
    if plots is not None and os.path.exists(plots) and not os.path.isdir(plots):
        raise UserError(f"--plots {plots!r} is a file; accepted: a folder (created if missing)")
    tau_table = TauTable.load(table)
    if as_json:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    pipe = load_pipeline(model)
    check_model(tau_table, pipe.unet)
    den = Denoiser(pipe.unet.eval())
    meta = tau_table.metadata
    sampler = Sampler(den, pipe.scheduler.config, meta.get("scheduler_name", "ddim"), meta.get("trajectory"),
                      tau_table.num_inference_steps)
    tau_table.check_scheduler(sampler.template)
    seed = meta.get("eval_seed", 1_000_003) if seed is None else seed
    noise = torch.randn((n, *den.sample_shape), generator=torch.Generator().manual_seed(seed))
    key = cache_key("trajectory", model_hash(pipe.unet), sampler.identity_table().metadata, reference_steps, seed, n)
    refs = reference_trajectory(sampler, noise, reference_steps, key=key)
    plain = truncation_gap(sampler, noise, refs)
    tuned = truncation_gap(sampler, noise, refs, tau_table.tau.float())
    x0_change = paired_bootstrap(plain["x0_per_sample"].numpy(), tuned["x0_per_sample"].numpy(),
                                 resamples=bootstrap)
    record = {"table": table, "n": n, "seed": seed, "reference": f"ddim-{reference_steps}",
              "t": tau_table.t.tolist(), "tau": tau_table.tau.tolist(), "state_times": plain["times"],
              "gap_plain": plain["per_state"], "gap_tuned": tuned["per_state"],
              "x0_gap_plain": plain["x0"], "x0_gap_tuned": tuned["x0"], "x0_gap_change": x0_change}
    from timetuner.fit import FitConfig
    from timetuner.trainers.data import load_digits_tensor

    if _uses_digits_features(FitConfig(), resolve_model(model), den):
        held_out = digits_features(load_digits_tensor("test")[0])
        fd_change = paired_bootstrap(
            digits_features(plain["final"].clamp(-1, 1)), digits_features(tuned["final"].clamp(-1, 1)),
            statistic=lambda rows: frechet_distance(rows, held_out), resamples=min(bootstrap, 200))
        record["fd_plain"], record["fd_tuned"], record["fd_change"] = fd_change["plain"], fd_change["tuned"], fd_change
        record["fd_reference"] = frechet_distance(digits_features(refs[-1].clamp(-1, 1)), held_out)
    if plots is not None:
        from pathlib import Path

        from timetuner.plots import save_gap_plot, save_side_by_side, save_tau_shift_plot

        folder, label = Path(plots), f"{Path(table).name}, {n} noises"
        record["plots"] = [str(p) for p in (
            save_tau_shift_plot(tau_table.t, tau_table.tau, folder / "tau_shift.png", label),
            save_gap_plot(plain["times"], plain["per_state"], tuned["per_state"], folder / "gap_per_step.png", label),
            save_side_by_side(plain["final"][:64].clamp(-1, 1), tuned["final"][:64].clamp(-1, 1),
                              folder / "samples.png"),
        )]
    if as_json:
        typer.echo(json.dumps(record))
        return
    typer.echo(f"truncation gap (RMS, VP space) to a {reference_steps}-step DDIM reference, {n} noises (seed {seed})")
    typer.echo(f"{'state':>5} {'time':>9} {'plain':>10} {'tuned':>10}")
    for i, (t, a, b) in enumerate(zip(plain["times"], plain["per_state"], tuned["per_state"], strict=True)):
        typer.echo(f"{i:>5} {t:>9.2f} {a:>10.5f} {b:>10.5f}")
    typer.echo(describe_change("x0 gap", x0_change))
    if "fd_plain" in record:
        typer.echo(describe_change("FD (digits features, vs held-out digits)", record["fd_change"], digits=3)
                   + f"; reference sampler {record['fd_reference']:.3f}")
    for path in record.get("plots", []):
        typer.echo(f"wrote {path}")

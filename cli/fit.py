"""`timetuner fit`: fit a τ table for a model and a few-step sampler, judged on held-out seeds."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from timetuner.cli.options import Model, Seed, user_command


@user_command
def fit(
    model: Model = None,
    nfe: Annotated[int, typer.Option(help="Sampler steps (num_inference_steps).")] = 10,
    scheduler: Annotated[str, typer.Option(help="ddim, dpm2 (DPM-Solver-2), heun, euler.")] = "ddim",
    trajectory: Annotated[str | None, typer.Option(help="uniform, trailing, linspace, quadratic, logsnr, karras; "
                                                   "default per scheduler (ddim: uniform, dpm2: logsnr, heun: karras)."
                                                   )] = None,
    strategy: Annotated[str, typer.Option(help="sequential (Alg. 1) or parallel (Eq. 11).")] = "sequential",
    objective: Annotated[str | None, typer.Option(help="e2e (the default: best on held-out figures), paper "
                                                  "(Eq. 9/11; the default with --strategy parallel) or teacher."
                                                  )] = None,
    optimizer: Annotated[str, typer.Option(help="search (bracketed 1-D search) or adam (official recipe).")] = "search",
    samples: Annotated[int, typer.Option(help="Noises the fit uses.")] = 128,
    eval_samples: Annotated[int, typer.Option(help="Held-out noises for the verdict.")] = 256,
    data: Annotated[str | None, typer.Option(help="parallel: x0 from 'digits' or an image folder; default: the "
                                             "model's own high-NFE samples.")] = None,
    reference_steps: Annotated[int, typer.Option(help="Steps of the DPM-Solver++ reference.")] = 100,
    adam_iters: Annotated[int, typer.Option(help="adam: iterations per τ.")] = 500,
    e2e_iters: Annotated[int, typer.Option(help="e2e: Adam iterations on all τ.")] = 40,
    force: Annotated[bool, typer.Option(help="Write the tuned table even when it is not better on held-out seeds."
                                        )] = False,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Table file (.safetensors); default: "
                                            "tau-SCHEDULER-TRAJECTORY-nfeN.safetensors.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    seed: Seed = 0,
) -> None:
    """Fit one network timestep τ per evaluation of a few-step sampler, and write the table.

        timetuner fit --nfe 10

        timetuner fit --model runs/digits-ddpm --scheduler dpm2 --nfe 5 --objective e2e --out dpm2-5.safetensors

    The fit ends by sampling plain and tuned from held-out noises: if the tuned table is not better (x0 gap to
    the reference and, for digits models, FD), it says so and writes the identity table unless --force.
    """
    from timetuner.fit import fit as run
    from timetuner.trajectories import DEFAULT_TRAJECTORY

    if as_json:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    name = out or f"tau-{scheduler}-{trajectory or DEFAULT_TRAJECTORY.get(scheduler, 'uniform')}-nfe{nfe}.safetensors"
    result = run(model, out=name, progress=not as_json, nfe=nfe, scheduler=scheduler, trajectory=trajectory,
                 strategy=strategy, objective=objective, optimizer=optimizer, samples=samples,
                 eval_samples=eval_samples, seed=seed, data=data, reference_steps=reference_steps,
                 adam_iters=adam_iters, e2e_iters=e2e_iters, force=force)
    held = result.held_out
    if as_json:
        typer.echo(json.dumps({"out": name, "better": result.better, "written": "tuned" if not
                               result.table.is_identity else "identity", "t": result.tuned.t.tolist(),
                               "tau": result.tuned.tau.tolist(), "rows": result.rows, "held_out": held,
                               "seconds": round(result.seconds, 2),
                               "network_evaluations": result.network_evaluations,
                               "fit_network_evaluations": result.fit_evaluations}))
        return
    joint = result.config.objective == "e2e"
    typer.echo(f"{'k':>3} {'t':>9} {'tau':>9}" + ("" if joint else f" {'loss before':>12} {'loss after':>12}"))
    for row in result.rows:
        typer.echo(f"{row['k']:>3} {row['t']:>9.2f} {row['tau']:>9.2f}" + (
            "" if joint else f" {row['loss_before']:>12.5g} {row['loss_after']:>12.5g}"))
    if joint and result.rows:
        typer.echo(f"joint loss (final samples vs reference, fit noises): {result.rows[0]['loss_before']:.5g} -> "
                   f"{result.rows[0]['loss_after']:.5g}")
    from timetuner.metrics import describe_change

    typer.echo(describe_change(f"held-out x0 gap (RMS to the {result.table.metadata['reference']} reference, "
                               f"{result.config.eval_samples} samples)", held["gap_change"]))
    if "fd_change" in held:
        typer.echo(describe_change("held-out FD (digits features)", held["fd_change"], digits=3)
                   + f"; reference sampler {held['fd_reference']:.3f}")
    if result.better:
        typer.echo(f"tuned table is better on held-out seeds; wrote {name} ({result.seconds:.1f} s)")
    elif force:
        typer.echo(f"tuned table is NOT better on held-out seeds; wrote it anyway (--force) to {name}")
    else:
        typer.echo(f"tuned table is NOT better on held-out seeds; wrote the identity table (tau = t) to {name}; "
                   "--force writes the tuned one")


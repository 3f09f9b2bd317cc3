"""`timetuner eval`: truncation gap per step and at x0 against a fine DDIM reference, FD and KID, with intervals."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from timetuner.cli.options import (
    Bootstrap,
    Features,
    GapN,
    HeldOutClassLabels,
    HeldOutN,
    HeldOutPrompts,
    InceptionWeights,
    Model,
    NegativePrompt,
    ReferenceN,
    ReferenceSteps,
    user_command,
)


@user_command
def evaluate(
    table: Annotated[str, typer.Option(help="A τ table (.safetensors) from `timetuner fit`.")],
    model: Model = None,
    n: HeldOutN = None,
    gap_n: GapN = None,
    reference_n: ReferenceN = None,
    reference_steps: ReferenceSteps = 1000,
    seed: Annotated[int | None, typer.Option(help="Noise seed; default: the table's held-out seed.")] = None,
    fid: Annotated[bool, typer.Option("--fid", help="Distribution gap and data FD/KID through clean-fid (digits "
                                      "models: on by default, data FD against the held-out digits).")] = False,
    ref: Annotated[str | None, typer.Option(help="Reference images: a folder or .zip (the same size each), a "
                                            "clean-fid .npz of statistics, or digits:test / digits:train.")] = None,
    features: Features = "auto",
    inception_weights: InceptionWeights = None,
    bootstrap: Bootstrap = 1000,
    prompts: HeldOutPrompts = None,
    class_labels: HeldOutClassLabels = None,
    negative_prompt: NegativePrompt = None,
    plots: Annotated[str | None, typer.Option(
        help="Folder for PNGs: tau_shift.png, gap_per_step.png, samples.png (plain | tuned, same noises).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare plain and tuned sampling from the same held-out noises against a fine DDIM reference.

    Before/after figures come with a 95 % paired bootstrap interval over the noises; an interval that covers
    zero is reported as "no significant change". Conditional tables are evaluated as they were fitted: guided at
    their scale, on held-out prompts or class labels (the table's own by default); latent models are measured in
    latent space for the gaps and on VAE-decoded images for FD and KID.

        timetuner eval --table tau-ddim-uniform-nfe10.safetensors --plots eval-plots

        timetuner eval --table tau.safetensors --model my-model --fid --ref val-images/ --n 10000
    """
    from timetuner.errors import UserError
    from timetuner.measuring.evaluation import Setup, save_plots
    from timetuner.measuring.evaluation import evaluate as run
    from timetuner.measuring.verdict import describe_judgement
    from timetuner.measuring.yardstick import FidOptions, resolve_features

    if plots is not None and os.path.exists(plots) and not os.path.isdir(plots):
        raise UserError(f"--plots {plots!r} is a file; accepted: a folder (created if missing)")
    if ref is not None and not fid:
        raise UserError(f"--ref {ref!r} is only used with --fid; accepted: --fid --ref {ref}")
    from timetuner.core.loading import quiet_loading

    quiet_loading()
    from timetuner.core.prompts import parse_class_labels

    setup = Setup(table, model, prompts, parse_class_labels(class_labels), negative_prompt)
    n = setup.default_n if n is None else n
    yardstick = None
    if fid or setup.is_digits:
        chosen = resolve_features(features, setup.is_digits)
        yardstick = setup.yardstick(FidOptions(ref=ref, features=chosen, inception_weights=inception_weights),
                                    reference_n, data=fid or setup.is_digits, progress=not as_json,
                                    data_n=n if fid else None)
    result = run(setup, n=n, gap_n=gap_n, reference_steps=reference_steps, seed=seed, bootstrap=bootstrap,
                 yardstick=yardstick, progress=not as_json)
    record = result.record
    if plots is not None:
        record["plots"] = [str(p) for p in save_plots(setup, result, plots).values()]
    if as_json:
        typer.echo(json.dumps(record))
        return
    if record.get("conditioning"):
        typer.echo(f"conditioned on {record['conditioning']}")
    typer.echo(f"truncation gap per state (RMS, {record['trajectory_gap_space']}) to a {reference_steps}-step DDIM "
               f"trajectory, {record['gap_n']} noises (seed {record['seed']})")
    typer.echo(f"{'state':>5} {'time':>9} {'plain':>10} {'tuned':>10}")
    for i, (t, a, b) in enumerate(zip(record["state_times"], record["trajectory_gap_plain"],
                                      record["trajectory_gap_tuned"], strict=True)):
        typer.echo(f"{i:>5} {t:>9.2f} {a:>10.5f} {b:>10.5f}")
    for line in describe_judgement(record):
        typer.echo(line)
    typer.echo(f"verdict (distribution gap and x0 gap): tuned is {'better' if record['better'] else 'NOT better'}")
    for path in record.get("plots", []):
        typer.echo(f"wrote {path}")

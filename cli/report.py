"""`timetuner report`: one page (HTML, and Markdown with PNGs) for a τ table, with its figures and plots."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from timetuner.cli import options as opt


@opt.user_command
def report(
    tables: Annotated[list[str], typer.Argument(help="The τ table to report on; more tables of the same solver and "
                                                "trajectory (other step counts) join its gap-against-steps plot.")],
    model: opt.Model = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Report folder; default: <table name>-report.")
                   ] = None,
    n: opt.HeldOutN = None,
    gap_n: opt.GapN = None,
    reference_n: opt.ReferenceN = None,
    nfes: Annotated[str, typer.Option(help="Step counts of the plain sampler in the gap-against-steps plot.")
                    ] = "5,10,20",
    reference_steps: opt.ReferenceSteps = 1000,
    ref: Annotated[str | None, typer.Option(help="FD/KID reference: a folder or .zip of images, a clean-fid .npz, "
                                            "or digits:test; default: digits:test for digits models, else no FD."
                                            )] = None,
    features: opt.Features = "auto",
    inception_weights: opt.InceptionWeights = None,
    bootstrap: opt.Bootstrap = 1000,
    prompts: opt.HeldOutPrompts = None,
    class_labels: opt.HeldOutClassLabels = None,
    negative_prompt: opt.NegativePrompt = None,
) -> None:
    """Write report.html (self-contained), report.md and the PNGs for a table.

        timetuner report tau-ddim-uniform-nfe10.safetensors

        timetuner report tau-10.safetensors tau-5.safetensors --model my-model --ref val-images/ --n 5000
    """
    from timetuner.errors import UserError
    from timetuner.measuring.evaluation import Setup, check_siblings, evaluate, gap_versus_nfe, save_plots
    from timetuner.measuring.report import write_report
    from timetuner.measuring.yardstick import FidOptions, resolve_features
    from timetuner.table import TauTable

    try:
        steps = [int(v) for v in nfes.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--nfes {nfes!r} is invalid; accepted: comma-separated step counts, e.g. 5,10,20") from None
    folder = Path(out or f"{Path(tables[0]).stem}-report")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {str(folder)!r} is a file; accepted: a folder (created if missing)")
    from timetuner.core.loading import quiet_loading

    quiet_loading()
    from timetuner.core.prompts import parse_class_labels

    setup = Setup(tables[0], model, prompts, parse_class_labels(class_labels), negative_prompt)
    n = setup.default_n if n is None else n
    others = [TauTable.load(path) for path in tables[1:]]
    check_siblings(setup.table, others, tables[1:], tables[0])
    yardstick = None
    if ref is not None or setup.is_digits:
        chosen = resolve_features(features, setup.is_digits)
        yardstick = setup.yardstick(FidOptions(ref=ref, features=chosen, inception_weights=inception_weights),
                                    reference_n, data_n=n if ref is not None else None)
    result = evaluate(setup, n=n, gap_n=gap_n, reference_steps=reference_steps, bootstrap=bootstrap,
                      yardstick=yardstick, progress=True)
    rows = None
    if yardstick is not None and steps:
        rows = gap_versus_nfe(setup, yardstick, steps, others, n=n, bootstrap=bootstrap, progress=True)
        result.record["gap_vs_nfe"] = rows
    plots = save_plots(setup, result, folder, rows)
    command = "timetuner " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["report"] else ""
    written = write_report(folder, setup.table, result.record, plots, command)
    for path in [*written.values(), *plots.values()]:
        typer.echo(f"wrote {path}")

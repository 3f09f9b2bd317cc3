"""The `timetuner` application: one module per command, registered here."""

from __future__ import annotations

from typing import Annotated

import typer

from timetuner import __version__
from timetuner.cli.eval import evaluate
from timetuner.cli.features import train_features
from timetuner.cli.fit import fit
from timetuner.cli.report import report
from timetuner.cli.sample import sample
from timetuner.cli.train import train

app = typer.Typer(
    name="timetuner",
    help="Timestep tuning for few-step diffusion sampling, and faster diffusion training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"timetuner {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Timestep tuning for few-step diffusion sampling, and faster diffusion training."""


app.command(name="fit")(fit)
app.command(name="eval")(evaluate)
app.command(name="train")(train)
app.command(name="train-features")(train_features)
app.command(name="sample")(sample)
app.command(name="report")(report)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

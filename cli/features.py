"""`timetuner train-features`: train the digits feature extractor used for offline Fréchet distances."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from timetuner.cli.options import Seed, user_command


@user_command
def train_features(
    out: Annotated[str, typer.Option("--out", "-o", help="Folder for model.safetensors and config.json.")],
    epochs: Annotated[int, typer.Option(help="Passes over the digits train split.")] = 60,
    feature_dim: Annotated[int, typer.Option(help="Width of the feature layer.")] = 64,
    seed: Seed = 0,
) -> None:
    """Train the small CNN digits classifier whose features measure FD offline.

    The shipped one was made with:

        timetuner train-features --out assets/digits-features
    """
    from timetuner.measuring.features import train_digits_features

    record = train_digits_features(out, epochs=epochs, seed=seed, feature_dim=feature_dim)
    typer.echo(json.dumps(record))

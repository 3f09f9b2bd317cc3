"""Option aliases shared by the commands, and the one-line handling of user errors."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import typing
from typing import Annotated

import typer

from timetuner.errors import UserError
from timetuner.measuring.yardstick import DEFAULT_GAP_N, DEFAULT_N, DEFAULT_REFERENCE_N

Seed = Annotated[int, typer.Option("--seed", help="Seed of every random draw; same seed, same result.")]
Model = Annotated[
    str | None,
    typer.Option("--model", "-m", help="Hub id or local diffusers pipeline folder; default: the embedded "
                 "digits model (assets/digits-ddpm)."),
]
Cpu = Annotated[bool, typer.Option("--cpu", help="Run on CPU even when a GPU is available.")]


def user_command(fn):
    """Turn a UserError into `Error: <message>` on stderr and exit code 2 (TIMETUNER_DEBUG=1: traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            if os.environ.get("TIMETUNER_DEBUG"):
                raise
            typer.echo(f"Error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def options_from(config, helps: dict[str, str], names: dict[str, tuple[str, ...]] | None = None,
                 panels: dict[str, str] | None = None, types: dict[str, object] | None = None):
    """A decorator: the command also takes one option per field of the dataclass `config` that `helps` describes —
    its name, type and default are the field's (the dataclass is their one home), `names[field]` its flags,
    `types[field]` the type the command parses itself (a list written as text) — passed as keyword arguments."""
    hints, names, panels, types = typing.get_type_hints(config), names or {}, panels or {}, types or {}
    fields = {f.name: f for f in dataclasses.fields(config)}
    unknown = set(helps) - set(fields)
    if unknown:
        raise TypeError(f"{config.__name__} has no fields {sorted(unknown)}")
    generated = [inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY,
        default=inspect.Parameter.empty if fields[name].default is dataclasses.MISSING else fields[name].default,
        annotation=Annotated[types.get(name, hints[name]),
                             typer.Option(*names.get(name, ()), help=help_text, rich_help_panel=panels.get(name))])
        for name, help_text in helps.items()]

    def decorate(fn):
        own_hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=own_hints[p.name], kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        parameters = own + generated
        fn.__signature__ = inspect.Signature(parameters, return_annotation=None)
        fn.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": None}
        return fn

    return decorate


Features = Annotated[str, typer.Option(
    help="FD/KID feature extractor: auto (digits for digits models, else inception), inception, digits, or "
    "package.module:factory (returns a torch module: N×3×H×W in [0, 255] → N×D).")]
InceptionWeights = Annotated[str | None, typer.Option(
    help="The Inception weights file inception-2015-12-05.pt (default: $TIMETUNER_INCEPTION_WEIGHTS, the cache, "
    "or a download when online).")]
Bootstrap = Annotated[int, typer.Option(help="Paired bootstrap resamples for the 95 % intervals (FD-based figures: "
                                        "at most 200).")]

# Loading a pipeline (hub id or folder): the usual `from_pretrained` arguments.
Revision = Annotated[str | None, typer.Option("--revision", help="Hub revision (branch, tag or commit) of --model.")]
Variant = Annotated[str | None, typer.Option("--variant", help="Weights variant of --model, e.g. fp16.")]
Dtype = Annotated[str | None, typer.Option("--dtype", help="Load every component as float32, float16 or "
                                           "bfloat16; default: bfloat16 for transformer pipelines (SD3, Flux, Sana, "
                                           "Wan, DiT) on a GPU, float32 otherwise.")]

# Conditional models in eval / report: what the held-out samples are conditioned on (default: the table's own).
HeldOutPrompts = Annotated[str | None, typer.Option(
    "--prompts", help="Text models: held-out prompts (a file, one per line, or one prompt); sample i uses prompt "
    "i mod P. Default: the table's held-out prompts. Must share none with the prompts it was fitted on.")]
HeldOutClassLabels = Annotated[str | None, typer.Option(
    "--class-labels", help="DiT: class labels, e.g. 207,360,387. Default: the table's held-out labels.")]
NegativePrompt = Annotated[str | None, typer.Option(
    "--negative-prompt", help="Text models: the unconditional branch of guidance. Default: the table's.")]

# eval / report: how many held-out samples, and the fine reference the gaps are measured against.
HeldOutN = Annotated[int | None, typer.Option("--n", help="Held-out noises (samples of the distribution gap and data "
                                              f"FD). Default: the fit's ({DEFAULT_N:,} for pixel models).")]
GapN = Annotated[int | None, typer.Option(help="Of those, how many carry the x0 gap and the truncation gap per state "
                                          f"(the costly part). Default: the fit's ({DEFAULT_GAP_N}).")]
ReferenceN = Annotated[int | None, typer.Option(help="Reference-solver samples the distribution gap is measured "
                                                "against (cached; grown when more are asked). Default: the fit's "
                                                f"({DEFAULT_REFERENCE_N:,}).")]
ReferenceSteps = Annotated[int, typer.Option(help="Steps of the DDIM trajectory of the per-state truncation gap "
                                             "(cached on disk).")]

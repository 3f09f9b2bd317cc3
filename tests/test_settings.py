"""One home per setting: the CLI's options are the config dataclasses' fields (their names, types and defaults), a
method's hyperparameter defaults live in its sampler's or weighting's `__init__`, and no default is written twice."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import typer

from timetuner.cli.main import app
from timetuner.fitting.config import FitConfig
from timetuner.trainers import MDLRC, SAMPLERS, WEIGHTINGS
from timetuner.trainers.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def command(name: str):
    return typer.main.get_command(app).commands[name]


def options(name: str) -> dict:
    return {p.name: p for p in command(name).params}


def test_every_train_option_is_a_train_config_field_with_its_default():
    params = options("train")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(params) == set(fields)
    for name, field in fields.items():
        if field.default is not dataclasses.MISSING:
            assert params[name].default == field.default, name


def test_fit_options_that_are_fit_config_fields_take_its_defaults():
    params = options("fit")
    shared = [f for f in dataclasses.fields(FitConfig) if f.name in params]
    assert len(shared) >= 25
    for field in shared:
        assert params[field.name].default == field.default, field.name


def _method_owner(field: str):
    """(class, kwarg) whose `__init__` holds the default of a TrainConfig field "<method>_<kwarg>", or None."""
    owners = {**SAMPLERS, **WEIGHTINGS, "mdlrc": MDLRC}
    for method, owner in owners.items():
        prefix = method.replace("-", "_") + "_"
        if field.startswith(prefix):
            parameter = inspect.signature(owner.__init__).parameters.get(field[len(prefix):])
            if parameter is not None and parameter.default is not inspect.Parameter.empty:
                return owner, field[len(prefix):]
    return None


def _literal_defaults(tree: ast.AST, class_name: str) -> dict[str, str]:
    """{field: its default's source} for the fields of `class_name` whose default is written as a literal."""
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {n.target.id: ast.unparse(n.value) for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.value, ast.Constant | ast.UnaryOp)
            and n.value is not None and ast.unparse(n.value) != "None"}


def test_a_method_default_is_written_once_in_its_sampler_or_weighting():
    """TrainConfig reads a method's defaults from the method (`method_default`): a literal there would be a second
    home that can drift from the sampler's `__init__` (CLTS's ramp had three)."""
    literal = _literal_defaults(ast.parse((ROOT / "trainers" / "config.py").read_text()), "TrainConfig")
    written_twice = [f"TrainConfig.{name} = {literal[name]} (also {owner.__name__}.__init__'s {kwarg})"
                     for name in literal for found in [_method_owner(name)] if found for owner, kwarg in [found]]
    assert written_twice == []
    checked = [f.name for f in dataclasses.fields(TrainConfig) if _method_owner(f.name)]
    assert {"clts_ramp_steps", "clts_mu", "adaptive_lr", "min_snr_gamma", "mdlrc_beta1_end"} <= set(checked)
    for name in checked:  # None: derived from another setting (SpeeD's published one) when the run resolves
        owner, kwarg = _method_owner(name)
        value = getattr(TrainConfig, name)
        assert value is None or value == inspect.signature(owner.__init__).parameters[kwarg].default, name


@pytest.mark.parametrize("module", ["fit", "train"])
def test_the_cli_writes_no_default_of_a_config_field(module):
    """A CLI option that is a config field has no default in the command's source (it comes from the field)."""
    config = {"fit": FitConfig, "train": TrainConfig}[module]
    fields = {f.name for f in dataclasses.fields(config)}
    tree = ast.parse((ROOT / "cli" / f"{module}.py").read_text())
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == module)
    arguments = function.args.args + function.args.kwonlyargs
    assert not [a.arg for a in arguments if a.arg in fields]


def test_the_held_out_protocol_constants_have_one_home():
    """FitConfig's held-out sizes are the yardstick's constants, not copies of their values."""
    literal = _literal_defaults(ast.parse((ROOT / "timetuner" / "fitting" / "config.py").read_text()), "FitConfig")
    assert not {"eval_gap_samples", "reference_n"} & set(literal)

"""The distribution: import paths under the timetuner namespace, console script, shipped assets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import typer

import timetuner
from timetuner.assets import DIGITS_FEATURES, EMBEDDED_MODEL


def test_namespaced_subpackages_install_from_their_root_folders():
    # trainers/ and cli/ live at the repository root but import as timetuner.trainers / timetuner.cli.
    import timetuner.cli.main
    import timetuner.trainers

    root = Path(timetuner.__file__).resolve().parent.parent
    assert Path(timetuner.trainers.__file__).resolve().parent == root / "trainers"
    assert Path(timetuner.cli.main.__file__).resolve().parent == root / "cli"
    assert callable(timetuner.trainers.train) and isinstance(timetuner.cli.main.app, typer.Typer)


# What `from timetuner import TunedScheduler` must not load: a pipeline that only samples with a table pays for
# the table and the scheduler, not for fitting, measurement, plotting, the trainers or the CLI.
HEAVY = ("timetuner.fitting.run", "timetuner.fitting.method", "timetuner.core.solver",
         "timetuner.measuring.evaluation", "timetuner.measuring.fid",
         "timetuner.cli", "timetuner.trainers", "cleanfid", "matplotlib", "sklearn")


def test_loading_a_tuned_scheduler_loads_nothing_of_fitting_measurement_trainers_or_cli():
    # One fresh process: what the scheduler import loaded, then that `fit` is reachable and stays the function
    # even after the fitting modules are imported.
    code = ("import sys, json; from timetuner import TunedScheduler, TauTable; loaded = sorted(sys.modules); "
            "import timetuner, timetuner.fitting.method, timetuner.fitting.run; from timetuner import fit; "
            "print(json.dumps([loaded, fit.__module__, callable(fit), timetuner.fit is fit]))")
    loaded, module, is_callable, same = json.loads(subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert "timetuner.scheduler" in loaded and "timetuner.table" in loaded
    assert [m for m in loaded if m.startswith(HEAVY)] == []
    assert (module, is_callable, same) == ("timetuner", True, True)


def test_console_script_version_and_help():
    out = subprocess.run([sys.executable, "-m", "timetuner.cli.main", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"timetuner {timetuner.__version__}"
    helped = subprocess.run([sys.executable, "-m", "timetuner.cli.main", "--help"], capture_output=True,
                            text=True, check=True)
    for command in ("train", "sample", "train-features"):
        assert command in helped.stdout


def test_assets_ship_within_size_limits():
    model_bytes = sum(p.stat().st_size for p in EMBEDDED_MODEL.rglob("*") if p.is_file())
    assert (EMBEDDED_MODEL / "model_index.json").is_file()
    assert model_bytes <= 10 * 1024 * 1024
    feature_bytes = sum(p.stat().st_size for p in DIGITS_FEATURES.rglob("*") if p.is_file())
    assert (DIGITS_FEATURES / "model.safetensors").is_file()
    assert feature_bytes <= 2 * 1024 * 1024
    assert json.loads((DIGITS_FEATURES / "config.json").read_text())["test_accuracy"] >= 0.95

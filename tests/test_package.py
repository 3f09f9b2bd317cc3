"""The distribution: import paths under the timetuner namespace, console script, shipped assets."""

from __future__ import annotations

import json
import subprocess
import sys

import timetuner
from timetuner.assets import DIGITS_FEATURES, EMBEDDED_MODEL


def test_namespaced_subpackages_import():
    import timetuner.cli.main
    import timetuner.trainers

    assert timetuner.trainers.train is not None
    assert timetuner.cli.main.app is not None


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

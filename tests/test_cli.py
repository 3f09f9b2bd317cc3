"""`timetuner sample` and the console script's handling of user mistakes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from timetuner.cli.main import app

runner = CliRunner()


def test_sample_writes_a_grid(tiny_run, tmp_path):
    out = tmp_path / "grid.png"
    result = runner.invoke(app, ["sample", "--model", str(tiny_run), "--n", "9", "--steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as im:
        assert im.size[0] == im.size[1] and im.size[0] > 3 * 8


def test_sample_compares_plain_and_tuned_from_the_same_noise(tmp_path):
    import torch

    from timetuner.assets import DEFAULT_TABLE
    from timetuner.measuring.sampling import sample
    from timetuner.table import TauTable

    table = TauTable.load(DEFAULT_TABLE)
    plain, tuned = sample(n=4, table=table, compare=True)
    assert plain.shape == tuned.shape == (4, 1, 8, 8) and not torch.equal(plain, tuned)
    _, again = sample(n=4, table=table.with_tau(table.t), compare=False)
    assert torch.equal(again, plain)  # the identity table through the wrapper is the plain sampler
    out = tmp_path / "compare.png"
    result = runner.invoke(app, ["sample", "--table", str(DEFAULT_TABLE), "--compare", "--n", "4", "--out", str(out)])
    assert result.exit_code == 0 and "plain (left) vs tuned (right)" in result.output and out.is_file()


def test_sample_heun_and_dpm2_run(tiny_run, tmp_path):
    for scheduler in ("heun", "dpm2"):
        out = tmp_path / f"{scheduler}.png"
        result = runner.invoke(app, ["sample", "--model", str(tiny_run), "--n", "2", "--steps", "3",
                                     "--scheduler", scheduler, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert out.is_file()


@pytest.mark.slow  # a subprocess (~13 s)
def test_console_script_reports_a_bad_model_folder_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "timetuner.cli.main", "sample", "--model", str(tmp_path),
                             "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "model_index.json" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_sample_refuses_unknown_scheduler(tiny_run, tmp_path):
    result = runner.invoke(app, ["sample", "--model", str(tiny_run), "--scheduler", "plms",
                                 "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "--scheduler 'plms'" in result.output

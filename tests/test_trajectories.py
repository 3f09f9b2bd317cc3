"""Named trajectories, explicit grids carried by tables, and `timetuner eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from typer.testing import CliRunner

from timetuner import TauTable, TunedScheduler
from timetuner.cli.main import app
from timetuner.core.trajectories import ays_timesteps, build, logsnr_timesteps, quadratic_timesteps
from timetuner.errors import UserError

BASE = DDPMScheduler(num_train_timesteps=1000).config
runner = CliRunner()


def test_logsnr_grid_is_descending_and_uniform_in_lambda():
    a = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.numpy().astype(np.float64)
    grid = logsnr_timesteps(a, 10)
    assert grid[0] == 999 and grid[-1] == 0 and grid == sorted(grid, reverse=True) and len(set(grid)) == 10
    lam = 0.5 * np.log(a[grid] / (1 - a[grid]))
    steps = np.diff(lam)
    assert steps.std() / steps.mean() < 0.15  # integer rounding only


def test_quadratic_grid_is_dense_near_the_data():
    grid = quadratic_timesteps(1000, 10)
    gaps = -np.diff(grid)
    assert len(set(grid)) == 10 and gaps[0] > gaps[-1]


def test_align_your_steps_grid_is_diffusers_list_at_ten_steps_and_log_linear_between():
    from diffusers.schedulers.scheduling_utils import AysSchedules

    assert ays_timesteps(1000, 10) == AysSchedules["StableDiffusionTimesteps"]
    for steps in (3, 5, 8, 20):
        grid = ays_timesteps(1000, steps)
        assert len(set(grid)) == steps and grid == sorted(grid, reverse=True) and (grid[0], grid[-1]) == (999, 24)
    sched, grid = build("dpm++", None, BASE, 5)  # DPM-Solver++ 2M runs Align-Your-Steps by default
    table = TauTable.identity(sched, 5, timesteps=grid)
    assert table.t.tolist() == grid and table.scheduler_class == "DPMSolverMultistepScheduler"


def test_explicit_grid_travels_in_the_table_and_the_scheduler_reproduces_it():
    sched, grid = build("dpm2", "logsnr", BASE, 6)
    table = TauTable.identity(sched, 6, timesteps=grid)
    assert table.metadata["timesteps"] == grid
    tuned = TunedScheduler.from_table(build("dpm2", "uniform", BASE, 6)[0], table.with_tau(table.t.clamp(min=1) - 1))
    tuned.set_timesteps(6)  # what a pipeline calls: no grid passed
    assert torch.equal(tuned.inner.timesteps.double().cpu(), table.t)


def test_unknown_trajectory_for_a_scheduler_is_refused():
    with pytest.raises(UserError, match="--trajectory 'logsnr' is not available for --scheduler heun"):
        build("heun", "logsnr", BASE, 5)


@pytest.mark.slow  # a 1000-step reference trajectory (~17 s)
def test_eval_prints_gap_per_state_and_fd(tiny_run, tmp_path):
    from timetuner.fitting.api import fit

    out = tmp_path / "t.safetensors"
    fit(str(tiny_run), out=out, progress=False, nfe=3, scheduler="ddim", objective="paper", samples=8,
        reference_n=500, eval_samples=8, reference_steps=5, force=True)
    result = runner.invoke(app, ["eval", "--model", str(tiny_run), "--table", str(out), "--n", "8",
                                 "--reference-steps", "20", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert len(record["trajectory_gap_plain"]) == len(record["trajectory_gap_tuned"]) == 3 + 1  # x_T, each evaluation
    assert record["trajectory_gap_plain"][0] == 0.0  # both start from the same x_T
    assert {"dist_gap", "data_fd", "x0_gap"} <= set(record)


@pytest.mark.slow  # a 1000-step reference and bootstrap (~17 s)
def test_eval_gives_paired_bootstrap_intervals(tiny_run, tmp_path):
    from timetuner.fitting.api import fit

    out = tmp_path / "t.safetensors"
    fit(str(tiny_run), out=out, progress=False, nfe=3, scheduler="ddim", objective="paper", samples=8,
        reference_n=500, eval_samples=8, reference_steps=5, force=True)
    result = runner.invoke(app, ["eval", "--model", str(tiny_run), "--table", str(out), "--n", "16",
                                 "--reference-steps", "20", "--bootstrap", "200", "--plots", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for start in ("distribution gap", "x0 gap", "data FD"):
        line = next(line for line in lines if line.startswith(start))
        assert "95 % CI [" in line, line
    from PIL import Image

    for name in ("tau_shift.png", "gap_per_step.png", "samples.png"):
        with Image.open(tmp_path / "p" / name) as image:
            assert image.format == "PNG" and image.width > 100


def test_eval_refuses_a_file_as_plots_folder(tmp_path):
    table, plots = tmp_path / "missing.safetensors", tmp_path / "a-file"
    plots.write_text("x")
    result = runner.invoke(app, ["eval", "--table", str(table), "--plots", str(plots)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--plots" in lines[0], result.output

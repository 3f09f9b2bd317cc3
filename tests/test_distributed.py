"""Several processes under `accelerate launch` (gloo on CPU): the same table as one process, one training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timetuner import TauTable
from timetuner.fitting.api import fit

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # each launch starts two Python processes (~30-60 s)


def launch(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch` of tests/distributed_run.py on this machine's CPU (gloo), from the repository root."""
    from timetuner.core.distributed import launch_command

    command = launch_command(processes, str(ROOT / "tests" / "distributed_run.py"), *args, module=None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_two_processes_fit_the_same_table_as_one(tiny_run, tmp_path):
    from tests.distributed_run import FITS

    launch("fit", str(tiny_run), str(tmp_path))
    for name, options in FITS.items():
        two = TauTable.load(tmp_path / f"{name}.safetensors")
        one = fit(str(tiny_run), progress=False, **options).table
        assert torch.allclose(two.tau, one.tau, atol=1e-3), (name, two.tau, one.tau)
        held_two, held_one = two.metadata["held_out"], one.metadata["held_out"]
        for figure in ("x0_gap", "dist_gap"):
            assert held_two[figure]["tuned"] == pytest.approx(held_one[figure]["tuned"], rel=1e-3), (name, figure)
        assert held_two["n"] == held_one["n"] == options["eval_samples"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.safetensors" for n in FITS)  # no checkpoints


def test_two_processes_train_one_run_and_save_a_loadable_pipeline(tmp_path):
    from diffusers import DDPMPipeline

    out = tmp_path / "run"
    launch("train", str(out))
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # EMA weights, model, adaptive policy and its buffers: the same on both processes
    assert ranks[0]["step"] == 6
    assert json.loads((out / "train_config.json").read_text())["num_processes"] == 2
    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.unet.config.sample_size == 8


def test_fit_processes_option_relaunches_under_accelerate(tiny_run, tmp_path):
    out = tmp_path / "t.safetensors"
    small = ["--nfe", "3", "--scheduler", "ddim", "--samples", "16", "--eval-samples", "24", "--eval-gap-samples", "16",
             "--reference-steps", "8", "--reference-n", "64", "--e2e-iters", "3", "--force"]
    command = [sys.executable, "-m", "timetuner.cli.main", "fit", "--model", str(tiny_run), *small, "--processes",
               "2", "--out", str(out), "--json"]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [line for line in result.stdout.splitlines() if line.startswith('{"out"')]
    assert len(records) == 1  # only the main process reports
    one = fit(str(tiny_run), progress=False, nfe=3, scheduler="ddim", samples=16, eval_samples=24, eval_gap_samples=16,
              reference_steps=8, reference_n=64, e2e_iters=3, force=True)
    assert torch.allclose(TauTable.load(out).tau, one.table.tau, atol=1e-3)

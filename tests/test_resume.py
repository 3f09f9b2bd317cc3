"""A fit or training run killed with SIGKILL mid-way and rerun with the same command ends where an uninterrupted
one ends: the same τ table (every tensor and every figure; only wall-clock seconds and the count of network calls
this process made differ) and the same loss curve and weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # three subprocesses per case (~30 s)

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--scheduler", "ddim", "--samples", "16", "--eval-samples", "24", "--eval-gap-samples", "16",
         "--reference-steps", "8",
         "--reference-n", "64", "--force", "--json"]
FITS = {
    "sequential-paper": ["--nfe", "8", "--objective", "paper"],
    "sequential-teacher": ["--nfe", "8", "--objective", "teacher"],
    "sequential-e2e": ["--nfe", "4", "--objective", "e2e", "--e2e-iters", "30"],
    "sequential-paper-adam": ["--nfe", "6", "--objective", "paper", "--optimizer", "adam", "--adam-iters", "30"],
    "parallel-paper": ["--nfe", "8", "--strategy", "parallel", "--objective", "paper"],
    "parallel-teacher": ["--nfe", "8", "--strategy", "parallel", "--objective", "teacher"],
    # the grid search, then grid and τ by the e2e gradient: the checkpoint carries the grid's logits and Adam's
    "e2e-grid-gradient": ["--nfe", "4", "--scheduler", "dpm++", "--trajectory", "learned", "--grid-gradient",
                          "--e2e-iters", "30"],
}
TIMINGS = ("fit_seconds", "network_evaluations", "seconds")  # wall clock, and calls made by this process


def kill_when(command: list[str], ready, timeout: float = 300) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds; fail if it finished first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = time.monotonic()
    while not ready():
        assert proc.poll() is None, "finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
        assert time.monotonic() - started < timeout
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def table_contents(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        metadata = {k: json.loads(v) if v[:1] in "[{" else v for k, v in (f.metadata() or {}).items()}
    return tensors, metadata


@pytest.mark.parametrize("case", list(FITS))
def test_a_killed_fit_resumes_to_the_same_table(tiny_run, tmp_path, case):
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "timetuner.cli.main", "fit", "--model", str(tiny_run), "--out", str(out),
                *SMALL, *FITS[case]]  # the case's own options last: they win

    out, straight = tmp_path / "killed.safetensors", tmp_path / "straight.safetensors"
    partial = out.with_name(out.name + ".partial.json")
    kill_when(command(out), partial.is_file)
    assert not out.exists()  # killed during fitting, with at least one unit checkpointed
    finish(command(out))
    finish(command(straight))
    assert not partial.exists()
    (tensors_a, meta_a), (tensors_b, meta_b) = table_contents(out), table_contents(straight)
    assert tensors_a.keys() == tensors_b.keys()
    for name in tensors_a:  # bit for bit
        assert tensors_a[name].dtype == tensors_b[name].dtype and torch.equal(tensors_a[name], tensors_b[name]), name
    assert without_timings(meta_a) == without_timings(meta_b)


def test_a_killed_training_run_resumes_its_loss_curve_bit_identically(tmp_path):
    def command(out: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "timetuner.cli.main", "train", "--preset", "digits-tiny", "--steps", "40",
                "--batch-size", "16", "--checkpoint-every", "10", "--log-every", "1", "--warmup-steps", "2",
                "--sample-n", "0", "--sampler", "speed", "--weighting", "caw", "--cpu", "--out", str(out), *extra]

    killed, straight = tmp_path / "killed", tmp_path / "straight"

    def between_checkpoints() -> bool:  # checkpoint-10 saved and the log two steps further
        log = killed / "log.jsonl"
        return (killed / "checkpoints" / "checkpoint-10").is_dir() and log.is_file() and \
            len(log.read_text().splitlines()) >= 12

    kill_when(command(killed), between_checkpoints)
    assert not (killed / "checkpoints" / "checkpoint-20").exists() and not (killed / "unet").exists()
    finish(command(killed, "--resume"))
    finish(command(straight))

    def curve(run: Path) -> list[dict]:
        return [without_timings(json.loads(line)) for line in (run / "log.jsonl").read_text().splitlines()]

    assert [r["step"] for r in curve(killed)] == list(range(1, 41))
    assert curve(killed) == curve(straight)  # loss, running loss, lr, per-bucket losses, sampler mass
    weights = [load_file(run / "unet" / "diffusion_pytorch_model.safetensors") for run in (killed, straight)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

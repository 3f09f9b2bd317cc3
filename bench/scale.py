"""Fit wall time on 1 and on N processes (`accelerate launch`), and whether the tables agree.

    python bench/scale.py                          # the default fit of the embedded model, 1 vs 2 processes
    python bench/scale.py --processes 1,2,4 --objectives e2e,paper --model runs/my-ddpm

Each run is a fresh `timetuner fit` subprocess with its own empty cache (the shipped reference set aside), so every
run computes its own references and verdict; N > 1 runs under `accelerate launch --multi_gpu` (gloo on a machine
without GPUs, NCCL with one GPU per process). Printed per objective: wall time of the command (start-up
included), the fit's own seconds (after the model is loaded), the ratio to one process and the largest |Δτ| to
the one-process table. Rows are appended to bench/results/scale.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBJECTIVE_ARGS = {"e2e": ["--objective", "e2e"], "paper": ["--objective", "paper"]}


def fit_command(processes: int, args: list[str]) -> list[str]:
    from timetuner.core import launch_command

    if processes == 1:
        return [sys.executable, "-m", "timetuner.cli.main", "fit", *args]
    return launch_command(processes, "fit", *args)


def run(processes: int, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.safetensors"
        env = {**os.environ, "TIMETUNER_CACHE": str(Path(tmp) / "cache")}
        started = time.perf_counter()
        result = subprocess.run(fit_command(processes, [*args, "--out", str(out), "--json"]), cwd=ROOT, env=env,
                                capture_output=True, text=True)
        wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"fit on {processes} process(es) failed:\n{result.stderr[-3000:]}")
    record = json.loads(next(line for line in result.stdout.splitlines() if line.startswith('{"out"')))
    return {"processes": processes, "wall_seconds": round(wall, 1), "fit_seconds": record["seconds"],
            "tau": record["tau"], "better": record["better"], "held_out": record["held_out"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--objectives", default="e2e,paper")
    parser.add_argument("--model", default=None)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.jsonl"))
    options = parser.parse_args()
    counts = [int(v) for v in options.processes.split(",")]
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    except ImportError:
        device = "?"
    print(f"{'objective':<10} {'processes':>9} {'wall s':>8} {'fit s':>8} {'ratio':>6} {'max |dtau|':>11}")
    for objective in options.objectives.split(","):
        args = ["--nfe", str(options.nfe), *OBJECTIVE_ARGS[objective]]
        args += [] if options.model is None else ["--model", options.model]
        rows = [run(n, args) for n in counts]
        base = rows[0]
        for row in rows:
            row.update(objective=objective, nfe=options.nfe, model=options.model or "embedded", device=device,
                       host=platform.node(), ratio=round(row["fit_seconds"] / base["fit_seconds"], 3),
                       max_tau_change=max(abs(a - b) for a, b in zip(row["tau"], base["tau"], strict=True)))
            print(f"{objective:<10} {row['processes']:>9} {row['wall_seconds']:>8.1f} {row['fit_seconds']:>8.1f} "
                  f"{row['ratio']:>6.2f} {row['max_tau_change']:>11.2e}")
            with open(options.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

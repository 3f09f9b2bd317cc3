"""diffusers' own scheduler tests (vendored in tests/diffusers_suite/, see its README) on identity-wrapped schedulers:
a `TunedScheduler` holding no table must add no failure over the class it wraps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = {"DDIMScheduler", "DDPMScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler",
           "DPMSolverSinglestepScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
           "UniPCMultistepScheduler"}


def _run(wrapped: bool) -> tuple[set[str], int, str]:
    """(failed test ids, passed count, output) of the vendored suite, plain or on wrapped schedulers."""
    env = {**os.environ, "TIMETUNER_DIFFUSERS_SUITE": "1", "TIMETUNER_WRAPPED": "1" if wrapped else "0"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-W", "ignore",
                          "tests/diffusers_suite/schedulers"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900).stdout
    failed = set(re.findall(r"^FAILED (\S+)", out, re.MULTILINE))
    passed = re.search(r"(\d+) passed", out)
    return failed, int(passed.group(1)) if passed else 0, out


def test_identity_wrapped_schedulers_add_no_failure_to_diffusers_own_scheduler_tests():
    plain_failed, plain_passed, _ = _run(wrapped=False)
    failed, passed, out = _run(wrapped=True)
    assert plain_passed >= 300, "the vendored suite did not run"
    summary = re.search(r"timetuner-wrapped: (\d+) test classes, (\d+) wrapped schedulers over (.*)$", out,
                        re.MULTILINE)
    assert summary and int(summary.group(1)) >= 9 and set(summary.group(3).split(", ")) == SOLVERS
    assert failed <= plain_failed, f"wrapping added failures: {sorted(failed - plain_failed)}"
    assert passed == plain_passed
    assert not any("test_compatibles" in f or "test_getattr" in f for f in failed)  # the two the issue named

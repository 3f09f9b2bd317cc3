"""Shared fixtures: tiny runs of the project's own training loop, built in a temp folder."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def tiny_config(out, **overrides):
    """A digits-tiny training config that runs in about a second on CPU."""
    from timetuner.trainers import TrainConfig

    base = dict(out=str(out), preset="digits-tiny", steps=20, batch_size=16, checkpoint_every=10, log_every=5,
                sample_n=4, sample_steps=2, warmup_steps=2, cpu=True)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session", autouse=True)
def _isolated_reference_cache(tmp_path_factory):
    """Reference trajectories are cached on disk; tests use a fresh cache, never the user's, and stay offline."""
    import os

    old = os.environ.get("TIMETUNER_CACHE")
    os.environ["TIMETUNER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["TIMETUNER_OFFLINE"] = "1"  # nothing in the tests touches the network (Inception weights included)
    yield
    if old is None:
        os.environ.pop("TIMETUNER_CACHE", None)
    else:
        os.environ["TIMETUNER_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 20-step digits-tiny run folder (a DDPM pipeline with checkpoints at 10 and 20)."""
    from timetuner.trainers import train

    return train(tiny_config(tmp_path_factory.mktemp("tiny") / "run"))

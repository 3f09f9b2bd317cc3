"""The model fingerprint a table records: the same for the same weights in float32, bfloat16 and float16 (so a table
fitted in float32 loads onto the bfloat16 pipeline), different for other weights, cheap on a large model; a table
written before fingerprints is still checked by its weights hash."""

from __future__ import annotations

import time

import pytest
import torch

from timetuner import TauTable, TunedScheduler
from timetuner.core.trajectories import make_scheduler
from timetuner.errors import UserError
from timetuner.matching import model_fingerprint, model_hash, same_model
from timetuner.tiny import tiny_pixel_unet

BASE = make_scheduler("dpm++", {"num_train_timesteps": 1000}).config


def _table(**metadata) -> TauTable:
    table = TauTable.identity(make_scheduler("dpm++", BASE), 4, model="tiny", **metadata)
    return table.with_tau((table.t - 3).clamp(min=0))


def test_the_fingerprint_is_the_same_in_every_dtype_and_differs_for_other_weights():
    unet = tiny_pixel_unet()
    fingerprint = model_fingerprint(unet)
    assert len(fingerprint["samples"]) == 256
    for dtype in (torch.bfloat16, torch.float16):
        assert same_model(fingerprint, model_fingerprint(tiny_pixel_unet().to(dtype)))
    other = tiny_pixel_unet()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.1)  # a fine-tune moves every weight by more than a 16-bit rounding
    assert not same_model(fingerprint, model_fingerprint(other))


def test_a_float32_fitted_table_loads_onto_the_bfloat16_network_and_refuses_other_weights():
    unet = tiny_pixel_unet()
    table = _table(model_fingerprint=model_fingerprint(unet), model_hash=model_hash(unet))
    wrapped = TunedScheduler.from_table(make_scheduler("dpm++", BASE), table, unet=tiny_pixel_unet().to(torch.bfloat16))
    assert 4 in wrapped.tables
    other = tiny_pixel_unet()
    with torch.no_grad():
        next(iter(other.parameters())).add_(1.0)
        for p in other.parameters():
            p.mul_(0.9)
    with pytest.raises(UserError, match="its weights differ") as err:
        TunedScheduler.from_table(make_scheduler("dpm++", BASE), table, unet=other)
    assert "\n" not in str(err.value)


def test_a_table_without_a_fingerprint_is_checked_by_its_weights_hash_as_before():
    unet = tiny_pixel_unet()
    table = _table(model_hash=model_hash(unet))
    TunedScheduler.from_table(make_scheduler("dpm++", BASE), table, unet=unet)
    with pytest.raises(UserError, match="weights"):
        TunedScheduler.from_table(make_scheduler("dpm++", BASE), table, unet=unet.to(torch.bfloat16))


def test_the_fingerprint_of_a_one_gigabyte_model_takes_under_two_seconds():
    big = torch.nn.Module()
    for i in range(16):  # 16 × 16 M float32 = 1 GiB, as a checkpoint's large matrices
        big.register_buffer(f"w{i}", torch.empty(4096, 4096))
    started = time.perf_counter()
    fingerprint = model_fingerprint(big)
    assert time.perf_counter() - started < 2.0 and len(fingerprint["samples"]) == 256

"""TauTable: identity construction, safetensors round trip, validation, refusal of other schedulers."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverSinglestepScheduler

from timetuner import TauTable
from timetuner.errors import UserError


def _ddim(**kw):
    return DDIMScheduler(num_train_timesteps=1000, **kw)


def test_identity_table_round_trips_through_safetensors(tmp_path):
    table = TauTable.identity(_ddim(), 10, model="digits", strategy="sequential")
    assert table.nfe == 10 and table.is_identity and table.num_inference_steps == 10
    tuned = table.with_tau((table.t - 3.5).clamp(min=0), objective="paper")
    path = tuned.save(tmp_path / "t.safetensors")
    back = TauTable.load(path)
    assert torch.equal(back.t, tuned.t) and torch.equal(back.tau, tuned.tau)
    assert back.metadata["objective"] == "paper" and back.metadata["scheduler_class"] == "DDIMScheduler"
    assert not back.is_identity
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_dpm2_table_counts_network_evaluations():
    sched = DPMSolverSinglestepScheduler(num_train_timesteps=1000, solver_order=2)
    assert TauTable.identity(sched, 10).nfe == 10


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: (t.t, t.tau[:-1]), "entries"),
        (lambda t: (t.t, torch.cat([t.tau[:-1], torch.tensor([float("nan")], dtype=torch.float64)])), "non-finite"),
        (lambda t: (t.t.flip(0), t.tau.flip(0)), "increases"),
        (lambda t: (t.t, t.tau + 2000), "leaves"),
    ],
)
def test_invalid_tables_are_refused(mutate, needle):
    table = TauTable.identity(_ddim(), 5)
    t, tau = mutate(table)
    with pytest.raises(UserError, match=needle):
        TauTable(t, tau, table.metadata)


def test_corrupt_and_foreign_files_are_user_errors(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(UserError, match="not a readable safetensors"):
        TauTable.load(bad)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="not a timetuner table"):
        TauTable.load(foreign)
    with pytest.raises(UserError, match="does not exist"):
        TauTable.load(tmp_path / "missing.safetensors")


def test_table_refuses_another_scheduler_class_or_configuration():
    table = TauTable.identity(_ddim(), 10)
    with pytest.raises(UserError, match="DDIMScheduler cannot load onto DPMSolverSinglestepScheduler"):
        table.check_scheduler(DPMSolverSinglestepScheduler())
    with pytest.raises(UserError, match="timestep_spacing"):
        table.check_scheduler(_ddim(timestep_spacing="trailing"))
    table.check_scheduler(_ddim())


@pytest.mark.parametrize(("grid", "needle"), [
    ([900, 500, 600], "not strictly decreasing"),
    ([900, 500, 500], "not strictly decreasing"),
    ([1200, 500, 100], "leaves the model's time range"),
    ([900, 500, -1], "leaves the model's time range"),
    ([900, 500], "has 2 entries for 3 steps"),
])
def test_an_explicit_grid_is_refused_unless_k_strictly_decreasing_timesteps_in_range(grid, needle):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from timetuner.errors import UserError
    from timetuner.table import set_grid

    with pytest.raises(UserError, match=needle):
        set_grid(DPMSolverMultistepScheduler(), 3, grid)
    scheduler = DPMSolverMultistepScheduler()
    set_grid(scheduler, 3, [900, 500, 100])
    assert scheduler.timesteps.tolist() == [900, 500, 100]
    with pytest.raises(UserError, match="DDIMScheduler cannot take a custom timestep grid"):
        set_grid(DDIMScheduler(), 3, [900, 500, 100])

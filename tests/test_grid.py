"""Learned timestep grids (`timetuner.fitting.grid`): the search, the fit, the table, the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from timetuner.fitting.api import fit
from timetuner.fitting.grid import GRID_POINT_LOSSES, _lattice_search

FAST = dict(samples=16, eval_samples=16, reference_steps=10, reference_n=500, e2e_iters=3)


def test_lattice_search_finds_the_minimum_within_its_budget_and_keeps_the_start_on_ties():
    calls = []

    def f(v):
        calls.append(v)
        return (v - 37) ** 2

    assert abs(_lattice_search(f, 0, 99, 50) - 37) <= 3 and len(calls) <= GRID_POINT_LOSSES
    assert _lattice_search(lambda v: 1.0, 0, 99, 50) == 50  # nothing strictly lower: the start stays
    assert _lattice_search(lambda v: -v, 10, 11, 10) in (10, 11)


class _CoupledSolver:
    """A stand-in solver whose 'final sample' is A·t for its grid t (A couples neighbouring points), so the loss
    RMS(A(t − t*)) has its minimum at t* and coordinate descent needs several sweeps to reach it."""

    name, flow, num_train_timesteps = "fake", False, 1000

    def __init__(self, grid):
        self.grid, self.evaluations = list(grid), len(grid)

    def with_grid(self, grid):
        return _CoupledSolver(grid)

    def rollout(self, noise):
        t = torch.tensor(self.grid[1:], dtype=torch.float64)
        return (t - 0.9 * torch.cat([t[1:], torch.zeros(1, dtype=torch.float64)])).reshape(1, -1)


def _learn_coupled(monkeypatch, budget: int, max_sweeps: int = 2):
    import timetuner.fitting.grid as grid_module
    from timetuner.fitting.method import FitInputs

    target = _CoupledSolver([900, 500, 300, 150, 60])  # the optimum t*, reachable only through several sweeps
    monkeypatch.setattr(grid_module, "GRID_EVALUATIONS", budget)
    monkeypatch.setattr(grid_module, "GRID_MAX_SWEEPS", max_sweeps)
    monkeypatch.setattr(grid_module, "named_grids", lambda solver: {"uniform": [900, 720, 540, 360, 180]})
    inputs = FitInputs(torch.zeros(1, 1), reference_final=target.rollout(None))
    grid, record = grid_module.learn_grid(_CoupledSolver([900, 720, 540, 360, 180]), inputs)
    return grid, record, grid_module.sweeps(target)


def test_the_grid_search_sweeps_again_while_points_move_as_far_as_its_budget_of_evaluations_allows(monkeypatch):
    sweep = 4 * (GRID_POINT_LOSSES - 1)  # ≤ 5 new losses for each of t_1 … t_4
    cost = 5 * sweep  # network evaluations per fit noise of one sweep at K = 5
    _, one, allowed = _learn_coupled(monkeypatch, budget=2 * cost - 1)  # one evaluation short of two sweeps: one
    assert allowed == one["sweeps"] == 1 and one["losses"] - 1 <= sweep  # the start grid is the 1
    _, two, allowed = _learn_coupled(monkeypatch, budget=2 * cost)  # two sweeps fit in the budget
    assert allowed == two["sweeps"] == 2 and two["losses"] - 1 <= 2 * sweep
    assert two["loss"] < 0.8 * one["loss"]  # the second sweep carries the coupled points closer to t*
    _, capped, allowed = _learn_coupled(monkeypatch, budget=100 * cost)  # GRID_MAX_SWEEPS caps it
    assert allowed == capped["sweeps"] == 2 and capped == two
    grid, many, allowed = _learn_coupled(monkeypatch, budget=100 * cost, max_sweeps=100)
    assert 2 < many["sweeps"] < allowed == 100  # a sweep that moved no point ended it
    assert many["losses"] - 1 <= many["sweeps"] * sweep and many["loss"] < two["loss"] <= two["loss_start"]
    assert grid[0] == 900 and grid == sorted(grid, reverse=True) and len(set(grid)) == 5
    assert _learn_coupled(monkeypatch, budget=100 * cost, max_sweeps=100)[0] == grid  # deterministic


def test_two_sweeps_up_to_seven_steps_one_at_eight_and_ten_the_default_fit_s_time():
    from timetuner.fitting.grid import sweeps

    assert [sweeps(_CoupledSolver(range(k, 0, -1))) for k in (3, 4, 5, 6, 7, 8, 10, 20)] == [2] * 5 + [1] * 3


def test_the_grid_and_e2e_loss_is_the_mean_per_sample_rms_distance_not_the_mse():
    from timetuner.fitting.method import sample_distance

    reference = torch.zeros(3, 1, 2, 2)
    final = torch.stack([torch.full((1, 2, 2), 0.1), torch.full((1, 2, 2), 0.2), torch.full((1, 2, 2), 3.0)])
    assert torch.allclose(sample_distance(final, reference), torch.tensor([0.1, 0.2, 3.0]))
    # the MSE is 99 % the one bad sample's; the mean RMS distance weighs each sample by its own error
    assert sample_distance(final, reference).mean() < 1.2 and (final - reference).pow(2).mean() > 3.0
    zero = torch.zeros(1, 1, 2, 2, requires_grad=True)
    sample_distance(zero, reference[:1]).sum().backward()
    assert torch.isfinite(zero.grad).all()  # finite at a perfect match


def test_learned_grid_lowers_the_fit_loss_and_travels_in_the_table(tiny_run, tmp_path):
    from diffusers import DDPMPipeline

    from timetuner import TauTable, TunedScheduler

    out = tmp_path / "g.safetensors"
    result = fit(str(tiny_run), out=out, progress=False, nfe=4, scheduler="dpm++", trajectory="learned", force=True,
                 **FAST)
    table = TauTable.load(out)
    grid = table.metadata["timesteps"]
    assert table.metadata["trajectory"] == "learned" and len(grid) == 4
    assert all(a > b for a, b in zip(grid, grid[1:], strict=False))
    record = table.metadata["learned_grid"]  # started from the best named grid; never worse than any of them
    assert record["start"] in record["start_losses"] and "ays" in record["start_losses"]
    assert record["loss"] <= record["loss_start"] == min(record["start_losses"].values())
    assert table.t.tolist() == [float(v) for v in grid]
    assert not out.with_name(out.name + ".partial.json").exists()
    # the pipeline runs the table's grid: its scheduler asks the network at τ, the solver steps on the learned t
    pipe = DDPMPipeline.from_pretrained(tiny_run)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, out)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.inner.timesteps.tolist() == grid
    assert torch.allclose(pipe.scheduler.timesteps.double(), result.tuned.tau.to(torch.float64), atol=1e-4)
    # eval's figures against the step count run the table's own grid at its step count
    from timetuner.core.solver import Solver
    from timetuner.measuring.evaluation import Setup, gap_versus_nfe

    grids, real = [], Solver.rollout

    def spy(self, noise, taus=None, keep_states=False, **options):
        grids.append(self.grid)
        return real(self, noise, taus, keep_states, **options)

    setup = Setup(str(out), str(tiny_run))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Solver, "rollout", spy)
        rows = gap_versus_nfe(setup, setup.yardstick(), [4], n=8, bootstrap=10)
    assert [r["nfe"] for r in rows] == [4] and grids and all(g == grid for g in grids)


def test_a_fit_resumes_with_its_learned_grid_without_learning_it_again(tiny_run, tmp_path, monkeypatch):
    import timetuner.fitting.grid as grid_module

    options = dict(FAST, nfe=3, scheduler="dpm++", trajectory="learned", force=True, progress=False)
    straight = fit(str(tiny_run), **options)
    out = tmp_path / "r.safetensors"
    fitting = sys.modules["timetuner.fitting.run"]
    saves = {"n": 0}
    real_save = fitting.Checkpoints.save

    def save_then_die(self, **state):
        real_save(self, **state)
        saves["n"] += 1
        if saves["n"] == 2:  # the grid's checkpoint, then the first e2e iteration's
            raise KeyboardInterrupt

    monkeypatch.setattr(fitting.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(str(tiny_run), out=out, **options)
    saved = json.loads(out.with_name(out.name + ".partial.json").read_text())
    # the searched grid (the e2e fit then moves it with τ: --grid-gradient, on by default here)
    assert saved["grid"] == straight.tuned.metadata["learned_grid"]["gradient"]["searched"] and saved["iteration"] == 1
    monkeypatch.setattr(fitting.Checkpoints, "save", real_save)
    monkeypatch.setattr(grid_module, "learn_grid", lambda *a, **k: pytest.fail("the grid was learned again"))
    resumed = fit(str(tiny_run), out=out, **options)
    assert torch.equal(resumed.tuned.tau, straight.tuned.tau)
    assert resumed.tuned.metadata["timesteps"] == straight.tuned.metadata["timesteps"]


def test_learned_grid_table_reproduces_the_fit_samples_after_save_pretrained_in_a_fresh_process(tiny_run, tmp_path):
    from diffusers import DDPMPipeline

    from timetuner import TunedScheduler
    from timetuner.core.solver import Solver

    out = tmp_path / "g.safetensors"
    result = fit(str(tiny_run), out=out, progress=False, nfe=3, scheduler="dpm++", trajectory="learned", force=True,
                 **FAST)
    pipe = DDPMPipeline.from_pretrained(tiny_run)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, out)
    pipe.save_pretrained(tmp_path / "saved")
    noise = torch.randn((4, 1, *[pipe.unet.config.sample_size] * 2), generator=torch.Generator().manual_seed(3))
    torch.save(noise, tmp_path / "noise.pt")
    from timetuner.core.denoiser import Denoiser

    solver = Solver.for_table(Denoiser(pipe.unet.eval()), pipe.scheduler.config, result.tuned)
    with torch.no_grad():
        expected = solver.rollout(noise, result.tuned.tau.float())
    script = f"""
import torch, timetuner
from diffusers import DDPMPipeline
from timetuner.core.solver import sample_images
pipe = DDPMPipeline.from_pretrained({str(tmp_path / 'saved')!r})
assert type(pipe.scheduler).__name__ == "TunedScheduler"
noise = torch.load({str(tmp_path / 'noise.pt')!r}, weights_only=True)
torch.save(sample_images(pipe.unet, pipe.scheduler, noise, 3), {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(got, expected.clamp(-1, 1), atol=1e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "unipc", "heun"])
def test_a_learned_grid_is_refused_for_solvers_that_take_no_explicit_grid(tiny_run, tmp_path, scheduler):
    from timetuner.errors import UserError

    with pytest.raises(UserError, match="'learned' is not available"):
        fit(str(tiny_run), out=tmp_path / "x.safetensors", progress=False, scheduler=scheduler,
            trajectory="learned", **FAST)
    assert not list(tmp_path.iterdir())


def test_an_identity_table_on_a_learned_grid_is_bitwise_the_plain_scheduler_on_that_grid(tiny_run):
    from diffusers import DPMSolverMultistepScheduler, UNet2DModel

    from timetuner import TauTable, TunedScheduler

    unet = UNet2DModel.from_pretrained(tiny_run, subfolder="unet").eval()
    config = DPMSolverMultistepScheduler.load_config(tiny_run, subfolder="scheduler")
    grid = [999, 640, 313, 71, 9]
    plain = DPMSolverMultistepScheduler.from_config(config, solver_order=2, algorithm_type="dpmsolver++")
    table = TauTable.identity(plain, 5, timesteps=grid, scheduler_name="dpm++", trajectory="learned")
    tuned = TunedScheduler.from_table(plain, table)
    plain = DPMSolverMultistepScheduler.from_config(plain.config)
    noise = torch.randn((2, 1, unet.config.sample_size, unet.config.sample_size),
                        generator=torch.Generator().manual_seed(0))
    outputs = []
    for scheduler, args in ((plain, {"timesteps": grid}), (tuned, {"num_inference_steps": 5})):
        scheduler.set_timesteps(**args)
        x = noise.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
        outputs.append(x)
    assert torch.equal(outputs[0], outputs[1])


def test_auto_hands_its_ranking_rollouts_to_the_grid_search_as_the_named_grids_losses(tiny_run):
    """auto's ranking rolls out DPM-Solver++ on its named grids already: the grid search takes those losses (the
    same figures its own rollouts give) instead of rolling the same grids out again."""
    from timetuner.core.loading import load_model
    from timetuner.fitting.auto import _to_tune, rank_candidates
    from timetuner.fitting.config import checked_config
    from timetuner.fitting.grid import named_grids
    from timetuner.fitting.method import FitInputs, sample_distance

    setup = load_model(str(tiny_run))
    config = checked_config(nfe=4, **FAST)
    ranked = rank_candidates(config, setup)
    run = _to_tune(ranked, config, setup)[0]["run"]
    known = run.known_grid_losses
    named = {tuple(g) for g in named_grids(run.solver).values()}
    assert known and set(known) <= named  # its named grids stepped on timesteps (not Karras / log-SNR sigmas)
    reference = run.reference(run.fit_noise, config.seed, run.solver)
    inputs = FitInputs(run.fit_noise, reference_final=reference)
    for grid, loss in known.items():  # the very figure the grid search's own rollout gives
        assert float(inputs.mean(sample_distance(run.solver.with_grid(list(grid)).rollout(run.fit_noise),
                                                 reference))) == loss
    from timetuner.fitting.grid import learn_grid

    with_known, record = learn_grid(run.solver, inputs, known)
    without, record_alone = learn_grid(run.solver, inputs)
    assert with_known == without and record["start"] == record_alone["start"]
    assert record["losses"] == record_alone["losses"] - len(known)
    from timetuner.fitting.grid import planned  # and the plan said before the fit leaves them out

    assert planned(run.solver, 1) - planned(run.solver, 1, known) == run.solver.evaluations * len(known)


# -- --grid-gradient: the grid moved by the e2e gradient with τ (LD3) ----------------------------------------------
def test_a_rollout_on_the_grid_s_own_times_is_bitwise_the_plain_one_and_differentiable_in_them(tiny_run):
    from diffusers import DDPMPipeline

    from timetuner.core.denoiser import Denoiser
    from timetuner.core.solver import Solver
    from timetuner.fitting.grid import takes_grid_gradient

    pipe = DDPMPipeline.from_pretrained(tiny_run)
    solver = Solver.named(Denoiser(pipe.unet.eval()), pipe.scheduler.config, "dpm++", "learned", 4)
    solver = solver.with_grid([900, 500, 200, 40])
    assert takes_grid_gradient(solver)
    noise = torch.randn((3, 1, *[pipe.unet.config.sample_size] * 2), generator=torch.Generator().manual_seed(1))
    taus = solver.t.float() + torch.tensor([3.0, -5.0, 2.0, 1.0])
    times = solver.t.clone().requires_grad_(True)
    moved = solver.rollout(noise, taus, times=times)
    assert torch.equal(moved.detach(), solver.rollout(noise, taus).detach())  # same σ at the integer grid
    moved.pow(2).mean().backward()
    assert torch.isfinite(times.grad).all() and (times.grad[1:] != 0).all()
    ddim = Solver.named(Denoiser(pipe.unet.eval()), pipe.scheduler.config, "ddim", "uniform", 4)
    assert not takes_grid_gradient(ddim)  # DDIM indexes ᾱ by integer timestep: no gradient in t


def test_grid_parameters_start_on_the_grid_stay_monotone_and_round_to_distinct_integers():
    from timetuner.fitting.grid import GridParameters, integer_grid

    grid = torch.tensor([830.0, 603.0, 381.0, 191.0, 44.0], dtype=torch.float64)
    params = GridParameters(grid)
    assert torch.allclose(params.times(params.logits.detach()), grid, rtol=0, atol=1e-3)
    assert torch.equal(params.start, params.logits.detach())
    for seed in range(5):  # any logits: strictly decreasing from the fixed t_0, above 0
        times = params.times(torch.randn(5, generator=torch.Generator().manual_seed(seed)) * 3)
        assert times[0] == 830 and (times[1:] < times[:-1]).all() and times[-1] > 0
    assert integer_grid([830.0, 603.4, 602.9, 0.2], 1000) == [830, 603, 602, 1]
    assert integer_grid([999.7, 2.2, 1.6, 0.4], 1000) == [999, 3, 2, 1]


def test_grid_gradient_moves_the_grid_with_tau_lowers_the_loss_and_the_table_runs_it(tiny_run, tmp_path):
    from diffusers import DDPMPipeline

    from timetuner import TauTable, TunedScheduler

    out = tmp_path / "g.safetensors"
    options = dict(FAST, nfe=4, scheduler="dpm++", trajectory="learned", force=True, e2e_iters=8)
    searched = fit(str(tiny_run), progress=False, grid_gradient=False, **options)
    result = fit(str(tiny_run), out=out, progress=False, grid_gradient=True, **options)
    table = TauTable.load(out)
    record = table.metadata["learned_grid"]["gradient"]
    grid = table.metadata["timesteps"]
    assert record["searched"] == searched.tuned.metadata["timesteps"] and record["grid"] == grid != record["searched"]
    assert all(isinstance(v, int) for v in grid) and all(a > b > 0 for a, b in zip(grid, grid[1:], strict=False))
    assert grid[0] == record["searched"][0]  # t_0 stays
    assert record["loss_after"] < record["loss_before"]
    assert record["loss_after"] <= searched.rows[0]["loss_after"] * 1.05  # not worse than τ alone on the search's grid
    assert table.t.tolist() == [float(v) for v in grid]
    pipe = DDPMPipeline.from_pretrained(tiny_run)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, out)
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.inner.timesteps.tolist() == grid
    assert torch.allclose(pipe.scheduler.timesteps.double(), result.tuned.tau.to(torch.float64), atol=1e-4)

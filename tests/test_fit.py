"""fit: strategies, objectives, optimisers, cached states, held-out verdict, checkpoint and resume."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline
from typer.testing import CliRunner

from timetuner import TauTable, TunedScheduler
from timetuner.cli.main import app
from timetuner.fitting.api import fit
from timetuner.fitting.search import adam_search, golden_search

tuning = importlib.import_module("timetuner.fitting.method")
search = importlib.import_module("timetuner.fitting.search")
evaluation = importlib.import_module("timetuner.measuring.evaluation")
fitting = importlib.import_module("timetuner.fitting.run")
# DDIM, named: the default (`auto`) tunes several solvers and has tests of its own
FAST = dict(scheduler="ddim", samples=16, eval_samples=16, reference_steps=10, reference_n=500, search_points=5,
            search_refine=4)
PAPER = dict(FAST, objective="paper")
runner = CliRunner()


def test_golden_search_finds_the_minimum_and_never_loses_to_the_start():
    x, fx = golden_search(lambda v: (v - 3.3) ** 2, 0.0, 10.0, start=5.0, points=7, refine=20)
    assert x == pytest.approx(3.3, abs=1e-2) and fx < 1e-4
    x, fx = golden_search(lambda v: abs(v - 5.0), 0.0, 10.0, start=5.0, points=4, refine=3)
    assert x == 5.0 and fx == 0.0


def test_adam_recipe_moves_tau_down_a_slope():
    tau, loss = adam_search(lambda tau: ((tau - 40.0) ** 2).reshape(1), t=50.0, iters=300, lr=2e-2, lo=0, hi=999)
    assert tau == pytest.approx(40.0, abs=0.5) and loss < 0.25


@pytest.mark.parametrize("scheduler", ["ddim", pytest.param("dpm2", marks=pytest.mark.slow),
                                       pytest.param("heun", marks=pytest.mark.slow)])
def test_sequential_paper_fit_lowers_every_per_step_loss(tiny_run, scheduler):
    result = fit(str(tiny_run), progress=False, nfe=3, **{**PAPER, "scheduler": scheduler})
    table = result.tuned
    assert len(result.rows) == table.nfe == len(table.tau)
    assert all(r["loss_after"] <= r["loss_before"] for r in result.rows)
    assert not table.is_identity
    assert {"x0_gap", "dist_gap", "data_fd"} <= set(result.held_out) and result.held_out["reference_n"] == 500
    assert table.metadata["model_hash"] and table.metadata["strategy"] == "sequential"


def test_sequential_cost_is_linear_in_the_number_of_evaluations(tiny_run, monkeypatch):
    # Held-out evaluation and reference costs scale with K too; count only what the per-τ fit spends.
    monkeypatch.setattr(fitting.Run, "verdict", lambda *a, **k: {"x0_gap": {"plain": 1.0, "tuned": 0.5}})
    costs = {}
    for nfe in (2, 6):
        costs[nfe] = fit(str(tiny_run), progress=False, nfe=nfe, **PAPER).network_evaluations
    # O(K) rollouts cost 3× from K=2 to K=6; re-rolling from x_T per candidate (the official code) would cost ~9×.
    assert costs[6] / costs[2] < 3.5


@pytest.mark.slow  # four fits (~28 s)
def test_parallel_strategy_uses_data_and_other_objectives_run(tiny_run):
    par = fit(str(tiny_run), progress=False, nfe=3, strategy="parallel", data="digits", **PAPER)
    assert par.tuned.metadata["strategy"] == "parallel" and len(par.rows) == 3
    teacher = fit(str(tiny_run), progress=False, nfe=3, objective="teacher", **FAST)
    assert all(r["loss_after"] <= r["loss_before"] for r in teacher.rows)
    e2e = fit(str(tiny_run), progress=False, nfe=3, objective="e2e", e2e_iters=3, **FAST)
    assert e2e.rows[0]["loss_after"] <= e2e.rows[0]["loss_before"]
    adam = fit(str(tiny_run), progress=False, nfe=2, optimizer="adam", adam_iters=3, **PAPER)
    assert adam.tuned.metadata["optimizer"] == "adam"


def test_not_better_on_held_out_writes_identity_unless_forced(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(fitting.Run, "verdict", lambda *a, **k: {"x0_gap": {"plain": 0.5, "tuned": 0.6}})
    result = fit(str(tiny_run), out=tmp_path / "t.safetensors", progress=False, nfe=2, **PAPER)
    assert not result.better and TauTable.load(tmp_path / "t.safetensors").is_identity
    forced = fit(str(tiny_run), out=tmp_path / "f.safetensors", progress=False, nfe=2, force=True, **PAPER)
    assert not TauTable.load(tmp_path / "f.safetensors").is_identity and not forced.better


@pytest.mark.slow  # three fits (~16 s)
def test_fit_checkpoints_after_every_tau_and_resumes(tiny_run, tmp_path, monkeypatch):
    straight = fit(str(tiny_run), progress=False, nfe=4, force=True, **PAPER)
    calls = {"n": 0}
    real = search.golden_search

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "r.safetensors"
    monkeypatch.setattr(search, "golden_search", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fit(str(tiny_run), out=out, progress=False, nfe=4, force=True, **PAPER)
    partial = json.loads(out.with_name(out.name + ".partial.json").read_text())
    assert len(partial["taus"]) == 2 and not out.exists()
    monkeypatch.setattr(search, "golden_search", real)
    resumed = fit(str(tiny_run), out=out, progress=False, nfe=4, force=True, **PAPER)
    assert resumed.network_evaluations < straight.network_evaluations
    assert torch.allclose(resumed.tuned.tau, straight.tuned.tau)
    assert not out.with_name(out.name + ".partial.json").exists()


def test_e2e_is_the_default_objective_and_checkpoints_its_iterations(tiny_run, tmp_path):
    out = tmp_path / "e.safetensors"
    result = fit(str(tiny_run), out=out, progress=False, nfe=2, e2e_iters=2, force=True, **FAST)
    assert result.tuned.metadata["objective"] == "e2e" and out.is_file()
    assert not out.with_name(out.name + ".partial.json").exists()


@pytest.mark.slow  # three fits (~15 s)
def test_an_interrupted_e2e_fit_resumes_to_the_same_table(tiny_run, tmp_path, monkeypatch):
    # Adam's moments and the best-so-far are checkpointed with δ, so the resumed run ends exactly where an
    # uninterrupted one does.
    options = dict(FAST, nfe=3, e2e_iters=6, force=True, progress=False)
    straight = fit(str(tiny_run), **options)
    real, saves = fitting.Checkpoints.save, {"n": 0}

    def save_then_die(self, **state):
        real(self, **state)
        saves["n"] += 1
        if saves["n"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "e.safetensors"
    monkeypatch.setattr(fitting.Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(str(tiny_run), out=out, **options)
    assert json.loads(out.with_name(out.name + ".partial.json").read_text())["iteration"] == 3
    monkeypatch.setattr(fitting.Checkpoints, "save", real)
    resumed = fit(str(tiny_run), out=out, **options)
    assert torch.equal(resumed.tuned.tau, straight.tuned.tau) and resumed.rows == straight.rows


@pytest.mark.slow  # four fits (~30 s each solver)
@pytest.mark.parametrize("scheduler", ["dpm++", "unipc"])
def test_multistep_solvers_fit_with_their_history_in_the_snapshot(tiny_run, scheduler):
    # Each candidate τ steps a deep copy of the solver state, model-output history included; e2e differentiates
    # through the multistep update.
    paper = fit(str(tiny_run), progress=False, nfe=4, **{**PAPER, "scheduler": scheduler})
    assert all(r["loss_after"] <= r["loss_before"] for r in paper.rows) and not paper.tuned.is_identity
    e2e = fit(str(tiny_run), progress=False, nfe=4, e2e_iters=3, **{**FAST, "scheduler": scheduler})
    assert e2e.rows[0]["loss_after"] <= e2e.rows[0]["loss_before"]
    assert e2e.tuned.metadata["trajectory"] == ("ays" if scheduler == "dpm++" else "uniform")


def test_fitted_table_changes_pipeline_output(tiny_run):
    result = fit(str(tiny_run), progress=False, nfe=3, force=True, **PAPER)
    pipe = DDPMPipeline.from_pretrained(tiny_run)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    plain = run()
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, result.tuned, unet=pipe.unet)
    assert not (run() == plain).all()


def test_cli_fit_json_and_table_file(tiny_run, tmp_path):
    out = tmp_path / "t.safetensors"
    result = runner.invoke(app, ["fit", "--model", str(tiny_run), "--nfe", "2", "--samples", "8", "--eval-samples",
                                 "8", "--reference-steps", "5", "--reference-n", "500", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.output.splitlines() if line.startswith('{"out"')))
    assert record["out"] == str(out) and len(record["tau"]) == 2 and "x0_gap" in record["held_out"]
    assert TauTable.load(out).nfe == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--scheduler", "plms"], "--scheduler 'plms'"),
        (["--trajectory", "cosine"], "--trajectory 'cosine'"),
        (["--objective", "magic"], "--objective 'magic'"),
        (["--strategy", "both"], "--strategy 'both'"),
        (["--nfe", "0"], "--nfe 0"),
        (["--nfe", "5000"], "--nfe 5000"),
        (["--strategy", "parallel", "--scheduler", "heun"], "--strategy parallel"),
        (["--model", "{tmp}"], "model_index.json"),
        (["--out", "{tmp}/table.txt"], ".safetensors"),
        (["--out", "{tmp}/no/such/dir/t.safetensors"], "does not exist or is not writable"),
    ],
)
def test_cli_fit_bad_input(tiny_run, tmp_path, args, needle):
    args = [a.format(tmp=tmp_path) for a in args]
    if "--model" not in args:
        args = ["--model", str(tiny_run), *args]
    result = runner.invoke(app, ["fit", *args, "--samples", "4", "--eval-samples", "4", "--reference-steps", "2"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and needle in lines[0], result.output
    assert not list(tmp_path.rglob("*.safetensors")) and not (tmp_path / "no").exists()


def test_sample_refuses_a_corrupt_table(tiny_run, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    result = runner.invoke(app, ["sample", "--model", str(tiny_run), "--table", str(bad), "--out",
                                 str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "not a readable safetensors" in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow  # twelve plain candidates, a grid and a τ fit (~30 s)
def test_auto_is_the_default_ranks_plain_candidates_tunes_the_best_solvers_and_judges_against_the_best_plain(
        tiny_run, tmp_path):
    from diffusers import DDPMPipeline

    from timetuner import TunedScheduler
    from timetuner.core.trajectories import TRAJECTORIES
    from timetuner.fitting.auto import AUTO_TUNED, CANDIDATES

    out = tmp_path / "auto.safetensors"
    result = fit(str(tiny_run), out=out, progress=False, nfe=3, e2e_iters=2, **{**FAST, "scheduler": None})
    table = TauTable.load(out)
    auto = table.metadata["auto"]
    gaps = [c["fit_x0_gap"] for c in auto["candidates"]]
    assert len(gaps) == len(CANDIDATES) and gaps == sorted(gaps)
    best = auto["candidates"][0]
    assert auto["best_plain"] == f"{best['scheduler']}-{best['trajectory']}"
    expected = []  # solvers taking a learned grid first (on one), then the others, each group by rank, each once
    learnable = [c for c in auto["candidates"] if "learned" in TRAJECTORIES[c["scheduler"]]]
    for c in learnable + [c for c in auto["candidates"] if c not in learnable]:
        if c["scheduler"] not in [scheduler for scheduler, _ in expected]:
            expected.append((c["scheduler"], "learned" if c in learnable else c["trajectory"]))
    assert [(c["scheduler"], c["trajectory"]) for c in auto["tuned"] if not c["coefficients"]] == expected[:AUTO_TUNED]
    # each tuned solver that takes learned coefficients is tuned a second time with them (timetuner.coefficients)
    with_coefficients = [(c["scheduler"], c["trajectory"]) for c in auto["tuned"] if c["coefficients"]]
    assert with_coefficients == [s for s in expected[:AUTO_TUNED] if s[0] in ("dpm++", "dpm++3m", "unipc", "deis")]
    assert auto["winner"].endswith("(tuned)") == result.better and "written" not in auto  # no --force
    if not result.better:  # the best plain candidate's solver and grid, τ = t
        assert table.is_identity and table.metadata["scheduler_name"] == best["scheduler"]
    assert not list(tmp_path.glob("*.partial.json"))
    pipe = DDPMPipeline.from_pretrained(tiny_run)  # ships DDPM: the table brings its own solver
    TunedScheduler.from_table(pipe.scheduler, table, unet=pipe.unet)


def test_auto_refuses_a_trajectory(tiny_run, tmp_path):
    result = runner.invoke(app, ["fit", "--model", str(tiny_run), "--scheduler", "auto", "--trajectory", "ays",
                                 "--out", str(tmp_path / "a.safetensors")])
    assert result.exit_code == 2 and "--scheduler auto chooses the solver" in result.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("objective", ["paper", pytest.param("e2e", marks=pytest.mark.slow)])
def test_fit_prints_its_plan_and_estimate_before_fitting_and_the_plan_is_close(tiny_run, capsys, objective):
    from timetuner.core.loading import load_model
    from timetuner.fitting.cost import plan

    options = dict(FAST, nfe=3, objective=objective, e2e_iters=3, force=True, seed=11)
    config = fitting.FitConfig(**options)
    planned = {p.key: p for p in plan(fitting.prepare(config, load_model(str(tiny_run))))}  # same cache state
    result = fit(str(tiny_run), progress=True, **options)
    err = capsys.readouterr().err
    first = next(line for line in err.splitlines() if "plan:" in line)
    assert "network evaluations" in first and "about" in first and "timed batch" in first
    assert err.index("plan:") < err.index("fit ddim nfe=3")  # before the fitting bar
    expected = sum(p.evaluations for key, p in planned.items() if key in ("references", "fitting") and not p.cached)
    assert 0.5 * result.fit_evaluations <= expected <= 2.0 * result.fit_evaluations


def test_e2e_iterations_default_to_fewer_on_a_learned_grid_and_an_explicit_number_stays():
    """On a learned grid (auto's, or --trajectory learned) τ starts close: 15 Adam iterations; else 40."""
    from timetuner.fitting.config import E2E_ITERS, E2E_ITERS_LEARNED_GRID, checked_config

    assert checked_config().e2e_iters == E2E_ITERS_LEARNED_GRID  # auto, the default
    assert checked_config(scheduler="dpm++", trajectory="learned").e2e_iters == E2E_ITERS_LEARNED_GRID
    assert checked_config(scheduler="ddim").e2e_iters == E2E_ITERS
    assert checked_config(scheduler="dpm++", trajectory="ays").e2e_iters == E2E_ITERS
    assert checked_config(e2e_iters=7).e2e_iters == 7 and E2E_ITERS_LEARNED_GRID < E2E_ITERS


def test_the_grid_gradient_is_on_wherever_it_applies_up_to_its_nfe_and_an_explicit_choice_stays():
    from timetuner.errors import UserError
    from timetuner.fitting.config import GRID_GRADIENT_MAX_NFE, checked_config

    small, large = GRID_GRADIENT_MAX_NFE, GRID_GRADIENT_MAX_NFE + 1
    assert checked_config(nfe=small).grid_gradient  # auto: its learned DPM-Solver++ grid
    assert not checked_config(nfe=large).grid_gradient  # τ alone on the searched grid (docs/results.md)
    assert checked_config(nfe=large, grid_gradient=True).grid_gradient
    assert checked_config(nfe=small, scheduler="dpm++3m", trajectory="learned").grid_gradient
    assert not checked_config(nfe=small, scheduler="dpm++", trajectory="learned", grid_gradient=False).grid_gradient
    assert not checked_config(nfe=small, scheduler="dpm2", trajectory="learned").grid_gradient  # KDPM2: none in t
    assert not checked_config(nfe=small, scheduler="dpm++", trajectory="learned", objective="paper").grid_gradient
    assert not checked_config(nfe=small, scheduler="dpm++", trajectory="ays").grid_gradient
    with pytest.raises(UserError, match="--grid-gradient"):
        checked_config(scheduler="dpm2", trajectory="learned", grid_gradient=True)
    import typing

    import timetuner.cli.fit as cli_fit  # its help states the reach without importing the constant (torch)
    option = typing.get_type_hints(cli_fit.fit, include_extras=True)["grid_gradient"].__metadata__[0]
    assert f"--nfe <= {GRID_GRADIENT_MAX_NFE};" in option.help
    # a default never refuses itself: a parallel fit is told what is wrong with it, not about --grid-gradient
    with pytest.raises(UserError, match="--strategy parallel"):
        checked_config(nfe=small, scheduler="dpm++", trajectory="learned", strategy="parallel", objective="e2e")

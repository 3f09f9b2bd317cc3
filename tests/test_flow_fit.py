"""`fit` on flow-matching models: the solver steps as the flow schedulers do, ε from the velocity, the flow
reference, every objective, `auto` ranking the plain flow setups, and tables that load into the model's pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler
from typer.testing import CliRunner

from tests.conftest import tiny_config
from timetuner import TunedScheduler
from timetuner.cli.main import app
from timetuner.core.loading import load_model
from timetuner.core.reference import reference_trajectory
from timetuner.core.solver import Solver
from timetuner.core.trajectories import make_scheduler
from timetuner.errors import UserError
from timetuner.fitting.api import fit
from timetuner.fitting.grid import takes_grid_gradient

FAST = dict(samples=8, eval_samples=16, eval_gap_samples=8, reference_steps=10, reference_n=64, search_points=5,
            search_refine=4)
runner = CliRunner()


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """A finished 20-step digits-tiny rectified-flow run (DDPMPipeline + FlowMatchEulerDiscreteScheduler)."""
    from timetuner.trainers import train

    return train(tiny_config(tmp_path_factory.mktemp("flow") / "run", objective="flow"))


class Velocity:
    """A denoiser whose velocity is exact for one known (x0, ε): v = ε − x0, whatever the input."""

    device = torch.device("cpu")

    def __init__(self, x0, eps):
        self.x0, self.eps, self.calls = x0, eps, []

    def __call__(self, x, t):
        self.calls.append(float(torch.as_tensor(t).reshape(-1)[0]))
        return self.eps - self.x0


def test_flow_solver_is_euler_in_sigma_and_recovers_epsilon():
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    den = Velocity(x0, eps)
    solver = Solver(den, FlowMatchEulerDiscreteScheduler(shift=3.0), 5)
    assert solver.flow and solver.init_noise_sigma == 1.0 and not takes_grid_gradient(solver)
    final = solver.rollout(eps)  # the straight path from ε lands on x0 exactly
    assert torch.allclose(final, x0, atol=1e-5)
    sched = solver.fresh()
    x = (1 - sched.sigmas[2]) * x0 + sched.sigmas[2] * eps
    assert torch.allclose(solver.eps_at(sched, x, 2), eps, atol=1e-5)  # ε = x + (1 − σ) v
    assert den.calls[:5] == pytest.approx(solver.t.tolist(), abs=1e-3)  # the network saw σ·T


def test_flow_reference_trajectory_is_euler_on_the_joined_grid():
    x0, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    solver = Solver(Velocity(x0, eps), FlowMatchEulerDiscreteScheduler(), 4)
    states = reference_trajectory(solver, eps, steps=20)
    sigmas = solver.fresh().sigmas
    for state, sigma in zip(states, sigmas, strict=True):  # on the straight path at every few-step time
        assert torch.allclose(state, (1 - sigma) * x0 + sigma * eps, atol=1e-5)


def test_flow_solvers_refuse_ddpm_models_and_the_reverse():
    with pytest.raises(UserError, match="--scheduler ddim does not sample a flow-matching model like this one; "
                                        "accepted: flow-"):
        make_scheduler("ddim", FlowMatchEulerDiscreteScheduler().config)
    with pytest.raises(UserError, match="--scheduler flow-euler does not sample a DDPM-style model like this one; "
                                        "accepted: ddim"):
        make_scheduler("flow-euler", DDIMScheduler().config)
    dpm = make_scheduler("flow-dpm++", FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert dpm.config.use_flow_sigmas and dpm.config.flow_shift == 3.0
    assert dpm.config.prediction_type == "flow_prediction"


@pytest.mark.parametrize("objective", ["e2e", "paper", "teacher"])
def test_every_objective_fits_a_flow_model_and_the_table_loads_into_its_pipeline(flow_run, objective):
    result = fit(str(flow_run), progress=False, nfe=3, scheduler="flow-euler", objective=objective,
                 e2e_iters=3, force=True, **FAST)
    table = result.tuned
    assert table.scheduler_class == "FlowMatchEulerDiscreteScheduler" and not table.is_identity
    assert float(table.t[0]) == pytest.approx(1000.0) and (table.tau >= 0).all() and (table.tau <= 1000).all()
    pipe = DDPMPipeline.from_pretrained(flow_run)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table)
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    assert torch.allclose(pipe.scheduler.timesteps.double(), table.tau, atol=1e-4)


@pytest.mark.parametrize("objective", ["paper", "teacher"])
def test_the_parallel_strategy_fits_a_flow_model_from_its_forward_process(flow_run, objective):
    from timetuner.fitting.method import FitInputs, Parallel

    model = load_model(str(flow_run))
    solver = Solver.named(model.denoiser, model.base_config, "flow-euler", None, 3)
    x0 = torch.rand((4, 1, 8, 8)) * 2 - 1
    parallel = Parallel(solver, FitInputs(torch.zeros_like(x0), x0=x0), seed=0)
    for k in range(3):  # x_σ = (1 − σ_k) x0 + σ_k ε, with the scheduler positioned at k
        sched, x = parallel.state(k)
        sigma = float(solver.fresh().sigmas[k])
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7 + 1_000_003 * k))  # ε of evaluation k
        assert torch.allclose(x, (1 - sigma) * x0 + sigma * eps, atol=1e-6)
    result = fit(str(flow_run), progress=False, nfe=3, scheduler="flow-euler", strategy="parallel",
                 objective=objective, data="digits", force=True, **FAST)
    table = result.tuned
    assert table.metadata["strategy"] == "parallel" and not table.is_identity and len(result.rows) == 3
    pipe = DDPMPipeline.from_pretrained(flow_run)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table)
    assert pipe(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 8, 8, 1)


def test_auto_ranks_the_plain_flow_setups(flow_run):
    result = fit(str(flow_run), progress=False, nfe=3, e2e_iters=2, **FAST)
    record = result.table.metadata["auto"]
    names = {(c["scheduler"], c["trajectory"]) for c in record["candidates"]}
    assert all(s.startswith("flow-") for s, _ in names)
    assert {("flow-euler", "uniform"), ("flow-euler", "shift3"), ("flow-dpm++", "uniform"),
            ("flow-unipc", "uniform")} <= names and ("flow-euler", "shift1") not in names  # shift 1 is its own
    assert result.table.scheduler_class in ("FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                            "UniPCMultistepScheduler")


@pytest.mark.parametrize(("args", "needle"), [
    (["--scheduler", "ddim"], "--scheduler ddim does not sample a flow-matching model"),
    (["--strategy", "parallel", "--scheduler", "flow-unipc"], "--strategy parallel needs a solver whose evaluations"),
])
def test_fit_on_a_flow_model_refuses_ddpm_only_settings_in_one_line(flow_run, args, needle):
    result = runner.invoke(app, ["fit", "--model", str(flow_run), *args])
    assert result.exit_code == 2 and needle in result.output and len(result.output.strip().splitlines()) == 1


def test_the_embedded_flow_model_is_a_plain_diffusers_flow_pipeline():
    from timetuner.core.loading import resolve_model

    folder = resolve_model("digits-flow")
    pipe = DDPMPipeline.from_pretrained(folder)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 1.0
    assert sum(p.numel() for p in pipe.unet.parameters()) == 1_112_801  # the digits preset, as digits-ddpm


@pytest.mark.parametrize("name", ["flow-euler", "flow-unipc"])
def test_a_flow_solver_s_named_sigma_grids_are_learned_grids_that_run_the_same_sigmas(name):
    from timetuner.core.trajectories import TRAJECTORIES
    from timetuner.fitting.grid import named_grids

    base = FlowMatchEulerDiscreteScheduler(shift=3.0).config  # a shifted model: the grids are handed pre-shift
    den = Velocity(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    learned = Solver.named(den, base, name, "learned", 6)
    grids = named_grids(learned)
    assert set(grids) == set(TRAJECTORIES[name]) - {"learned"} and grids["uniform"] == learned.grid
    for trajectory, grid in grids.items():
        plain = Solver.named(den, base, name, trajectory, 6).fresh().sigmas
        assert grid[0] == 1.0 and torch.allclose(learned.with_grid(grid).fresh().sigmas, plain, atol=2e-7, rtol=0)


def test_a_learned_sigma_grid_is_fitted_on_a_flow_model_and_replays_in_its_pipeline(flow_run):
    result = fit(str(flow_run), progress=False, nfe=4, scheduler="flow-unipc", trajectory="learned", e2e_iters=2,
                 force=True, **FAST)
    table, record = result.tuned, result.tuned.metadata["learned_grid"]
    assert table.metadata["trajectory"] == "learned" and table.scheduler_class == "UniPCMultistepScheduler"
    sigmas = table.sigmas
    assert len(sigmas) == 4 and sigmas[0] == 1.0 and sigmas == sorted(sigmas, reverse=True) and sigmas[-1] > 0
    assert record["loss"] <= record["loss_start"] and record["start"] in ("uniform", "shift3")
    assert "timesteps" not in table.metadata  # a flow grid is a σ grid
    pipe = DDPMPipeline.from_pretrained(flow_run)  # ships FlowMatchEuler: the table brings its UniPC on its σ grid
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table)
    pipe.scheduler.set_timesteps(4)
    solver = Solver.for_table(Velocity(0, 0), pipe.scheduler.inner.config, table)
    assert torch.equal(pipe.scheduler.inner.sigmas, solver.fresh().sigmas)
    assert torch.allclose(pipe.scheduler.inner.sigmas[:4].double(), torch.tensor(sigmas, dtype=torch.float64),
                          atol=1e-6)  # shift 1: the grid is the σ the solver runs (UniPC's first is 1 − 1e-6)
    assert pipe(batch_size=2, num_inference_steps=4, output_type="np").images.shape == (2, 8, 8, 1)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
def test_a_learned_sigma_grid_under_a_dynamic_shift_inverts_the_shift_at_its_mu(time_shift_type):
    from timetuner.core.trajectories import build

    dynamic = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type=time_shift_type).config
    with pytest.raises(UserError, match="shifts its sigmas by the image size .* and no mu is known"):
        build("flow-euler", "learned", dynamic, 5)
    sched, grid = build("flow-euler", "learned", dynamic, 5, mu=0.9)
    plain, handed = (FlowMatchEulerDiscreteScheduler.from_config(dynamic) for _ in range(2))
    plain.set_timesteps(5, mu=0.9)
    handed.set_timesteps(sigmas=grid, mu=0.9)  # the start grid, shifted at mu, is the solver's own σ
    assert torch.allclose(handed.sigmas, plain.sigmas, atol=1e-6)
    unipc, grid = build("flow-unipc", "learned", dynamic, 5, mu=0.9)  # UniPC shifts handed σ by mu the same way
    plain, handed = (type(unipc).from_config(unipc.config) for _ in range(2))
    plain.set_timesteps(5, mu=0.9)
    handed.set_timesteps(sigmas=np.array(grid), mu=0.9)
    assert torch.allclose(handed.sigmas, plain.sigmas, atol=1e-6)


@pytest.mark.parametrize(("config", "needle"), [
    (dict(shift=3.0, shift_terminal=0.1), "stretches its sigmas to a terminal sigma"),
    (dict(shift=3.0, use_karras_sigmas=True), "use_karras_sigmas=True, which rebuilds the sigmas"),
    (dict(shift=3.0, use_beta_sigmas=True), "use_beta_sigmas=True, which rebuilds the sigmas"),
    (dict(shift=3.0, invert_sigmas=True), "invert_sigmas=True, which rebuilds the sigmas"),
])
def test_a_learned_sigma_grid_is_refused_where_the_scheduler_would_not_run_it(config, needle):
    from timetuner.core.trajectories import build
    from timetuner.fitting.auto import takes_learned_grid

    base = FlowMatchEulerDiscreteScheduler(**config).config
    with pytest.raises(UserError, match=needle):
        build("flow-euler", "learned", base, 5)
    assert not takes_learned_grid("flow-euler", base, 5, None)  # auto tunes τ on a named grid there instead
    assert takes_learned_grid("flow-euler", FlowMatchEulerDiscreteScheduler(shift=3.0).config, 5, None)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A tiny Stable Diffusion 3 pipeline saved to a folder (`timetuner.tiny.save_sd3`), static shift 3."""
    from timetuner.tiny import save_sd3

    return save_sd3(tmp_path_factory.mktemp("sd3"), FlowMatchEulerDiscreteScheduler(shift=3.0))


def test_fit_tunes_a_stable_diffusion_3_transformer_and_the_table_runs_in_its_pipeline(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    from timetuner.core.denoiser import text_conditioning
    from timetuner.core.loading import load_model

    model = load_model(str(sd3_folder))
    assert model.flow and model.kind == "text"
    cond = text_conditioning(model.pipeline, ["a cat", "a dog"], 3)
    pe, _, pooled, _ = model.pipeline.encode_prompt(["a cat", "a dog"], None, None, negative_prompt=["", ""])
    assert torch.allclose(cond.values[:, :-1], pe, atol=1e-4) and torch.allclose(cond.values[:, -1, :8], pooled,
                                                                                   atol=1e-4)
    assert not cond.values[:, -1, 8:].any()  # the pooled row, zero-padded to the embeddings' width
    pe, pooled = cond.values[:, :-1], cond.values[:, -1, :8]
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 600.0)
    own = model.network(hidden_states=x, timestep=t, encoder_hidden_states=pe[[0, 1, 0]],
                        pooled_projections=pooled[[0, 1, 0]]).sample
    assert torch.equal(model.denoiser.bind(cond)(x, t), own)  # the pipeline's own call, unguided

    result = fit(str(sd3_folder), progress=False, nfe=3, scheduler="flow-euler", e2e_iters=2, force=True,
                 prompts=("a cat",), eval_prompts=("a dog",), guidance_scale=3.0, **FAST)
    table = result.tuned
    assert table.scheduler_class == "FlowMatchEulerDiscreteScheduler" and not table.is_identity
    assert table.metadata["guidance_scale"] == 3.0
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a dog", num_inference_steps=3, guidance_scale=3.0, height=8, width=8, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table, unet=pipe.transformer, guidance_scale=3.0)
    tuned = pipe("a dog", num_inference_steps=3, guidance_scale=3.0, height=8, width=8, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert tuned.shape == plain.shape == (1, 8, 8, 3) and not (tuned == plain).all()

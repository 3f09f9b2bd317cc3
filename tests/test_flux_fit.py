"""`fit` on Flux transformers: the denoiser is FluxPipeline's own call (packed latents, position ids, distilled
guidance, σ as time), the fit's plain solver is the pipeline's loop at its σ grid and `mu`, and a fitted table runs
in FluxPipeline at the resolution it was fitted for and refuses another."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from typer.testing import CliRunner

from tests.test_flow_fit import FAST
from timetuner import TunedScheduler
from timetuner.cli.main import app
from timetuner.core.denoiser import refuse_integer_timesteps, text_conditioning
from timetuner.core.loading import load_model, state_side
from timetuner.core.solver import Solver
from timetuner.errors import UserError
from timetuner.fitting.api import fit
from timetuner.tiny import save_flux

SIDE = 16  # pixels; the tiny VAE's factor is 1, so 16×16 latents packed into 8·8 tokens
runner = CliRunner()


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """Flux.1-dev-like: a guidance embedding, a scheduler that shifts by image size (its own seq-len settings)."""
    return save_flux(tmp_path_factory.mktemp("flux"), True, FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256))


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    """Flux.1-schnell-like: no guidance embedding, a static shift of 1 (FluxPipeline still passes its σ and mu)."""
    return save_flux(tmp_path_factory.mktemp("schnell"), False, FlowMatchEulerDiscreteScheduler(shift=1.0))


def _pack(x):
    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def test_the_fit_s_plain_solver_is_flux_pipeline_s_own_loop(flux_folder):
    model = load_model(str(flux_folder))
    assert model.flow and model.kind == "text"
    model.denoiser.sample_size = state_side(model, SIDE)
    assert model.denoiser.sample_shape == (4, SIDE, SIDE)
    cond = text_conditioning(model.pipeline, ["a cat", "a dog"], 2)
    embeds, pooled, _ = model.pipeline.encode_prompt(["a cat", "a dog"], None, max_sequence_length=512)
    assert torch.allclose(cond.values[:, :-1], embeds, atol=1e-4) and torch.allclose(cond.values[:, -1, :8], pooled)
    den = model.denoiser.bind(cond)
    den.guidance_scale = 2.5
    assert not den.guided  # distilled: one call per evaluation, not a CFG batch
    solver = Solver.named(den, model.base_config, "flow-euler", None, 3)
    assert solver.grid == pytest.approx([1.0, 2 / 3, 1 / 3]) and solver.mu is not None
    noise = torch.randn((2, 4, SIDE, SIDE), generator=torch.Generator().manual_seed(1))
    before = den.evaluations
    ours = solver.rollout(noise)
    assert den.evaluations - before == 2 * 3
    theirs = model.pipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=3, height=SIDE,
                            width=SIDE, guidance_scale=2.5, latents=_pack(noise), output_type="latent").images
    assert torch.allclose(_pack(ours), theirs, atol=1e-5)
    # DPM-Solver++ on flow sigmas as a user swaps it into FluxPipeline: the same mu (from the pipeline's config)
    dpm = Solver.named(den, model.base_config, "flow-dpm++", None, 3)
    assert dpm.mu == pytest.approx(solver.mu) and dpm.grid is None  # the pipeline passes no σ with flow sigmas
    model.pipeline.scheduler = type(dpm.template).from_config(model.base_config, **dict(dpm.template.config))
    theirs = model.pipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=3, height=SIDE,
                            width=SIDE, guidance_scale=2.5, latents=_pack(noise), output_type="latent").images
    assert torch.allclose(_pack(dpm.rollout(noise)), theirs, atol=1e-5)
    with pytest.raises(UserError, match="--scheduler flow-heun cannot shift by image size"):
        Solver.named(den, model.base_config, "flow-heun", None, 3)


def test_schnell_samples_at_flux_pipeline_s_sigmas_without_guidance(schnell_folder):
    model = load_model(str(schnell_folder))
    model.denoiser.sample_size = SIDE
    cond = text_conditioning(model.pipeline, ["a cat"], 1)
    den = model.denoiser.bind(cond)
    solver = Solver.named(den, model.base_config, "flow-euler", None, 4)
    assert solver.grid == pytest.approx([1.0, 0.75, 0.5, 0.25]) and solver.mu is None  # static shift: no mu
    noise = torch.randn((1, 4, SIDE, SIDE), generator=torch.Generator().manual_seed(2))
    embeds, pooled = cond.values[:, :-1], cond.values[:, -1, :8]
    theirs = model.pipeline(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=4, height=SIDE,
                            width=SIDE, latents=_pack(noise), output_type="latent").images
    assert torch.allclose(_pack(solver.rollout(noise)), theirs, atol=1e-5)
    with pytest.raises(UserError, match="passes mu on every call, which DPMSolverMultistepScheduler takes only"):
        Solver.named(den, model.base_config, "flow-dpm++", None, 4)
    result = runner.invoke(app, ["fit", "--model", str(schnell_folder), "--resolution", "16", "--guidance-scale", "3"])
    assert result.exit_code == 2 and "has no guidance embedding" in result.output


def test_a_bfloat16_flux_passes_the_fractional_time_probe(flux_folder):
    model = load_model(str(flux_folder), torch_dtype=torch.bfloat16)
    model.denoiser.sample_size = SIDE
    den = model.denoiser.bind(text_conditioning(model.pipeline, ["a cat"], 1))
    refuse_integer_timesteps(den)  # 500 and 500.5 are one bfloat16; the probe moves to where they are two


def test_fit_tunes_a_flux_transformer_and_the_table_runs_at_its_resolution_only(flux_folder, tmp_path):
    from timetuner.measuring.evaluation import Setup

    result = fit(str(flux_folder), progress=False, nfe=3, scheduler="flow-euler", e2e_iters=2, force=True,
                 prompts=("a cat",), eval_prompts=("a dog",), resolution=SIDE, **FAST)
    table = result.tuned
    assert not table.is_identity and table.metadata["guidance_scale"] == 3.5  # FluxPipeline's default
    assert table.sigmas == pytest.approx([1.0, 2 / 3, 1 / 3]) and table.mu is not None
    table.save(tmp_path / "tau.safetensors")  # eval samples at the size it was fitted at (its mu)
    assert Setup(str(tmp_path / "tau.safetensors"), str(flux_folder)).sampler.mu == pytest.approx(table.mu)
    pipe = FluxPipeline.from_pretrained(flux_folder)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a dog", num_inference_steps=3, height=SIDE, width=SIDE, output_type="np")
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table, unet=pipe.transformer, guidance_scale=3.5)
    tuned = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert tuned.shape == plain.shape == (1, SIDE, SIDE, 3) and not (tuned == plain).all()
    with pytest.raises(UserError, match="mu follows the image size"):
        pipe(**dict(call, height=2 * SIDE, width=2 * SIDE))


@pytest.mark.parametrize("scheduler", ["flow-euler", "flow-unipc"])
def test_a_learned_sigma_grid_at_flux_s_mu_runs_in_flux_pipeline_as_fitted(flux_folder, scheduler):
    result = fit(str(flux_folder), progress=False, nfe=3, scheduler=scheduler, trajectory="learned", e2e_iters=2,
                 force=True, prompts=("a cat",), eval_prompts=("a dog",), resolution=SIDE, **FAST)
    table = result.tuned
    record = table.metadata["learned_grid"]  # searched from the best named grid at the pipeline's mu
    assert table.mu is not None and record["loss"] <= min(record["start_losses"].values())
    if scheduler == "flow-euler":  # FluxPipeline passes its linspace to Euler: the learned grid replaces it
        assert table.metadata["pipeline_sigmas"] == pytest.approx([1.0, 2 / 3, 1 / 3])
        assert {"pipeline", "uniform", "karras"} <= set(record["start_losses"])
    else:  # and no σ to a scheduler on flow sigmas: the table's grid is what it runs
        assert "pipeline_sigmas" not in table.metadata
    model = load_model(str(flux_folder))
    model.denoiser.sample_size = SIDE
    cond = text_conditioning(model.pipeline, ["a dog"], 1)
    den = model.denoiser.bind(cond)
    den.guidance_scale = 3.5
    solver = Solver.for_table(den, model.base_config, table)
    assert solver.grid == pytest.approx(table.sigmas) and solver.mu == pytest.approx(table.mu)
    noise = torch.randn((1, 4, SIDE, SIDE), generator=torch.Generator().manual_seed(3))
    ours = solver.rollout(noise, taus=table.tau, coefficients=table.coefficients)
    pipe = model.pipeline  # FluxPipeline passes linspace(1, 1/N, N) and its mu: the table runs its own grid there
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table, unet=pipe.transformer, guidance_scale=3.5)
    embeds, pooled = cond.values[:, :-1], cond.values[:, -1, :8]
    theirs = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=3, height=SIDE, width=SIDE,
                  guidance_scale=3.5, latents=_pack(noise), output_type="latent").images
    assert torch.allclose(_pack(ours), theirs, atol=1e-5)
    if scheduler == "flow-unipc":
        return  # FluxPipeline hands a scheduler on flow sigmas no σ at all, a caller's own included
    custom = [1.0, 0.5, 0.25]  # a σ grid of the caller's own runs plainly
    pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, sigmas=custom, num_inference_steps=3, height=SIDE,
         width=SIDE, latents=_pack(noise), output_type="latent")
    assert pipe.scheduler.inner.sigmas[:3].tolist() != pytest.approx(solver.fresh().sigmas[:3].tolist())


def test_auto_on_flux_ranks_the_setups_that_follow_its_mu(flux_folder):
    result = fit(str(flux_folder), progress=False, nfe=3, e2e_iters=2, prompts=("a cat",), eval_prompts=("a dog",),
                 resolution=SIDE, **FAST)
    names = {(c["scheduler"], c["trajectory"]) for c in result.table.metadata["auto"]["candidates"]}
    assert {("flow-euler", "uniform"), ("flow-dpm++", "uniform"), ("flow-unipc", "uniform")} <= names
    assert not any(t in ("shift1", "shift3", "learned") for _, t in names)  # Flux's shift is the pipeline's mu
    pipe = FluxPipeline.from_pretrained(flux_folder)  # the winner's table, whatever its solver, runs in the pipeline
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, result.tuned, unet=pipe.transformer, guidance_scale=3.5)
    assert type(pipe.scheduler.inner).__name__ == result.tuned.scheduler_class
    images = pipe("a dog", num_inference_steps=3, height=SIDE, width=SIDE, output_type="np").images
    assert images.shape == (1, SIDE, SIDE, 3) and np.isfinite(images).all()


def test_a_table_fitted_at_height_by_width_runs_in_flux_pipeline_as_fitted_at_that_size_only(flux_folder, tmp_path):
    from timetuner.measuring.evaluation import Setup

    size = (SIDE, 2 * SIDE)  # height × width: 8·16 tokens, another mu than the square's
    result = fit(str(flux_folder), progress=False, nfe=3, scheduler="flow-euler", e2e_iters=2, force=True,
                 prompts=("a cat",), eval_prompts=("a dog",), resolution=size, **FAST)
    table = result.tuned
    assert list(table.metadata["fit_config"]["resolution"]) == list(size) and not table.is_identity
    table.save(tmp_path / "tau.safetensors")  # eval samples at the size it was fitted at
    setup = Setup(str(tmp_path / "tau.safetensors"), str(flux_folder))
    assert setup.den.sample_shape == (4, *size) and setup.sampler.mu == pytest.approx(table.mu)
    model = load_model(str(flux_folder))
    model.denoiser.sample_size = state_side(model, size)
    cond = text_conditioning(model.pipeline, ["a dog"], 1)
    den = model.denoiser.bind(cond)
    den.guidance_scale = 3.5
    noise = torch.randn((1, 4, *size), generator=torch.Generator().manual_seed(5))
    ours = Solver.for_table(den, model.base_config, table).rollout(noise, taus=table.tau,
                                                                 coefficients=table.coefficients)
    pipe = model.pipeline
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table, unet=pipe.transformer, guidance_scale=3.5)
    call = dict(prompt_embeds=cond.values[:, :-1], pooled_prompt_embeds=cond.values[:, -1, :8], num_inference_steps=3,
                guidance_scale=3.5, latents=_pack(noise), output_type="latent")
    theirs = pipe(**call, height=SIDE, width=2 * SIDE).images  # FluxPipeline's mu at this size is the table's
    assert torch.allclose(_pack(ours), theirs, atol=1e-5)
    with pytest.raises(UserError, match="mu follows the image size"):
        pipe(**dict(call, latents=None), height=2 * SIDE, width=2 * SIDE)


@pytest.mark.parametrize(("args", "needle"), [
    (["--resolution", "15"], "--resolution 15 is not a multiple of 2"),
    (["--resolution", "16x15"], "--resolution 16x15 is not a multiple of 2"),
    (["--resolution", "16x"], "--resolution 16x is invalid"),
    (["--resolution", "0"], "--resolution 0 is invalid"),
    (["--negative-prompt", "blurry", "--resolution", "16"], "distils guidance into the network"),
    (["--scheduler", "flow-euler", "--trajectory", "shift3", "--resolution", "16"],
     "--trajectory shift3 needs a static shift"),
])
def test_fit_on_flux_refuses_what_does_not_apply_in_one_line(flux_folder, args, needle):
    result = runner.invoke(app, ["fit", "--model", str(flux_folder), "--nfe", "3", *args])
    assert result.exit_code == 2 and needle in result.output and len(result.output.strip().splitlines()) == 1

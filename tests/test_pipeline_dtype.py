"""The fit's loop is the pipeline's own `__call__` in the dtype the user runs, float32 and bfloat16: guided SD3 at
patch 2 with a dynamic shift, and Flux (both keep their latents in the prompt embeddings' dtype and cast each new
state back to it); and a table with learned coefficients replays in both pipelines as the fit's solver runs it."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from timetuner import TauTable, TunedScheduler
from timetuner.core.denoiser import text_conditioning
from timetuner.core.loading import load_model
from timetuner.core.solver import Solver

PROMPTS = ["a cat", "a dog"]
SIDE = 8  # latents (the tiny VAE's factor is 1)


def _dynamic():
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=4,
                                           max_image_seq_len=64)


@pytest.fixture(scope="module")
def sd3_patch2_folder(tmp_path_factory):
    """A tiny SD3 pipeline with a 2×2 patch and a scheduler that shifts by image size (SD3.5-like), saved."""
    from timetuner.tiny import save_sd3

    return save_sd3(tmp_path_factory.mktemp("sd3p2"), _dynamic(), patch_size=2)


@pytest.fixture(scope="module")
def flux_dynamic_folder(tmp_path_factory):
    from timetuner.tiny import save_flux

    return save_flux(tmp_path_factory.mktemp("fluxdt"), True, _dynamic())


def _pack(x):
    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def _sd3(folder, dtype, scale: float = 3.0):
    model = load_model(str(folder), torch_dtype=dtype)
    model.denoiser.sample_size = SIDE
    den = model.denoiser.bind(text_conditioning(model.pipeline, PROMPTS, 2))
    den.guidance_scale = scale
    return model, den


def _sd3_call(model, noise, dtype, steps: int = 4):
    return model.pipeline(PROMPTS, num_inference_steps=steps, guidance_scale=3.0, height=SIDE, width=SIDE,
                          latents=noise.to(dtype), output_type="latent").images


def _flux(folder, dtype):
    model = load_model(str(folder), torch_dtype=dtype)
    model.denoiser.sample_size = SIDE
    den = model.denoiser.bind(text_conditioning(model.pipeline, PROMPTS, 2))
    den.guidance_scale = 3.5
    return model, den


def _flux_call(model, noise, dtype, steps: int = 4):
    return model.pipeline(PROMPTS, num_inference_steps=steps, guidance_scale=3.5, height=SIDE, width=SIDE,
                          latents=_pack(noise).to(dtype), output_type="latent").images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_fit_s_guided_sd3_loop_is_the_pipeline_s_call_at_patch_2_with_a_dynamic_shift(sd3_patch2_folder, dtype):
    model, den = _sd3(sd3_patch2_folder, dtype)
    assert den.guided and den.patch == 2
    solver = Solver.named(den, model.base_config, "flow-euler", None, 4)
    assert solver.mu is not None  # the shift by image size, from the token count at patch 2
    noise = torch.randn((2, 4, SIDE, SIDE), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = solver.rollout(noise)
    theirs = _sd3_call(model, noise, dtype)
    assert ours.dtype == theirs.dtype == dtype  # the states are kept in the pipeline's dtype
    if dtype == torch.bfloat16:
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_fit_s_flux_loop_is_the_pipeline_s_call(flux_dynamic_folder, dtype):
    model, den = _flux(flux_dynamic_folder, dtype)
    solver = Solver.named(den, model.base_config, "flow-euler", None, 4)
    noise = torch.randn((2, 4, SIDE, SIDE), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = _pack(solver.rollout(noise))
    theirs = _flux_call(model, noise, dtype)
    assert ours.dtype == theirs.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.equal(ours, theirs)
    else:
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def _with_coefficients(solver, seed: int):
    table = solver.identity_table(scheduler_name="flow-euler")
    gen = torch.Generator().manual_seed(seed)
    steps = table.nfe
    return TauTable(table.t, (table.t - 20.0).clamp(min=0.0), table.metadata,
                    0.1 * torch.randn(steps, 2, generator=gen), 1 + 0.05 * torch.randn(steps, generator=gen))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_table_with_coefficients_replays_in_sd3_and_flux_pipelines_as_the_fit_s_solver(sd3_patch2_folder,
                                                                                        flux_dynamic_folder, family):
    build, call, folder = {"sd3": (_sd3, _sd3_call, sd3_patch2_folder),
                           "flux": (_flux, _flux_call, flux_dynamic_folder)}[family]
    model, den = build(folder, torch.float32)
    solver = Solver.named(den, model.base_config, "flow-euler", None, 4)
    table = _with_coefficients(solver, 7)
    assert table.has_coefficients
    noise = torch.randn((2, 4, SIDE, SIDE), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = solver.rollout(noise, table.tau.float(), coefficients=table.coefficients)
        plain = solver.rollout(noise, table.tau.float())
    model.pipeline.scheduler = TunedScheduler.from_table(model.pipeline.scheduler, table)
    theirs = call(model, noise, torch.float32)
    ours, plain = (_pack(ours), _pack(plain)) if family == "flux" else (ours, plain)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)

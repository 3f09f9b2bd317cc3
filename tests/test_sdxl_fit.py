"""`fit` on SDXL: the denoiser is StableDiffusionXLPipeline's own call (two CLIP encoders, the pooled projection and
the size ids of a plain call, the negative branch zeroed as `force_zeros_for_empty_prompt` does), the fit's loop is
the pipeline's `__call__` in float32 and bfloat16 (Stable Diffusion 1.x as well), a fitted table runs in the
pipeline, and the refiner is refused in one line."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline

from tests.test_conditional import one_thread
from tests.test_flow_fit import FAST
from timetuner import TunedScheduler
from timetuner.core.denoiser import text_conditioning
from timetuner.core.families.sdxl import TextSDXL
from timetuner.core.loading import load_model
from timetuner.core.solver import Solver
from timetuner.errors import UserError
from timetuner.fitting.api import fit
from timetuner.tiny import tiny_sdxl

PROMPTS = ["a cat", "a dog"]
SIDE = 16  # pixels: 8×8 latents at the tiny VAE's factor 2


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-fit")
    tiny_sdxl(root).save_pretrained(root / "sdxl")
    return root / "sdxl"


def _bound(folder, dtype, guidance: float = 5.0):
    model = load_model(str(folder), torch_dtype=dtype)
    model.denoiser.sample_size = SIDE // 2
    den = model.denoiser.bind(text_conditioning(model.pipeline, PROMPTS, 2))
    den.guidance_scale = guidance
    return model, den


def _called(pipe, scheduler, noise, dtype, steps: int = 4, guidance: float = 5.0):
    pipe.scheduler = scheduler
    return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=SIDE, width=SIDE,
                latents=noise.to(dtype), output_type="latent").images


def test_sdxl_unets_take_the_sdxl_adapter_and_a_plain_call_s_zero_negative_branch(sdxl_folder):
    model, den = _bound(sdxl_folder, torch.float32)
    assert den.family is TextSDXL and den.guided
    cond = den.conditioning
    embeds, null, pooled, null_pooled = model.pipeline.encode_prompt(PROMPTS, negative_prompt=None)
    assert torch.equal(cond.values[:, :-1], embeds) and torch.equal(cond.values[:, -1, :16], pooled)
    assert float(cond.values[0, -1, 16]) == model.pipeline.vae_scale_factor  # what the size ids are made from
    assert not null[:, :-1].any() and not null_pooled.any()  # force_zeros_for_empty_prompt, as a plain call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("scheduler", ["euler", "dpm++"])
def test_the_fit_s_sdxl_loop_is_the_pipeline_s_call(sdxl_folder, dtype, scheduler):
    model, den = _bound(sdxl_folder, dtype)
    solver = Solver.named(den, model.base_config, scheduler, "uniform" if scheduler == "dpm++" else None, 4)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = solver.rollout(noise)
    theirs = _called(model.pipeline, solver.template, noise, dtype)
    assert ours.dtype == theirs.dtype == dtype  # the states kept in the pipeline's dtype
    assert torch.equal(ours, theirs)  # the same operations in the same order: bitwise, in both dtypes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_fit_s_stable_diffusion_loop_is_the_pipeline_s_call(sd_folders, dtype):
    model = load_model(str(sd_folders["sd"]), torch_dtype=dtype)
    den = model.denoiser.bind(text_conditioning(model.pipeline, PROMPTS, 2))
    den.guidance_scale = 7.5
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(2))
    for name, trajectory in (("ddim", "uniform"), ("dpm++", "trailing")):
        solver = Solver.named(den, model.base_config, name, trajectory, 4)
        with torch.no_grad():
            ours = solver.rollout(noise)
        model.pipeline.scheduler = solver.template
        theirs = model.pipeline(PROMPTS, num_inference_steps=4, guidance_scale=7.5, latents=noise.to(dtype),
                                output_type="latent").images
        assert ours.dtype == theirs.dtype == dtype and torch.equal(ours, theirs), name


def test_fit_tunes_sdxl_and_the_table_samples_in_its_pipeline_as_the_fit_s_solver(sdxl_folder, tmp_path):
    with one_thread():
        result = fit(str(sdxl_folder), out=tmp_path / "sdxl.safetensors", progress=False, nfe=3, scheduler="dpm++",
                     trajectory="uniform", e2e_iters=4, force=True, prompts=("a cat",), eval_prompts=("a dog",),
                     resolution=SIDE, **FAST)
    table = result.tuned
    assert not table.is_identity and table.metadata["guidance_scale"] == 5.0  # StableDiffusionXLPipeline's default
    model, den = _bound(sdxl_folder, torch.float32)
    solver = Solver.for_table(den, model.base_config, table)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = solver.rollout(noise, table.tau.float())
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder)
    pipe.set_progress_bar_config(disable=True)
    base = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    tuned = TunedScheduler.from_table(base, table, unet=pipe.unet, guidance_scale=5.0)
    theirs = _called(pipe, tuned, noise, torch.float32, steps=table.num_inference_steps)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_the_sdxl_refiner_and_other_added_conditioning_are_refused_in_one_line(tmp_path):
    tiny_sdxl(tmp_path, refiner=True).save_pretrained(tmp_path / "refiner")
    with pytest.raises(UserError, match="aesthetic score") as err:
        load_model(str(tmp_path / "refiner"))
    assert "\n" not in str(err.value)
    from diffusers import UNet2DConditionModel

    from timetuner.core.families import family_of

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=16,
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text",
                                encoder_hid_dim=16)
    with pytest.raises(UserError, match="addition_embed_type='text'"):
        family_of(unet)

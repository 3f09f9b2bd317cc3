"""`fit` on Sana transformers: the denoiser is SanaPipeline's own call (Gemma prompt embeddings with their attention
mask and the pipeline's complex human instruction, time × timestep_scale, CFG batch [uncond, cond]), the fit's
plain solver is the pipeline's DPM-Solver++ loop on flow sigmas, and a fitted table runs in SanaPipeline."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, SanaPipeline
from typer.testing import CliRunner

from tests.test_flow_fit import FAST
from timetuner import TunedScheduler
from timetuner.cli.main import app
from timetuner.core.denoiser import text_conditioning
from timetuner.core.loading import load_model, state_side
from timetuner.core.solver import Solver
from timetuner.core.trajectories import model_shift
from timetuner.errors import UserError
from timetuner.fitting.api import fit

SIDE = 32  # pixels (SanaPipeline takes multiples of 32); the tiny DC-AE's factor is 2, so 16×16 latents
runner = CliRunner()


def _save_sana(root, **transformer):
    """A tiny Sana pipeline saved to `root`/sana: a Gemma2 text encoder of width 8, a one-block transformer, a
    two-level DC-AE (factor 2), and Sana's scheduler (DPM-Solver++ on flow sigmas, flow_shift 3)."""
    from diffusers import AutoencoderDC, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    from timetuner.tiny import quiet, tiny_tokenizer

    tokenizer, vocab_size = tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    gemma = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                     num_hidden_layers=1, num_key_value_heads=2, vocab_size=vocab_size,
                                     max_position_embeddings=4096, pad_token_id=1, attn_implementation="eager"))
    network = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
                                     attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                     cross_attention_dim=8, caption_channels=8, sample_size=16, **transformer)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    pipe = quiet(SanaPipeline(tokenizer=tokenizer, text_encoder=gemma, vae=vae, transformer=network,
                              scheduler=scheduler))
    pipe.save_pretrained(root / "sana")
    return root / "sana"


@pytest.fixture(scope="module")
def sana_folder(tmp_path_factory):
    return _save_sana(tmp_path_factory.mktemp("sana"))


def _runs_as_fitted(folder, table, guidance: float = 4.5) -> None:
    """SanaPipeline with `table` swapped in samples what the fit's solver for the table samples, from the same
    latents and prompt embeddings."""
    model = load_model(str(folder))
    model.denoiser.sample_size = SIDE // 2
    cond = text_conditioning(model.pipeline, ["a dog"], 1)
    den = model.denoiser.bind(cond)
    den.guidance_scale = guidance
    noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    ours = Solver.for_table(den, model.base_config, table).rollout(noise, taus=table.tau,
                                                                 coefficients=table.coefficients)
    pipe = model.pipeline
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table, unet=pipe.transformer, guidance_scale=guidance)
    theirs = pipe(negative_prompt=None, prompt_embeds=cond.values[..., :-1], prompt_attention_mask=cond.values[..., -1],
                  negative_prompt_embeds=cond.null[..., :-1], negative_prompt_attention_mask=cond.null[..., -1],
                  num_inference_steps=table.num_inference_steps, height=SIDE, width=SIDE, guidance_scale=guidance,
                  latents=noise, output_type="latent", use_resolution_binning=False).images
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fit_s_plain_solver_is_sana_pipeline_s_own_loop(sana_folder, dtype):
    model = load_model(str(sana_folder), torch_dtype=dtype)
    assert model.flow and model.kind == "text"
    model.denoiser.sample_size = state_side(model, SIDE)
    assert model.denoiser.sample_shape == (4, 16, 16)
    prompts = ["a cat", "a dog"]
    cond = text_conditioning(model.pipeline, prompts, 2, negative_prompt="blurry")
    # The pipeline's own encoding, with its default complex human instruction: embeddings and mask, both branches
    instruction = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
    assert instruction  # prepended to every prompt by default
    embeds, mask, null, null_mask = model.pipeline.encode_prompt(prompts, True, "blurry",
                                                                 complex_human_instruction=instruction)
    assert cond.values.shape == (2, 300, 9) and torch.equal(cond.values[..., -1], mask.float())
    assert torch.equal(cond.values[..., :-1], embeds.float()) and torch.equal(cond.null[..., :-1], null.float())
    assert torch.equal(cond.null[..., -1], null_mask.float()) and not mask.all()  # the padding is masked
    den = model.denoiser.bind(cond)
    den.guidance_scale = 4.5
    assert den.guided
    for name in ("flow-euler", "flow-heun", "flow-unipc"):  # every flow solver starts from Sana's flow_shift 3
        assert model_shift(Solver.named(den, model.base_config, name, None, 3).template.config) == 3.0
    solver = Solver.named(den, model.base_config, "flow-dpm++", None, 3)
    noise = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1))
    before = den.evaluations
    ours = solver.rollout(noise)
    assert den.evaluations - before == 2 * 2 * 3  # a CFG batch of 2N per evaluation
    theirs = model.pipeline(negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                            negative_prompt_embeds=null, negative_prompt_attention_mask=null_mask,
                            num_inference_steps=3, height=SIDE, width=SIDE, guidance_scale=4.5, latents=noise,
                            output_type="latent", use_resolution_binning=False).images
    assert torch.equal(ours, theirs) if dtype == torch.bfloat16 else torch.allclose(ours, theirs, atol=1e-5)


def test_fit_tunes_a_sana_transformer_and_the_table_changes_sana_pipeline_s_images(sana_folder):
    result = fit(str(sana_folder), progress=False, nfe=3, scheduler="flow-dpm++", e2e_iters=2, force=True,
                 prompts=("a cat",), eval_prompts=("a dog",), resolution=SIDE, **FAST)
    table = result.tuned
    assert not table.is_identity and table.metadata["guidance_scale"] == 4.5  # SanaPipeline's default
    assert table.scheduler_class == "DPMSolverMultistepScheduler"
    pipe = SanaPipeline.from_pretrained(sana_folder)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a dog", num_inference_steps=3, height=SIDE, width=SIDE, output_type="np",
                use_resolution_binning=False)
    plain = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, table, unet=pipe.transformer, guidance_scale=4.5)
    tuned = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert tuned.shape == plain.shape == (1, SIDE, SIDE, 3) and not (tuned == plain).all()
    _runs_as_fitted(sana_folder, table)


def test_sana_sprint_is_refused_in_one_line(tmp_path):
    folder = _save_sana(tmp_path, guidance_embeds=True, qk_norm="rms_norm_across_heads")
    result = runner.invoke(app, ["fit", "--model", str(folder), "--nfe", "3"])
    assert result.exit_code == 2 and "Sana-Sprint" in result.output and len(result.output.strip().splitlines()) == 1
    with pytest.raises(UserError, match="guidance_embeds"):
        load_model(str(folder))


def test_auto_on_sana_ranks_the_flow_setups_and_its_winner_runs_in_sana_pipeline(sana_folder):
    result = fit(str(sana_folder), progress=False, nfe=3, e2e_iters=2, prompts=("a cat",), eval_prompts=("a dog",),
                 **FAST)  # the network's own resolution: sample_size 16 × the DC-AE's factor 2
    names = {(c["scheduler"], c["trajectory"]) for c in result.table.metadata["auto"]["candidates"]}
    assert {("flow-euler", "uniform"), ("flow-euler", "shift1"), ("flow-dpm++", "uniform"),
            ("flow-unipc", "uniform")} <= names  # "uniform" is the model's own shift 3: no separate shift3
    pipe = SanaPipeline.from_pretrained(sana_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, result.tuned, unet=pipe.transformer, guidance_scale=4.5)
    assert type(pipe.scheduler.inner).__name__ == result.tuned.scheduler_class
    images = pipe("a dog", num_inference_steps=3, height=SIDE, width=SIDE, output_type="np",
                  use_resolution_binning=False).images
    assert images.shape == (1, SIDE, SIDE, 3) and np.isfinite(images).all()
    _runs_as_fitted(sana_folder, result.tuned)  # the winner (a learned σ grid where one takes it) as fitted


def test_a_resolution_sana_pipeline_cannot_take_is_refused_in_one_line(sana_folder):
    result = runner.invoke(app, ["fit", "--model", str(sana_folder), "--nfe", "3", "--resolution", "48"])
    assert result.exit_code == 2 and "--resolution 48 is not a multiple of 32" in result.output
    assert len(result.output.strip().splitlines()) == 1

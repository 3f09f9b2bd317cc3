"""`fit` on Wan text-to-video transformers: states (C, F, H, W), the denoiser is WanPipeline's own call (UMT5 prompt
embeddings, CFG as two calls), the fit's plain solver is the pipeline's UniPC loop on flow sigmas, a fitted table
runs in WanPipeline, decoded frames are the pipeline's, and what samples otherwise (Wan 2.2's two experts,
a frame count the pipeline rounds) is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline
from typer.testing import CliRunner

from tests.test_flow_fit import FAST
from timetuner import TunedScheduler
from timetuner.cli.main import app
from timetuner.core.denoiser import text_conditioning
from timetuner.core.loading import decode_latents, load_model, size_state
from timetuner.core.solver import Solver
from timetuner.errors import UserError
from timetuner.fitting.api import fit
from timetuner.table import TauTable

SIDE, FRAMES = 32, 5  # pixels and frames: 4×4 latents (the VAE's factor 8), 2 latent frames (temporal factor 4)
SHAPE = (16, 2, 4, 4)
runner = CliRunner()


def _transformer():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=1,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def _save_wan(root, two_experts: bool = False):
    """A tiny Wan 2.1 pipeline saved to `root`/wan: a one-layer UMT5 text encoder of width 32, a one-block
    transformer, a Wan VAE of base width 3 (factors 8 spatial, 4 temporal), and Wan's scheduler (UniPC on flow
    sigmas, flow_shift 3). `two_experts`: a second transformer below boundary_ratio 0.875, as Wan 2.2 A14B."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from timetuner.tiny import quiet, tiny_tokenizer

    tokenizer, vocab_size = tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1,
                                               vocab_size=vocab_size, relative_attention_num_buckets=8))
    transformer = _transformer()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    extra = dict(transformer_2=_transformer(), boundary_ratio=0.875) if two_experts else {}
    pipe = quiet(WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler, **extra))
    pipe.save_pretrained(root / "wan")
    return root / "wan"


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return _save_wan(tmp_path_factory.mktemp("wan"))


def _pipeline_latents(pipe, cond, noise, steps: int, guidance: float) -> torch.Tensor:
    return pipe(prompt_embeds=cond.values, negative_prompt_embeds=cond.null, num_inference_steps=steps,
                height=SIDE, width=SIDE, num_frames=FRAMES, guidance_scale=guidance, latents=noise,
                output_type="latent").frames


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fit_s_plain_solver_is_wan_pipeline_s_own_loop(wan_folder, dtype):
    model = load_model(str(wan_folder), torch_dtype=dtype)
    assert model.flow and model.kind == "text"
    assert model.denoiser.sample_shape == (16, 21, 60, 104)  # WanPipeline's default: 81 frames of 480 × 832 px
    size_state(model, SIDE, FRAMES)
    assert model.denoiser.sample_shape == SHAPE
    prompts = ["a cat", "a dog"]
    cond = text_conditioning(model.pipeline, prompts, 2, negative_prompt="blurry")
    with torch.no_grad():  # as WanPipeline.__call__ encodes (UMT5 takes other kernels with gradients on)
        embeds, null = model.pipeline.encode_prompt(prompts, "blurry", True, max_sequence_length=512)
    assert torch.equal(cond.values, embeds.float()) and torch.equal(cond.null, null.float())
    assert cond.values.shape[1] == 512  # WanPipeline.__call__'s default length, not encode_prompt's 226
    den = model.denoiser.bind(cond)
    den.guidance_scale = 5.0
    assert den.guided
    solver = Solver.named(den, model.base_config, "flow-unipc", None, 3)
    noise = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(1))
    before = den.evaluations
    ours = solver.rollout(noise)
    assert den.evaluations - before == 2 * 2 * 3  # conditional and unconditional call per evaluation
    theirs = _pipeline_latents(model.pipeline, cond, noise, 3, 5.0)
    assert torch.equal(ours, theirs) if dtype == torch.bfloat16 else torch.allclose(ours, theirs, atol=1e-5)
    # and as a user calls it: prompts, not embeddings, encoded by the pipeline's own __call__ at its defaults
    called = model.pipeline(prompts, negative_prompt="blurry", num_inference_steps=3, height=SIDE, width=SIDE,
                            num_frames=FRAMES, guidance_scale=5.0, latents=noise, output_type="latent").frames
    assert torch.equal(ours, called) if dtype == torch.bfloat16 else torch.allclose(ours, called, atol=1e-5)


def test_fit_tunes_a_wan_transformer_and_the_table_runs_in_wan_pipeline(wan_folder):
    result = fit(str(wan_folder), progress=False, nfe=3, scheduler="flow-unipc", e2e_iters=2, force=True,
                 prompts=("a cat",), eval_prompts=("a dog",), resolution=SIDE, frames=FRAMES, **FAST)
    table = result.tuned
    assert not table.is_identity and table.metadata["guidance_scale"] == 5.0  # WanPipeline's default
    assert table.scheduler_class == "UniPCMultistepScheduler" and table.metadata["fit_config"]["frames"] == FRAMES
    model = load_model(str(wan_folder))
    size_state(model, SIDE, FRAMES)
    cond = text_conditioning(model.pipeline, ["a dog"], 1)
    den = model.denoiser.bind(cond)
    den.guidance_scale = 5.0
    noise = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(4))
    pipe = model.pipeline
    plain = _pipeline_latents(pipe, cond, noise, 3, 5.0)
    identity = TauTable(table.t.clone(), table.t.clone(), dict(table.metadata))  # the fit's table at τ = t
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, identity, unet=pipe.transformer, guidance_scale=5.0)
    assert torch.equal(_pipeline_latents(pipe, cond, noise, 3, 5.0), plain)  # identity: bit-identical
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler.inner, table, unet=pipe.transformer,
                                               guidance_scale=5.0)
    tuned = _pipeline_latents(pipe, cond, noise, 3, 5.0)
    ours = Solver.for_table(den, model.base_config, table).rollout(noise, taus=table.tau,
                                                                 coefficients=table.coefficients)
    assert torch.allclose(ours, tuned, atol=1e-5) and not torch.allclose(tuned, plain, atol=1e-4)


def test_decoded_frames_are_wan_pipeline_s(wan_folder):
    pipe = WanPipeline.from_pretrained(wan_folder)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a cat", num_inference_steps=2, height=SIDE, width=SIDE, num_frames=FRAMES)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).frames
    video = pipe(**call, output_type="np", generator=torch.Generator().manual_seed(0)).frames  # (1, F, H, W, 3)
    frames = decode_latents(pipe.vae, latents)
    assert frames.shape == (FRAMES, 3, SIDE, SIDE)  # N·F images in sample order
    ours = ((frames / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert np.allclose(ours, video[0], atol=1e-6)


@pytest.mark.slow
def test_auto_on_wan_ranks_the_flow_setups_and_its_winner_runs_in_wan_pipeline(wan_folder):
    result = fit(str(wan_folder), progress=False, nfe=3, e2e_iters=2, prompts=("a cat",), eval_prompts=("a dog",),
                 resolution=SIDE, frames=FRAMES, **FAST)
    names = {(c["scheduler"], c["trajectory"]) for c in result.table.metadata["auto"]["candidates"]}
    assert {("flow-unipc", "uniform"), ("flow-dpm++", "uniform"), ("flow-euler", "shift1")} <= names
    pipe = WanPipeline.from_pretrained(wan_folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, result.tuned, unet=pipe.transformer,
                                               guidance_scale=5.0)
    video = pipe("a dog", num_inference_steps=3, height=SIDE, width=SIDE, num_frames=FRAMES, output_type="np").frames
    assert video.shape == (1, FRAMES, SIDE, SIDE, 3) and np.isfinite(video).all()


def _one_line(result, *phrases) -> None:
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    for phrase in phrases:
        assert phrase in result.output


def test_a_frame_count_wan_pipeline_would_round_is_refused_in_one_line(wan_folder):
    _one_line(runner.invoke(app, ["fit", "--model", str(wan_folder), "--nfe", "3", "--frames", "6"]),
              "--frames 6 is invalid", "1 + a multiple of 4")
    _one_line(runner.invoke(app, ["fit", "--nfe", "3", "--frames", "5"]), "--frames 5 is for video models")


def test_wan_2_2_two_expert_pipelines_are_refused_in_one_line(tmp_path):
    folder = _save_wan(tmp_path, two_experts=True)
    _one_line(runner.invoke(app, ["fit", "--model", str(folder), "--nfe", "3"]), "boundary_ratio")
    with pytest.raises(UserError, match="two transformers"):
        load_model(str(folder))


def test_a_wan_state_is_latent_frames_by_height_by_width(wan_folder):
    model = load_model(str(wan_folder))
    size_state(model, (32, 64), 9)  # 9 frames of 32 × 64 px: 3 latent frames of 4 × 8 latents
    assert model.denoiser.sample_shape == (16, 3, 4, 8)

"""`fit` on Flux transformers: the denoiser is FluxPipeline's own call (packed latents, position ids, distilled
guidance, σ as time), the fit's plain solver is the pipeline's loop at its σ grid and `mu`, and a fitted table runs
in FluxPipeline at the resolution it was fitted for and refuses another."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from typer.testing import CliRunner

from tests.test_flow_fit import FAST
from timetuner import TunedScheduler
from timetuner.cli.main import app
from timetuner.core.denoiser import text_conditioning
from timetuner.core.loading import load_model, state_side
from timetuner.core.solver import Solver
from timetuner.errors import UserError
from timetuner.fitting.api import fit

SIDE = 16  # pixels; the tiny VAE's factor is 1, so 16×16 latents packed into 8·8 tokens
runner = CliRunner()


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A tiny Flux.1-dev-like pipeline saved to a folder: a CLIP text encoder (pooled projection 8) and a T5 encoder
    of width 16, a transformer with a guidance embedding, a scheduler that shifts by image size."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from tests.tiny import quiet, tiny_latent_vae, tiny_tokenizer

    root = tmp_path_factory.mktemp("flux")
    tokenizer, vocab_size = tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                 pad_token_id=1, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4), guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16,
                                                max_image_seq_len=256)
    pipe = quiet(FluxPipeline(scheduler=scheduler, vae=tiny_latent_vae(), text_encoder=clip, tokenizer=tokenizer,
                              text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer))
    pipe.save_pretrained(root / "flux")
    return root / "flux"


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


def test_auto_on_flux_ranks_the_setups_that_follow_its_mu(flux_folder):
    result = fit(str(flux_folder), progress=False, nfe=3, e2e_iters=2, prompts=("a cat",), eval_prompts=("a dog",),
                 resolution=SIDE, **FAST)
    names = {(c["scheduler"], c["trajectory"]) for c in result.table.metadata["auto"]["candidates"]}
    assert {("flow-euler", "uniform"), ("flow-dpm++", "uniform"), ("flow-unipc", "uniform")} <= names
    assert not any(t in ("shift1", "shift3", "learned") for _, t in names)  # Flux's shift is the pipeline's mu


@pytest.mark.parametrize(("args", "needle"), [
    (["--resolution", "15"], "--resolution 15 is not a multiple of 2"),
    (["--resolution", "0"], "--resolution 0 is invalid"),
    (["--negative-prompt", "blurry", "--resolution", "16"], "distils guidance into the network"),
    (["--scheduler", "flow-euler", "--trajectory", "shift3", "--resolution", "16"],
     "--trajectory shift3 needs a static shift"),
])
def test_fit_on_flux_refuses_what_does_not_apply_in_one_line(flux_folder, args, needle):
    result = runner.invoke(app, ["fit", "--model", str(flux_folder), "--nfe", "3", *args])
    assert result.exit_code == 2 and needle in result.output and len(result.output.strip().splitlines()) == 1

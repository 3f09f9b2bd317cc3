"""Shared fixtures: tiny runs of the project's own training loop, built in a temp folder."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from timetuner.tiny import quiet, tiny_tokenizer, tiny_vae

torch.set_num_threads(2)
# diffusers' own scheduler tests (vendored) run only through tests/test_diffusers_suite.py, which sets this
collect_ignore = [] if os.environ.get("TIMETUNER_DIFFUSERS_SUITE") else ["diffusers_suite"]


def tiny_config(out, **overrides):
    """A digits-tiny training config that runs in about a second on CPU."""
    from timetuner.trainers import TrainConfig

    base = dict(out=str(out), preset="digits-tiny", steps=20, batch_size=16, checkpoint_every=10, log_every=5,
                sample_n=4, sample_steps=2, warmup_steps=2, cpu=True)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.fixture(scope="session", autouse=True)
def _isolated_reference_cache(tmp_path_factory):
    """Reference trajectories are cached on disk; tests use a fresh cache, never the user's, and stay offline."""
    import os

    old = os.environ.get("TIMETUNER_CACHE")
    os.environ["TIMETUNER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["TIMETUNER_OFFLINE"] = "1"  # nothing in the tests touches the network (Inception weights included)
    yield
    if old is None:
        os.environ.pop("TIMETUNER_CACHE", None)
    else:
        os.environ["TIMETUNER_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 20-step digits-tiny run folder (a DDPM pipeline with checkpoints at 10 and 20)."""
    from timetuner.trainers import train

    return train(tiny_config(tmp_path_factory.mktemp("tiny") / "run"))


SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)


# -- tiny conditional pipelines, built in code once per session (nothing from a hub) ------------------------------
@pytest.fixture(scope="session")
def sd_folders(tmp_path_factory):
    """Tiny Stable Diffusion pipelines saved to folders: ε-prediction and v-prediction (same networks)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd")
    tokenizer, vocab_size = tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8)
    vae, folders = tiny_vae(), {}
    for name, prediction in (("sd", "epsilon"), ("sd-v", "v_prediction")):
        pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                       scheduler=DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(root / name)
        folders[name] = root / name
    return folders


@pytest.fixture(scope="session")
def dit_folder(tmp_path_factory):
    """A tiny DiT pipeline (learned σ: 8 output channels for 4 latent ones, 1000 classes + null) in a folder."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())
    folder = tmp_path_factory.mktemp("dit") / "dit"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sd_pipe(sd_folders):
    return quiet(DiffusionPipeline.from_pretrained(sd_folders["sd"]))


@pytest.fixture(scope="session")
def dit_pipe(dit_folder):
    return quiet(DiffusionPipeline.from_pretrained(dit_folder))



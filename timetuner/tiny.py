"""Tiny pipelines and components of the model families, built in code with random weights (nothing from a hub):
what the tests fit and load, the benchmarks' stand-ins for real checkpoints, and a start for a new family's test
(docs/architecture.md). Each builds in about a second on a CPU."""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL, UNet2DModel


def byte_alphabet() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: the base symbols of a byte-level BPE vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(folder):
    """A CLIPTokenizer from a vocab.json / merges.txt written here: bytes and end-of-word bytes, no merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in byte_alphabet():
            vocab.setdefault(ch + suffix, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=16), len(vocab)


def tiny_vae():
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixel_unet() -> UNet2DModel:
    """An unconditional 8×8 one-channel UNet2DModel with seeded weights, in eval mode."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8).eval()


def tiny_latent_vae(latent_channels: int = 4):
    """A one-level VAE (scale factor 1) with SD3/Flux's shift and scaling factors."""
    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                         layers_per_block=1, norm_num_groups=8, sample_size=8, shift_factor=0.0609,
                         scaling_factor=1.5035).eval()


def tiny_sd3(scheduler, img2img: bool = False):
    """A StableDiffusion3 (img2img) pipeline of one transformer block, fed prompt embeddings (no text encoders)."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=8, out_channels=4).eval()
    cls = StableDiffusion3Img2ImgPipeline if img2img else StableDiffusion3Pipeline
    return quiet(cls(transformer=transformer, scheduler=scheduler, vae=tiny_latent_vae(), text_encoder=None,
                     tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None))


def tiny_flux(scheduler):
    """A Flux pipeline of one double and one single block, fed prompt embeddings (no text encoders)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()
    return quiet(FluxPipeline(scheduler=scheduler, vae=tiny_latent_vae(), text_encoder=None, tokenizer=None,
                              text_encoder_2=None, tokenizer_2=None, transformer=transformer))


def save_sd3(root, scheduler, patch_size: int = 1):
    """A tiny Stable Diffusion 3 pipeline saved to `root`/sd3: two CLIP text encoders (hidden 8, projection 4: the
    transformer's 16-wide embeddings and 8-wide pooled projection), a T5 encoder of width 16, a one-block transformer
    of 8×8 latents at `patch_size`."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tokenizer, vocab_size = tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=8, intermediate_size=16, projection_dim=4, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
        for _ in range(2)]
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=patch_size, in_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, out_channels=4)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                 pad_token_id=1, eos_token_id=1))
    pipe = quiet(StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=tiny_latent_vae(),
                                          text_encoder=encoders[0], tokenizer=tokenizer, text_encoder_2=encoders[1],
                                          tokenizer_2=tokenizer, text_encoder_3=t5, tokenizer_3=tokenizer))
    pipe.save_pretrained(root / "sd3")
    return root / "sd3"


def tiny_sdxl(root, refiner: bool = False):
    """A tiny SDXL: two CLIP text encoders (the second with a projection), a text_time-conditioned UNet, SDXL's Euler;
    `refiner`: the refiner's image-to-image pipeline (aesthetic-score conditioning, the second encoder only)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, vocab = tiny_tokenizer(root / "tok")
    torch.manual_seed(0)
    text = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    ids = 5 if refiner else 6
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 if refiner else 32, attention_head_dim=4, norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=ids * 8 + 16)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    if refiner:
        return quiet(diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=tiny_vae(), text_encoder=None, text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
            tokenizer=None, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, requires_aesthetics_score=True))
    return quiet(diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler))


def save_flux(root, guidance_embeds: bool, scheduler):
    """A tiny Flux.1 pipeline saved to `root`/flux: a CLIP text encoder (pooled projection 8) and a T5 encoder of
    width 16; a transformer with a guidance embedding (dev) or without (schnell)."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, vocab_size = tiny_tokenizer(root / "tokenizer-src")
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                 pad_token_id=1, eos_token_id=1))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
                                         guidance_embeds=guidance_embeds)
    pipe = quiet(FluxPipeline(scheduler=scheduler, vae=tiny_latent_vae(), text_encoder=clip, tokenizer=tokenizer,
                              text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer))
    pipe.save_pretrained(root / "flux")
    return root / "flux"

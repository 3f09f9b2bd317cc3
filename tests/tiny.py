"""Builders of tiny pipeline components in code (nothing from a hub): tokenizer, VAE, quiet pipelines."""

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

"""Time a TimeTuner fit of a Stable-Diffusion-sized latent text-to-image model (issue 6).

The pipeline is built here (random weights, SD 1.5 shapes: an 860 M-parameter UNet2DConditionModel at 64×64×4
latents, the SD VAE, a 12-layer CLIP text encoder with a byte-level tokenizer written here), saved with
`save_pretrained` and fitted from that folder exactly as `timetuner fit --model FOLDER --guidance-scale 7.5`
does: same loading, same `fit`. Random weights make the held-out verdict meaningless; the figures are the cost
(seconds, network evaluations, evaluations per second, peak GPU memory). Prints one JSON line per phase.

    python bench/gpu_latent.py                      # on a GPU machine (bf16)
    python bench/gpu_latent.py --size tiny --cpu    # a minute on a CPU: checks the script, times nothing useful
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1)
SIZES = {
    # SD 1.5 (runwayml/stable-diffusion-v1-5) UNet, VAE and text-encoder shapes.
    "sd15": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77)),
    "tiny": dict(
        unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                  cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=16)),
}


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def build(size: str, folder: Path, device: str, dtype: torch.dtype) -> dict:
    """A randomly initialised SD-shaped pipeline, saved to `folder`; returns the parameter counts."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from timetuner.tiny import tiny_tokenizer

    shapes = SIZES[size]
    tokenizer, vocab_size = tiny_tokenizer(folder.parent / "tokenizer-src")
    tokenizer.model_max_length = shapes["text"]["max_position_embeddings"]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**shapes["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, **shapes["vae"])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                            **shapes["text"]))
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).to(dtype=dtype)
    pipe.save_pretrained(folder)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"unet_params": count(unet), "vae_params": count(vae), "text_params": count(text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on GPU, else float32)")
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--objectives", default="e2e", help="comma-separated fit objectives, timed one after another")
    parser.add_argument("--budget", type=float, default=420.0, help="skip further objectives after this many seconds")
    args = parser.parse_args()

    from transformers.utils import logging as transformers_logging

    from timetuner.core import load_pipeline
    from timetuner.fitting import fit

    transformers_logging.set_verbosity_error()  # the shipped prompts are longer than a tiny tokenizer's 16 tokens

    started = time.perf_counter()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    emit(phase="machine", device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
         torch=torch.__version__, dtype=str(dtype).removeprefix("torch."), size=args.size)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd"
        t0 = time.perf_counter()
        params = build(args.size, folder, device, dtype)
        emit(phase="build+save", seconds=round(time.perf_counter() - t0, 1), **params)

        t0 = time.perf_counter()
        pipe = load_pipeline(str(folder), torch_dtype=dtype).to(device)  # `timetuner fit --model FOLDER --dtype`
        pipe.set_progress_bar_config(disable=True)
        if device == "cuda":
            torch.cuda.synchronize()
        emit(phase="load", seconds=round(time.perf_counter() - t0, 1))

        # Raw guided throughput: one CFG batch (2B network samples) at t = 500, as fit evaluates it.
        unet, shapes = pipe.unet, SIZES[args.size]
        side = shapes["unet"]["sample_size"]
        batch = 2 * max(args.samples, args.eval_samples)
        x = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
        cond = torch.randn(batch, shapes["text"]["max_position_embeddings"], shapes["unet"]["cross_attention_dim"],
                           device=device, dtype=dtype)
        with torch.no_grad():
            for reps in (2, 5):  # warm-up, then timed
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    unet(x, torch.full((batch,), 500.0, device=device), encoder_hidden_states=cond)
                if device == "cuda":
                    torch.cuda.synchronize()
        per_second = reps * batch / (time.perf_counter() - t0)
        emit(phase="unet forward", batch=batch, network_evaluations_per_s=round(per_second, 1))

        for objective in args.objectives.split(","):
            if time.perf_counter() - started > args.budget:
                emit(phase=f"fit {objective}", skipped=f"over the {args.budget:.0f} s budget")
                continue
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            result = fit(str(folder), pipeline=pipe, out=Path(tmp) / f"{objective}.safetensors", progress=False,
                         nfe=args.nfe, guidance_scale=args.guidance_scale, samples=args.samples,
                         eval_samples=args.eval_samples, reference_steps=args.reference_steps, objective=objective,
                         force=True)
            seconds = time.perf_counter() - t0
            held = result.held_out
            emit(phase=f"fit {objective}", nfe=args.nfe, guidance_scale=args.guidance_scale, samples=args.samples,
                 eval_samples=args.eval_samples, reference_steps=args.reference_steps, seconds=round(seconds, 1),
                 network_evaluations=result.network_evaluations, fit_network_evaluations=result.fit_evaluations,
                 peak_gpu_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
                 tau=[round(v, 2) for v in result.tuned.tau.tolist()], t=result.tuned.t.tolist(),
                 gap_plain=held["gap_plain"], gap_tuned=held["gap_tuned"])
    emit(phase="total", seconds=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    main()

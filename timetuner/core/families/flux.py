"""`FluxTransformer2DModel`: Flux.1 (dev, schnell), a flow-matching model with distilled guidance."""

from __future__ import annotations

import numpy as np
import torch

from timetuner.core.families.base import Family, call_default, parts, with_pooled


class TextFlux(Family):
    """The state (C, H, W) packed into (H/2)(W/2) tokens of 4C as `FluxPipeline` packs it, with its position ids (text
    ids zero); prompt embeddings and the pooled projection as one zero-padded row (`encode`); time fed as σ (τ/1000).
    Guidance is distilled: the scale goes into the guidance embedding (when the network has one: Flux.1-dev;
    Flux.1-schnell has none) in the one call, as FluxPipeline does."""

    networks = ("FluxTransformer2DModel",)
    conditional = "text"
    distilled = True
    default_guidance = 3.5  # FluxPipeline's (Flux.1-schnell has no guidance embedding: 1, none)
    passes_mu = True  # FluxPipeline passes mu to every scheduler, shifting by image size or not
    keeps_network_dtype = True  # latents in the prompt embeddings' dtype, each new state cast back to it
    default_sample_size = 128  # FluxPipeline's latent side (1024 px at the VAE's factor 8)
    packing = 2  # 2×2 latents per token, on top of the network's own patch_size (1)

    @staticmethod
    def without_guidance(network) -> bool:
        return not network.config.guidance_embeds  # Flux.1-schnell

    @staticmethod
    def channels(model) -> int:
        return model.config.in_channels // 4

    @staticmethod
    def pipeline_sigmas(n: int) -> list[float]:
        """The σ grid FluxPipeline passes its scheduler on every call (before the shift by `mu`)."""
        return [float(v) for v in np.linspace(1.0, 1 / n, n)]

    @classmethod
    def call(cls, model, x, t, cond, scale=None):
        b, c, h, w = x.shape
        packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(x.device, x.dtype)
        embeds, pooled = parts(cond[:, :-1], cond[:, -1, :model.config.pooled_projection_dim])
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if model.config.guidance_embeds:
            scale = cls.default_guidance if scale is None else float(scale)
            guidance = torch.full((b,), scale, device=x.device, dtype=torch.float32)
        out = model(hidden_states=packed, timestep=t.to(x.dtype) / 1000, guidance=guidance, pooled_projections=pooled,
                    encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids).sample
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    @classmethod
    def encode(cls, pipe, network, prompts, negative_prompt, device):
        """No negative prompt (the guidance is distilled): the null rows are the prompts' own, never used."""
        cond, pooled, _ = pipe.encode_prompt(prompts, None, device=device,
                                             max_sequence_length=call_default(pipe, "max_sequence_length"))
        cond = with_pooled(cond, pooled)
        return cond, cond

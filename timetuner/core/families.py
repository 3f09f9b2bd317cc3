"""The model families `Denoiser` adapts, one small adapter each, looked up by the network's class name (see
`timetuner.core.denoiser`): how each is called, how it is guided, and what its state looks like.

An adapter has `conditional` (None, "text" or "class") and `call(model, x, t, cond)`; a CFG-guided one `guided(model,
x, t, cond, null, scale)`; a guidance-distilled one (`distilled`) takes the scale in `call`. Optional: the pipeline's
`default_guidance`, and for networks whose config does not say the state's shape, `channels(model)`,
`default_sample_size`, `packing` (latents per token side, before the network's own patches),
`pixel_multiple` (what the pipeline requires of an image side) and `pipeline_sigmas(n)`; a video family
(`default_frames`: the pipeline's default, in latent frames) has states (C, F, H, W).
"""

from __future__ import annotations

import numpy as np
import torch

from timetuner.errors import UserError


def _parts(*views: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The parts of a packed conditioning row as the pipelines hand them: contiguous tensors (a strided view takes
    other kernels, which in bfloat16 round differently from the pipeline's call)."""
    return tuple(v.contiguous() for v in views)


class Unconditional:
    """`UNet2DModel`: output = model(x, t)."""

    conditional = None

    @staticmethod
    def call(model, x, t, cond):
        return model(x, t).sample


class TextUNet:
    """`UNet2DConditionModel`: cross-attention on prompt embeddings; CFG batch ordered [uncond, cond] as SD does."""

    conditional = "text"
    float_guidance = False  # combine the two branches in float32 (SanaPipeline), not the network's dtype (SD, SD3)
    keeps_network_dtype = True  # latents in the prompt embeddings' dtype, each new state in it (StableDiffusion-
    # Pipeline: the scheduler steps on the network-dtype output and state, so in bfloat16 every state is bfloat16)

    @staticmethod
    def call(model, x, t, cond):
        return model(x, t, encoder_hidden_states=cond).sample

    @classmethod
    def guided(cls, model, x, t, cond, null, scale: float):
        out = cls.call(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, cond]))
        uncond, text = (out.float() if cls.float_guidance else out).chunk(2)
        return uncond + scale * (text - uncond)


class TextSD3(TextUNet):
    """`SD3Transformer2DModel`: prompt embeddings (L, D) and a pooled projection (D_p ≤ D), which rides in the
    conditioning as one extra row of the embeddings, zero-padded to D (`text_conditioning`); CFG batch ordered
    [uncond, cond] as StableDiffusion3Pipeline does (the guided call is TextUNet's over this `call`)."""

    conditional = "text"
    default_guidance = 7.0  # StableDiffusion3Pipeline's
    keeps_network_dtype = True  # latents in the prompt embeddings' dtype, each new state cast back to it
    max_shift = 1.16  # StableDiffusion3Pipeline's default for a dynamic shift (FluxPipeline's: 1.15)

    @staticmethod
    def call(model, x, t, cond):
        embeds, pooled = _parts(cond[:, :-1], cond[:, -1, :model.config.pooled_projection_dim])
        return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample


class TextSDXL(TextUNet):
    """`UNet2DConditionModel` with SDXL's added conditioning (`addition_embed_type="text_time"`): the two CLIP
    encoders' prompt embeddings (L, D) and one extra row holding the pooled projection (D_p) and the VAE's factor
    (`text_conditioning`), from which the call makes the size conditioning of the state it is given, as
    `StableDiffusionXLPipeline` does by default: original size = target size = the image's (H, W) in pixels, crop
    (0, 0), the same for both branches; CFG batch [uncond, cond] in the network's dtype (TextUNet's guided call)."""

    default_guidance = 5.0  # StableDiffusionXLPipeline's
    size_ids = 6  # original (h, w), crop top-left (y, x), target (h, w)

    @classmethod
    def pooled_dim(cls, model) -> int:
        return model.config.projection_class_embeddings_input_dim - cls.size_ids * model.config.addition_time_embed_dim

    @classmethod
    def call(cls, model, x, t, cond):
        dim = cls.pooled_dim(model)
        embeds, pooled = _parts(cond[:, :-1], cond[:, -1, :dim])
        factor = float(cond[0, -1, dim])
        h, w = (float(side) * factor for side in x.shape[-2:])
        sizes = torch.tensor([[h, w, 0.0, 0.0, h, w]], dtype=embeds.dtype, device=x.device).repeat(x.shape[0], 1)
        return model(x, t, encoder_hidden_states=embeds,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample


class TextSana(TextUNet):
    """`SanaTransformer2DModel`: Gemma prompt embeddings with their attention mask, which rides in the conditioning
    as one extra channel (`text_conditioning`: SanaPipeline pads every prompt to 300 tokens and masks the padding);
    time scaled by the network's `timestep_scale`; learned-σ channels split off; CFG batch ordered [uncond, cond]
    and combined in float32, as SanaPipeline does (TextUNet's guided call over this `call`)."""

    conditional = "text"
    default_guidance = 4.5  # SanaPipeline's
    pixel_multiple = 32  # SanaPipeline takes image sides in multiples of 32 only
    float_guidance = True  # SanaPipeline combines the branches in float32 (bf16 / fp16 checkpoints)
    keeps_network_dtype = False  # SanaPipeline's latents stay float32, the network's output cast to them

    @staticmethod
    def call(model, x, t, cond):
        embeds, mask = _parts(cond[..., :-1], cond[..., -1])
        out = model(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                    timestep=t * model.config.timestep_scale).sample
        channels = model.config.in_channels
        return out[:, :channels] if model.config.out_channels // 2 == channels else out


class TextFlux:
    """`FluxTransformer2DModel`: the state (C, H, W) packed into (H/2)(W/2) tokens of 4C as `FluxPipeline` packs it,
    with its position ids (text ids zero); prompt embeddings and the pooled projection as one zero-padded row
    (`text_conditioning`); time fed as σ (τ/1000). Guidance is distilled: the scale goes into the guidance embedding
    (when the network has one: Flux.1-dev; Flux.1-schnell has none) in the one call, as FluxPipeline does."""

    conditional = "text"
    distilled = True
    default_guidance = 3.5  # FluxPipeline's (Flux.1-schnell has no guidance embedding: 1, none)
    passes_mu = True  # FluxPipeline passes mu to every scheduler, shifting by image size or not
    keeps_network_dtype = True  # latents in the prompt embeddings' dtype, each new state cast back to it
    default_sample_size = 128  # FluxPipeline's latent side (1024 px at the VAE's factor 8)
    packing = 2  # 2×2 latents per token, on top of the network's own patch_size (1)

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
        embeds, pooled = _parts(cond[:, :-1], cond[:, -1, :model.config.pooled_projection_dim])
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=x.dtype)
        guidance = None
        if model.config.guidance_embeds:
            scale = cls.default_guidance if scale is None else float(scale)
            guidance = torch.full((b,), scale, device=x.device, dtype=torch.float32)
        out = model(hidden_states=packed, timestep=t.to(x.dtype) / 1000, guidance=guidance, pooled_projections=pooled,
                    encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids).sample
        return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class TextWan:
    """`WanTransformer3DModel` (Wan 2.1 text-to-video): states (C, F, H, W) of latent video frames; UMT5 prompt
    embeddings; CFG as WanPipeline computes it — two calls, conditional and unconditional, combined in the network's
    dtype (not one batch of 2N: in bfloat16 a batched call rounds differently from the pipeline's)."""

    conditional = "text"
    default_guidance = 5.0  # WanPipeline's
    default_frames = 21  # latent frames: WanPipeline's num_frames 81 at the VAE's temporal factor 4
    default_sample_size = (60, 104)  # latents of WanPipeline's default 480 × 832 px at the VAE's factor 8
    steps_network_dtype = True  # float32 latents, the network-dtype output handed to the scheduler as it comes

    @staticmethod
    def channels(model) -> int:
        return model.config.in_channels

    @staticmethod
    def call(model, x, t, cond):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond).sample

    @classmethod
    def guided(cls, model, x, t, cond, null, scale: float):
        text, uncond = cls.call(model, x, t, cond), cls.call(model, x, t, null)
        return uncond + scale * (text - uncond)


class ClassTransformer:
    """DiT: class labels through AdaLN-Zero; CFG batch ordered [cond, null] and learned σ split off as DiTPipeline."""

    conditional = "class"

    @staticmethod
    def _eps(model, out):
        channels = model.config.in_channels
        return out[:, :channels] if model.config.out_channels // 2 == channels else out

    @classmethod
    def call(cls, model, x, t, cond):
        return cls._eps(model, model(x, timestep=t, class_labels=cond).sample)

    @classmethod
    def guided(cls, model, x, t, cond, null, scale: float):
        eps = cls._eps(model, model(torch.cat([x, x]), timestep=torch.cat([t, t]),
                                    class_labels=torch.cat([cond, null])).sample)
        cond_eps, uncond_eps = eps.chunk(2)
        return uncond_eps + scale * (cond_eps - uncond_eps)


FAMILIES: dict[str, type] = {
    "UNet2DModel": Unconditional,
    "UNet2DConditionModel": TextUNet,
    "DiTTransformer2DModel": ClassTransformer,
    "Transformer2DModel": ClassTransformer,
    "SD3Transformer2DModel": TextSD3,
    "FluxTransformer2DModel": TextFlux,
    "SanaTransformer2DModel": TextSana,
    "WanTransformer3DModel": TextWan,
}


def family_of(model) -> type:
    """The adapter for a network, by its class (or a diffusers base class); UserError if unsupported."""
    name = type(model).__name__
    family = FAMILIES.get(name)
    if family is None:  # subclasses (wrappers, patched models) adapt like their diffusers base
        family = next((FAMILIES[c.__name__] for c in type(model).__mro__ if c.__name__ in FAMILIES), None)
    if family is None:
        raise UserError(f"network {name} is not supported; accepted: {', '.join(sorted(FAMILIES))}")
    if family is TextUNet:
        family = _unet_family(model)
    if family is ClassTransformer and getattr(model.config, "num_embeds_ada_norm", None) is None:
        raise UserError(f"{name} has no class-label embedding (num_embeds_ada_norm is None); accepted: DiT "
                        "configurations (norm_type='ada_norm_zero' with num_embeds_ada_norm)")
    if family is TextSana and getattr(model.config, "guidance_embeds", False):
        raise UserError(f"{name} embeds the guidance scale (guidance_embeds, Sana-Sprint: a consistency model "
                        "sampled by SCMScheduler in 1-4 steps); accepted: Sana transformers sampled with "
                        "classifier-free guidance (SanaPipeline)")
    return family


def _unet_family(model) -> type:
    """A text UNet's adapter by what else it is conditioned on: nothing (SD 1.x / 2.x), or SDXL's pooled projection
    and size ids; other added conditioning (images, aesthetic scores) refused in one line."""
    added = getattr(model.config, "addition_embed_type", None)
    if added is None:
        return TextUNet
    name = type(model).__name__
    if added != "text_time":
        raise UserError(f"{name} is conditioned on addition_embed_type={added!r} besides the prompt; accepted: "
                        "Stable Diffusion 1.x / 2.x UNets and SDXL's ('text_time')")
    if TextSDXL.pooled_dim(model) <= 0:
        raise UserError(f"{name}'s added conditioning has fewer than SDXL's six size ids; accepted: SDXL base UNets")
    return TextSDXL

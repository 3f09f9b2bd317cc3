"""SDXL's `UNet2DConditionModel` (`addition_embed_type="text_time"`), reached from Stable Diffusion's by its config."""

from __future__ import annotations

import torch

from timetuner.core.families.base import parts, with_pooled
from timetuner.core.families.sd import TextUNet
from timetuner.errors import UserError


class TextSDXL(TextUNet):
    """The two CLIP encoders' prompt embeddings (L, D) and one extra row holding the pooled projection (D_p) and the
    VAE's factor (`encode`), from which the call makes the size conditioning of the state it is given, as
    `StableDiffusionXLPipeline` does by default: original size = target size = the image's (H, W) in pixels, crop
    (0, 0), the same for both branches; CFG batch [uncond, cond] in the network's dtype."""

    networks = ()  # Stable Diffusion's network class: claimed by its config
    default_guidance = 5.0  # StableDiffusionXLPipeline's
    size_ids = 6  # original (h, w), crop top-left (y, x), target (h, w)

    @classmethod
    def claims(cls, model) -> bool:
        return getattr(model.config, "addition_embed_type", None) == "text_time"

    @classmethod
    def resolve(cls, model) -> type[TextUNet]:
        if cls.pooled_dim(model) <= 0:
            raise UserError(f"{type(model).__name__}'s added conditioning has fewer than SDXL's six size ids; "
                            "accepted: SDXL base UNets")
        return cls

    @classmethod
    def check_pipeline(cls, pipeline, network, model_name) -> None:
        if getattr(pipeline, "config", {}).get("requires_aesthetics_score"):
            raise UserError(f"--model {model_name!r} conditions its UNet on an aesthetic score (the SDXL refiner, an "
                            "image-to-image stage); accepted: SDXL base and other text-to-image pipelines")
        super().check_pipeline(pipeline, network, model_name)

    @classmethod
    def pooled_dim(cls, model) -> int:
        return model.config.projection_class_embeddings_input_dim - cls.size_ids * model.config.addition_time_embed_dim

    @classmethod
    def call(cls, model, x, t, cond):
        dim = cls.pooled_dim(model)
        embeds, pooled = parts(cond[:, :-1], cond[:, -1, :dim])
        factor = float(cond[0, -1, dim])
        h, w = (float(side) * factor for side in x.shape[-2:])
        sizes = torch.tensor([[h, w, 0.0, 0.0, h, w]], dtype=embeds.dtype, device=x.device).repeat(x.shape[0], 1)
        return model(x, t, encoder_hidden_states=embeds,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": sizes}).sample

    @classmethod
    def encode(cls, pipe, network, prompts, negative_prompt, device):
        """A plain call's negative prompt is None: zeros where the config forces them (`force_zeros_for_empty_
        prompt`), so the default empty negative prompt is passed as None."""
        negatives = [negative_prompt] * len(prompts) if negative_prompt else None
        cond, null, pooled, null_pooled = pipe.encode_prompt(prompts, device=device, negative_prompt=negatives)
        dim = cls.pooled_dim(network)
        return tuple(with_pooled(e, _with_factor(p, pipe.vae_scale_factor, dim))
                     for e, p in ((cond, pooled), (null, null_pooled)))


def _with_factor(pooled: torch.Tensor, factor: int, dim: int) -> torch.Tensor:
    """SDXL's (P, D_p) pooled projection with the VAE's factor appended; D_p must be the UNet's."""
    if pooled.shape[-1] != dim:
        raise UserError(f"the pipeline's pooled text projection has {pooled.shape[-1]} values and its UNet takes "
                        f"{dim}; accepted: an SDXL base pipeline whose second text encoder matches its UNet")
    return torch.cat([pooled, torch.full_like(pooled[:, :1], float(factor))], dim=1)

"""`UNet2DConditionModel` of Stable Diffusion 1.x / 2.x: cross-attention on CLIP prompt embeddings."""

from __future__ import annotations

from timetuner.core.families.base import Family
from timetuner.errors import UserError


class TextUNet(Family):
    """Cross-attention on prompt embeddings; CFG batch ordered [uncond, cond] in the network's dtype, as
    StableDiffusionPipeline does; latents kept in the network's dtype and the scheduler stepped on them (in bfloat16
    every state is bfloat16)."""

    networks = ("UNet2DConditionModel",)
    conditional = "text"
    default_guidance = 7.5  # StableDiffusionPipeline's
    keeps_network_dtype = True

    @classmethod
    def resolve(cls, model) -> type[Family]:
        """SD's UNet, or a sub-family's that claims it (SDXL's); other added conditioning is refused."""
        family = super().resolve(model)
        added = getattr(model.config, "addition_embed_type", None)
        if family is cls and added is not None:
            raise UserError(f"{type(model).__name__} is conditioned on addition_embed_type={added!r} besides the "
                            "prompt; accepted: Stable Diffusion 1.x / 2.x UNets and SDXL's ('text_time')")
        return family

    @staticmethod
    def call(model, x, t, cond):
        return model(x, t, encoder_hidden_states=cond).sample

    @classmethod
    def encode(cls, pipe, network, prompts, negative_prompt, device):
        return pipe.encode_prompt(prompts, device, 1, True, [negative_prompt] * len(prompts))

"""`SD3Transformer2DModel`: Stable Diffusion 3 / 3.5, a flow-matching model."""

from __future__ import annotations

from timetuner.core.families.base import Family, call_default, parts, with_pooled


class TextSD3(Family):
    """Prompt embeddings (L, D) and a pooled projection (D_p ≤ D), which rides in the conditioning as one extra row of
    the embeddings, zero-padded to D (`encode`); CFG batch ordered [uncond, cond] as StableDiffusion3Pipeline does."""

    networks = ("SD3Transformer2DModel",)
    conditional = "text"
    default_guidance = 7.0  # StableDiffusion3Pipeline's
    keeps_network_dtype = True  # latents in the prompt embeddings' dtype, each new state cast back to it
    max_shift = 1.16  # StableDiffusion3Pipeline's default for a dynamic shift (FluxPipeline's: 1.15)

    @staticmethod
    def call(model, x, t, cond):
        embeds, pooled = parts(cond[:, :-1], cond[:, -1, :model.config.pooled_projection_dim])
        return model(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample

    @classmethod
    def encode(cls, pipe, network, prompts, negative_prompt, device):
        """Both branches (CFG), its two CLIP encoders and T5 at `__call__`'s `max_sequence_length`."""
        cond, null, pooled, null_pooled = pipe.encode_prompt(
            prompts, None, None, device=device, negative_prompt=[negative_prompt] * len(prompts),
            max_sequence_length=call_default(pipe, "max_sequence_length"))
        return with_pooled(cond, pooled), with_pooled(null, null_pooled)

"""`SanaTransformer2DModel` (SanaPipeline), a flow-matching model."""

from __future__ import annotations

import torch

from timetuner.core.families.base import Family, call_default, parts
from timetuner.errors import UserError


class TextSana(Family):
    """Gemma prompt embeddings with their attention mask, which rides in the conditioning as one extra channel
    (`encode`: SanaPipeline pads every prompt to 300 tokens and masks the padding); time scaled by the network's
    `timestep_scale`; learned-σ channels split off; CFG batch ordered [uncond, cond] and combined in float32, as
    SanaPipeline does."""

    networks = ("SanaTransformer2DModel",)
    conditional = "text"
    default_guidance = 4.5  # SanaPipeline's
    pixel_multiple = 32  # SanaPipeline takes image sides in multiples of 32 only
    float_guidance = True  # SanaPipeline combines the branches in float32 (bf16 / fp16 checkpoints)

    @classmethod
    def resolve(cls, model) -> type[Family]:
        if getattr(model.config, "guidance_embeds", False):
            raise UserError(f"{type(model).__name__} embeds the guidance scale (guidance_embeds, Sana-Sprint: a "
                            "consistency model sampled by SCMScheduler in 1-4 steps); accepted: Sana transformers "
                            "sampled with classifier-free guidance (SanaPipeline)")
        return cls

    @staticmethod
    def call(model, x, t, cond):
        embeds, mask = parts(cond[..., :-1], cond[..., -1])
        out = model(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                    timestep=t * model.config.timestep_scale).sample
        channels = model.config.in_channels
        return out[:, :channels] if model.config.out_channels // 2 == channels else out

    @classmethod
    def encode(cls, pipe, network, prompts, negative_prompt, device):
        """The prompts carry the pipeline's default complex human instruction, as `SanaPipeline.__call__` encodes
        them; the negative prompt does not."""
        instruction = call_default(pipe, "complex_human_instruction")
        cond, mask, null, null_mask = pipe.encode_prompt(prompts, True, negative_prompt, device=device,
                                                         complex_human_instruction=instruction)
        return _with_mask(cond, mask), _with_mask(null, null_mask)


def _with_mask(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(P, L, D) prompt embeddings with the (P, L) attention mask as channel D."""
    return torch.cat([embeds, mask[..., None].to(embeds.dtype)], dim=-1)

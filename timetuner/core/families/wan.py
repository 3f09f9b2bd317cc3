"""`WanTransformer3DModel` (Wan 2.1 text-to-video, WanPipeline), a flow-matching video model."""

from __future__ import annotations

from timetuner.core.families.base import Family, call_default
from timetuner.errors import UserError


class TextWan(Family):
    """States (C, F, H, W) of latent video frames; UMT5 prompt embeddings; CFG as WanPipeline computes it — two calls,
    conditional and unconditional, combined in the network's dtype (not one batch of 2N: in bfloat16 a batched call
    rounds differently from the pipeline's)."""

    networks = ("WanTransformer3DModel",)
    conditional = "text"
    default_guidance = 5.0  # WanPipeline's
    default_frames = 21  # latent frames: WanPipeline's num_frames 81 at the VAE's temporal factor 4
    default_sample_size = (60, 104)  # latents of WanPipeline's default 480 × 832 px at the VAE's factor 8
    steps_network_dtype = True  # float32 latents, the network-dtype output handed to the scheduler as it comes

    @classmethod
    def check_pipeline(cls, pipeline, network, model_name) -> None:
        """Also Wan 2.2's two-expert pipelines (a second transformer below `boundary_ratio`) and per-token timesteps
        (`expand_timesteps`, TI2V): they sample otherwise than one network at one time per state."""
        config = getattr(pipeline, "config", {})
        if getattr(pipeline, "transformer_2", None) is not None or config.get("boundary_ratio") is not None:
            raise UserError(f"--model {model_name!r} switches between two transformers at boundary_ratio (Wan 2.2 "
                            "A14B); accepted: pipelines with one network (Wan 2.1, SD3, Flux, Sana, ...)")
        if config.get("expand_timesteps"):
            raise UserError(f"--model {model_name!r} feeds per-token timesteps (expand_timesteps, Wan 2.2 TI2V); "
                            "accepted: pipelines that feed one time per state (Wan 2.1)")
        super().check_pipeline(pipeline, network, model_name)

    @staticmethod
    def call(model, x, t, cond):
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond).sample

    @classmethod
    def guided(cls, model, x, t, cond, null, scale: float):
        text, uncond = cls.call(model, x, t, cond), cls.call(model, x, t, null)
        return uncond + scale * (text - uncond)

    @classmethod
    def encode(cls, pipe, network, prompts, negative_prompt, device):
        """At `__call__`'s 512 tokens (its `encode_prompt` alone takes 226; Wan has no text mask, so the length
        changes the output)."""
        return pipe.encode_prompt(prompts, [negative_prompt] * len(prompts), True, device=device,
                                  max_sequence_length=call_default(pipe, "max_sequence_length"))

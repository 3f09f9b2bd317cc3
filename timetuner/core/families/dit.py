"""DiT (`DiTTransformer2DModel`, or `Transformer2DModel` in a DiT configuration): class labels."""

from __future__ import annotations

import torch

from timetuner.core.families.base import Family
from timetuner.errors import UserError


class ClassTransformer(Family):
    """Class labels through AdaLN-Zero; CFG batch ordered [cond, null] and learned σ split off as DiTPipeline."""

    networks = ("DiTTransformer2DModel", "Transformer2DModel")
    conditional = "class"
    default_guidance = 4.0  # DiTPipeline's

    @classmethod
    def resolve(cls, model) -> type[Family]:
        if getattr(model.config, "num_embeds_ada_norm", None) is None:
            raise UserError(f"{type(model).__name__} has no class-label embedding (num_embeds_ada_norm is None); "
                            "accepted: DiT configurations (norm_type='ada_norm_zero' with num_embeds_ada_norm)")
        return cls

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

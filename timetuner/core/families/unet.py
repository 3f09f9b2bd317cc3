"""`UNet2DModel`: unconditional, pixel or latent space (DDPMPipeline, LDM)."""

from __future__ import annotations

from timetuner.core.families.base import Family


class Unconditional(Family):
    """output = model(x, t)."""

    networks = ("UNet2DModel",)

    @staticmethod
    def call(model, x, t, cond):
        return model(x, t).sample

"""The base of every model family: what `Denoiser` asks a family, with the defaults most networks take.

A family adapts one kind of diffusers network (and its pipeline) to `output = call(model, x, t, cond)`: how it is
called and guided, what its state looks like, how its pipeline embeds prompts (`encode`), and what the fit refuses
(`resolve`, `check_pipeline`). A new family is one module in this folder defining one subclass with `networks`;
`timetuner.core.families` finds it (docs/architecture.md, "Adding a model family").
"""

from __future__ import annotations

import inspect

import torch

from timetuner.errors import UserError

# Pipelines of a supported network that condition it on more than a prompt (an image, a mask, a control image):
# the fit samples the text-to-image (video) function, not theirs. Matched as parts of the pipeline's class name.
OTHER_CONDITIONING = ("Fill", "Kontext", "Control", "ImageToVideo", "VACE", "Redux", "Depth", "Canny")


class Family:
    """A model family; subclasses override what differs (see each family's module)."""

    networks: tuple[str, ...] = ()  # the diffusers network classes it adapts (a sub-family reached by `resolve`: ())
    conditional: str | None = None  # None, "text" or "class"
    default_guidance: float | None = None  # the pipeline's default guidance scale (conditional families)
    distilled = False  # guidance is an input of one call (Flux.1), not a CFG batch
    float_guidance = False  # combine the two CFG branches in float32 (SanaPipeline), not the network's dtype
    keeps_network_dtype = False  # latents kept in the network's dtype, each new state cast back (SD, SD3, Flux)
    steps_network_dtype = False  # float32 latents, the network-dtype output handed to the scheduler (Wan)
    passes_mu = False  # the pipeline passes `mu` to every scheduler, shifting by image size or not (Flux)
    packing = 1  # latents per token side, before the network's own patches (Flux: 2)
    pixel_multiple = 1  # what the pipeline requires of an image side (Sana: 32)
    default_sample_size: int | tuple[int, int] | None = None  # the state's side where the config does not say it
    default_frames: int | None = None  # video families: latent frames of the pipeline's default; states (C, F, H, W)
    max_shift = 1.15  # the pipeline's default max_shift for a dynamic shift (FluxPipeline's)

    @classmethod
    def claims(cls, model) -> bool:
        """Whether this sub-family takes a network of its parent's class, by the network's config (SDXL's UNet)."""
        return False

    @classmethod
    def resolve(cls, model) -> type[Family]:
        """The family that adapts `model`: a sub-family that claims it, else this one; UserError for a configuration
        the fit does not reproduce."""
        sub = next((s for s in cls.__subclasses__() if s.claims(model)), None)
        return cls if sub is None else sub.resolve(model)

    @classmethod
    def check_pipeline(cls, pipeline, network, model_name) -> None:
        """Refuse, in one line, pipelines of this network whose conditioning the fit does not reproduce: an image, a
        mask or a control (Flux Fill / Kontext / Control, Wan image-to-video, …), and networks with more input than
        output channels for them (SD inpainting, Flux Fill, Wan I2V)."""
        name = type(pipeline).__name__
        part = next((p for p in OTHER_CONDITIONING if p in name), None)
        if part is not None:
            raise UserError(f"--model {model_name!r} is a {name}, which conditions on more than a prompt ({part}); "
                            "accepted: the text-to-image (video) pipelines the fit samples as they do (FluxPipeline, "
                            "StableDiffusion3Pipeline, WanPipeline, ...)")
        config = network.config
        inputs, outputs = config.get("in_channels"), config.get("out_channels")
        if inputs and outputs and inputs > outputs:
            raise UserError(f"--model {model_name!r}: its {type(network).__name__} takes {inputs} input channels for "
                            f"{outputs} output ones (an image or mask it is conditioned on: inpainting, Fill, "
                            "image-to-video); accepted: networks conditioned on a prompt or class only")

    @staticmethod
    def without_guidance(network) -> bool:
        """Whether no guidance scale changes the network's output (a distilled network without its embedding)."""
        return False

    @staticmethod
    def channels(model) -> int:
        """Channels of a state."""
        return model.config.in_channels

    @staticmethod
    def pipeline_sigmas(n: int) -> list[float] | None:
        """The σ grid the pipeline passes its scheduler on every call (before any shift); None: none."""
        return None

    @staticmethod
    def call(model, x, t, cond):
        raise NotImplementedError

    @classmethod
    def guided(cls, model, x, t, cond, null, scale: float):
        """Classifier-free guidance from one batch [uncond, cond] as StableDiffusionPipeline makes it."""
        out = cls.call(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, cond]))
        uncond, text = (out.float() if cls.float_guidance else out).chunk(2)
        return uncond + scale * (text - uncond)

    @classmethod
    def encode(cls, pipe, network, prompts: list[str], negative_prompt: str, device):
        """(prompt rows, negative rows) as the pipeline's `__call__` embeds them (text families)."""
        raise UserError(f"{type(network).__name__} takes {cls.conditional or 'no'} conditioning, not prompts")


def network_of(pipeline):
    """The denoising network of a pipeline: its `transformer` (DiT), or its `unet`; None if it has neither."""
    return getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)


def call_default(pipe, name: str):
    """The default of argument `name` of the pipeline's `__call__`: what a plain call of the pipeline uses."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


def parts(*views: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The parts of a packed conditioning row as the pipelines hand them: contiguous tensors (a strided view takes
    other kernels, which in bfloat16 round differently from the pipeline's call)."""
    return tuple(v.contiguous() for v in views)


def with_pooled(embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(P, L, D) prompt embeddings with the (P, D_p) pooled projection as row L, zero-padded to D."""
    row = torch.nn.functional.pad(pooled, (0, embeds.shape[-1] - pooled.shape[-1]))
    return torch.cat([embeds, row[:, None].to(embeds.dtype)], dim=1)

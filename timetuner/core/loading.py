"""Hub id or local folder → diffusers pipeline → one model setup: network, denoiser, VAE, noise schedule."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from timetuner.assets import EMBEDDED, EMBEDDED_MODEL
from timetuner.core.denoiser import Denoiser
from timetuner.core.families import FAMILIES, family_of, network_of
from timetuner.core.prompts import format_resolution, resolution_sides
from timetuner.errors import UserError, check_choice
from timetuner.matching import model_fingerprint, model_hash
from timetuner.table import is_flow


def resolve_model(model: str | None) -> str:
    """The embedded digits model's folder for None (`digits-flow`: the embedded flow model); a local folder,
    checked; else the string as a hub id."""
    if model is None:
        return str(EMBEDDED_MODEL)
    if model in EMBEDDED:
        return str(EMBEDDED[model])
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(f"--model {model!r} is not a diffusers pipeline folder (no model_index.json); "
                            "accepted: a folder written by save_pretrained, or a hub id")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"--model {model!r} is neither an existing folder nor a hub id; accepted: a "
                        "diffusers pipeline folder or an id like 'google/ddpm-cifar10-32'")
    return model


def quiet_loading() -> None:
    """No per-component loading bars from diffusers and transformers: they only interleave with what the CLI
    prints (a fit's own progress, a one-line error, JSON). Hub downloads keep their own progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(model: str | None = None, revision: str | None = None, variant: str | None = None,
                  torch_dtype=None):
    """`DiffusionPipeline.from_pretrained` on a hub id or folder (default: the embedded digits model)."""
    from diffusers import DiffusionPipeline

    source = resolve_model(model)
    try:
        with warnings.catch_warnings():
            # Newer diffusers renamed `torch_dtype` to `dtype` and warn; `torch_dtype` works on every supported one.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return DiffusionPipeline.from_pretrained(source, revision=revision, variant=variant,
                                                     torch_dtype=torch_dtype)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(f"--model {source!r} could not be loaded: {first}") from None


DTYPES = ("float32", "float16", "bfloat16")


def default_dtype(model: str | None, on_gpu: bool):
    """The dtype a model is run in when `--dtype` is not given, every component in it: bfloat16 for a transformer
    pipeline (SD3, Flux, Sana, Wan, DiT) on a GPU, as those pipelines are run; float32 otherwise (UNets, any CPU).
    Reads only the pipeline's `model_index.json`."""
    import torch
    from diffusers import DiffusionPipeline

    if not on_gpu:
        return torch.float32
    try:
        index = DiffusionPipeline.load_config(resolve_model(model))
    except (OSError, ValueError):
        return torch.float32  # unreadable here: the load that follows says why
    return torch.bfloat16 if "transformer" in index else torch.float32


def parse_dtype(name: str | None):
    """'float16' → torch.float16 (None stays None: the weights' own dtype)."""
    import torch

    if name is None:
        return None
    return getattr(torch, check_choice("--dtype", name, DTYPES))


def parse_device(device: str | None, cpu: bool = False):
    """The device to fit on: `device` ('cpu', 'cuda', 'cuda:1', 'mps'), checked; default the GPU where there is
    one, unless `cpu`."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() and not cpu else "cpu")
    accepted = "accepted: cpu, cuda, cuda:N (an index below the GPU count) or mps"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device!r} is not a device; {accepted}") from None
    if cpu and parsed.type != "cpu":
        raise UserError(f"--device {device} contradicts --cpu; accepted: one of them")
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s); {accepted}")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {device}: MPS is not available here; {accepted}")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {device!r} is not supported; {accepted}")
    return parsed


def text_encoders(pipeline) -> dict:
    """The pipeline's text encoders by component name (text_encoder, text_encoder_2, …); {} for none."""
    components = getattr(pipeline, "components", {}) or {}
    return {name: c for name, c in components.items() if name.startswith("text_encoder") and c is not None}


def place(pipeline, device, offload: bool = False):
    """Move every component of `pipeline` to `device`, the text encoders too unless `offload` (they then stay on
    the CPU and embed the prompts there: less GPU memory, embeddings rounded as the CPU rounds them)."""
    import torch

    encoders = text_encoders(pipeline) if offload else {}
    for name, component in pipeline.components.items():
        if isinstance(component, torch.nn.Module):
            component.to("cpu" if name in encoders else device)
    return pipeline


def release_text_encoders(pipeline) -> None:
    """Move the text encoders off the GPU (their prompts embedded, the fit needs them no more) and free the memory."""
    import torch

    moved = False
    for encoder in text_encoders(pipeline).values():
        if next(encoder.parameters()).device.type != "cpu":
            encoder.to("cpu")
            moved = True
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class ModelSetup:
    """A loaded model, ready to sample and fit: network, denoiser, VAE (latent models) and noise schedule.

    One setup serves fitting, evaluation and reports, so every command sees the same model the same way.
    """

    network: object
    denoiser: object  # timetuner.core.denoiser.Denoiser over `network` (unconditional until bound)
    base_config: object  # the pipeline's scheduler config: the noise schedule every solver is built from
    name: str  # what tables record: the hub id or folder given, "embedded:digits-ddpm", or "in-memory"
    path: str = ""  # the resolved folder or hub id ("" for a bare network)
    pipeline: object = None
    vae: object = None  # latent models: the autoencoder that decodes samples to images
    release_encoders: bool = False  # text encoders leave the GPU once a fit has embedded its prompts (the CLI's)

    @property
    def kind(self) -> str | None:
        """"text" (Stable Diffusion), "class" (DiT) or None (unconditional)."""
        return self.denoiser.family.conditional

    @property
    def flow(self) -> bool:
        """Whether the model is a flow-matching one (its scheduler samples x_σ = (1 − σ) x0 + σ ε)."""
        return is_flow(self.base_config)

    @property
    def weights(self) -> str:
        """The network's weights hash (tables and reference caches are keyed by it)."""
        if not hasattr(self, "_weights"):
            self._weights = model_hash(self.network)
        return self._weights

    @property
    def fingerprint(self) -> dict:
        """The network's weights fingerprint (`matching.model_fingerprint`: the same in any dtype, on any device),
        which a table records and `TunedScheduler.from_table(..., unet=)` checks."""
        if not hasattr(self, "_fingerprint"):
            self._fingerprint = model_fingerprint(self.network)
        return self._fingerprint

    @property
    def is_digits(self) -> bool:
        """A pixel-space model of the 8×8 digits (the embedded one, or a `timetuner train --data digits` run)."""
        if self.vae is not None or self.denoiser.sample_shape[0] != 1 or not self.path:
            return False
        if Path(self.path).resolve() == EMBEDDED_MODEL.resolve():
            return True
        run_config = Path(self.path) / "train_config.json"
        return run_config.is_file() and json.loads(run_config.read_text()).get("data") == "digits"

    def images(self, samples):
        """Final samples as images in about [-1, 1]: decoded by the VAE for latent models."""
        return samples if self.vae is None else decode_latents(self.vae, samples)

    @classmethod
    def from_network(cls, network, base_config) -> ModelSetup:
        """A bare unconditional network with its pipeline's scheduler config (no pipeline, no files)."""
        network.eval().requires_grad_(False)
        return cls(network=network, denoiser=Denoiser(network), base_config=base_config, name="in-memory")


def load_model(model: str | None = None, pipeline=None, device=None, revision: str | None = None,
               variant: str | None = None, torch_dtype=None) -> ModelSetup:
    """The model `model` names (hub id or folder; None: the embedded digits model), or `pipeline` already loaded
    from it; moved to `device` when given. Networks and VAE are frozen (eval mode, no gradients)."""
    path = resolve_model(model)
    if pipeline is None:
        pipeline = load_pipeline(model, revision=revision, variant=variant, torch_dtype=torch_dtype)
    if device is not None:
        pipeline = pipeline.to(device)
    network = network_of(pipeline)
    if network is None:
        raise UserError(f"--model {model!r} has no unet or transformer; accepted: pipelines whose network is one of "
                        f"{', '.join(FAMILIES)}")
    family_of(network).check_pipeline(pipeline, network, model)
    network.eval().requires_grad_(False)
    vae = latent_decoder(pipeline)
    if vae is not None:
        vae.eval().requires_grad_(False)
    return ModelSetup(network=network, denoiser=Denoiser(network), base_config=pipeline.scheduler.config,
                      name=model or "embedded:digits-ddpm", path=path, pipeline=pipeline, vae=vae)


def state_side(setup: ModelSetup, resolution: int | tuple[int, int]) -> int | tuple[int, int]:
    """The side of a sample's state for images of `resolution` pixels — a side, or (height, width), read from a
    fit's record as a list too — the image side for pixel models, side / the VAE's factor for latent ones (Flux packs
    2×2 latents, so twice the factor must divide it); UserError if it does not divide."""
    pipe = setup.pipeline
    factor = 1 if setup.vae is None else int(getattr(pipe, "vae_scale_factor", None)
                                             or getattr(pipe, "vae_scale_factor_spatial", None)
                                             or 2 ** (len(setup.vae.config.block_out_channels) - 1))
    multiple = math.lcm(factor * setup.denoiser.patch, setup.denoiser.family.pixel_multiple)
    sides = tuple(int(v) for v in resolution_sides(resolution))
    if any(side % multiple for side in sides):
        nearest = format_resolution([max(1, round(side / multiple)) * multiple for side in sides])
        raise UserError(f"--resolution {format_resolution(sides)} is not a multiple of {multiple} (the VAE's factor "
                        f"times the network's patch, and what its pipeline takes); accepted: e.g. {nearest}")
    state = tuple(side // factor for side in sides)
    return state[0] if len(set(state)) == 1 else state


def state_frames(setup: ModelSetup, frames: int) -> int:
    """Latent frames of a video model's state for `frames` video frames (WanPipeline's num_frames: 1 + a multiple of
    the VAE's temporal factor); UserError for an image model or a count the pipeline would round."""
    if setup.denoiser.family.default_frames is None:
        raise UserError(f"--frames {frames} is for video models; accepted: no --frames for "
                        f"{type(setup.network).__name__} (an image model)")
    factor = int(getattr(setup.pipeline, "vae_scale_factor_temporal", 4))
    if frames < 1 or (frames - 1) % factor:
        raise UserError(f"--frames {frames} is invalid; accepted: 1 + a multiple of {factor} (what the pipeline "
                        f"samples without rounding), e.g. {max(1, (frames - 1) // factor) * factor + 1}")
    return (frames - 1) // factor + 1


def size_state(setup: ModelSetup, resolution: int | tuple[int, int] | None = None, frames: int | None = None) -> None:
    """Set the denoiser's state size for images of `resolution` pixels and videos of `frames` frames (None: the
    model's own), as a fit records them and an evaluation of its table restores them."""
    if resolution is not None:
        setup.denoiser.sample_size = state_side(setup, resolution)
    if frames is not None:
        setup.denoiser.frames = state_frames(setup, frames)


def latent_decoder(pipeline):
    """The pipeline's autoencoder (`vae`, or `vqvae` for LDM), or None for a pixel-space model."""
    return getattr(pipeline, "vae", None) or getattr(pipeline, "vqvae", None)


def decode_latents(vae, latents, batch_size: int = 16):
    """Images in about [-1, 1] from latents, as the pipelines decode them (divide by the VAE's scaling factor; SD3 and
    Flux then add its shift factor). Video latents (N, C, F, H, W) are de-normalised by the VAE's per-channel
    `latents_mean` / `latents_std` as WanPipeline does and decoded to their frames, N·F' images in sample order."""
    import torch

    param = next(vae.parameters())
    if latents.dim() == 5:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(param.device, param.dtype)
        inverse_std = (1.0 / torch.tensor(vae.config.latents_std)).view(shape).to(param.device, param.dtype)
        with torch.no_grad():  # WanPipeline's own arithmetic, so decoded frames match its output
            videos = [vae.decode(chunk.to(param.device, param.dtype) / inverse_std + mean).sample.to(torch.float32)
                      for chunk in latents.split(batch_size)]
        video = torch.cat(videos).to(latents.device)
        return video.transpose(1, 2).reshape(-1, video.shape[1], *video.shape[-2:])
    scale = getattr(vae.config, "scaling_factor", 1.0)
    shift = getattr(vae.config, "shift_factor", None)
    with torch.no_grad():
        out = [vae.decode((chunk / scale if shift is None else chunk / scale + shift).to(param.device, param.dtype)
                          ).sample.to(torch.float32) for chunk in latents.split(batch_size)]
    return torch.cat(out).to(latents.device)

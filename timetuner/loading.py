"""Hub id or local folder → diffusers pipeline, and named few-step schedulers built from its config."""

from __future__ import annotations

import warnings
from pathlib import Path

from timetuner.errors import UserError, check_choice

# name → (diffusers scheduler class name, config overrides). "dpm2" is DPM-Solver-2 (singlestep, order 2);
# "heun" uses Karras/EDM sigmas (ρ = 7).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm2": ("DPMSolverSinglestepScheduler", {"solver_order": 2}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
}


def resolve_model(model: str | None) -> str:
    """The embedded digits model's folder for None; a local folder, checked; else the string as a hub id."""
    from timetuner.assets import EMBEDDED_MODEL

    if model is None:
        return str(EMBEDDED_MODEL)
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


def parse_dtype(name: str | None):
    """'float16' → torch.float16 (None stays None: the weights' own dtype)."""
    import torch

    if name is None:
        return None
    return getattr(torch, check_choice("--dtype", name, DTYPES))


def make_scheduler(name: str, base_config):
    """A scheduler of kind `name` (ddim, ddpm, dpm2, heun, euler) built from a pipeline's scheduler config."""
    import diffusers

    class_name, overrides = SCHEDULERS[check_choice("--scheduler", name, SCHEDULERS)]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)

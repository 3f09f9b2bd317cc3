"""Which tables fit which scheduler and model: the solver a table brings, guidance scales, the σ grid and `mu` of flow
tables, the weights hash. Read by `TunedScheduler` when tables load and when a pipeline sets its timesteps."""

from __future__ import annotations

import hashlib
import math

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from timetuner.errors import UserError
from timetuner.table import TauTable, is_flow


def scheduler_class(name: str):
    """The diffusers scheduler class called `name`; a UserError naming what is accepted otherwise."""
    import diffusers

    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)) or cls.__name__ == "TunedScheduler":
        raise UserError(f"solver class {name!r} is not a diffusers scheduler; accepted: a scheduler class of "
                        f"diffusers {diffusers.__version__}, e.g. DDIMScheduler, DPMSolverMultistepScheduler, "
                        "HeunDiscreteScheduler")
    return cls


NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                       "prediction_type", "rescale_betas_zero_snr")


def solver_for(scheduler, table):
    """`scheduler` itself if the table is for its class; else the table's solver, built from the table's config,
    when it shares the scheduler's noise schedule (the same model, sampled by another solver)."""
    name = table.scheduler_class
    fitted_on, runs = is_flow((name, table.scheduler_config)), is_flow(scheduler)
    if fitted_on != runs:
        kinds = {True: "a flow-matching model", False: "a DDPM-style (noise-prediction) model"}
        raise UserError(f"table for {name} was fitted on {kinds[fitted_on]} and this {type(scheduler).__name__} "
                        f"samples {kinds[runs]}; accepted: a table fitted on this model")
    if type(scheduler).__name__ == name:
        return scheduler
    solver = scheduler_class(name)
    mine = table.scheduler_config
    for key in NOISE_SCHEDULE_KEYS:
        theirs = scheduler.config.get(key)
        if key in mine and theirs is not None and _plain(mine[key]) != _plain(theirs):
            raise UserError(f"table for {name} was fitted with {key}={mine[key]!r} and this "
                            f"{type(scheduler).__name__} has {key}={theirs!r}: another noise schedule; accepted: a "
                            "table fitted for this model's noise schedule")
    return solver.from_config(mine)


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def same_sigmas(passed, fitted: list[float] | None) -> bool:
    """Whether the σ grid a pipeline passes is the one a table was fitted on (both absent counts)."""
    if passed is None or fitted is None:
        return passed is None and fitted is None
    passed = [float(v) for v in torch.as_tensor(passed, dtype=torch.float64).reshape(-1).tolist()]
    return len(passed) == len(fitted) and all(abs(a - b) <= 1e-6 for a, b in zip(passed, fitted, strict=True))


def same_mu(table: TauTable, mu) -> bool:
    """Whether the pipeline's dynamic shift `mu` is the one the table was fitted at."""
    fitted = table.mu
    return fitted is not None and mu is not None and math.isclose(float(mu), fitted, rel_tol=0, abs_tol=1e-6)


def check_mu(table: TauTable, mu) -> None:
    """A flow table runs at the dynamic shift it was fitted at; another one is refused in one line."""
    fitted = table.mu
    if same_mu(table, mu):
        return
    raise UserError(f"table for {table.num_inference_steps} steps was fitted at mu={fitted} and the pipeline "
                    f"passes mu={None if mu is None else float(mu)} (mu follows the image size); accepted: the image "
                    "size the table was fitted at, or a table fitted at this mu")


def table_scale(table: TauTable) -> float | None:
    """The guidance scale a table was fitted at, or None for an unconditional model."""
    value = table.metadata.get("guidance_scale")
    return None if value is None else float(value)


def same_scale(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-6))


def scale_name(scale: float | None) -> str:
    return "an unconditional model" if scale is None else f"guidance scale {scale:g}"


def select_guidance_scale(tables: list[TauTable], guidance_scale: float | None) -> tuple[list[TauTable], float | None]:
    """The tables of one guidance scale, and that scale: `guidance_scale` if given, else the only one there is."""
    scales = sorted({table_scale(t) for t in tables}, key=lambda v: (v is not None, v or 0.0))
    names = ", ".join(scale_name(v) for v in scales)
    if guidance_scale is not None:
        chosen = [t for t in tables if same_scale(table_scale(t), float(guidance_scale))]
        if not chosen:
            raise UserError(f"no table was fitted at guidance scale {float(guidance_scale):g} (the tables are for "
                            f"{names}); accepted: guidance_scale one of the tables' scales")
        return chosen, float(guidance_scale)
    if len(scales) > 1:
        given = [v for v in scales if v is not None]
        raise UserError(f"the tables are for {names}; a table is tuned for one guidance scale, so pass "
                        f"guidance_scale= one of {', '.join(f'{v:g}' for v in given)}")
    return tables, (scales[0] if scales else None)


def model_hash(module: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of a module's parameters and buffers: names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


FINGERPRINT_SAMPLES = 256  # weights read by `model_fingerprint`, spread over the model's largest tensors
FINGERPRINT_RTOL = 2e-2  # float16 and bfloat16 round a float32 weight by at most 2^-11 and 2^-8 of it


def model_fingerprint(module: torch.nn.Module) -> dict:
    """What identifies a network's weights whatever their dtype or device, cheaply: a hash of the tensors' names and
    shapes, and FINGERPRINT_SAMPLES weights (as float) at fixed positions of its largest tensors — a few hundred
    values read, not the whole model. Two fingerprints match when the structures are equal and the samples agree
    within FINGERPRINT_RTOL (`same_model`): the same weights in float32, bfloat16 or float16, on any device."""
    state = module.state_dict()
    names = sorted(state)
    structure = hashlib.sha256("\n".join(f"{n}:{tuple(state[n].shape)}" for n in names).encode()).hexdigest()[:16]
    floating = sorted((n for n in names if state[n].is_floating_point() and state[n].numel()),
                      key=lambda n: (-state[n].numel(), n))[:64]
    samples = []
    for i, name in enumerate(floating):
        flat = state[name].detach().reshape(-1)
        count = FINGERPRINT_SAMPLES // len(floating) + (i < FINGERPRINT_SAMPLES % len(floating))
        positions = torch.linspace(0, flat.numel() - 1, min(count, flat.numel())).round().long()
        samples += flat[positions.to(flat.device)].float().cpu().tolist()
    return {"structure": structure, "samples": [float(v) for v in samples]}


def same_model(expected: dict, got: dict) -> bool:
    """Whether two `model_fingerprint`s are of the same weights (up to the rounding of a 16-bit dtype)."""
    a, b = expected.get("samples", []), got.get("samples", [])
    return expected.get("structure") == got.get("structure") and len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-6) for x, y in zip(a, b, strict=True))


def check_model(table: TauTable, unet) -> None:
    """Raise a UserError if `table` was fitted for other weights than `unet`'s: by its fingerprint (the same in any
    dtype and on any device), or — a table written before fingerprints — by its weights hash (dtype-dependent)."""
    fingerprint = table.metadata.get("model_fingerprint")
    if fingerprint:
        if not same_model(fingerprint, model_fingerprint(unet)):
            model = table.metadata.get("model", "another model")
            raise UserError(f"table was fitted for {model} (fingerprint {fingerprint.get('structure')}), not for this "
                            "model (its weights differ, beyond a float32 / bfloat16 / float16 rounding); accepted: "
                            "the model the table was fitted for, in any dtype")
        return
    expected = table.metadata.get("model_hash")
    if expected and model_hash(unet) != expected:
        model = table.metadata.get("model", "another model")
        raise UserError(f"table was fitted for {model} (weights {expected}), not for this model "
                        f"(weights {model_hash(unet)}); accepted: the model the table was fitted for")

"""`TunedScheduler`: a diffusers scheduler that feeds the network τ while the solver keeps its own t.

    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, "ddim-10.safetensors")
    images = pipe(num_inference_steps=10).images          # the table for 10 steps is picked by step count

Pipelines pass the *same* value to the network and to `scheduler.step(model_output, t, sample)`. So this
scheduler exposes `timesteps` = τ (what the pipeline hands the network) and, inside `scale_model_input` and
`step`, advances the wrapped scheduler with its own t_k, chosen by evaluation index k — never by value: DDIM
indexes `alphas_cumprod[t]` (a float raises) and DPM-Solver falls back silently to its last index for an
unknown value. With τ = t it is bit-identical to the wrapped scheduler.

Notation: k counts network evaluations (Heun and DPM-Solver-2 evaluate twice per step); t_k = inner.timesteps[k];
τ_k = self.timesteps[k].

Guidance scales: a table fitted on a conditional model records the classifier-free guidance scale s it was tuned
at (the optimal τ differs per scale), and a TunedScheduler holds the tables of one scale — chosen explicitly:

    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, ["tau-…-cfg3.safetensors", "tau-…-cfg7.5.safetensors"],
                                               guidance_scale=7.5)   # keeps the 7.5 tables; refuses if none
    images = pipe(prompt, num_inference_steps=10, guidance_scale=7.5).images   # call the pipeline at that scale

Without `guidance_scale`, tables of more than one scale are refused (naming the scales available); tables of a
single scale, or of unconditional models, load as they are. `scheduler.guidance_scale` says which scale the
tables are for (None: unconditional); pipelines do not pass their scale to the scheduler, so keeping the two
equal is the caller's part.

Saving a pipeline writes `["timetuner", "TunedScheduler"]` into `model_index.json`; loading it in a fresh
process needs `import timetuner` first, as for any scheduler from outside diffusers.
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from timetuner.errors import UserError
from timetuner.table import TauTable, config_dict, set_grid

logger = logging.getLogger(__name__)
MATCH_ATOL = 1e-4  # how close a table's t must be to the scheduler's own timesteps


class TunedScheduler(SchedulerMixin, ConfigMixin):
    """Wraps a diffusers scheduler; the network sees the tuned τ of the table for the current step count."""

    config_name = "scheduler_config.json"

    @register_to_config
    def __init__(self, inner_class: str = "DDIMScheduler", inner_config: dict | None = None,
                 tables: dict | None = None, guidance_scale: float | None = None):
        import diffusers

        cls = getattr(diffusers, inner_class, None)
        if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)) or cls is TunedScheduler:
            raise UserError(f"inner_class {inner_class!r} is not a diffusers scheduler; accepted: e.g. "
                            "DDIMScheduler, DPMSolverSinglestepScheduler, HeunDiscreteScheduler")
        self.inner = cls.from_config(inner_config or {})
        # Looked up once: `step` runs once per network evaluation and must add no measurable time.
        self._step_params = frozenset(inspect.signature(self.inner.step).parameters)
        self.tables: dict[int, TauTable] = {}
        for table in (tables or {}).values():
            self._add(TauTable.from_dict(table))
        self.timesteps = None
        self.num_inference_steps = None
        self._inner_timesteps = None
        self._tau_values: list[float] = []
        self._k = 0

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_table(cls, scheduler, tables, unet=None, guidance_scale: float | None = None) -> TunedScheduler:
        """Wrap `scheduler` (or extend a TunedScheduler) with one table or several (objects or file paths).

        Each table must match the scheduler's class and configuration; with `unet`, also the model it was
        fitted for (by weights hash). `guidance_scale` keeps the tables fitted at that classifier-free guidance
        scale; without it, tables of several scales are ambiguous and refused. A mismatch is a UserError naming
        the difference and what is available.
        """
        if not isinstance(tables, list | tuple):
            tables = [tables]
        loaded = [t if isinstance(t, TauTable) else TauTable.load(t) for t in tables]
        loaded, scale = select_guidance_scale(loaded, guidance_scale)
        if isinstance(scheduler, TunedScheduler):
            held = scheduler.guidance_scale
            if scheduler.tables and not _same_scale(held, scale):
                raise UserError(f"this TunedScheduler holds tables for {_scale_name(held)}, not "
                                f"{_scale_name(scale)}; accepted: tables of one guidance scale per scheduler")
            wrapped = cls.from_config(scheduler.config)
        else:
            wrapped = cls(inner_class=type(scheduler).__name__, inner_config=config_dict(scheduler.config))
        wrapped.register_to_config(guidance_scale=scale)
        for table in loaded:
            if unet is not None:
                check_model(table, unet)
            wrapped._add(table)
        return wrapped

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale the tables were fitted at (None: unconditional tables)."""
        return self.config.get("guidance_scale")

    def _add(self, table: TauTable) -> None:
        table.check_scheduler(self.inner)
        if not _same_scale(table_scale(table), self.guidance_scale):
            raise UserError(f"table for {table.num_inference_steps} steps was fitted for "
                            f"{_scale_name(table_scale(table))}, and this scheduler holds "
                            f"{_scale_name(self.guidance_scale)}; accepted: tables of one guidance scale")
        self.tables[table.num_inference_steps] = table
        self.register_to_config(tables={str(k): v.to_dict() for k, v in sorted(self.tables.items())})

    # -- what pipelines read --------------------------------------------------------------------------------------
    @property
    def order(self) -> int:
        return self.inner.order

    @property
    def init_noise_sigma(self):
        return self.inner.init_noise_sigma

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str):
        # Anything else a pipeline or user reads (sigmas, alphas_cumprod, step_index, …) is the wrapped one's.
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            return super().__getattr__(name)
        return getattr(inner, name)

    # -- sampling -----------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list | None = None, sigmas: list | None = None, **kwargs) -> None:
        """Set the inner scheduler's t_k, and expose τ_k from the table for this step count as `timesteps`."""
        custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
        accepted = inspect.signature(self.inner.set_timesteps).parameters
        for name in custom:
            if name not in accepted:
                raise ValueError(f"{type(self.inner).__name__}.set_timesteps does not accept custom {name}")
        table = self.tables.get(num_inference_steps) if not custom else None
        if table is not None and "timesteps" in table.metadata:
            # The table was fitted on an explicit grid (e.g. log-SNR): the wrapped scheduler runs that grid.
            set_grid(self.inner, num_inference_steps, table.metadata["timesteps"], device=device)
        else:
            self.inner.set_timesteps(num_inference_steps, device=device, **custom, **kwargs)
        t = self.inner.timesteps
        self._inner_timesteps = t
        self.num_inference_steps = getattr(self.inner, "num_inference_steps", None) or num_inference_steps
        self._k = 0
        if table is None:
            if self.tables and not custom:
                logger.warning("TunedScheduler has no table for %s steps (tables: %s); sampling with plain "
                               "timesteps", self.num_inference_steps, sorted(self.tables))
            self.timesteps = t
            self._tau_values = [float(v) for v in t.tolist()]
            return
        mine = t.detach().to("cpu", torch.float64)
        if table.t.numel() != mine.numel() or not torch.allclose(table.t, mine, atol=MATCH_ATOL, rtol=0):
            raise UserError(f"table for {self.num_inference_steps} steps expects t = {table.t.tolist()} but the "
                            f"scheduler runs t = {mine.tolist()}; accepted: the scheduler the table was fitted for")
        self.timesteps = table.tau.to(device=t.device, dtype=torch.float32)
        self._tau_values = [float(v) for v in self.timesteps.tolist()]

    def _inner_t(self, timestep) -> torch.Tensor:
        """t_k for the current evaluation k, after checking that the pipeline passed τ_k."""
        if self._inner_timesteps is None:
            raise RuntimeError("call set_timesteps before sampling with a TunedScheduler")
        k = self._k
        if k >= len(self.timesteps):
            raise RuntimeError(f"TunedScheduler got evaluation {k + 1} of a {len(self.timesteps)}-evaluation run; "
                               "call set_timesteps to start a new one")
        if timestep is not None:
            expected = self._tau_values[k]
            got = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
            if abs(got - expected) > MATCH_ATOL * max(1.0, abs(expected)):
                raise RuntimeError(f"TunedScheduler expected the pipeline to pass τ_{k} = {expected} but got "
                                   f"{got}; pass scheduler.timesteps[k]")
        return self._inner_timesteps[k]

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The wrapped scheduler's input scaling at t_k (σ-space schedulers divide by √(σ² + 1))."""
        return self.inner.scale_model_input(sample, self._inner_t(timestep), *args, **kwargs)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True, **kwargs):
        """The wrapped scheduler's update with its own t_k; `eta` and `generator` are named so pipelines pass them."""
        t = self._inner_t(timestep)
        offered = dict(eta=eta, use_clipped_model_output=use_clipped_model_output, generator=generator,
                       variance_noise=variance_noise, **kwargs)
        extra = {k: v for k, v in offered.items() if k in self._step_params}
        out = self.inner.step(model_output, t, sample, return_dict=return_dict, **extra)
        self._k += 1
        return out

    # -- img2img / inpaint ----------------------------------------------------------------------------------------
    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at evaluation `begin_index` (img2img strength < 1)."""
        self._k = begin_index
        if hasattr(self.inner, "set_begin_index"):
            self.inner.set_begin_index(begin_index)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise to the level of t for each τ the pipeline passes (τ is mapped back to t by position)."""
        return self.inner.add_noise(original_samples, noise, self._to_inner(timesteps))

    def _to_inner(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self._inner_timesteps is None or self.timesteps is self._inner_timesteps:
            return timesteps
        values = torch.as_tensor(timesteps).reshape(-1)
        taus = self.timesteps.to(values.device, torch.float64)
        mapped = []
        for v in values.to(torch.float64):
            hits = (taus - v).abs() <= MATCH_ATOL * max(1.0, abs(float(v)))
            mapped.append(self._inner_timesteps[int(hits.nonzero()[0])] if hits.any() else v.to(values.dtype))
        return torch.stack(mapped).to(device=values.device).reshape(torch.as_tensor(timesteps).shape)


def table_scale(table: TauTable) -> float | None:
    """The guidance scale a table was fitted at, or None for an unconditional model."""
    value = table.metadata.get("guidance_scale")
    return None if value is None else float(value)


def _same_scale(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, abs_tol=1e-6))


def _scale_name(scale: float | None) -> str:
    return "an unconditional model" if scale is None else f"guidance scale {scale:g}"


def select_guidance_scale(tables: list[TauTable], guidance_scale: float | None) -> tuple[list[TauTable], float | None]:
    """The tables of one guidance scale, and that scale: `guidance_scale` if given, else the only one there is."""
    scales = sorted({table_scale(t) for t in tables}, key=lambda v: (v is not None, v or 0.0))
    names = ", ".join(_scale_name(v) for v in scales)
    if guidance_scale is not None:
        chosen = [t for t in tables if _same_scale(table_scale(t), float(guidance_scale))]
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
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_model(table: TauTable, unet) -> None:
    """Raise a UserError if `table` records a model hash that differs from `unet`'s."""
    expected = table.metadata.get("model_hash")
    if expected and model_hash(unet) != expected:
        model = table.metadata.get("model", "another model")
        raise UserError(f"table was fitted for {model} (weights {expected}), not for this model "
                        f"(weights {model_hash(unet)}); accepted: the model the table was fitted for")

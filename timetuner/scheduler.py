"""`TunedScheduler`: a diffusers scheduler that feeds the network τ while the solver keeps its own t.

    pipe.scheduler = TunedScheduler.from_table(pipe.scheduler, "ddim-10.safetensors")
    images = pipe(num_inference_steps=10).images          # the table for 10 steps is picked by step count

Pipelines pass the *same* value to the network and to `scheduler.step(model_output, t, sample)`. So this
scheduler exposes `timesteps` = τ (what the pipeline hands the network) and, inside `scale_model_input`, `step`
and `add_noise`, maps τ_k back to the solver's own t_k — by evaluation index, never by value: DDIM indexes
`alphas_cumprod[t]` (a float raises) and DPM-Solver falls back silently to its last index for an unknown value.

What it guarantees: with τ = t (an identity table, or a step count it has no table for) every call is the wrapped
scheduler's own, so it is bit-identical to it; its `config` is the wrapped scheduler's config plus one private key
`_timetuner` (solver class, tables, guidance scale), so `config.*` reads and `X.from_config(pipe.scheduler.config)`
behave as for the plain class; attribute reads and writes it does not own reach the wrapped scheduler.

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

import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from timetuner.coefficients import Corrector
from timetuner.errors import UserError
from timetuner.matching import (  # noqa: F401 (check_model, model_hash: their old home, still imported from here)
    check_model,
    check_mu,
    model_hash,
    same_mu,
    same_scale,
    same_sigmas,
    scale_name,
    scheduler_class,
    select_guidance_scale,
    solver_for,
    table_scale,
)
from timetuner.table import TauTable, as_array, is_flow, set_grid

logger = logging.getLogger(__name__)
MATCH_ATOL = 1e-4  # how close a table's t must be to the scheduler's own timesteps, and a passed value to τ_k
OWN = "_timetuner"  # the config key holding the wrapper's own settings
# The solver's calls that take a time, served by the wrapper with τ_k mapped to t_k: `scale_noise` is flow matching's
# add_noise (SD3/Flux img2img).
MAPPED = {"scale_model_input": "_scale_model_input", "scale_noise": "_scale_noise"}
# Attributes that live on the wrapper itself; every other attribute is the wrapped scheduler's.
OWN_ATTRIBUTES = frozenset({"inner", "tables", "_own", "_step_params", "_set_params", "_tau", "_tau_values",
                            "_inner_timesteps", "_k", "_warned", "_corrector"})


class TunedScheduler(SchedulerMixin, ConfigMixin):
    """Wraps a diffusers scheduler; the network sees the tuned τ of the table for the current step count."""

    config_name = "scheduler_config.json"

    def __init__(self, solver_class: str = "DDIMScheduler", tables: dict | None = None,
                 guidance_scale: float | None = None, **solver_config):
        cls = scheduler_class(solver_class)
        solver_config.pop(OWN, None)  # a plain scheduler swapped from a TunedScheduler's config still carries it
        self.inner = cls.from_config(solver_config)
        self._own = {"solver_class": cls.__name__, "tables": {}, "guidance_scale": guidance_scale}
        # Looked up once: `step` runs once per network evaluation and must add no measurable time.
        self._step_params = frozenset(inspect.signature(self.inner.step).parameters)
        self._set_params = frozenset(inspect.signature(self.inner.set_timesteps).parameters)
        self.tables: dict[int, TauTable] = {}
        self._tau = None  # τ for the current run when a tuned (non-identity) table is active, else None
        self._tau_values: list[float] = []
        self._inner_timesteps = None
        self._k = 0
        self._warned = False
        self._corrector = None  # the active table's learned coefficients (`timetuner.coefficients`), else None
        for table in (tables or {}).values():
            self._add(TauTable.from_dict(table))

    # -- configuration: the wrapped scheduler's, plus `_timetuner` ----------------------------------------------
    @property
    def _internal_dict(self) -> FrozenDict:
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError("_internal_dict")
        return FrozenDict({**inner.config, OWN: dict(self._own)})

    @_internal_dict.setter
    def _internal_dict(self, value) -> None:
        # Pipelines rewrite a scheduler's config in place (SD: steps_offset, clip_sample): the solver gets it.
        value = dict(value)
        own = value.pop(OWN, None)
        self.inner._internal_dict = FrozenDict(value)
        if own is not None:
            self._own = dict(own)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """A TunedScheduler from a config: its own (tables included), a plain scheduler's (no tables yet; the
        solver is `_class_name`, or `solver_class=`), or one saved by timetuner 0.1 (`inner_class`)."""
        config = {**dict(config or {}), **kwargs}
        own = dict(config.pop(OWN, None) or {})
        if "inner_class" in config:  # the layout timetuner 0.1 saved
            own.setdefault("solver_class", config.pop("inner_class"))
            config = {**dict(config.pop("inner_config", None) or {}), **config}
        for key in ("solver_class", "tables", "guidance_scale"):
            if key in config:
                own[key] = config.pop(key)
        class_name = config.pop("_class_name", None)
        if "solver_class" not in own and isinstance(class_name, str) and class_name != cls.__name__:
            own["solver_class"] = class_name
        # The solver's own private keys stay: `_use_default_values` decides what `X.from_config` takes as given.
        solver = {k: v for k, v in config.items() if k != "_diffusers_version"}
        model = cls(solver_class=own.get("solver_class", "DDIMScheduler"), tables=own.get("tables"),
                    guidance_scale=own.get("guidance_scale"), **solver)
        return (model, {}) if return_unused_kwargs else model

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_table(cls, scheduler, tables, unet=None, guidance_scale: float | None = None) -> TunedScheduler:
        """Wrap `scheduler` (or extend a TunedScheduler) with one table or several (objects or file paths).

        A table carries its solver: onto a scheduler of another class (a DPM-Solver++ table onto a pipeline that
        ships DDIM) it brings its own, built from the table's configuration, provided the noise schedule (T, betas,
        prediction type) is the scheduler's; tables of the same class must match its configuration. With `unet`,
        also the model it was fitted for (by weights hash). `guidance_scale` keeps the tables fitted at that
        classifier-free guidance scale; without it, tables of several scales are ambiguous and refused. A mismatch
        is a UserError naming the difference and what is available.
        """
        if not isinstance(tables, list | tuple):
            tables = [tables]
        loaded = [t if isinstance(t, TauTable) else TauTable.load(t) for t in tables]
        loaded, scale = select_guidance_scale(loaded, guidance_scale)
        if isinstance(scheduler, TunedScheduler):
            held = scheduler.guidance_scale
            if scheduler.tables and not same_scale(held, scale):
                raise UserError(f"this TunedScheduler holds tables for {scale_name(held)}, not "
                                f"{scale_name(scale)}; accepted: tables of one guidance scale per scheduler")
            wrapped = cls.from_config(scheduler.config)
        else:
            scheduler = solver_for(scheduler, loaded[0]) if loaded else scheduler
            wrapped = cls(solver_class=type(scheduler).__name__, **dict(scheduler.config))
        wrapped._own["guidance_scale"] = scale
        for table in loaded:
            if unet is not None:
                check_model(table, unet)
            wrapped._add(table)
        return wrapped

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale the tables were fitted at (None: unconditional tables)."""
        return self._own.get("guidance_scale")

    def _add(self, table: TauTable) -> None:
        table.check_scheduler(self.inner)
        if not same_scale(table_scale(table), self.guidance_scale):
            raise UserError(f"table for {table.num_inference_steps} steps was fitted for "
                            f"{scale_name(table_scale(table))}, and this scheduler holds "
                            f"{scale_name(self.guidance_scale)}; accepted: tables of one guidance scale")
        self.tables[table.num_inference_steps] = table
        self._own["tables"] = {str(k): v.to_dict() for k, v in sorted(self.tables.items())}

    # -- attributes: the wrapped scheduler's, except the wrapper's own ------------------------------------------
    def __getattr__(self, name: str):
        inner = self.__dict__.get("inner")
        if name in MAPPED and hasattr(inner, name):  # calls that take a time: τ mapped to t (only where the solver
            return getattr(self, MAPPED[name])     # has them: flow schedulers have no scale_model_input)
        if inner is not None and not name.startswith("__"):
            try:
                return getattr(inner, name)
            except AttributeError:
                pass
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")  # Python's own wording

    def __setattr__(self, name: str, value) -> None:
        if name in OWN_ATTRIBUTES or "inner" not in self.__dict__ or hasattr(type(self), name):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    @property
    def timesteps(self) -> torch.Tensor:
        """τ_k of the active table, else the wrapped scheduler's own timesteps (dtype and device as it has them)."""
        return self.inner.timesteps if self._tau is None else self._tau

    @timesteps.setter
    def timesteps(self, value) -> None:
        self.inner.timesteps = value
        self._tau = None

    @property
    def compatibles(self) -> list:
        """The classes a pipeline may swap this scheduler for: the wrapped scheduler's (UIs list them from here)."""
        return self.inner.compatibles

    @property
    def order(self) -> int:
        return self.inner.order

    @property
    def init_noise_sigma(self):
        return self.inner.init_noise_sigma

    def __len__(self) -> int:
        return len(self.inner)

    # -- sampling -----------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list | None = None, sigmas: list | None = None, **kwargs) -> None:
        """Set the wrapped scheduler's t_k (on the table's grid when it has one) and, when a tuned table exists
        for this step count, expose its τ_k as `timesteps`.

        Custom `timesteps` run plain. Custom `sigmas` run plain too, unless they are the σ grid the table was fitted
        on (Flux passes linspace(1, 1/N, N) on every call: a table fitted through FluxPipeline records it) or the
        pipeline's own grid that the table's learned σ grid replaces (its `pipeline_sigmas`). A
        scheduler with dynamic shifting gets `mu` from the pipeline (it follows the image size): a table applies only
        at the `mu` it was fitted at, and another `mu` is refused in one line rather than run with τ tuned for
        another schedule; an identity table (τ = t on a named grid) tunes nothing for a size and runs plainly at any
        other `mu`."""
        custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
        for name in custom:
            if name not in self._set_params:
                raise ValueError(f"The current scheduler class {type(self.inner)}'s `set_timesteps` does not support "
                                 f"custom {name} schedules. Please check whether you are using the correct scheduler.")
        # diffusers' `retrieve_timesteps` passes custom sigmas without the step count (Flux, SD3 with sigmas=).
        steps = num_inference_steps if num_inference_steps is not None or sigmas is None else len(sigmas)
        table = self.tables.get(steps)
        own_sigmas = (table is not None and sigmas is not None and not same_sigmas(sigmas, table.sigmas)
                      and not same_sigmas(sigmas, table.metadata.get("pipeline_sigmas")))
        if table is not None and (timesteps is not None or own_sigmas):
            table = None  # a schedule of the caller's own: the plain scheduler
        elif table is not None and table.sigmas is not None:
            custom = {"sigmas": as_array(table.sigmas)}  # the table owns its σ grid (the pipeline's, or none)
        if table is not None and self.inner.config.get("use_dynamic_shifting"):
            table = _at_mu(table, kwargs.get("mu"))
        if table is not None and "timesteps" in table.metadata:
            # The table was fitted on an explicit grid (e.g. log-SNR): the wrapped scheduler runs that grid.
            set_grid(self.inner, steps, table.metadata["timesteps"], device=device)
        else:
            args = {"device": device, **custom, **kwargs}
            if num_inference_steps is not None or "num_inference_steps" not in self._set_params:
                self.inner.set_timesteps(num_inference_steps, **args)
            else:
                self.inner.set_timesteps(**args)
        self._k, self._tau, self._corrector = 0, None, None
        if table is None:
            if steps in self.tables and custom:
                logger.warning("TunedScheduler got a schedule of its own (%s) for %s steps, not the table's grid; "
                               "sampling with it plainly", ", ".join(custom), steps)
            elif self.tables and not custom:
                logger.warning("TunedScheduler has no table for %s steps (tables: %s); sampling with plain "
                               "timesteps", num_inference_steps, sorted(self.tables))
            return
        t = self.inner.timesteps
        mine = t.detach().to("cpu", torch.float64)
        if table.t.numel() != mine.numel() or not torch.allclose(table.t, mine, atol=MATCH_ATOL, rtol=0):
            raise UserError(f"table for {steps} steps expects t = {table.t.tolist()} but the "
                            f"scheduler runs t = {mine.tolist()}; accepted: the scheduler the table was fitted for")
        if table.is_identity:
            return  # τ = t: every call is the wrapped scheduler's own
        self._inner_timesteps = t
        self._tau = table.tau.to(device=t.device, dtype=torch.float32)
        self._tau_values = [float(v) for v in self._tau.tolist()]
        if table.has_coefficients:
            self._corrector = Corrector(self.inner, *table.coefficients, is_flow(self.inner))

    def _inner_t(self, timestep):
        """The solver's t for the value a pipeline passed: t_k for τ_k (k the current evaluation, else the index
        whose τ it is); any other value is passed on as given, as the plain scheduler would take it."""
        if self._tau is None or timestep is None:
            return timestep
        got = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        k = self._index_of(got, prefer=self._k)
        if k is not None:
            self._k = k
            return self._inner_timesteps[k]
        if not self._warned:
            logger.warning("TunedScheduler got timestep %s, which is no tuned τ of this run; passing it to %s as "
                           "given (plain behaviour)", got, type(self.inner).__name__)
            self._warned = True
        return timestep

    def _scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        """The wrapped scheduler's input scaling at t_k (σ-space schedulers divide by √(σ² + 1))."""
        return self.inner.scale_model_input(sample, self._inner_t(timestep), *args, **kwargs)

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True, **kwargs):
        """The wrapped scheduler's update with its own t_k; `eta` and `generator` are named so pipelines pass them.
        A table with learned coefficients scales the output handed to it and corrects what it returns."""
        t = self._inner_t(timestep)
        offered = dict(eta=eta, use_clipped_model_output=use_clipped_model_output, generator=generator,
                       variance_noise=variance_noise, **kwargs)
        extra = {k: v for k, v in offered.items() if k in self._step_params}
        k, corrector = self._k, self._corrector
        if corrector is not None:
            model_output = corrector.scaled(k, model_output)
        out = self.inner.step(model_output, t, sample, return_dict=return_dict, **extra)
        if corrector is not None:
            prev = out.prev_sample if return_dict else out[0]
            prev = corrector.corrected(self.inner, k, model_output, sample, prev)
            if return_dict:
                out.prev_sample = prev
            else:
                out = (prev, *out[1:])
        self._k += 1
        return out

    # -- img2img / inpaint ----------------------------------------------------------------------------------------
    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at evaluation `begin_index` (img2img strength < 1)."""
        self._k = begin_index
        if hasattr(self.inner, "set_begin_index"):
            self.inner.set_begin_index(begin_index)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise to the level of t for each τ the pipeline passes (τ_k mapped back to t_k by position)."""
        return self.inner.add_noise(original_samples, noise, self._to_inner(timesteps))

    def _scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Flow matching's forward process (SD3/Flux img2img): noise to the σ of t for each τ the pipeline passes."""
        return self.inner.scale_noise(sample, self._to_inner(timestep), noise)

    def _to_inner(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self._tau is None:
            return timesteps
        values = torch.as_tensor(timesteps).reshape(-1)
        mapped = []
        for v in values:
            k = self._index_of(float(v))
            mapped.append(self._inner_timesteps[k].to(values.device) if k is not None else v.to(values.dtype))
        return torch.stack(mapped).reshape(torch.as_tensor(timesteps).shape)

    def _index_of(self, value: float, prefer: int | None = None) -> int | None:
        """The evaluation k whose τ_k the value is (`prefer` checked first, as pipelines pass τ in order)."""
        order = range(len(self._tau_values))
        if prefer is not None and prefer < len(self._tau_values):
            order = [prefer, *order]
        for k in order:
            expected = self._tau_values[k]
            if abs(value - expected) <= MATCH_ATOL * max(1.0, abs(expected)):
                return k
        return None


def _at_mu(table, mu):
    """The table to run at the pipeline's dynamic shift `mu`: itself at the `mu` it was fitted at; at another, None
    (plain) for an identity table, which tunes nothing for one size, and a one-line refusal for any other."""
    if table.is_identity and "learned_grid" not in table.metadata:
        return table if same_mu(table, mu) else None
    check_mu(table, mu)
    return table

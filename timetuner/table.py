"""`TauTable`: the fitted artifact — one network timestep τ per evaluation of a few-step sampler.

Notation (paper §3, Alg. 1):

    t    the timesteps the solver uses for its update coefficients (the scheduler's own `timesteps`)
    tau  τ, the timesteps the network is fed instead, one per network evaluation

    corrections, scale   optional learned solver coefficients c_{k,j} and output scales o_k
                         (`timetuner.coefficients`; absent: the solver's own update)

Stored as safetensors (tensors `t`, `tau`, float64, and `corrections`, `scale` where learned) with the metadata as
JSON in the header: which scheduler and configuration, step count, model, how it was fitted, and how well it did on
held-out seeds. No pickle.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from timetuner.coefficients import check_coefficients, history_length, refusal
from timetuner.errors import UserError
from timetuner.files import write_atomic

FORMAT = "timetuner.TauTable/1"
# Scheduler config keys that decide the timesteps or the update; a table refuses schedulers differing in one.
# `lower_order_final` is ignored: DPM-Solver rewrites it itself inside set_timesteps for some configurations.
IGNORED_CONFIG_KEYS = {"_class_name", "_diffusers_version", "_use_default_values", "lower_order_final"}


@dataclass(frozen=True)
class TauTable:
    """τ per network evaluation for one scheduler configuration and step count."""

    t: torch.Tensor
    tau: torch.Tensor
    metadata: dict = field(default_factory=dict)
    corrections: torch.Tensor | None = None  # (K, J): c_{k,j}; None with `scale`: no learned coefficients
    scale: torch.Tensor | None = None  # (K,): o_k

    def __post_init__(self):
        t = torch.as_tensor(self.t, dtype=torch.float64).flatten()
        tau = torch.as_tensor(self.tau, dtype=torch.float64).flatten()
        object.__setattr__(self, "t", t)
        object.__setattr__(self, "tau", tau)
        _validate(t, tau, self.metadata, source="TauTable")
        if self.corrections is None and self.scale is None:
            return
        n = t.numel()  # one given: the other is the solver's own (no correction, scale 1)
        corrections = (torch.zeros(n, 1, dtype=torch.float64) if self.corrections is None
                       else torch.as_tensor(self.corrections, dtype=torch.float64))
        scale = torch.ones(n, dtype=torch.float64) if self.scale is None else torch.as_tensor(self.scale,
                                                                                             dtype=torch.float64)
        check_coefficients(corrections, scale, n, "TauTable")
        object.__setattr__(self, "corrections", corrections)
        object.__setattr__(self, "scale", scale)

    @property
    def nfe(self) -> int:
        """Network evaluations the table covers."""
        return int(self.t.numel())

    @property
    def num_inference_steps(self) -> int:
        """The `num_inference_steps` the table was made for (what the pipeline is called with)."""
        return int(self.metadata["num_inference_steps"])

    @property
    def scheduler_class(self) -> str:
        return str(self.metadata["scheduler_class"])

    @property
    def scheduler_config(self) -> dict:
        return dict(self.metadata.get("scheduler_config", {}))

    @property
    def has_coefficients(self) -> bool:
        """True when the table carries learned solver coefficients other than the solver's own (c = 0, o = 1)."""
        return self.corrections is not None and bool(self.corrections.any() or (self.scale != 1).any())

    @property
    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(corrections, scale) in float32 as `Solver.rollout` takes them; None without learned coefficients."""
        return (self.corrections.float(), self.scale.float()) if self.has_coefficients else None

    @property
    def is_identity(self) -> bool:
        """True when τ = t everywhere and no coefficients are learned (the plain sampler)."""
        return bool(torch.equal(self.t, self.tau)) and not self.has_coefficients

    @classmethod
    def identity(cls, scheduler, num_inference_steps: int, timesteps: list[int] | None = None,
                 sigmas: list[float] | None = None, mu: float | None = None, **metadata) -> TauTable:
        """τ = t for `scheduler` at `num_inference_steps` (the plain sampler, the starting point of a fit).

        `timesteps`: an explicit grid (see `timetuner.core.trajectories`); the table carries it, so that
        `TunedScheduler.set_timesteps(num_inference_steps)` sets the same grid on the wrapped scheduler.
        Flow-matching schedulers: `sigmas` is the σ grid handed to `set_timesteps` (what Flux passes:
        linspace(1, 1/N, N)), `mu` the dynamic shift (it follows the image size); the table records both, applies
        when a pipeline passes the same, and refuses another `mu` (see `TunedScheduler.set_timesteps`).
        """
        config = config_dict(scheduler.config)  # before set_timesteps, which some schedulers let rewrite it
        fresh = type(scheduler).from_config(scheduler.config)
        set_grid(fresh, num_inference_steps, timesteps, sigmas=sigmas, mu=mu)
        t = fresh.timesteps.detach().to(torch.float64).cpu()
        meta = {
            "scheduler_class": type(scheduler).__name__,
            "scheduler_config": config,
            "num_inference_steps": num_inference_steps,
            "nfe": int(t.numel()),
            **({"timesteps": [int(v) for v in timesteps]} if timesteps is not None else {}),
            **({"sigmas": [float(v) for v in sigmas]} if sigmas is not None else {}),
            **({"mu": float(mu)} if mu is not None else {}),
            **metadata,
        }
        return cls(t, t.clone(), meta)

    @property
    def sigmas(self) -> list[float] | None:
        """The σ grid a flow-matching table was fitted on (None: the scheduler's own spacing)."""
        value = self.metadata.get("sigmas")
        return None if value is None else [float(v) for v in value]

    @property
    def mu(self) -> float | None:
        """The dynamic shift a flow-matching table was fitted at (None: a static shift)."""
        value = self.metadata.get("mu")
        return None if value is None else float(value)

    def with_tau(self, tau, **metadata) -> TauTable:
        """A copy with new τ values and extra metadata (coefficients kept)."""
        return TauTable(self.t, torch.as_tensor(tau, dtype=torch.float64), {**self.metadata, **metadata},
                        self.corrections, self.scale)

    def with_coefficients(self, corrections, scale, **metadata) -> TauTable:
        """A copy with learned solver coefficients (`timetuner.coefficients`; None, None: none)."""
        return TauTable(self.t, self.tau, {**self.metadata, **metadata}, corrections, scale)

    def check_scheduler(self, scheduler) -> None:
        """Raise a UserError unless `scheduler` has this table's class and configuration."""
        name = type(scheduler).__name__
        if name != self.scheduler_class:
            raise UserError(f"table made for {self.scheduler_class} cannot load onto {name}; accepted: a "
                            f"{self.scheduler_class} with the table's configuration")
        mine, theirs = self.scheduler_config, config_dict(scheduler.config)
        for key in sorted(set(mine) | set(theirs)):
            if key in IGNORED_CONFIG_KEYS or key.startswith("_"):
                continue
            if key in mine and key in theirs and mine[key] != theirs[key]:
                raise UserError(f"table made for {name} with {key}={mine[key]!r} cannot load onto one with "
                                f"{key}={theirs[key]!r}; accepted: the table's configuration")
        if self.has_coefficients:
            why = refusal(scheduler)
            if why:
                raise UserError(f"table's learned coefficients: {why}")
            if self.corrections.shape[1] > history_length(scheduler):
                raise UserError(f"table's corrections reach {self.corrections.shape[1]} outputs back; {name} at "
                                f"solver_order {scheduler.config.get('solver_order', 1)} keeps "
                                f"{history_length(scheduler)}; accepted: the solver the table was fitted for")
        lo, hi = time_range(scheduler)
        lo, hi = min(lo, float(self.t.min())), max(hi, float(self.t.max()))  # the grid itself is in range
        if (self.tau < lo - 1e-6).any() or (self.tau > hi + 1e-6).any():
            raise UserError(f"table's tau {self.tau.tolist()} leaves the solver's time range [{lo:g}, {hi:g}] of "
                            f"{name}; accepted: network times inside it")

    def save(self, path: str | Path) -> Path:
        """Write the table as safetensors with JSON metadata, atomically (temp file, then rename)."""
        from safetensors.torch import save_file

        header = {"format": FORMAT, "metadata": json.dumps(self.metadata, sort_keys=True, default=_json_default)}
        tensors = {"t": self.t.contiguous(), "tau": self.tau.contiguous()}
        if self.corrections is not None:
            tensors.update(corrections=self.corrections.contiguous(), scale=self.scale.contiguous())
        return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=header))

    @classmethod
    def load(cls, path: str | Path) -> TauTable:
        """Read and validate a table file; a missing, foreign or corrupt file is a UserError."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError(f"table {str(path)!r} does not exist; accepted: a .safetensors file written by "
                            "`timetuner fit`")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except Exception as err:  # safetensors raises several types for a damaged file
            raise UserError(f"table {str(path)!r} is not a readable safetensors file ({err.__class__.__name__})"
                            "; accepted: a file written by `timetuner fit`") from None
        if header.get("format") != FORMAT or set(tensors) not in ({"t", "tau"}, {"t", "tau", "corrections", "scale"}):
            raise UserError(f"table {str(path)!r} is not a timetuner table (format {header.get('format')!r}, tensors "
                            f"{sorted(tensors)}); accepted: format {FORMAT!r} with tensors t and tau (and "
                            "corrections, scale)")
        try:
            metadata = json.loads(header["metadata"])
        except (KeyError, json.JSONDecodeError):
            raise UserError(f"table {str(path)!r} has corrupt metadata; accepted: a file written by "
                            "`timetuner fit`") from None
        try:
            return cls(tensors["t"], tensors["tau"], metadata, tensors.get("corrections"), tensors.get("scale"))
        except UserError as err:
            raise UserError(f"table {str(path)!r}: {err}") from None

    def to_dict(self) -> dict:
        """Plain JSON-able form (what `TunedScheduler` stores in its saved config)."""
        coefficients = {} if self.corrections is None else {"corrections": self.corrections.tolist(),
                                                             "scale": self.scale.tolist()}
        return {"t": self.t.tolist(), "tau": self.tau.tolist(), "metadata": self.metadata, **coefficients}

    @classmethod
    def from_dict(cls, data: dict) -> TauTable:
        def tensor(key):
            return None if data.get(key) is None else torch.tensor(data[key], dtype=torch.float64)

        return cls(tensor("t"), tensor("tau"), dict(data.get("metadata", {})), tensor("corrections"), tensor("scale"))


def set_grid(scheduler, num_inference_steps: int, timesteps: list[int] | None = None, device=None,
             sigmas: list[float] | None = None, mu: float | None = None) -> None:
    """`scheduler.set_timesteps` for K steps: on its own spacing, on an explicit grid of K timesteps, or (flow
    matching) on a σ grid of K values and/or at a dynamic shift `mu`."""
    # σ as an array, as pipelines pass them (UniPC / DPM-Solver++ shift them with numpy arithmetic)
    flow = {k: v for k, v in (("sigmas", as_array(sigmas)), ("mu", mu)) if v is not None}
    if scheduler.config.get("use_dynamic_shifting") and mu is None:
        raise UserError(f"{type(scheduler).__name__} shifts its sigmas by the image size (use_dynamic_shifting), so "
                        "it needs mu; accepted: mu= the pipeline's shift for the image size (Flux: calculate_shift)")
    if timesteps is None:
        accepted = inspect.signature(scheduler.set_timesteps).parameters
        for name in flow:
            if name not in accepted:
                raise UserError(f"{type(scheduler).__name__} takes no {name}=; accepted: a flow-matching scheduler "
                                "that does, e.g. FlowMatchEulerDiscreteScheduler")
        if sigmas is not None:
            check_sigmas(sigmas, num_inference_steps)
        scheduler.set_timesteps(num_inference_steps, device=device, **flow)
        return
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise UserError(f"{type(scheduler).__name__} cannot take a custom timestep grid; accepted: a class that can, "
                        "e.g. DPMSolverMultistepScheduler (solver_order=1 is DDIM's update), UniPCMultistepScheduler")
    check_grid(timesteps, num_inference_steps, int(scheduler.config.num_train_timesteps))
    scheduler.set_timesteps(timesteps=list(timesteps), device=device)


def as_array(sigmas) -> np.ndarray | None:
    """A σ grid as the float64 array a pipeline hands `set_timesteps` (Flux: `np.linspace`); None stays None."""
    return None if sigmas is None else np.asarray([float(v) for v in sigmas], dtype=np.float64)


def check_grid(timesteps, num_inference_steps: int, total: int) -> None:
    """An explicit grid: K finite timesteps, strictly decreasing, inside the model's [0, T−1]; else a UserError."""
    grid = [float(v) for v in timesteps]
    if len(grid) != num_inference_steps:
        raise UserError(f"timestep grid {grid} has {len(grid)} entries for {num_inference_steps} steps; accepted: "
                        "one timestep per step")
    if not all(math.isfinite(v) for v in grid) or min(grid) < 0 or max(grid) > total - 1:
        raise UserError(f"timestep grid {grid} leaves the model's time range; accepted: timesteps in [0, {total - 1}]")
    if any(b >= a for a, b in zip(grid, grid[1:], strict=False)):
        raise UserError(f"timestep grid {grid} is not strictly decreasing; accepted: a grid from noise (high t) to "
                        "data (low t), each timestep below the one before")


def check_sigmas(sigmas, num_inference_steps: int) -> None:
    """A flow σ grid: K finite values in (0, 1], strictly decreasing; else a UserError."""
    grid = [float(v) for v in sigmas]
    if len(grid) != num_inference_steps:
        raise UserError(f"sigma grid {grid} has {len(grid)} entries for {num_inference_steps} steps; accepted: one "
                        "sigma per step")
    if not all(math.isfinite(v) and 0 < v <= 1 for v in grid) or any(b >= a for a, b in zip(grid, grid[1:],
                                                                                            strict=False)):
        raise UserError(f"sigma grid {grid} is not strictly decreasing inside (0, 1]; accepted: sigmas from noise "
                        "(1) towards data, each below the one before")


def time_range(scheduler) -> tuple[float, float]:
    """The network times a scheduler hands out over its whole schedule, in its own units: [0, T] for discrete
    timesteps, [¼ log σ_min, ¼ log σ_max] for continuous-time Euler."""
    fresh = type(scheduler).from_config(scheduler.config)
    total = float(scheduler.config.num_train_timesteps)
    if is_flow(scheduler):  # the network was trained on every σ in (0, 1]: times σ·T in [0, T]
        return 0.0, total
    times = getattr(fresh, "timesteps", None)
    if times is None or not len(times):
        return 0.0, total
    times = torch.as_tensor(times, dtype=torch.float64)
    lo, hi = float(times.min()), float(times.max())
    if torch.equal(times, times.round()):  # integer timesteps: the whole [0, T] the embedding was trained on
        lo, hi = min(lo, 0.0), max(hi, total)
    return lo, hi


def is_flow(scheduler) -> bool:
    """Whether a scheduler — or its (class name, config), or a pipeline's scheduler config — samples a flow-matching
    model: x_σ = (1 − σ) x0 + σ ε (SD3, Flux, `timetuner train --objective flow`)."""
    if isinstance(scheduler, tuple):
        name, config = scheduler
    elif hasattr(scheduler, "config"):
        name, config = type(scheduler).__name__, scheduler.config
    else:  # a config: a saved one names its class; one built in code does not, and FlowMatch configs have no betas
        config = dict(scheduler)
        name = str(config.get("_class_name", "")) or ("FlowMatch" if "shift" in config and "beta_start" not in config
                                                      else "")
    return (name.startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


def config_dict(config) -> dict:
    """A scheduler config as a plain JSON-able dict (lists for tuples, no private keys)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")},
                                 default=_json_default))


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _validate(t: torch.Tensor, tau: torch.Tensor, metadata: dict, source: str) -> None:
    """Shapes, finiteness and monotonic sense of a table; UserError naming the problem."""
    for key in ("scheduler_class", "num_inference_steps"):
        if key not in metadata:
            raise UserError(f"{source}: metadata lacks {key!r}; accepted: tables made by TauTable.identity or fit")
    if t.numel() == 0 or t.shape != tau.shape:
        raise UserError(f"{source}: t has {t.numel()} entries and tau {tau.numel()}; accepted: equal, non-zero")
    if "nfe" in metadata and int(metadata["nfe"]) != t.numel():
        raise UserError(f"{source}: metadata says nfe={metadata['nfe']} but the table has {t.numel()} entries")
    if not (torch.isfinite(t).all() and torch.isfinite(tau).all()):
        raise UserError(f"{source}: t or tau holds a non-finite value; accepted: finite timesteps")
    # Samplers run from noise to data: t never increases (Heun repeats each t once).
    if t.numel() > 1 and (t[1:] > t[:-1] + 1e-9).any():
        raise UserError(f"{source}: t increases somewhere ({t.tolist()}); accepted: non-increasing timesteps")
    config = metadata.get("scheduler_config", {})
    total = config.get("num_train_timesteps")
    # Discrete solvers count t in [0, T]; continuous-time ones (Euler, timestep_type="continuous": ¼ log σ) are
    # checked in their own units when the table meets its scheduler (`check_scheduler`).
    if total is not None and config.get("timestep_type") != "continuous" and ((tau < 0).any() or (tau > total).any()):
        raise UserError(f"{source}: tau leaves [0, {total}] ({tau.tolist()}); accepted: timesteps in range")

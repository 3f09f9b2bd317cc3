"""The named few-step solvers and their timestep grids ("trajectories") for K steps.

A solver is a diffusers scheduler class with config overrides (`SCHEDULERS`), built from a pipeline's own
scheduler config so that it shares the model's noise schedule.

A trajectory is either a configuration of the scheduler itself (DDIM's `timestep_spacing`, Karras σ) or an
explicit list of timesteps handed to `set_timesteps(timesteps=...)` — for a flow-matching solver, an explicit σ grid
handed to `set_timesteps(sigmas=...)`, before the scheduler's shift, as a pipeline's `sigmas` are; "learned" is an
explicit grid fitted to the model by `timetuner.fitting.grid` (here: the grid it starts from, the scheduler's default
explicit one, or a flow solver's own σ grid). Explicit grids travel inside the table's metadata (`timesteps`,
`sigmas`), so `TunedScheduler` reproduces them when a pipeline calls `set_timesteps(num_inference_steps)`.
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from timetuner.errors import UserError, check_choice
from timetuner.table import is_flow

# name → (diffusers scheduler class name, config overrides). "dpm2" is DPM-Solver-2 (singlestep, order 2);
# "dpm++" / "dpm++3m" DPM-Solver++ 2M / 3M (multistep: the history of model outputs is part of the solver state);
# "dpm++1" DPM-Solver++ of order 1 (DDIM in exponential-integrator form, which takes custom timesteps);
# "unipc" UniPC-bh2; "heun" uses Karras/EDM sigmas (ρ = 7).
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "dpm2": ("DPMSolverSinglestepScheduler", {"solver_order": 2}),
    "dpm++": ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "dpmsolver++"}),
    "dpm++1": ("DPMSolverMultistepScheduler", {"solver_order": 1, "algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2"}),
    "deis": ("DEISMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
}
# Flow-matching models (SD3, Flux, the `--objective flow` digits model): their own Euler and Heun, and DPM-Solver++ /
# UniPC on flow sigmas (`prediction_type="flow_prediction"`); each starts from the model's own shift.
FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "flow-dpm++": ("DPMSolverMultistepScheduler", {"solver_order": 2, "algorithm_type": "dpmsolver++", **FLOW}),
    "flow-unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", **FLOW}),
}
SCHEDULERS.update(FLOW_SCHEDULERS)


def solvers_for(flow: bool) -> list[str]:
    """The named solvers of a model's family: flow-matching ones for a flow model, DDPM-style ones otherwise."""
    return sorted(FLOW_SCHEDULERS if flow else set(SCHEDULERS) - set(FLOW_SCHEDULERS))


def check_family(name: str, flow: bool, also: tuple[str, ...] = ()) -> None:
    """The one refusal of a solver of the other family (a DDPM solver for a flow model, or the reverse); `also`:
    other accepted names (fit's `auto`)."""
    if name not in also and flow != (name in FLOW_SCHEDULERS):
        raise UserError(f"--scheduler {name} does not sample a {'flow-matching' if flow else 'DDPM-style'} model "
                        f"like this one; accepted: {', '.join((*also, *solvers_for(flow)))}")


MU_KEYS = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")  # calculate_shift's settings


def make_scheduler(name: str, base_config):
    """A scheduler of kind `name` (ddim, ddpm, dpm2, heun, euler; flow-euler, …) built from a pipeline's scheduler
    config; a solver of the other family (a DDPM solver for a flow model, or the reverse) is a UserError."""
    import diffusers

    class_name, overrides = SCHEDULERS[check_choice("--scheduler", name, SCHEDULERS)]
    flow = is_flow(base_config)
    check_family(name, flow)
    cls = getattr(diffusers, class_name)
    if flow and "use_flow_sigmas" in overrides:  # DPM-Solver++ / UniPC keep the model's shift as their flow_shift
        overrides = {**overrides, "flow_shift": model_shift(base_config)}
    elif flow:  # and FlowMatch Euler / Heun as their shift (from a DPM-Solver++ config: Sana's flow_shift)
        overrides = {"shift": model_shift(base_config), **overrides}
    if flow:  # keys of another flow class (FlowMatchEuler's Karras σ for UniPC, …) mean nothing to this one
        accepted = inspect.signature(cls.__init__).parameters
        if dynamic_shift(base_config) and "use_dynamic_shifting" not in accepted:
            raise UserError(f"--scheduler {name} cannot shift by image size (mu) as this model's scheduler does "
                            "(use_dynamic_shifting); accepted: flow-euler, flow-dpm++, flow-unipc")
        kept = {k: v for k, v in dict(base_config).items() if k in MU_KEYS}  # what a pipeline computes mu from
        base_config = {k: v for k, v in dict(base_config).items() if k in accepted}
        sched = cls.from_config(base_config, **overrides)
        sched.register_to_config(**kept)
        return sched
    return cls.from_config(base_config, **overrides)


def quadratic_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """t_i = (i/K)² (T−1): dense near the data (Song et al., 2021, DDIM's CIFAR-10 grid)."""
    grid = (np.linspace(0, np.sqrt((num_train_timesteps - 1) * 0.8), steps) ** 2).round().astype(int)
    return _descending_unique(grid, num_train_timesteps, steps)


def logsnr_timesteps(alphas_cumprod, steps: int) -> list[int]:
    """Uniform in half log-SNR λ = log(α/σ) between t = T−1 and t = 0 (Lu et al., 2022, DPM-Solver)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    lam = 0.5 * np.log(a / (1 - a))
    targets = np.linspace(lam[-1], lam[0], steps)
    grid = np.array([int(np.argmin(np.abs(lam - v))) for v in targets])
    return _descending_unique(grid, len(a), steps)


def ays_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """Align-Your-Steps' Stable Diffusion timesteps (Sabour et al., 2024, as diffusers ships them), log-linearly
    interpolated to K steps as the paper's `loglinear_interp` does; rescaled to T training timesteps."""
    from diffusers.schedulers.scheduling_utils import AysSchedules

    ays = np.asarray(AysSchedules["StableDiffusionTimesteps"], dtype=np.float64) * (num_train_timesteps - 1) / 999
    log_t = np.interp(np.linspace(0, 1, steps), np.linspace(0, 1, len(ays)), np.log(ays[::-1]))
    return _descending_unique(np.exp(log_t)[::-1].round().astype(int), num_train_timesteps, steps)


def _descending_unique(grid, total: int, steps: int) -> list[int]:
    grid = np.unique(np.clip(grid, 0, total - 1))[::-1].tolist()
    if len(grid) != steps:
        raise UserError(f"--nfe asks for {steps} distinct timesteps, more than this grid can place on "
                        f"{total} training timesteps; accepted: fewer steps")
    return grid


DPM_MULTISTEP_GRIDS = {"uniform": {}, "trailing": {"timestep_spacing": "trailing"},
                       "karras": {"use_karras_sigmas": True}, "logsnr": {"explicit": "logsnr"},
                       "ays": {"explicit": "ays"}, "quadratic": {"explicit": "quadratic"},
                       "learned": {"explicit": "learned"}}
# scheduler name → trajectory name → config overrides ("explicit": computed timesteps instead).
TRAJECTORIES: dict[str, dict[str, dict]] = {
    "ddim": {"uniform": {"timestep_spacing": "leading"}, "trailing": {"timestep_spacing": "trailing"},
             "linspace": {"timestep_spacing": "linspace"}},
    "dpm2": {"uniform": {}, "logsnr": {"explicit": "logsnr"}, "quadratic": {"explicit": "quadratic"},
             "karras": {"use_karras_sigmas": True}, "learned": {"explicit": "learned"}},
    "dpm++": DPM_MULTISTEP_GRIDS,
    "dpm++3m": DPM_MULTISTEP_GRIDS,
    "dpm++1": DPM_MULTISTEP_GRIDS,
    # UniPC and DEIS take no explicit timesteps in diffusers (use dpm++ for log-SNR or Align-Your-Steps grids).
    "unipc": {"uniform": {}, "trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True}},
    "deis": {"uniform": {}, "trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True}},
    "heun": {"karras": {}, "uniform": {"use_karras_sigmas": False}},
    "euler": {"uniform": {}, "trailing": {"timestep_spacing": "trailing"}, "karras": {"use_karras_sigmas": True}},
    "ddpm": {"uniform": {}},
    # flow: "uniform" is the model's own shift; shift1 / shift3 the two a user picks (SD3 ships 3). A learned σ grid
    # where the scheduler takes `sigmas=` (DPM-Solver++ takes none with flow sigmas in diffusers 0.42)
    "flow-euler": {"uniform": {}, "shift1": {"shift": 1.0}, "shift3": {"shift": 3.0},
                   "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
                   "beta": {"use_beta_sigmas": True}, "learned": {"explicit": "learned"}},
    "flow-heun": {"uniform": {}, "shift1": {"shift": 1.0}, "shift3": {"shift": 3.0}},
    "flow-dpm++": {"uniform": {}, "shift1": {"flow_shift": 1.0}, "shift3": {"flow_shift": 3.0}},
    "flow-unipc": {"uniform": {}, "shift1": {"flow_shift": 1.0}, "shift3": {"flow_shift": 3.0},
                   "learned": {"explicit": "learned"}},
}
DEFAULT_TRAJECTORY = {"ddim": "uniform", "dpm2": "logsnr", "dpm++": "ays", "dpm++3m": "ays", "dpm++1": "ays",
                      "unipc": "uniform", "deis": "uniform", "heun": "karras", "euler": "uniform", "ddpm": "uniform",
                      "flow-euler": "uniform", "flow-heun": "uniform", "flow-dpm++": "uniform",
                      "flow-unipc": "uniform"}


def build(scheduler: str, trajectory: str | None, base_config, num_inference_steps: int, mu: float | None = None):
    """(scheduler, explicit timesteps or None) for a named scheduler and trajectory at K steps; `mu`: the shift by
    image size a dynamic-shift model's pipeline passes (a learned σ grid starts from the solver's σ at it)."""
    if scheduler not in SCHEDULERS:
        make_scheduler(scheduler, base_config)  # raises the one-line error listing the names
    trajectory = trajectory or DEFAULT_TRAJECTORY[scheduler]
    options = TRAJECTORIES[scheduler]
    if trajectory not in options:
        raise UserError(f"--trajectory {trajectory!r} is not available for --scheduler {scheduler}; accepted: "
                        f"{', '.join(sorted(options))}")
    overrides = dict(options[trajectory])
    explicit = overrides.pop("explicit", None)
    if dynamic_shift(base_config) and {"shift", "flow_shift"} & set(overrides):
        raise UserError(f"--trajectory {trajectory} needs a static shift, and this model's scheduler shifts by image "
                        "size (use_dynamic_shifting: the pipeline's mu); accepted: "
                        f"{', '.join(sorted(set(options) - STATIC_ONLY))}")
    sched = make_scheduler(scheduler, base_config)
    if overrides:
        sched = type(sched).from_config(sched.config, **overrides)
    timesteps = None
    if explicit == "learned" and scheduler in FLOW_SCHEDULERS:  # a σ grid, starting from the solver's own
        return sched, flow_sigmas(sched, num_inference_steps, mu=mu)
    if explicit == "learned":  # fitted by `timetuner.fitting.grid`, starting from the scheduler's default explicit grid
        explicit = TRAJECTORIES[scheduler][DEFAULT_TRAJECTORY[scheduler]]["explicit"]
    if explicit == "quadratic":
        timesteps = quadratic_timesteps(sched.config.num_train_timesteps, num_inference_steps)
    elif explicit == "logsnr":
        timesteps = logsnr_timesteps(sched.alphas_cumprod, num_inference_steps)
    elif explicit == "ays":
        timesteps = ays_timesteps(sched.config.num_train_timesteps, num_inference_steps)
    return sched, timesteps


STATIC_ONLY = {"shift1", "shift3"}  # flow trajectories that need a static shift


def dynamic_shift(config) -> bool:
    """Whether a scheduler config shifts its σ by image size (Flux: `use_dynamic_shifting`, `mu` per call)."""
    return bool(dict(config).get("use_dynamic_shifting"))


# -- flow σ grids --------------------------------------------------------------------------------------------------
def model_shift(config) -> float:
    """The static shift of a flow scheduler config: FlowMatch classes' `shift`, DPM-Solver++ / UniPC's `flow_shift`."""
    config = dict(config)
    return float(config.get("shift", config.get("flow_shift", 1.0)))


def flow_shift(sched, mu: float | None = None) -> float:
    """A flow scheduler's shift s (σ ↦ sσ / (1 + (s − 1)σ)): `shift` of FlowMatch classes, `flow_shift` of
    DPM-Solver++ / UniPC on flow sigmas; under a shift by image size, the one `mu` makes — diffusers' exponential
    time shift e^μ / (e^μ + 1/σ − 1) is this map with s = e^μ, its linear one with s = μ. One stretched to a terminal
    σ has no fixed inverse and takes no learned grid: a UserError, as is a dynamic shift without its `mu`."""
    config = sched.config
    if config.get("shift_terminal"):
        raise UserError(f"{type(sched).__name__} stretches its sigmas to a terminal sigma (shift_terminal); a learned "
                        "sigma grid needs a shift it can invert; accepted: --trajectory uniform, shift1, shift3")
    rebuilt = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")
               if config.get(k)]
    if rebuilt:  # these rebuild σ from a grid's ends (or flip it): a learned grid's inner points would do nothing
        raise UserError(f"{type(sched).__name__} is configured with {rebuilt[0]}=True, which rebuilds the sigmas it is "
                        "handed; a learned sigma grid needs a scheduler that runs them; accepted: a scheduler config "
                        f"without {rebuilt[0]}, or a named --trajectory")
    if config.get("use_dynamic_shifting"):
        if mu is None:
            raise UserError(f"{type(sched).__name__} shifts its sigmas by the image size (use_dynamic_shifting) and "
                            "no mu is known; accepted: a model whose pipeline computes mu (Flux, SD3)")
        return mu if config.get("time_shift_type", "exponential") == "linear" else math.exp(mu)
    return model_shift(config)


def unshifted(s: float, sigmas) -> list[float]:
    """The σ grid to hand to `set_timesteps(sigmas=…)` of a scheduler of static shift s so that it runs `sigmas`
    (after its shift): the shift's inverse σ / (s − (s − 1)σ), to 7 decimals (what float32 σ hold); a first σ within
    1e-5 of 1 is 1 (UniPC starts at 1 − 1e-6 to keep log α finite)."""
    grid = [round(float(v) / (s - (s - 1) * float(v)), 7) for v in sigmas]
    return [1.0 if i == 0 and abs(v - 1) < 1e-5 else v for i, v in enumerate(grid)]


def flow_sigmas(sched, num_inference_steps: int, target=None, mu: float | None = None) -> list[float]:
    """The σ grid (before `target`'s shift; `sched`'s own without one) that makes `target` run the σ_0 … σ_{K−1}
    which `sched`, with its own configuration — any named trajectory: shift 1 or 3, Karras, exponential, beta σ —
    runs at K steps; `mu`: the shift by image size both run at (`use_dynamic_shifting`)."""
    shift = flow_shift(sched if target is None else target, mu)  # an invertible one, or the one-line refusal
    fresh = type(sched).from_config(sched.config)
    fresh.set_timesteps(num_inference_steps, **({"mu": mu} if dynamic_shift(fresh.config) else {}))
    return unshifted(shift, fresh.sigmas[:num_inference_steps].tolist())

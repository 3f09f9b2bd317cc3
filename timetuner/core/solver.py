"""The one few-step sampler over a denoiser: fresh scheduler state, one evaluation at a network time, whole rollouts.

Every sampling loop of the project is this one — fitting, evaluation, `timetuner sample`, the reference samples
and the training loop's sample grids — so what is fitted is exactly what is measured and what runs in a pipeline.

Notation (TimeTuner, Xia et al., 2023, §3):

    k        index of a network evaluation (DPM-Solver-2 and Heun evaluate twice per step)
    t_k      the solver's own time of evaluation k (`scheduler.timesteps[k]`): its update coefficients use it
    τ_k      the time the network is fed instead (τ = t: the plain sampler)
    x_k      the state before evaluation k; x_0 is the scaled noise, x_K the sample

The update is always the real diffusers `scheduler.step`, on a deep copy of a template scheduler set to the grid,
so multistep history and DPM-Solver's step index live in that copy and can be snapshotted per candidate τ.

The ᾱ/σ/t conversions live here too (`alpha_bar_at`, `to_epsilon`, `to_vp`, `state_times`).
"""

from __future__ import annotations

import copy
import inspect
import math

import torch

from timetuner.coefficients import Corrector
from timetuner.core.denoiser import Denoiser
from timetuner.core.trajectories import DEFAULT_TRAJECTORY, build, dynamic_shift
from timetuner.errors import UserError
from timetuner.matching import check_mu
from timetuner.table import TauTable, is_flow, set_grid


# -- ᾱ, σ and t --------------------------------------------------------------------------------------------------
def alpha_bar_at(alphas_cumprod: torch.Tensor, t: float) -> float:
    """ᾱ at a fractional timestep: linear in log ᾱ between the neighbouring integers (float64)."""
    total = len(alphas_cumprod)
    t = min(max(float(t), 0.0), total - 1.0)
    lo = int(math.floor(t))
    hi = min(lo + 1, total - 1)
    la, lb = math.log(float(alphas_cumprod[lo])), math.log(float(alphas_cumprod[hi]))
    return math.exp(la + (t - lo) * (lb - la))


def sigma_at(alphas_cumprod: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """σ = √((1 − ᾱ)/ᾱ) at fractional timesteps, differentiable in them: linear between the integers, as diffusers'
    DPM-Solver interpolates its sigmas (`np.interp`), and equal to its float32 values at integer times."""
    full = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # diffusers' own expression, in its dtype
    full = full.to(torch.float64)
    times = times.to(torch.float64).clamp(0.0, len(full) - 1.0)
    lo = times.detach().floor().clamp(max=len(full) - 2).long()
    frac = times - lo
    return (full[lo] + frac * (full[lo + 1] - full[lo])).to(torch.float32)


def to_epsilon(output: torch.Tensor, x_in: torch.Tensor, t, alphas_cumprod: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """ε from an ε / v / x0 prediction of a VP network input x_in at timestep t (Salimans & Ho, 2022)."""
    if prediction_type == "epsilon":
        return output
    times = torch.as_tensor(t).detach().reshape(-1).tolist()
    a_bar = torch.tensor([alpha_bar_at(alphas_cumprod, v) for v in times], dtype=torch.float64)
    a_bar = a_bar.float().to(output.device).reshape(-1, *([1] * (output.ndim - 1)))
    a, s = a_bar.sqrt(), (1 - a_bar).sqrt()
    if prediction_type == "v_prediction":
        return a * output + s * x_in
    if prediction_type == "sample":
        return (x_in - a * output) / s.clamp(min=1e-8)
    raise UserError(f"prediction_type {prediction_type!r} is not supported; accepted: epsilon, sample, v_prediction")


def initial_noise(n: int, shape: tuple[int, ...], generator: torch.Generator, device=None) -> torch.Tensor:
    """n standard-normal starting states of shape `shape` (C×H×W), drawn on the generator's device."""
    noise = torch.randn((n, *shape), generator=generator, device=generator.device)
    return noise if device is None else noise.to(device)


def scaled_input(sched, x: torch.Tensor, t) -> torch.Tensor:
    """The network input of a state: `scale_model_input` where the scheduler has one (flow schedulers have none)."""
    return sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x


def pipeline_refusal(family, scheduler) -> str | None:
    """Why a model's pipeline cannot run `scheduler` (None if it can): FluxPipeline passes `mu` on every call,
    which DPMSolverMultistepScheduler refuses unless it shifts by image size (Flux.1-schnell's config does not)."""
    if (family is not None and family.passes_mu and not scheduler.config.get("use_dynamic_shifting")
            and type(scheduler).__name__ == "DPMSolverMultistepScheduler"):
        return ("the model's pipeline passes mu on every call, which DPMSolverMultistepScheduler takes only with "
                "use_dynamic_shifting, and this model's scheduler has none; accepted: flow-euler, flow-unipc")
    return None


def pipeline_mu(denoiser, config) -> float | None:
    """The `mu` a pipeline passes a scheduler config that shifts by image size (`use_dynamic_shifting`), for the
    denoiser's sample size (`Denoiser.dynamic_mu`); None for a static shift."""
    return denoiser.dynamic_mu(config) if dynamic_shift(config) and hasattr(denoiser, "dynamic_mu") else None


def pipeline_grid(family, scheduler, nfe: int) -> list[float] | None:
    """The σ grid a model's pipeline passes `scheduler` on every call (FluxPipeline: linspace(1, 1/N, N)); None where
    it passes none (its family has none, or the scheduler is on flow sigmas, which FluxPipeline hands no σ)."""
    if family is None or scheduler.config.get("use_flow_sigmas"):
        return None
    return family.pipeline_sigmas(nfe)


# -- the solver --------------------------------------------------------------------------------------------------


class Solver:
    """A few-step sampler: a diffusers scheduler at K steps (its own spacing or an explicit grid) over a denoiser.

    `Solver.named(...)` builds one of the named solvers and grids of `timetuner.core.trajectories`; the constructor
    takes any scheduler, a `TunedScheduler` included (whose `timesteps` are then τ: the network times it hands
    out). `grid`: an explicit grid — K integer timesteps, or for a flow-matching scheduler K σ before its shift
    (`set_timesteps(sigmas=…)`). `step_kwargs` go to `scheduler.step` where its signature has them (e.g.
    `generator` for DDPM). `mu`: the shift of a scheduler that shifts by image size (`use_dynamic_shifting`, Flux);
    None: the one the pipeline computes for the denoiser's sample size (`Denoiser.dynamic_mu`).
    """

    def __init__(self, denoiser, scheduler, num_inference_steps: int, grid: list | None = None,
                 name: str | None = None, trajectory: str | None = None, step_kwargs: dict | None = None,
                 mu: float | None = None):
        config = scheduler.config
        if num_inference_steps > config.num_train_timesteps:
            raise UserError(f"--nfe {num_inference_steps} exceeds the model's {config.num_train_timesteps} "
                            "training timesteps; accepted: 1 to that number")
        self.den = denoiser
        self.template, self.grid = scheduler, grid
        self.name, self.trajectory, self.nfe_steps = name, trajectory, num_inference_steps
        accepted = inspect.signature(scheduler.step).parameters
        self.step_kwargs = {k: v for k, v in (step_kwargs or {}).items() if k in accepted}
        self.flow = is_flow(scheduler)  # x_σ = (1 − σ) x0 + σ ε, the network fed σ·T predicts ε − x0
        self.prediction_type = "flow_prediction" if self.flow else config.prediction_type
        self.alphas_cumprod = None if self.flow else scheduler.alphas_cumprod
        self.num_train_timesteps = config.num_train_timesteps
        self.mu = pipeline_mu(denoiser, config) if mu is None else mu
        first = self.fresh()
        self.t = first.timesteps.detach().to(torch.float64).cpu()  # t_k, one per network evaluation
        self.init_noise_sigma = float(getattr(first, "init_noise_sigma", 1.0))  # flow schedulers: none (1)

    @classmethod
    def named(cls, denoiser, base_config, scheduler: str, trajectory: str | None, nfe: int) -> Solver:
        """A named solver and grid (`core.trajectories`) built from a pipeline's scheduler config, at K steps."""
        trajectory = trajectory or DEFAULT_TRAJECTORY.get(scheduler)
        mu = pipeline_mu(denoiser, base_config)  # a learned σ grid under a shift by image size starts at it
        template, grid = build(scheduler, trajectory, base_config, nfe, mu=mu)
        family = getattr(denoiser, "family", None)
        refusal = pipeline_refusal(family, template)
        if refusal:
            raise UserError(f"--scheduler {scheduler}: {refusal}")
        if grid is None:
            grid = pipeline_grid(family, template, nfe)  # what the pipeline passes on every call (Flux), or None
        return cls(denoiser, template, nfe, grid, name=scheduler, trajectory=trajectory, mu=mu)

    @classmethod
    def for_table(cls, denoiser, base_config, table) -> Solver:
        """The solver a table was fitted for, built from a pipeline's scheduler config and checked against it."""
        meta = table.metadata
        solver = cls.named(denoiser, base_config, meta.get("scheduler_name", "ddim"), meta.get("trajectory"),
                           table.num_inference_steps)
        if meta.get("trajectory") == "learned":  # the grid is the table's own
            grid = meta.get("sigmas" if solver.flow else "timesteps")
            solver = solver if grid is None else solver.with_grid(grid)
        table.check_scheduler(solver.template)
        if table.mu is not None:
            check_mu(table, solver.mu)  # fitted at another sample size: another schedule
        return solver

    def with_grid(self, grid: list) -> Solver:
        """The same solver on another explicit grid of K timesteps (flow: K σ before the shift)."""
        return Solver(self.den, self.template, self.nfe_steps, list(grid), name=self.name,
                      trajectory=self.trajectory, step_kwargs=self.step_kwargs, mu=self.mu)

    def on(self, denoiser) -> Solver:
        """The same solver over another denoiser (e.g. bound to other conditioning); the grid is shared."""
        other = copy.copy(self)
        other.den = denoiser
        return other

    @property
    def evaluations(self) -> int:
        return int(self.t.numel())

    def fresh(self):
        """A scheduler set to the grid, with no history: the state before evaluation 0."""
        sched = copy.deepcopy(self.template)
        set_grid(sched, self.nfe_steps, **self._grid_arguments(), device=self.den.device)
        return sched

    def _grid_arguments(self) -> dict:
        """The explicit grid as `set_grid` / `TauTable.identity` take it: `timesteps`, or a flow solver's `sigmas`
        (and `mu` for a scheduler that shifts by image size)."""
        return {"sigmas" if self.flow else "timesteps": self.grid, **({} if self.mu is None else {"mu": self.mu})}

    def identity_table(self, **metadata):
        """τ = t for this solver (the plain sampler), carrying `metadata`."""
        return TauTable.identity(self.template, self.nfe_steps, **self._grid_arguments(), **metadata)

    def model_output(self, sched, x, k: int, tau):
        """Network output at τ for the scaled input of evaluation k (scheduler state as given)."""
        return self.den(scaled_input(sched, x, sched.timesteps[k]), tau)

    def step(self, sched, output, x, k: int, corrector: Corrector | None = None):
        """The scheduler's update of evaluation k; with `corrector`, its learned coefficients applied as
        `TunedScheduler.step` applies them (output scaled before, correction added after)."""
        handed = getattr(self.den, "as_handed", None)  # a Denoiser's dtype rule; any other callable: as it returns
        output = output if handed is None else handed(output)
        if corrector is not None:
            output = corrector.scaled(k, output)
        x_next = sched.step(output, sched.timesteps[k], x, **self.step_kwargs).prev_sample
        return self.kept(x_next if corrector is None else corrector.corrected(sched, k, output, x, x_next))

    def kept(self, x: torch.Tensor) -> torch.Tensor:
        """A state in the dtype the model's pipeline keeps it in (`Denoiser.as_kept`; any other callable: as is)."""
        keep = getattr(self.den, "as_kept", None)
        return x if keep is None else keep(x)

    def start(self, noise: torch.Tensor) -> torch.Tensor:
        """The state before evaluation 0: unit-variance noise scaled by the scheduler's `init_noise_sigma` — in the
        dtype the pipeline keeps its latents in, scaled there, as `prepare_latents` scales them (SDXL's Euler)."""
        return self.kept(self.kept(noise) * self.init_noise_sigma)

    def advance(self, sched, x, k: int, tau, corrector: Corrector | None = None):
        """One evaluation and update with network time τ (in place on `sched`)."""
        return self.step(sched, self.model_output(sched, x, k, tau), x, k, corrector)

    def corrector(self, sched, coefficients) -> Corrector | None:
        """A run's `Corrector` for (corrections, scale) on `sched` (None: the solver's own update)."""
        return None if coefficients is None else Corrector(sched, *coefficients, self.flow)

    def eps_at(self, sched, x, k: int):
        """ε_θ at the honest time of evaluation k (t_k), or at t = 0 after the last evaluation."""
        if k < self.evaluations:
            x_in, t = scaled_input(sched, x, sched.timesteps[k]), sched.timesteps[k]
        else:
            x_in, t = x, torch.tensor(0.0)
        if self.flow:  # x = (1 − σ) x0 + σ ε and v = ε − x0 give ε = x + (1 − σ) v, σ = t/T
            sigma = float(torch.as_tensor(t).reshape(-1)[0]) / self.num_train_timesteps
            return x_in + (1.0 - sigma) * self.den(x_in, t)
        return to_epsilon(self.den(x_in, t), x_in, t, self.alphas_cumprod, self.prediction_type)

    def rollout(self, noise, taus=None, keep_states: bool = False, times=None, coefficients=None):
        """Sample from unit-variance noise with network times `taus` (None: plain); final state (and states).
        `times`: the solver's own t_k as a (differentiable) tensor in place of its integer grid — the update
        coefficients then follow them (solvers that read their grid only through `scheduler.sigmas`: the learned grid's
        rule, `timetuner.fitting.grid.takes_grid_gradient`); the last σ (0) stays. `coefficients`: learned
        (corrections, scale) (`timetuner.coefficients`; `TauTable.coefficients`), None: the solver's own update."""
        sched = self.fresh()
        if times is not None:
            sigmas = sigma_at(self.alphas_cumprod, times).to(sched.sigmas.device)
            sched.sigmas = torch.cat([sigmas, sched.sigmas[self.evaluations:].detach()])
        corrector = self.corrector(sched, coefficients)
        x = self.start(noise)
        states = [x]
        for k in range(self.evaluations):
            x = self.advance(sched, x, k, sched.timesteps[k] if taus is None else taus[k], corrector)
            states.append(x)
        return (x, states) if keep_states else x

    # -- the few-step states in VP space, to compare samplers of both kinds ---------------------------------------
    def state_times(self) -> list[float]:
        """The time of the state before evaluation 0, after each evaluation k (t_{k+1}; 0 after the last)."""
        return [float(self.t[0])] + [float(v) for v in self.t[1:]] + [0.0]

    @property
    def sigma_space(self) -> bool:
        """σ-space samplers (Heun, Euler) hold x / √ᾱ; VP ones (DDIM, DPM-Solver) hold x itself."""
        return self.init_noise_sigma > 1.0 + 1e-6

    def to_vp(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """A state of this solver at time t in VP space (x_t = α x0 + σ ε); a flow state as it is (flow solvers are
        compared with flow solvers only)."""
        if self.flow or not self.sigma_space or t <= 0:
            return x
        return x * math.sqrt(alpha_bar_at(self.alphas_cumprod, t))

    def from_vp(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """A VP-space state at time t in this solver's space (the inverse of `to_vp`)."""
        if self.flow or not self.sigma_space or t <= 0:
            return x
        return x / math.sqrt(alpha_bar_at(self.alphas_cumprod, t))


@torch.no_grad()
def sample_images(unet, scheduler, noise: torch.Tensor, num_inference_steps: int,
                  generator: torch.Generator | None = None, batch_size: int = 256, eta: float = 0.0) -> torch.Tensor:
    """Run `scheduler` from `noise` (unit variance) to images in [-1, 1] on CPU, `batch_size` samples at a time.

    Unlike `DDPMPipeline`, the solver calls `scale_model_input` and scales the noise by `init_noise_sigma`, so
    σ-space schedulers (Heun, Euler, EDM) sample correctly too. `scheduler` may be a `TunedScheduler`.
    """
    denoiser = Denoiser(unet, batch_size=batch_size)
    solver = Solver(denoiser, scheduler, num_inference_steps, step_kwargs={"eta": eta, "generator": generator})
    out = [solver.rollout(chunk.to(device=denoiser.device, dtype=torch.float32)).clamp(-1, 1).cpu()
           for chunk in noise.split(batch_size)]
    return torch.cat(out)

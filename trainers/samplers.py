"""Timestep samplers for training: a small protocol plus a name registry.

A sampler draws the training timesteps of a batch and may learn from the per-sample losses:

    sampler = make_sampler("speed", num_train_timesteps=1000)    # SpeeD as published: k = 5, τ = 700, dual
    t, weight = sampler.sample(batch_size, step, generator)          # weight: per-sample loss factor
    loss = (weight * per_sample_loss).mean()
    sampler.update(t, per_sample_loss.detach(), step)                # a no-op for static samplers

`probabilities(step)` is the distribution over {0, …, T−1} the sampler draws from at `step` (logged and
plotted by `timetuner train`); `state_dict()` / `load_state_dict()` let `accelerator.save_state`
checkpoint it with the model.

Importance correction (`importance=True`, off by default as in every paper here): the returned weight
becomes 1 / (T·p(t)), so the weighted loss is an unbiased estimate of the *uniform* objective. Leave it
off to get the method as published (the non-uniform sampling then *is* the re-weighting).

Timesteps follow diffusers' training convention: t = 0 is the cleanest, t = T − 1 the noisiest.
"""

from __future__ import annotations

import math
from typing import ClassVar, Protocol, runtime_checkable

import torch

from timetuner.errors import UserError, check_choice


@runtime_checkable
class TimestepSampler(Protocol):
    """Draws integer training timesteps in [0, T) and a per-sample loss weight."""

    name: ClassVar[str]
    num_train_timesteps: int

    def sample(
        self, batch_size: int, step: int, generator: torch.Generator | None = None, x0: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (t, weight): int64 timesteps and float weights, both of shape (batch_size,).

        `x0` is the clean batch, for samplers whose distribution depends on the data (adaptive).
        """
        ...

    def update(self, t: torch.Tensor, per_sample_loss: torch.Tensor, step: int) -> None:
        """Learn from the losses of the last batch (no-op for static samplers)."""
        ...

    def probabilities(self, step: int) -> torch.Tensor:
        """The distribution (float64, length T) that `sample` draws from at `step`."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


SAMPLERS: dict[str, type] = {}


def register_sampler(cls: type) -> type:
    """Class decorator: make `cls` available as `make_sampler(cls.name, ...)` and `--sampler NAME`."""
    SAMPLERS[cls.name] = cls
    return cls


def make_sampler(name: str, num_train_timesteps: int, **hyperparameters) -> TimestepSampler:
    """Build the sampler registered as `name` (hyperparameters as keyword arguments, see each class)."""
    cls = SAMPLERS[check_choice("--sampler", name, SAMPLERS)]
    return cls(num_train_timesteps=num_train_timesteps, **hyperparameters)


def default_alphas_cumprod(num_train_timesteps: int) -> torch.Tensor:
    """ᾱ_t of DDPM's linear β schedule (1e-4 … 0.02 scaled to T steps), float64."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps).alphas_cumprod.double()


def schedule_of(noise_scheduler, num_train_timesteps: int) -> torch.Tensor:
    """ᾱ_t (float64) of a diffusers noise scheduler, or of the linear DDPM schedule when None."""
    if noise_scheduler is None:
        return default_alphas_cumprod(num_train_timesteps)
    alphas = noise_scheduler.alphas_cumprod.double().cpu()
    if alphas.numel() != num_train_timesteps:
        raise UserError(f"the noise scheduler has {alphas.numel()} timesteps, the sampler {num_train_timesteps}; "
                        "accepted: the same T")
    return alphas


def importance_weight(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 / (T·p(t)): turns an expectation under p into one under the uniform distribution."""
    return (1.0 / (p.numel() * p.to(t.device)[t])).float()


def generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def check_range(name: str, value: float, low: float, high: float, *, low_open=False, high_open=False) -> float:
    """Return `value` if it lies in the interval, else raise a UserError naming the argument and the interval."""
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"{name} {value!r} is invalid; accepted: a number in {interval}")
    return value


class StaticSampler:
    """Base for samplers without learned state: `update` does nothing, the state is empty."""

    name: ClassVar[str] = ""

    def __init__(self, num_train_timesteps: int, noise_scheduler=None, importance: bool = False):
        if num_train_timesteps < 1:
            raise UserError(f"num_train_timesteps {num_train_timesteps} is invalid; accepted: 1 or more")
        self.num_train_timesteps = int(num_train_timesteps)
        self.importance = bool(importance)
        self._cached: torch.Tensor | None = None

    def _probabilities(self, step: int) -> torch.Tensor:
        raise NotImplementedError

    def probabilities(self, step: int = 0) -> torch.Tensor:
        if self._cached is None or self.time_varying:
            p = self._probabilities(step).double()
            p = p / p.sum()
            if self.time_varying:
                return p
            self._cached = p
        return self._cached

    time_varying: ClassVar[bool] = False

    def sample(self, batch_size, step, generator=None, x0=None):
        p = self.probabilities(step)
        t = torch.multinomial(p.float(), batch_size, replacement=True, generator=generator)
        t = t.to(generator_device(generator))
        return t, self._weight(p, t)

    def _weight(self, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return importance_weight(p, t) if self.importance else torch.ones(t.shape, device=t.device)

    def update(self, t: torch.Tensor, per_sample_loss: torch.Tensor, step: int) -> None:
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


@register_sampler
class UniformSampler(StaticSampler):
    """t ~ U{0, …, T−1}, weight 1: the DDPM recipe (Ho et al., 2020, Alg. 1)."""

    name: ClassVar[str] = "uniform"

    def _probabilities(self, step):
        return torch.ones(self.num_train_timesteps, dtype=torch.float64)

    def sample(self, batch_size, step, generator=None, x0=None):
        device = generator_device(generator)
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)
        return t, torch.ones(batch_size, device=device)


def speed_threshold(alphas_cumprod: torch.Tensor, r: float) -> int:
    """SpeeD's τ for magnitude r (Sec. 2.5): the first t in the convergence area, where 1/ᾱ_t ≥ r.

    For the linear schedule this is the paper's closed form τ = √(2T log r/Δβ + T²β₀²/Δβ²) − Tβ₀/Δβ up to
    discretisation (r_t = exp((β₀ + Δβ t/2T) t) = exp(∫β) ≈ 1/ᾱ_t); the ᾱ form holds for any schedule.
    """
    inside = (1.0 / alphas_cumprod >= r).nonzero()
    if r <= 1 or inside.numel() == 0:
        top = float(1.0 / alphas_cumprod[-1])
        raise UserError(f"--speed-r {r!r} is invalid; accepted: 1 < r <= {top:.4g} (1/ᾱ at the last timestep)")
    return int(inside[0])


def speed_dual_pivot(alphas_cumprod: torch.Tensor, threshold: float = 1e-4) -> int:
    """The official code's pivot m of the dual partner: one past the first t where ∂_t √(1 − ᾱ_t) < threshold."""
    grad = torch.gradient(torch.sqrt(1.0 - alphas_cumprod))[0]
    below = (grad < threshold).nonzero()
    return int(below[0]) + 1 if below.numel() else alphas_cumprod.numel()


# The authors' published settings (NUS-HPC-AI-Lab/SpeeD, `configs/`): "paper" is the paper's best (Table 6b) and the
# MetFaces and ablation configs; "ffhq" is the FFHQ comparison config. Both sample with `sampling: ours` (the dual
# partner on) and weight with `weighting: ours` (CAW, λ = 0.6). docs/training.md shows their weight mass per band.
SPEED_SETTINGS: dict[str, dict] = {
    "paper": {"k": 5.0, "tau": 700, "dual": True, "lam": 0.6},
    "ffhq": {"k": 2.0, "tau": 700, "dual": True, "lam": 0.6},
}


def speed_setting(name: str) -> dict:
    """The published SpeeD setting called `name` (k, τ, dual, CAW's λ)."""
    return SPEED_SETTINGS[check_choice("--speed-setting", name, SPEED_SETTINGS)]


def check_threshold(flag: str, tau, num_train_timesteps: int) -> int:
    """τ as an int if it is an integer in [1, T], else a UserError naming `flag`."""
    if tau is None or int(tau) != tau or not 1 <= tau <= num_train_timesteps:
        raise UserError(f"{flag} {tau!r} is invalid; accepted: an integer in [1, {num_train_timesteps}]")
    return int(tau)


@register_sampler
class SpeedSampler(StaticSampler):
    """SpeeD asymmetric sampling (Wang et al., 2024, Eq. 3) as the authors' code runs it (`sampling: ours`).

    P̃(t) ∝ k for t < τ, 1 for t ≥ τ: t ≥ τ is the convergence area, where the process increment barely changes
    and the loss is low, sampled k times less than the rest. τ is fixed (the configs' 700) or, with `r`, derived
    from the paper's threshold formula. With `dual` (the published setting) n//2 + 1 timesteps are drawn from P̃
    and each gets the partner t' = m − t (t − m above m, m = the first t where ∂_t √(1 − ᾱ_t) < 1e-4: 642 for the
    linear schedule); the marginal is the mixture that `probabilities` returns. Pair it with CAW
    (`make_weighting("caw")`, which `timetuner train --sampler speed` does by default) for the whole method.
    `setting` picks the published values ("paper": k = 5, "ffhq": k = 2); explicit `k`, `tau`, `dual` override it.
    """

    name: ClassVar[str] = "speed"

    def __init__(self, num_train_timesteps: int, noise_scheduler=None, importance: bool = False,
                 k: float | None = None, tau: int | None = None, r: float | None = None, dual: bool | None = None,
                 setting: str = "paper"):
        super().__init__(num_train_timesteps, noise_scheduler, importance)
        T = self.num_train_timesteps
        published = speed_setting(setting)
        k = published["k"] if k is None else k
        if not (math.isfinite(k) and k > 1):
            raise UserError(f"--speed-k {k!r} is invalid; accepted: a number > 1 (the paper's best is 5)")
        alphas = schedule_of(noise_scheduler, T)
        tau = speed_threshold(alphas, r) if r is not None else check_threshold(
            "--speed-tau", published["tau"] if tau is None else tau, T)
        self.k, self.tau, self.r = float(k), tau, r
        self.dual = bool(published["dual"] if dual is None else dual)
        self.pivot = speed_dual_pivot(alphas) if self.dual else None

    def _base(self) -> torch.Tensor:
        p = torch.ones(self.num_train_timesteps, dtype=torch.float64)
        p[: self.tau] = self.k
        return p / p.sum()

    def _partner(self, t: torch.Tensor) -> torch.Tensor:
        m = self.pivot
        return torch.where(t < m, m - t, t - m).clamp(0, self.num_train_timesteps - 1)

    def _probabilities(self, step):
        p = self._base()
        if not self.dual:
            return p
        t = torch.arange(self.num_train_timesteps)
        return 0.5 * p + 0.5 * torch.zeros_like(p).index_add_(0, self._partner(t), p)

    def sample(self, batch_size, step, generator=None, x0=None):
        if not self.dual:
            return super().sample(batch_size, step, generator, x0)
        # Official layout: n//2 + 1 draws and their partners, truncated to n. With an odd batch the first
        # half is one longer, so the marginal is the 50/50 mixture up to one sample.
        base = torch.multinomial(self._base().float(), batch_size // 2 + 1, replacement=True, generator=generator)
        t = torch.cat([base, self._partner(base)])[:batch_size].to(generator_device(generator))
        return t, self._weight(self.probabilities(step), t)


@register_sampler
class CLTSSampler(StaticSampler):
    """Curriculum-learning timestep schedule (CLTS, arXiv 2404.07946): p_k(t) = (1 − λ_k) U(t) + λ_k N(t; μT, σT).

    High-noise timesteps are learned early and easily, so the curriculum moves training mass over the run towards
    μ = 0.3T, the paper's hardest-to-learn region (its Sec. 5.1), as λ_k rises linearly from `lambda_start` to
    `lambda_end` over `ramp_steps` steps, then stays. The ramp is set in steps, never as a fraction of the run.
    λ is clamped to [0, 1] (the one public copy, SpeeD's baseline, forgets to, and mis-parenthesises the
    Gaussian). μ, σ are fractions of T; the Gaussian is truncated to {0, …, T − 1} and renormalised there.
    docs/training.md says which values the paper fixes and which were chosen here.
    """

    name: ClassVar[str] = "clts"
    time_varying: ClassVar[bool] = True

    def __init__(self, num_train_timesteps: int, noise_scheduler=None, importance: bool = False,
                 mu: float = 0.3, sigma: float = 0.2, lambda_start: float = 0.0, lambda_end: float = 0.8,
                 ramp_steps: int = 1000):
        super().__init__(num_train_timesteps, noise_scheduler, importance)
        self.mu = check_range("--clts-mu", mu, 0.0, 1.0)
        self.sigma = check_range("--clts-sigma", sigma, 0.0, math.inf, low_open=True, high_open=True)
        self.lambda_start = check_range("--clts-lambda-start", lambda_start, 0.0, 1.0)
        self.lambda_end = check_range("--clts-lambda-end", lambda_end, 0.0, 1.0)
        if int(ramp_steps) != ramp_steps or ramp_steps < 1:
            raise UserError(f"--clts-ramp-steps {ramp_steps!r} is invalid; accepted: an integer >= 1")
        self.ramp_steps = int(ramp_steps)

    def mixture_weight(self, step: int) -> float:
        """λ_k: linear from lambda_start to lambda_end over ramp_steps, clamped to [0, 1]."""
        progress = min(max(step, 0) / self.ramp_steps, 1.0)
        return min(max(self.lambda_start + (self.lambda_end - self.lambda_start) * progress, 0.0), 1.0)

    def _probabilities(self, step):
        T = self.num_train_timesteps
        t = torch.arange(T, dtype=torch.float64)
        gauss = torch.exp(-0.5 * ((t - self.mu * T) / (self.sigma * T)) ** 2)
        lam = self.mixture_weight(step)
        return (1.0 - lam) / T + lam * gauss / gauss.sum()

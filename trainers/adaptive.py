"""Adaptive timestep sampling (Kim et al., 2025; official code ku-dmlab/Adaptive-Timestep-Sampler).

A small policy network reads the clean batch x0 and outputs a Beta(α, β) over u = t/(T − 1); t = round(u·(T − 1)).
Every `update_every` steps the training loop's model update is scored: the reward of a sample is how much the
update lowered its loss (the VLB term, in bits per dimension) on a small subset S of timesteps, and the policy
follows REINFORCE with an entropy bonus. S (size `subset`) holds the timesteps whose loss drop best predicts the
total drop, picked by the F-statistic (scikit-learn's `f_regression`) over a buffer of the last `buffer` probes
of the full per-timestep drop on one training image.

Differences from the official code, on purpose:
- it runs on one process or many (the official trainer raises NotImplementedError without torch.distributed);
  with several processes the probe drops and policy gradients are averaged, so every process holds one policy;
- the before/after losses use the same noise (the official code redraws it, adding variance to the reward);
- the entropy bonus is the usual −c·H term of the policy loss (the official code adds c·H, with its gradient,
  to the reward that multiplies log π);
- Beta draws are inverse-CDF draws from the caller's generator, so runs are reproducible and resumable.

Cost per step: one policy forward on the batch. Every `update_every` steps: 2·|S| extra forwards of the batch
and 2 forwards of T/`probe_stride` copies of one image, i.e. (2·|S|·B + 2·T/stride)/update_every extra forwards
per step (≈ 70 at T = 1000, B = 128, against ≈ 3·B forward-equivalents of the training step itself: ~18 %;
`--adaptive-probe-stride 10` cuts the probe part tenfold). `bench/train.py` measures the wall-clock overhead.

The loop supplies the model through `bind(probe)`: `probe(x0, t, noise)` returns the per-sample training loss
without gradient. `timetuner train` does this; in your own loop call `sampler.bind(...)` once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from timetuner.errors import UserError
from timetuner.trainers.samplers import check_range, register_sampler, schedule_of

Probe = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class BetaPolicy(nn.Module):
    """x0 → (α, β) of a Beta distribution; α, β = softplus(·) + 1e-5, initialised to Beta(1, 1) = uniform."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, width), nn.SiLU(),
        )
        self.head = nn.Linear(width, 2)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, math.log(math.e - 1.0))  # softplus(b) = 1

    def forward(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = nn.functional.softplus(self.head(self.features(x0))) + 1e-5
        return out[:, 0], out[:, 1]


def vlb_weights(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """λ_t with L_t^VLB = λ_t‖ε − ε_θ‖² per dimension, in bits: β_t²/(2 σ_t² α_t (1 − ᾱ_t) ln 2), σ_t² = β̃_t.

    β̃_0 = 0, so t = 0 borrows β̃_1 (the log-variance clipping of Nichol & Dhariwal).
    """
    prev = torch.cat([torch.ones(1, dtype=alphas_cumprod.dtype), alphas_cumprod[:-1]])
    betas = 1.0 - alphas_cumprod / prev
    posterior = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    if posterior.numel() > 1:
        posterior[0] = posterior[1]
    else:
        posterior[0] = betas[0]
    return betas**2 / (2.0 * posterior * (1.0 - betas) * (1.0 - alphas_cumprod) * math.log(2.0))


def beta_pmf(alpha: torch.Tensor, beta: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """P(round(u·(T−1)) = t) for u ~ Beta(α_i, β_i), averaged over i: float64, length T."""
    from scipy.special import betainc

    T = num_train_timesteps
    edges = ((torch.arange(T + 1, dtype=torch.float64) - 0.5) / max(T - 1, 1)).clamp(0.0, 1.0).numpy()
    a = alpha.detach().double().cpu().numpy()[:, None]
    b = beta.detach().double().cpu().numpy()[:, None]
    cdf = torch.from_numpy(betainc(a, b, edges[None, :]))
    return (cdf[:, 1:] - cdf[:, :-1]).mean(dim=0)


@register_sampler
class AdaptiveSampler:
    """Adaptive non-uniform timestep sampling: a Beta policy on x0, trained by REINFORCE on the loss drop."""

    name: ClassVar[str] = "adaptive"

    def __init__(self, num_train_timesteps: int, noise_scheduler=None, importance: bool = False,
                 update_every: int = 40, subset: int = 3, buffer: int = 20, lr: float = 1e-2,
                 entropy: float = 1e-2, probe_stride: int = 1, reward: str = "vlb", grad_clip: float = 1.0,
                 seed: int = 0):
        T = int(num_train_timesteps)
        if T < 2:
            raise UserError(f"num_train_timesteps {T} is invalid; accepted: 2 or more for --sampler adaptive")
        for flag, value, low in (("--adaptive-update-every", update_every, 1), ("--adaptive-subset", subset, 1),
                                 ("--adaptive-buffer", buffer, 2), ("--adaptive-probe-stride", probe_stride, 1)):
            if int(value) != value or value < low:
                raise UserError(f"{flag} {value!r} is invalid; accepted: an integer >= {low}")
        if subset > T // probe_stride:
            raise UserError(f"--adaptive-subset {subset} is invalid; accepted: at most {T // probe_stride} "
                            "(the probed timesteps)")
        check_range("--adaptive-lr", lr, 0.0, math.inf, low_open=True, high_open=True)
        check_range("--adaptive-entropy", entropy, 0.0, math.inf, high_open=True)
        if reward not in ("vlb", "mse"):
            raise UserError(f"--adaptive-reward {reward!r} is not known; accepted: mse, vlb")
        self.num_train_timesteps, self.importance = T, bool(importance)
        self.update_every, self.subset, self.buffer_size = int(update_every), int(subset), int(buffer)
        self.lr, self.entropy_coef, self.grad_clip, self.seed = float(lr), float(entropy), float(grad_clip), seed
        self.probe_grid = torch.arange(0, T, int(probe_stride))
        alphas = schedule_of(noise_scheduler, T)
        self.loss_scale = vlb_weights(alphas).float() if reward == "vlb" else torch.ones(T)
        self.selected = self.probe_grid[: self.subset].tolist()  # the official start: the first timesteps
        self.buffer_x: list[torch.Tensor] = []
        self.buffer_y: list[float] = []
        self.policy: BetaPolicy | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.channels: int | None = None
        self.probe: Probe | None = None
        self._pending: dict | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_reward: float | None = None

    # -- wiring -------------------------------------------------------------------------------------
    def bind(self, probe: Probe) -> None:
        """Give the sampler the model's loss: `probe(x0, t, noise)` → per-sample loss (no gradient)."""
        self.probe = probe

    def _ensure_policy(self, channels: int, device: torch.device) -> None:
        if self.policy is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.policy = BetaPolicy(channels)
            self.channels = channels
            self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=self.lr)
        self.policy.to(device)

    # -- the protocol -------------------------------------------------------------------------------
    def sample(self, batch_size, step, generator=None, x0=None):
        from scipy.special import betaincinv

        if x0 is None or x0.shape[0] != batch_size:
            raise UserError("--sampler adaptive draws timesteps from the clean batch; accepted: "
                            "sample(batch_size, step, generator, x0=x0) with x0 of batch_size rows")
        T = self.num_train_timesteps
        self._ensure_policy(x0.shape[1], x0.device)
        learn = self.probe is not None and step % self.update_every == 0
        with torch.set_grad_enabled(learn):
            alpha, beta = self.policy(x0.detach().float())
        # Inverse-CDF draw from the caller's generator (torch's Beta sampler takes none).
        v = torch.rand(batch_size, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else "cpu").cpu()
        u = torch.from_numpy(betaincinv(alpha.detach().double().cpu().numpy(), beta.detach().double().cpu().numpy(),
                                        v.numpy())).clamp(1e-6, 1 - 1e-6)
        t = torch.round(u * (T - 1)).long().to(x0.device)
        u = u.to(device=x0.device, dtype=torch.float32)
        self._last = (alpha.detach(), beta.detach())
        dist = torch.distributions.Beta(alpha, beta)
        if self.importance:
            weight = ((T - 1) / (T * dist.log_prob(u).exp().clamp(min=1e-3))).detach()
        else:
            weight = torch.ones(batch_size, device=x0.device)
        if learn:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            noise = torch.randn(x0.shape, generator=gen).to(x0.device)
            probe_x = x0[int(torch.randint(0, batch_size, (1,), generator=gen))].detach()
            probe_noise = torch.randn((len(self.probe_grid), *x0.shape[1:]), generator=gen).to(x0.device)
            self._pending = {
                "step": step, "x0": x0.detach(), "noise": noise, "probe_x": probe_x, "probe_noise": probe_noise,
                "log_prob": dist.log_prob(u), "entropy": dist.entropy(),
                "before": self._subset_losses(x0.detach(), noise), "before_row": self._probe_row(probe_x, probe_noise),
            }
        return t, weight

    def update(self, t: torch.Tensor, per_sample_loss: torch.Tensor, step: int) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending["step"] != step:
            return None
        after = self._subset_losses(pending["x0"], pending["noise"])
        row = _mean_over_processes(pending["before_row"] - self._probe_row(pending["probe_x"], pending["probe_noise"]))
        reward = (pending["before"] - after).sum(dim=1)  # per sample, over the subset S
        self.buffer_x = (self.buffer_x + [row.cpu()])[-self.buffer_size:]
        self.buffer_y = (self.buffer_y + [float(row.sum())])[-self.buffer_size:]
        if len(self.buffer_x) > 1:
            self.selected = self._select_subset()
        loss = -(pending["log_prob"] * reward.detach()).mean() - self.entropy_coef * pending["entropy"].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in self.policy.parameters():
            if p.grad is not None:
                p.grad = _mean_over_processes(p.grad)
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.policy.parameters(), self.grad_clip)
        self.optimizer.step()
        self.last_reward = float(reward.mean())
        return None

    def probabilities(self, step: int = 0) -> torch.Tensor:
        """The batch-averaged distribution of the last draw (uniform before the first)."""
        if self._last is None:
            return torch.full((self.num_train_timesteps,), 1.0 / self.num_train_timesteps, dtype=torch.float64)
        return beta_pmf(*self._last, self.num_train_timesteps)

    def state_dict(self) -> dict:
        return {
            "channels": self.channels,
            "policy": None if self.policy is None else self.policy.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "selected": list(self.selected),
            "buffer_x": torch.stack(self.buffer_x) if self.buffer_x else torch.zeros(0, len(self.probe_grid)),
            "buffer_y": torch.tensor(self.buffer_y, dtype=torch.float64),
            "last": None if self._last is None else torch.stack([v.cpu() for v in self._last]),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("channels") is not None:
            self._ensure_policy(int(state["channels"]), torch.device("cpu"))
            self.policy.load_state_dict(state["policy"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.selected = [int(v) for v in state["selected"]]
        self.buffer_x = list(state["buffer_x"].unbind(0))
        self.buffer_y = [float(v) for v in state["buffer_y"]]
        self._last = None if state.get("last") is None else (state["last"][0], state["last"][1])

    # -- reward pieces ------------------------------------------------------------------------------
    def _scaled(self, x0, t, noise) -> torch.Tensor:
        with torch.no_grad():
            return self.probe(x0, t, noise).float() * self.loss_scale.to(x0.device)[t]

    def _subset_losses(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Loss of every sample at every timestep of S: shape (batch, |S|)."""
        cols = [self._scaled(x0, torch.full((x0.shape[0],), s, device=x0.device, dtype=torch.long), noise)
                for s in self.selected]
        return torch.stack(cols, dim=1)

    def _probe_row(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Loss of one image at every probed timestep (the F-statistic's features)."""
        t = self.probe_grid.to(x.device)
        return self._scaled(x.expand(len(t), *x.shape), t, noise)

    def _select_subset(self) -> list[int]:
        """The `subset` probed timesteps whose drop best explains the total drop (F-statistic)."""
        import warnings

        from sklearn.feature_selection import f_regression

        X = torch.stack(self.buffer_x).double().numpy()
        y = torch.tensor(self.buffer_y, dtype=torch.float64).numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant columns give NaN scores; they rank last
            scores, _ = f_regression(X, y)
        scores = torch.nan_to_num(torch.from_numpy(scores), nan=-1.0)
        best = torch.argsort(scores, descending=True, stable=True)[: self.subset]
        return sorted(self.probe_grid[best].tolist())


def _mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """Average a tensor over torch.distributed processes (identity on one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x

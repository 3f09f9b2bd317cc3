"""Reference trajectories from the same noises: what a few-step sampler is measured (and fitted) against.

Both are cached on disk (safetensors under `$TIMETUNER_CACHE`, default `~/.cache/timetuner/references`) keyed by
the model's weights hash, the scheduler configuration, the reference settings and the noises' seed and count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

from timetuner.denoiser import to_epsilon


def cache_key(*parts) -> str:
    """A short stable hash of JSON-able parts (model hash, configs, seeds, …)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cache_path(key: str) -> Path:
    root = Path(os.environ.get("TIMETUNER_CACHE", Path.home() / ".cache" / "timetuner")) / "references"
    return root / f"{key}.safetensors"


def _cached(key: str | None, compute):
    """{name: tensor} from the cache under `key`, else `compute()` written there atomically."""
    from safetensors.torch import load_file, save_file

    path = _cache_path(key) if key else None
    if path is not None and path.is_file():
        try:
            return load_file(path)
        except Exception:  # a damaged cache entry is recomputed
            path.unlink(missing_ok=True)
    tensors = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    return tensors


@torch.no_grad()
def reference_samples(denoiser, base_config, noise: torch.Tensor, kind: str, steps: int,
                      key: str | None = None) -> torch.Tensor:
    """Final samples of a high-NFE sampler ("dpm++": DPM-Solver++ 2M, or "ddim") from unit-variance `noise`."""
    import diffusers

    def compute():
        if kind == "dpm++":
            sched = diffusers.DPMSolverMultistepScheduler.from_config(base_config, solver_order=2)
        else:
            sched = diffusers.DDIMScheduler.from_config(base_config)
        sched.set_timesteps(steps, device=denoiser.device)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(denoiser(sched.scale_model_input(x, t), t), t, x).prev_sample
        return {"x0": x}

    return _cached(key, compute)["x0"].to(noise.device)


def interpolated_alpha_bar(alphas_cumprod: torch.Tensor, t: float) -> float:
    """ᾱ at a fractional timestep: linear in log ᾱ between the neighbouring integers."""
    total = len(alphas_cumprod)
    t = min(max(float(t), 0.0), total - 1.0)
    lo = int(math.floor(t))
    hi = min(lo + 1, total - 1)
    la, lb = math.log(float(alphas_cumprod[lo])), math.log(float(alphas_cumprod[hi]))
    return math.exp(la + (t - lo) * (lb - la))


def state_times(sampler) -> list[float]:
    """The time of the few-step state before evaluation 0, after each evaluation k (t_{k+1}; 0 after the last)."""
    return [float(sampler.t[0])] + [float(v) for v in sampler.t[1:]] + [0.0]


def is_sigma_space(sampler) -> bool:
    """σ-space samplers (Heun, Euler) hold x / √ᾱ; VP ones (DDIM, DPM-Solver) hold x itself."""
    return sampler.init_noise_sigma > 1.0 + 1e-6


def to_vp(sampler, x: torch.Tensor, t: float) -> torch.Tensor:
    """A sampler state at time t in VP space (x_t = α x0 + σ ε), to compare samplers of both kinds."""
    if not is_sigma_space(sampler) or t <= 0:
        return x
    return x * math.sqrt(interpolated_alpha_bar(sampler.alphas_cumprod, t))


@torch.no_grad()
def reference_trajectory(sampler, noise: torch.Tensor, steps: int, key: str | None = None) -> list[torch.Tensor]:
    """The reference's state at the time of every few-step state (see `state_times`), in the sampler's space.

    A DDIM (probability-flow) reference with `steps` uniform steps, its grid joined with the few-step times
    so that every comparison is at exactly the same time, runs in VP space from the sampler's own x_T.
    """
    a_bar = sampler.alphas_cumprod
    times = state_times(sampler)
    start = times[0]
    fine = torch.linspace(sampler.num_train_timesteps - 1, 0, steps + 1, dtype=torch.float64).tolist()
    grid = sorted({round(v, 6) for v in fine + times if v <= start + 1e-9}, reverse=True)

    def compute():
        x = to_vp(sampler, noise * sampler.init_noise_sigma, start)
        states = {grid[0]: x}
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            ab_a, ab_b = interpolated_alpha_bar(a_bar, a), interpolated_alpha_bar(a_bar, b)
            ta = torch.tensor(a)
            eps = to_epsilon(sampler.den(x, ta), x, ta, a_bar, sampler.prediction_type)
            x0 = (x - math.sqrt(1 - ab_a) * eps) / math.sqrt(ab_a)
            x = math.sqrt(ab_b) * x0 + math.sqrt(1 - ab_b) * eps
            states[round(b, 6)] = x
        out = {}
        for i, v in enumerate(times):
            vp = states[round(v, 6)]
            out[f"s{i}"] = vp / math.sqrt(interpolated_alpha_bar(a_bar, v)) if is_sigma_space(sampler) and v > 0 else vp
        return out

    tensors = _cached(key, compute)
    return [tensors[f"s{i}"].to(noise.device) for i in range(len(times))]

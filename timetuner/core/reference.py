"""Reference samples and trajectories from the same noises: what a few-step solver is measured (and fitted) against.

Both are cached on disk (`timetuner.core.cache`) keyed by the model's weights hash, the scheduler configuration, the
reference settings and the noises' seed and count.
"""

from __future__ import annotations

import math

import torch

from timetuner.core.cache import cache_key, cached, grown
from timetuner.core.solver import Solver, alpha_bar_at, to_epsilon
from timetuner.core.trajectories import make_scheduler
from timetuner.table import is_flow

REFERENCE_SOLVERS = {"dpm++": ("DPMSolverMultistepScheduler", {"solver_order": 2}), "ddim": ("DDIMScheduler", {})}
# A flow-matching model's: DPM-Solver++ 2M on flow sigmas at the model's shift, or its own Euler (the flow "ddim").
FLOW_REFERENCE_SOLVERS = {"dpm++": "flow-dpm++", "ddim": "flow-euler"}


def reference_scheduler(base_config, kind: str):
    """The reference solver `kind` ("dpm++" or "ddim") for a model, built from its pipeline's scheduler config."""
    import diffusers

    if is_flow(base_config):
        return make_scheduler(FLOW_REFERENCE_SOLVERS[kind], base_config)
    class_name, overrides = REFERENCE_SOLVERS[kind]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


@torch.no_grad()
def reference_samples(denoiser, base_config, noise: torch.Tensor, kind: str, steps: int,
                      key: str | None = None) -> torch.Tensor:
    """Final samples of a high-NFE solver ("dpm++": DPM-Solver++ 2M, or "ddim"; flow models: their flow
    counterparts) from unit-variance `noise`."""

    def compute():
        return {"x0": Solver(denoiser, reference_scheduler(base_config, kind), steps).rollout(noise)}

    return cached(key, compute)["x0"].to(noise.device)


@torch.no_grad()
def reference_trajectory(solver: Solver, noise: torch.Tensor, steps: int, key: str | None = None
                         ) -> list[torch.Tensor]:
    """The reference's state at the time of every few-step state (`Solver.state_times`), in the solver's space.

    A DDIM (probability-flow) reference with `steps` uniform steps, its grid joined with the few-step times
    so that every comparison is at exactly the same time, runs in VP space from the solver's own x_T; a flow
    model's reference is Euler on the same joined grid of σ·T.
    """
    a_bar = solver.alphas_cumprod
    times = solver.state_times()
    start = times[0]
    top = solver.num_train_timesteps if solver.flow else solver.num_train_timesteps - 1
    fine = torch.linspace(top, 0, steps + 1, dtype=torch.float64).tolist()
    grid = sorted({round(v, 6) for v in fine + times if v <= start + 1e-9}, reverse=True)

    def flow():
        x, total = noise * solver.init_noise_sigma, solver.num_train_timesteps
        states = {grid[0]: x}
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            x = x + (b - a) / total * solver.den(x, torch.tensor(a))  # dσ · v(x, σ·T)
            states[round(b, 6)] = x
        return {f"s{i}": states[round(v, 6)] for i, v in enumerate(times)}

    def compute():
        if solver.flow:
            return flow()
        x = solver.to_vp(noise * solver.init_noise_sigma, start)
        states = {grid[0]: x}
        for a, b in zip(grid[:-1], grid[1:], strict=True):
            ab_a, ab_b = alpha_bar_at(a_bar, a), alpha_bar_at(a_bar, b)
            ta = torch.tensor(a)
            eps = to_epsilon(solver.den(x, ta), x, ta, a_bar, solver.prediction_type)
            x0 = (x - math.sqrt(1 - ab_a) * eps) / math.sqrt(ab_a)
            x = math.sqrt(ab_b) * x0 + math.sqrt(1 - ab_b) * eps
            states[round(b, 6)] = x
        return {f"s{i}": solver.from_vp(states[round(v, 6)], v) for i, v in enumerate(times)}

    tensors = cached(key, compute)
    return [tensors[f"s{i}"].to(noise.device) for i in range(len(times))]


REFERENCE_SET_SEED = 7_000_000  # block i of a reference set: noises from seed REFERENCE_SET_SEED + i
REFERENCE_SET_BLOCK = 500


@torch.no_grad()
def reference_set(denoiser_for, base_config, kind: str, steps: int, n: int, features, key: str | None,
                  images=None, progress=None, world=None) -> torch.Tensor:
    """Features of n final samples of the reference solver from their own noises: what the distribution gap is
    measured against. Cached by `key` and grown block by block (`timetuner.core.cache.grown`): asking for more
    samples than are cached computes only the missing blocks, and the first n are the same at any size.

    `denoiser_for(lo, hi)`: the denoiser for samples lo…hi−1 (their conditioning); `features(images)` → N×D
    array; `images` maps final samples to images (the VAE decoder for latent models); `progress(done, total)`;
    `world`: the processes that share the missing blocks (`timetuner.core.distributed`).
    """
    size = reference_block(n)

    def block(i: int) -> torch.Tensor:
        lo, hi = i * size, (i + 1) * size
        den = denoiser_for(lo, hi)
        gen = torch.Generator().manual_seed(REFERENCE_SET_SEED + i)
        noise = torch.randn((size, *den.sample_shape), generator=gen).to(den.device)
        final = reference_samples(den, base_config, noise, kind, steps)
        final = final if images is None else images(final)
        # float32: the extractors compute in float32, so storing them so loses nothing (and halves the file)
        return torch.as_tensor(features(final.clamp(-1, 1))).float()

    return grown(key, n, size, block, progress, world)


def reference_block(n: int) -> int:
    """Samples per block of a reference set of n (part of its cache key): 500, or n for smaller sets."""
    return min(REFERENCE_SET_BLOCK, n)


def reference_final(model, denoiser, kind: str, steps: int, noise: torch.Tensor, seed: int, *parts
                    ) -> torch.Tensor:
    """Final samples of the reference solver from `noise` (seed `seed`) — the one cache entry that fit's
    verdict, `eval` and `report` share for the same model, reference, noises and conditioning; `parts` tell
    more about the noises (which rows of the seed's they are, for one process's share)."""
    key = reference_final_key(model, denoiser, kind, steps, noise.shape[0], seed, *parts)
    return reference_samples(denoiser, model.base_config, noise, kind, steps, key)


def reference_final_key(model, denoiser, kind: str, steps: int, n: int, seed: int, *parts) -> str:
    """The cache key of `reference_final` for n noises of `seed`."""
    return reference_key("samples", model, denoiser, kind, steps, seed, n, *parts)


def reference_key(what: str, model, denoiser, kind: str, steps: int, *parts) -> str:
    """The cache key of reference samples or a reference set: the model's weights hash and noise schedule, the
    reference solver and steps, the sample shape and conditioning, and `parts` (seeds, counts, extractor)."""
    schedule = {k: v for k, v in dict(model.base_config).items() if not k.startswith("_")}  # not diffusers' version
    return cache_key(what, model.weights, schedule, kind, steps, *parts, list(denoiser.sample_shape),
                     *denoiser.cache_parts())

"""A plain diffusers sampling loop that works for every scheduler, ε- and σ-space alike."""

from __future__ import annotations

import inspect

import torch


def initial_noise(n: int, shape: tuple[int, ...], generator: torch.Generator, device=None) -> torch.Tensor:
    """n standard-normal starting states of shape `shape` (C×H×W), drawn on the generator's device."""
    noise = torch.randn((n, *shape), generator=generator, device=generator.device)
    return noise if device is None else noise.to(device)


@torch.no_grad()
def sample_loop(
    unet,
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    batch_size: int = 256,
    eta: float = 0.0,
) -> torch.Tensor:
    """Run `scheduler` from `noise` (unit variance) to images in [-1, 1], `batch_size` samples at a time.

    Unlike `DDPMPipeline`, this calls `scale_model_input` and scales the noise by `init_noise_sigma`, so
    σ-space schedulers (Heun, Euler, EDM) sample correctly too.
    """
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    scheduler.set_timesteps(num_inference_steps, device=device)
    step_params = inspect.signature(scheduler.step).parameters
    extra = {}
    if "eta" in step_params:
        extra["eta"] = eta
    if "generator" in step_params:
        extra["generator"] = generator
    out = []
    for chunk in noise.split(batch_size):
        x = chunk.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
        # Some schedulers keep per-run state (DPM-Solver's step index, Heun's first-order buffer).
        scheduler.set_timesteps(num_inference_steps, device=device)
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            t_in = t.to(dtype=torch.float32).expand(x.shape[0])
            eps = unet(x_in.to(dtype), t_in).sample.to(torch.float32)
            x = scheduler.step(eps, t, x, **extra).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)

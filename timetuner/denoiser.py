"""One callable over a diffusers network: `model_output = denoiser(x_in, t)`, with float t into the embedding.

The raw output (ε, v or x0, as the model was trained) is what the scheduler's `step` consumes, so fitting and
sampling hand it on unchanged; `to_epsilon` converts it where a loss compares noise predictions.
"""

from __future__ import annotations

import torch

from timetuner.errors import UserError


class Denoiser:
    """Wraps a `UNet2DModel`; counts network evaluations (per sample) for the benchmarks."""

    def __init__(self, unet, batch_size: int = 1024):
        config = unet.config
        if getattr(config, "time_embedding_type", "positional") == "learned":
            raise UserError("the model's time embedding is learned (time_embedding_type='learned'): it cannot take "
                            "a tuned, fractional timestep; accepted: positional or fourier embeddings")
        self.unet = unet
        self.batch_size = batch_size
        self.evaluations = 0  # network evaluations, counted per sample
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
        return (c.in_channels, size, size)

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        """Network output at (float) timestep t — a scalar or one per sample — in float32."""
        t = torch.as_tensor(t, device=x.device)
        t = t.to(torch.float32).reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.to(torch.float32)
        self.evaluations += x.shape[0]
        outs = [self.unet(xb.to(self.dtype), tb).sample.to(torch.float32)
                for xb, tb in zip(x.split(self.batch_size), t.split(self.batch_size), strict=True)]
        return torch.cat(outs)


def to_epsilon(output: torch.Tensor, x_in: torch.Tensor, t, alphas_cumprod: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """ε from an ε / v / x0 prediction of a VP network input x_in at timestep t (Salimans & Ho, 2022)."""
    if prediction_type == "epsilon":
        return output
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(alphas_cumprod) - 1)
    # ᾱ at a fractional t: linear in log ᾱ between the neighbouring integers.
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(alphas_cumprod) - 1)
    log_a = torch.log(alphas_cumprod.double())
    a_bar = torch.exp(log_a[lo] + (t - lo) * (log_a[hi] - log_a[lo])).float().to(output.device)
    a, s = a_bar.sqrt(), (1 - a_bar).sqrt()
    if prediction_type == "v_prediction":
        return a * output + s * x_in
    if prediction_type == "sample":
        return (x_in - a * output) / s.clamp(min=1e-8)
    raise UserError(f"prediction_type {prediction_type!r} is not supported; accepted: epsilon, sample, v_prediction")

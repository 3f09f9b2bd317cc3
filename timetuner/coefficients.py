"""Learned solver coefficients: per step k, corrections c_{k,j} on the last J data predictions and an output scale
o_k, on top of the wrapped scheduler's own update (as GS in GAS, Oh et al., ICLR 2026, corrects DPM-Solver++'s
weights; the output scale as EPD-Solver's). The method: docs/method.md, "Learned solver coefficients".

Notation (k counts steps, one network evaluation each; x_k the sample handed to step k, m_k the network's output):

    D_k       the data prediction (x0 estimate) of step k, from o_k·m_k and x_k at σ_k
    α_k, s_k  the signal and noise levels of σ_k: VP α = 1/√(1 + σ²), s = σ·α; flow matching α = 1 − σ, s = σ
    w_k       α_{k+1} − α_k·s_{k+1}/s_k: the weight a first-order step from σ_k to σ_{k+1} gives D_k (DDIM's)

    x_{k+1} = step(o_k·m_k, t_k, x_k) + w_k Σ_{j<J} c_{k,j} D_{k−j}

The update itself stays the scheduler's `step`; corrections enter through what it returns and the output scale
through what it is handed. c = 0 and o = 1 are the plain solver, bitwise: the arithmetic is then skipped. Only
solvers that evaluate once per step and keep their σ per step in `sigmas` take them (`COEFFICIENT_SOLVERS`).
"""

from __future__ import annotations

import torch

from timetuner.errors import UserError

# One network evaluation per step, σ per step in `scheduler.sigmas` (σ_K the end): the solvers that take coefficients.
COEFFICIENT_SOLVERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                       "FlowMatchEulerDiscreteScheduler")
MAX_HISTORY = 3  # J: the solver's order + 1, at most 3


def history_length(scheduler) -> int:
    """J for a scheduler: its solver order + 1 (Euler: 2), at most MAX_HISTORY."""
    return min(MAX_HISTORY, int(scheduler.config.get("solver_order", 1)) + 1)


def refusal(scheduler) -> str | None:
    """Why a scheduler cannot take coefficients (None if it can)."""
    name = type(scheduler).__name__
    if name not in COEFFICIENT_SOLVERS:
        return (f"{name} cannot take learned coefficients; accepted: {', '.join(COEFFICIENT_SOLVERS)} (one network "
                "evaluation per step, σ per step)")
    return None


def check_coefficients(corrections: torch.Tensor, scale: torch.Tensor, steps: int, source: str) -> None:
    """Shapes and finiteness of a table's coefficients: a (K, J) correction matrix, J ≤ 3, and K positive scales."""
    if corrections.ndim != 2 or corrections.shape[0] != steps or not 1 <= corrections.shape[1] <= MAX_HISTORY:
        raise UserError(f"{source}: corrections have shape {tuple(corrections.shape)}; accepted: ({steps}, J), one "
                        f"row per network evaluation, J from 1 to {MAX_HISTORY}")
    if scale.shape != (steps,):
        raise UserError(f"{source}: scale has shape {tuple(scale.shape)}; accepted: ({steps},), one per evaluation")
    if not (torch.isfinite(corrections).all() and torch.isfinite(scale).all()) or (scale <= 0).any():
        raise UserError(f"{source}: corrections or scale hold a non-finite or non-positive scale value; accepted: "
                        "finite corrections, scales > 0")


def levels(sigma: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, s) of a scheduler's σ: VP σ = s/α (DPM-Solver, UniPC, DEIS), flow matching σ = s, α = 1 − σ."""
    if flow:
        return 1 - sigma, sigma
    alpha = (sigma * sigma + 1).rsqrt()
    return alpha, sigma * alpha


def data_prediction(output: torch.Tensor, x: torch.Tensor, alpha, s, prediction_type: str) -> torch.Tensor:
    """D, the x0 estimate of a network output at x with levels (α, s)."""
    if prediction_type == "epsilon":
        return (x - s * output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - s * output
    if prediction_type == "sample":
        return output
    return x - s * output  # flow matching: the velocity ε − x0 (flow_prediction, FlowMatch schedulers)


class Corrector:
    """One run's history of data predictions and the corrected step (`TunedScheduler.step` and `Solver.step`).

    `corrections` (K, J) and `scale` (K) may require gradients (the fit differentiates through them)."""

    def __init__(self, scheduler, corrections: torch.Tensor, scale: torch.Tensor, flow: bool):
        self.corrections, self.scale, self.flow = corrections, scale, flow
        self.prediction_type = scheduler.config.get("prediction_type") or "flow_prediction"
        self.history: dict[int, torch.Tensor] = {}

    def scaled(self, k: int, output: torch.Tensor) -> torch.Tensor:
        """o_k·m_k, in the output's dtype (unchanged when o_k = 1)."""
        o = self.scale[k]
        if not o.requires_grad and float(o) == 1.0:
            return output
        return output * o.to(device=output.device, dtype=output.dtype)

    def corrected(self, scheduler, k: int, output: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor):
        """x_{k+1} + w_k Σ_j c_{k,j} D_{k−j}, with `output` the (scaled) output handed to step k at x = x_k; D_k kept.
        Steps before the first of this run (img2img's begin index) have no D: their terms are left out."""
        sigmas = scheduler.sigmas
        sigma, after = (sigmas[i].to(device=x.device, dtype=torch.float32) for i in (k, k + 1))
        (alpha, s), (alpha_next, s_next) = levels(sigma, self.flow), levels(after, self.flow)
        self.history[k] = data_prediction(output.float(), x.float(), alpha, s, self.prediction_type)
        row = self.corrections[k]
        if not row.requires_grad and not bool(row.any()):
            return x_next
        weight = alpha_next - alpha * s_next / s
        terms = [row[j].to(x.device, torch.float32) * self.history[k - j] for j in range(row.numel())
                 if k - j in self.history]
        return (x_next.float() + weight * torch.stack(terms).sum(0)).to(x_next.dtype)

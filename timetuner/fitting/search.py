"""The 1-D optimisers of a per-evaluation τ fit (`fitting.method`): a bracketed search and the official Adam recipe.

`inputs` (a `timetuner.fitting.method.FitInputs`) says over which processes' samples a per-sample loss is averaged.
"""

from __future__ import annotations

import math

import torch

from timetuner.core.distributed import SOLO


def golden_search(f, lo: float, hi: float, start: float, points: int = 7, refine: int = 8) -> tuple[float, float]:
    """Minimise f on [lo, hi]: a grid scan (incl. `start`), then golden-section refinement around the best point.

    Returns (argmin, min) over every point evaluated, so the result is never worse than `start` on f.
    """
    seen: dict[float, float] = {}

    def val(x: float) -> float:
        x = float(x)
        if x not in seen:
            seen[x] = float(f(x))
        return seen[x]

    grid = sorted({*torch.linspace(lo, hi, points).tolist(), float(start)})
    values = [val(x) for x in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(refine):
        if b - a < 1e-3:
            break
        if val(c) < val(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    best = min(seen, key=seen.get)
    return best, seen[best]


class _OneProcess:
    """`inputs` of a fit on one process (`FitInputs` without its noises): losses averaged over its samples."""

    total, world = None, SOLO

    @staticmethod
    def mean(per_sample: torch.Tensor) -> torch.Tensor:
        return SOLO.mean(per_sample, per_sample.shape[0])


def adam_search(loss_fn, t: float, iters: int, lr: float, lo: float, hi: float,
                inputs=None) -> tuple[float, float]:
    """The official recipe: τ = s·r − (s − t) with s = max(t, 1) (τ = t·r for t ≥ 1), r₀ = 1, Adam on r.

    `loss_fn(τ)` gives per-sample losses; `inputs` says over which processes' samples they are averaged.
    """
    inputs = _OneProcess() if inputs is None else inputs
    s = max(t, 1.0)
    r = torch.ones((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([r], lr=lr)
    for _ in range(iters):
        tau = (s * r - (s - t)).clamp(lo, hi)
        per_sample = loss_fn(tau.float())
        loss = per_sample.sum() / (inputs.total or per_sample.shape[0])
        opt.zero_grad()
        loss.backward()
        inputs.world.sum_(r.grad)
        opt.step()
    tau = float((s * r.detach() - (s - t)).clamp(lo, hi))
    with torch.no_grad():
        return tau, float(inputs.mean(loss_fn(torch.tensor(tau))))


def _search(loss_fn, t_k: float, lo: float, hi: float, total: int, config, inputs) -> tuple[float, float]:
    with torch.no_grad():
        return golden_search(lambda v, f=loss_fn: inputs.mean(f(torch.tensor(v))), lo, hi, t_k, config.search_points,
                             config.search_refine)


def _adam(loss_fn, t_k: float, lo: float, hi: float, total: int, config, inputs) -> tuple[float, float]:
    return adam_search(loss_fn, t_k, config.adam_iters, config.adam_lr, 0.0, total - 1.0, inputs)


OPTIMIZERS = {"search": _search, "adam": _adam}


def adam_json(opt: torch.optim.Adam) -> dict:
    """Adam's state as JSON-able lists; float32 → float → float32 round-trips exactly."""
    state = opt.state_dict()
    return {"state": {str(i): {k: v.tolist() for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": state["param_groups"]}


def adam_state(saved: dict) -> dict:
    """`adam_json`'s state back as Adam's `load_state_dict` takes it."""
    return {"state": {int(i): {k: torch.tensor(v, dtype=torch.float32) for k, v in s.items()}
                      for i, s in saved["state"].items()}, "param_groups": saved["param_groups"]}

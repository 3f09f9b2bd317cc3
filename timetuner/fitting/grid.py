"""Learned timestep grids: the solver's own t_k fitted to the reference solver, as LD3 (Tong et al., ICLR 2025)
fits them — here with the real diffusers scheduler, so what is fitted is exactly what a pipeline runs.

diffusers' `set_timesteps(timesteps=…)` takes integers (DPM-Solver++ casts them) and looks its update coefficients
up at them, so a grid is a list of K integers and is searched as one: coordinate descent over t_1 … t_{K−1} (t_0,
where sampling starts, stays; the last step always ends at t = 0), each by a golden-section search on the integers
strictly between its neighbours, minimising the mean RMS distance of the final sample to the reference solver's
final sample from the same noise (`timetuner.fitting.method.sample_distance`) — the e2e objective's loss, with τ = t. It
starts from the best of the solver's named grids by that loss (its spacings, Karras, log-SNR, quadratic,
Align-Your-Steps: `named_grids`), and a point only moves when that lowers the loss, so the learned grid is never
worse on the fit noises than any named grid. τ is fitted afterwards on the learned grid.

A second sweep follows when the first moved a point and two sweeps cost at most `GRID_EVALUATIONS` network
evaluations per fit noise: at K ≤ 7, where one sweep leaves the coupled points far from settled; K = 8 and 10 keep
one (the default fit's time). The measurements behind both limits: docs/results.md, "The figures behind the
defaults".

Flow-matching solvers (FlowMatchEuler, UniPC on flow sigmas) take a σ grid (`set_timesteps(sigmas=…)`, before their
shift) instead: the same search over σ_1 … σ_{K−1} on a lattice of 1/T (σ_0 = 1 stays, the last σ ≥ 1/T), from the best
of the solver's named σ grids (its shifts, Karras / exponential / beta σ, and the σ its pipeline passes: Flux's
linspace) read as σ grids — under a shift by image size at the pipeline's `mu`, whose exponential shift inverts as a
static one of e^μ; the table carries it in `sigmas` (and, where the pipeline passes σ of its own, which grid it
replaces: `pipeline_sigmas`).

Several processes: every loss is the mean over all processes' fit noises (`FitInputs.mean`), so each process takes
the same decisions and holds the same grid.
"""

from __future__ import annotations

import math

import torch

from timetuner.core.distance import rms_distance
from timetuner.core.solver import pipeline_grid
from timetuner.core.trajectories import SCHEDULERS, TRAJECTORIES, build, flow_sigmas
from timetuner.errors import UserError
from timetuner.table import check_grid, check_sigmas

GRID_POINT_LOSSES = 6  # losses (one K-step rollout of the fit noises each) per grid point and sweep
GRID_EVALUATIONS = 450  # network evaluations per fit noise that buy a second sweep: one sweep costs at most
# K·(K−1)·5 (5 new losses per point), 450 at K = 10, so K ≤ 7 gets a second sweep and K = 8, 10 one
GRID_MAX_SWEEPS = 2  # more sweeps cost time without a lower held-out x0 gap (docs/results.md)
GOLDEN = (math.sqrt(5) - 1) / 2
# The grid gradient's one rule: it applies where the solver reads its grid only through `scheduler.sigmas` (torch
# arithmetic), so that a rollout is differentiable in t_k (`Solver.rollout(times=…)`): DPM-Solver++ of any order.
# DPM-Solver-2 (KDPM2) interpolates sigmas of its own midpoints and DDIM indexes ᾱ by integer timestep.
GRID_GRADIENT_SCHEDULERS = ("DPMSolverMultistepScheduler",)


def grid_gradient_names() -> tuple[str, ...]:
    """The named solvers (`core.trajectories`) whose learned grid the gradient can move: by the rule above."""
    return tuple(name for name, (cls, _) in SCHEDULERS.items()
                 if cls in GRID_GRADIENT_SCHEDULERS and "learned" in TRAJECTORIES.get(name, {}))


def planned(solver, n: int, known: dict | None = None) -> int:
    """Network evaluations `learn_grid` makes over n fit noises (at most; fewer where neighbours are close), the
    named grids among `known` (their losses handed over, see `learn_grid`) not rolled out again."""
    starts = len({tuple(g) for g in named_grids(solver).values()} - set(known or {}))
    return solver.evaluations * n * (starts + sweeps(solver) * sweep_losses(solver))


def sweep_losses(solver) -> int:
    """The most losses (K-step rollouts) one sweep makes: GRID_POINT_LOSSES − 1 new ones per point t_1 … t_{K−1}."""
    return (len(solver.grid) - 1) * (GRID_POINT_LOSSES - 1)


def sweeps(solver) -> int:
    """Sweeps the search may make: as many as fit in `GRID_EVALUATIONS` per fit noise, at least one, at most
    `GRID_MAX_SWEEPS` (a later sweep only when the one before moved a point)."""
    return min(GRID_MAX_SWEEPS, max(1, GRID_EVALUATIONS // (solver.evaluations * sweep_losses(solver))))


@torch.no_grad()
def learn_grid(solver, inputs, known: dict | None = None) -> tuple[list[int], dict]:
    """(the learned grid, a record: its start, the losses of the start and of the grid, losses evaluated) for
    `solver` (an explicit grid) against `inputs.reference_final`; `known`: {grid tuple: loss} already measured on
    the same noises (auto's ranking rolls out the named grids that are its candidates), not rolled out again."""
    reference, memo = inputs.reference_final, dict(known or {})
    unit = 1 / solver.num_train_timesteps if solver.flow else 1  # the lattice: timesteps, or σ in steps of 1/T
    last = unit if solver.flow else 0  # the lowest last point: t = 0, σ = 1/T (σ = 0 is the end of sampling)

    def loss(grid: tuple) -> float:
        if grid not in memo:
            final = solver.with_grid(list(grid)).rollout(inputs.noise)
            memo[grid] = float(inputs.mean(rms_distance(final, reference, eps=1e-12)))  # = method.sample_distance
        return memo[grid]

    starts = {name: tuple(g) for name, g in named_grids(solver).items()}
    start = min(starts, key=lambda name: loss(starts[name]))
    grid = starts[start]
    before = loss(grid)
    done, moved, allowed = 0, True, sweeps(solver)
    while moved and done < allowed:
        done, moved = done + 1, False
        for k in range(1, len(grid)):
            lo = round(grid[k + 1] + unit, 12) if k + 1 < len(grid) else last
            hi = round(grid[k - 1] - unit, 12)

            def at(v, k: int = k, current: tuple = grid) -> float:
                return loss(current[:k] + (v,) + current[k + 1:])

            best = _lattice_search(at, lo, hi, grid[k], unit)
            moved = moved or best != grid[k]
            grid = grid[:k] + (best,) + grid[k + 1:]
    evaluated = len(memo) - len(known or {})  # rolled out here; `known` ones came with the call
    return list(grid), {"start": start, "loss_start": before, "loss": memo[grid], "losses": evaluated,
                        "sweeps": done, "start_losses": {name: memo[g] for name, g in starts.items()}}


def named_grids(solver) -> dict[str, list]:
    """The solver's named grids at its K steps as explicit lists ({name: grid}), each usable as
    `set_timesteps(timesteps=…)`: the scheduler's own spacings read off a scheduler set to them, the computed ones
    as they are; a flow solver's as σ grids for its own shift (`set_timesteps(sigmas=…)`). The start of
    `learn_grid` is the one of lowest loss."""

    grids = {}
    for name in TRAJECTORIES[solver.name]:
        if name == "learned":
            continue
        try:
            template, explicit = build(solver.name, name, solver.template.config, solver.nfe_steps, mu=solver.mu)
            if solver.flow:  # its σ, as the learned solver (the model's shift, or the pipeline's mu) is handed them
                grid = flow_sigmas(template, solver.nfe_steps, target=solver.template, mu=solver.mu)
                check_sigmas(grid, solver.nfe_steps)
            else:
                if explicit is None:
                    template.set_timesteps(solver.nfe_steps)
                    explicit = [int(round(float(v))) for v in template.timesteps]
                check_grid(explicit, solver.nfe_steps, solver.num_train_timesteps)
                grid = [int(v) for v in explicit]
        except (UserError, ValueError):
            continue  # e.g. too few distinct timesteps at this K
        grids[name] = grid
    own = pipeline_grid(getattr(solver.den, "family", None), solver.template, solver.nfe_steps)
    if own is not None:
        grids["pipeline"] = own  # the σ the pipeline passes on every call (Flux: linspace(1, 1/N, N))
    return grids


def _lattice_search(f, lo, hi, start, unit=1):
    """The point of lo + unit·ℤ in [lo, hi] (integers for unit 1) with the lowest f found by a golden-section search
    of at most GRID_POINT_LOSSES losses, `start` among them; `start` unless another is strictly lower."""
    seen = {start: f(start)}
    a, b = lo, hi
    while len(seen) + 2 <= GRID_POINT_LOSSES:
        step = round(GOLDEN * (b - a) / unit) * unit
        c, d = round(b - step, 12), round(a + step, 12)  # on the lattice (integers stay integers)
        if c >= d:
            break
        for v in (c, d):
            if v not in seen:
                seen[v] = f(v)
        if seen[c] <= seen[d]:
            b = round(d - unit, 12)
        else:
            a = round(c + unit, 12)
    return min(seen, key=lambda v: (seen[v], v != start))


# -- a grid moved by gradient (`--grid-gradient`) ------------------------------------------------------------------
class GridParameters:
    """A K-point grid t_0 > t_1 > … > t_{K−1} > 0 as K logits w: t_k = t_0 (1 − Σ_{j<k} softmax(w)_j), t_0 fixed —
    strictly decreasing for any w; w = log of the grid's gaps (t_K = 0), `start`, gives back the grid itself."""

    def __init__(self, grid: torch.Tensor):
        t = grid.to(torch.float64)
        self.t0 = float(t[0])
        self.start = (torch.cat([t[:-1] - t[1:], t[-1:]]) / t[0]).log().float()
        # the logits at their start, as a tensor to train (the e2e fit trains its own, resumed: `fitting.joint`)
        self.logits = self.start.clone().requires_grad_(True)

    def times(self, logits: torch.Tensor) -> torch.Tensor:
        u = torch.softmax(logits.to(torch.float64), 0)
        return self.t0 * (1 - torch.cat([u.new_zeros(1), torch.cumsum(u, 0)[:-1]]))


def takes_grid_gradient(solver) -> bool:
    """Whether a solver's rollout can be differentiated in its own times t_k (`Solver.rollout(times=…)`): an explicit
    grid of a DDPM-style solver the rule `GRID_GRADIENT_SCHEDULERS` admits."""
    return type(solver.template).__name__ in GRID_GRADIENT_SCHEDULERS and solver.grid is not None and not solver.flow


def moves_grid(solver, config) -> bool:
    """Whether an e2e fit moves the solver's grid with τ (`config.grid_gradient` on a DPM-Solver++ grid)."""
    return bool(getattr(config, "grid_gradient", False)) and takes_grid_gradient(solver)


def integer_grid(times: list[float], total: int) -> list[int]:
    """`times` (strictly decreasing, in (0, T)) rounded to distinct integer timesteps, strictly decreasing in
    [1, T − 1]: a point that rounds onto its predecessor moves one below it, and from the end up, one onto its
    successor moves one above it."""
    out = []
    for v in times:
        r = min(int(round(v)), total - 1)
        out.append(r if not out else min(r, out[-1] - 1))
    for i in range(len(out) - 1, -1, -1):
        out[i] = max(out[i], 1 if i == len(out) - 1 else out[i + 1] + 1)
    return out


def on_integer_grid(solver, inputs, times: torch.Tensor, taus: torch.Tensor, before: float, coefficients=None):
    """(grid, τ, loss, coefficients) of a fit's continuous grid rounded to integer timesteps, the loss of the real
    rollout on it (with the fit's learned `coefficients`); the plain solver where rounding undid the gain (not seen
    in practice)."""
    grid = integer_grid(times.tolist(), solver.num_train_timesteps)
    with torch.no_grad():
        final = solver.with_grid(grid).rollout(inputs.noise, taus, coefficients=coefficients)
        loss = float(inputs.mean(rms_distance(final, inputs.reference_final, eps=1e-12)))
    if loss > before:
        return solver.t, solver.t.float(), before, None
    return torch.tensor(grid, dtype=torch.float64), taus, loss, coefficients


def on_timesteps(solver) -> bool:
    """Whether the solver steps on its integer timesteps (then a rollout equals that grid's explicit one), not on
    sigmas of its own (Karras, log-SNR λ, exponential, beta), which an explicit grid of timesteps only rounds. A flow
    solver's σ come back through its explicit σ grid only to float rounding (the shift's inverse): never."""
    config = solver.template.config
    return not solver.flow and not any(config.get(k) for k in ("use_karras_sigmas", "use_lu_lambdas",
                                                               "use_exponential_sigmas", "use_beta_sigmas"))

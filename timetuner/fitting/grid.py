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

Several processes: every loss is the mean over all processes' fit noises (`FitInputs.mean`), so each process takes
the same decisions and holds the same grid.
"""

from __future__ import annotations

import math

import torch

GRID_POINT_LOSSES = 6  # losses (one K-step rollout of the fit noises each) per grid point and sweep
GRID_EVALUATIONS = 450  # network evaluations per fit noise that buy a second sweep: one sweep costs at most
# K·(K−1)·5 (5 new losses per point), 450 at K = 10, so K ≤ 7 gets a second sweep and K = 8, 10 one
GRID_MAX_SWEEPS = 2  # a third sweep did not lower the held-out x0 gap, at more time (docs/results.md)
GOLDEN = (math.sqrt(5) - 1) / 2


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
    from timetuner.fitting.method import sample_distance

    reference, memo = inputs.reference_final, dict(known or {})

    def loss(grid: tuple[int, ...]) -> float:
        if grid not in memo:
            memo[grid] = float(inputs.mean(sample_distance(solver.with_grid(list(grid)).rollout(inputs.noise),
                                                           reference)))
        return memo[grid]

    starts = {name: tuple(g) for name, g in named_grids(solver).items()}
    start = min(starts, key=lambda name: loss(starts[name]))
    grid = starts[start]
    before = loss(grid)
    done, moved, allowed = 0, True, sweeps(solver)
    while moved and done < allowed:
        done, moved = done + 1, False
        for k in range(1, len(grid)):
            lo = grid[k + 1] + 1 if k + 1 < len(grid) else 0
            hi = grid[k - 1] - 1

            def at(v: int, k: int = k, current: tuple[int, ...] = grid) -> float:
                return loss(current[:k] + (v,) + current[k + 1:])

            best = _integer_search(at, lo, hi, grid[k])
            moved = moved or best != grid[k]
            grid = grid[:k] + (best,) + grid[k + 1:]
    evaluated = len(memo) - len(known or {})  # rolled out here; `known` ones came with the call
    return list(grid), {"start": start, "loss_start": before, "loss": memo[grid], "losses": evaluated,
                        "sweeps": done, "start_losses": {name: memo[g] for name, g in starts.items()}}


def named_grids(solver) -> dict[str, list[int]]:
    """The solver's named grids at its K steps as explicit integer lists ({name: grid}), each usable as
    `set_timesteps(timesteps=…)`: the scheduler's own spacings read off a scheduler set to them, the computed ones
    as they are. The start of `learn_grid` is the one of lowest loss."""
    from timetuner.core.trajectories import TRAJECTORIES, build
    from timetuner.errors import UserError
    from timetuner.table import check_grid

    grids = {}
    for name in TRAJECTORIES[solver.name]:
        if name == "learned":
            continue
        try:
            template, explicit = build(solver.name, name, solver.template.config, solver.nfe_steps)
            if explicit is None:
                template.set_timesteps(solver.nfe_steps)
                explicit = [int(round(float(v))) for v in template.timesteps]
            check_grid(explicit, solver.nfe_steps, solver.num_train_timesteps)
        except (UserError, ValueError):
            continue  # e.g. too few distinct timesteps at this K
        grids[name] = [int(v) for v in explicit]
    return grids


def _integer_search(f, lo: int, hi: int, start: int) -> int:
    """The integer in [lo, hi] with the lowest f found by a golden-section search of at most GRID_POINT_LOSSES
    losses, `start` among them; `start` unless another is strictly lower."""
    seen = {start: f(start)}
    a, b = lo, hi
    while len(seen) + 2 <= GRID_POINT_LOSSES:
        c, d = b - round(GOLDEN * (b - a)), a + round(GOLDEN * (b - a))
        if c >= d:
            break
        for v in (c, d):
            if v not in seen:
                seen[v] = f(v)
        if seen[c] <= seen[d]:
            b = d - 1
        else:
            a = c + 1
    return min(seen, key=lambda v: (seen[v], v != start))

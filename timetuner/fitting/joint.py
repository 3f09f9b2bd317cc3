"""What an end-to-end fit moves together, and the rows it returns: δ of τ, the grid's logits where the grid moves
(`fitting.grid.GridParameters`), and the solver's learned coefficients (`timetuner.coefficients`): corrections c from
0 and log output scales u from 0 (o = e^u), so every parameter starts at the plain solver."""

from __future__ import annotations

import torch

from timetuner.coefficients import history_length


def parameters(solver, config, grid, saved: dict) -> tuple[dict, torch.optim.Adam]:
    """({name: tensor} of what is fitted, at its start or as `saved`, and Adam over them): δ, the grid's logits
    where it moves, the corrections and log output scales where coefficients are learned."""
    params = {"delta": (torch.zeros(solver.evaluations), config.e2e_lr)}
    if grid is not None:
        params["grid_logits"] = (grid.start, config.e2e_grid_lr)
    if config.coefficients and config.coefficient_parts in ("all", "corrections"):
        width = history_length(solver.template)
        params["corrections"] = (torch.zeros(solver.evaluations, width), config.e2e_coefficient_lr)
    if config.coefficients and config.coefficient_parts in ("all", "scale"):
        params["log_scale"] = (torch.zeros(solver.evaluations), config.e2e_coefficient_lr)
    p = {name: torch.tensor(saved.get(name, start.tolist()), requires_grad=True)
         for name, (start, _) in params.items()}
    return p, torch.optim.Adam([{"params": [p[name]], "lr": lr} for name, (_, lr) in params.items()])


def coefficients_of(values: dict, solver) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrections, scale) of a set of parameter values; a part not fitted is the solver's own (0, 1)."""
    corrections = values.get("corrections")
    if corrections is None:
        corrections = torch.zeros(solver.evaluations, history_length(solver.template))
    log_scale = values.get("log_scale", torch.zeros(solver.evaluations))
    return corrections, log_scale.exp()


def rows_of(times, taus: torch.Tensor, after: float, before: float, coefficients=None) -> tuple[list, list]:
    """(τ, one row per evaluation: t, τ, the losses, and its learned coefficients where fitted)."""
    taus = taus.tolist()
    rows = [{"k": k, "t": float(times[k]), "tau": taus[k], "loss_before": before, "loss_after": after}
            for k in range(len(taus))]
    if coefficients is not None:
        for row, correction, scale in zip(rows, *coefficients, strict=True):
            row.update(corrections=correction.tolist(), scale=float(scale))
    return taus, rows


def row_coefficients(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The learned (corrections, scale) a fit's rows carry (`rows_of`), None where it learned none."""
    if not rows or "corrections" not in rows[0]:
        return None
    return (torch.tensor([row["corrections"] for row in rows], dtype=torch.float32),
            torch.tensor([row["scale"] for row in rows], dtype=torch.float32))

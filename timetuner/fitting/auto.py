"""`--scheduler auto`: measure the plain solvers a user could pick, tune the best few, ship the best of all.

A user who wants better K-step samples compares a tuned table with the best scheduler diffusers already gives
them, not with the same solver untuned. So `auto`:

1. ranks every candidate in `CANDIDATES` (solver × grid, one network evaluation per step, so K steps are K
   evaluations for all of them) *plain* by its x0 gap to the reference solver on the fit noises — K
   evaluations per sample each, no held-out data touched;
2. tunes `AUTO_TUNED` solvers, each once, those that take an explicit grid first, each group by rank: the
   timestep grid where the solver takes one (`fitting.grid`, starting from the best of its named grids), then τ
   with the configured objective, each with its own checkpoint — and, where the solver takes them, a second variant
   on the same searched grid that learns the solver's coefficients with τ (`timetuner.coefficients`; `--coefficients`
   keeps only it, `--no-coefficients` only the first);
3. judges every tuned candidate on the held-out noises against the **best plain candidate** (`evaluation.judge`,
   the same yardstick as everywhere) and writes the tuned table that beats it — of several, a later variant only
   where it beats the earlier one by the same rule (`_choose`) — or, when none does, the identity table of the
   best plain candidate: its solver and grid are then what the table brings to a pipeline (`TunedScheduler`
   carries the table's solver).

The table records every candidate's fit-noise score, each tuned candidate's held-out record against the best
plain one, and which won.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from timetuner.coefficients import refusal
from timetuner.core.solver import pipeline_refusal
from timetuner.core.trajectories import (
    STATIC_ONLY,
    build,
    dynamic_shift,
    make_scheduler,
    model_shift,
)
from timetuner.errors import UserError
from timetuner.fitting.config import FitResult
from timetuner.fitting.grid import on_timesteps
from timetuner.fitting.joint import row_coefficients
from timetuner.fitting.method import sample_distance
from timetuner.fitting.run import announce, prepare, table_metadata, tuned_table
from timetuner.fitting.steps import Phase, bars, fitting_steps, perform, verdict_steps

# solver × grid; all take one network evaluation per step (Heun and DPM-Solver-2 take two and are left out, so
# that every candidate spends the same K evaluations).
CANDIDATES = (("ddim", "uniform"), ("ddim", "trailing"), ("dpm++", "ays"), ("dpm++", "quadratic"),
              ("dpm++", "uniform"), ("dpm++", "logsnr"), ("dpm++", "karras"), ("dpm++3m", "ays"),
              ("dpm++3m", "logsnr"), ("unipc", "uniform"), ("unipc", "karras"), ("deis", "uniform"))
# A flow-matching model's: its Euler at its own shift, at shift 1 and 3, on Karras / exponential / beta sigmas, and
# DPM-Solver++ 2M and UniPC on flow sigmas (Heun evaluates twice per step and is left out, as above).
FLOW_CANDIDATES = (("flow-euler", "uniform"), ("flow-euler", "shift1"), ("flow-euler", "shift3"),
                   ("flow-euler", "karras"), ("flow-euler", "exponential"), ("flow-euler", "beta"),
                   ("flow-dpm++", "uniform"), ("flow-dpm++", "shift3"), ("flow-unipc", "uniform"),
                   ("flow-unipc", "shift3"))
# Solvers tuned: the best-ranked solver that takes a learned grid first, then the others by rank, each once. One:
# on the leaderboard (docs/results.md) a learned grid + τ of DPM-Solver++ beat τ on any fixed grid at every NFE,
# and the second solver auto used to tune (UniPC) never won, at twice the time.
AUTO_TUNED = 1


def candidates(setup) -> list[tuple[str, str]]:
    """The (solver, grid) candidates auto ranks on this model."""
    own_shift = f"shift{model_shift(setup.base_config):g}"
    dynamic = dynamic_shift(setup.base_config)
    chosen = []
    for scheduler, trajectory in FLOW_CANDIDATES if setup.flow else CANDIDATES:
        if setup.flow and (trajectory == own_shift or dynamic and trajectory in STATIC_ONLY):
            continue  # the model's own shift is its "uniform" candidate already; Flux's shift is the pipeline's mu
        if pipeline_refusal(setup.denoiser.family, make_scheduler(scheduler, setup.base_config)):
            continue  # a solver the model's pipeline cannot run (DPM-Solver++ under FluxPipeline's mu, schnell)
        chosen.append((scheduler, trajectory))
    return chosen


@torch.no_grad()
def rank_candidates(config, setup) -> list[dict]:
    """Every candidate's plain x0 gap to the reference on the fit noises, best first; each with its prepared run."""
    ranked, reference = [], None
    for scheduler, trajectory in candidates(setup):
        run = prepare(dataclasses.replace(config, scheduler=scheduler, trajectory=trajectory), setup)
        if reference is None:  # the same noises and reference solver for every candidate: one cache entry
            reference = run.reference(run.fit_noise, config.seed, run.solver, run.fit_rows)
        final = run.solver.rollout(run.fit_noise)
        # over every process's share of the fit noises: the x0 gap (clamped images), and the learned grid's loss
        gap = run.world.mean(sample_distance(final.clamp(-1, 1), reference.clamp(-1, 1)), run.config.samples)
        loss = run.world.mean(sample_distance(final, reference), run.config.samples)
        ranked.append({"scheduler": scheduler, "trajectory": trajectory, "fit_x0_gap": float(gap),
                       "grid_loss": float(loss), "grid": tuple(int(v) for v in run.solver.t), "run": run})
    return sorted(ranked, key=lambda c: c["fit_x0_gap"])


def _to_tune(ranked: list[dict], config, setup) -> list[dict]:
    """AUTO_TUNED solvers, each once: those that take a learned grid first (on one: `fitting.grid`, which starts
    from the best of the solver's named grids), then the others on their candidate's grid; each group by rank."""
    chosen, seen = [], set()
    learnable = [c for c in ranked if takes_learned_grid(c["scheduler"], setup.base_config, c["run"].solver.nfe_steps,
                                                         c["run"].solver.mu)]
    for candidate in learnable + [c for c in ranked if c not in learnable]:
        scheduler = candidate["scheduler"]
        if scheduler in seen:
            continue
        seen.add(scheduler)
        if candidate in learnable:
            run = prepare(dataclasses.replace(config, scheduler=scheduler, trajectory="learned", coefficients=False),
                          setup)
            # the ranking's rollouts of this solver's named grids: the grid search's start losses, not rolled again
            run.known_grid_losses = {c["grid"]: c["grid_loss"] for c in ranked
                                     if c["scheduler"] == scheduler and on_timesteps(c["run"].solver)}
            candidate = {**candidate, "trajectory": "learned", "run": run}
        chosen.append(candidate)
        if len(chosen) == AUTO_TUNED:
            break
    return chosen


def variants(candidate: dict, config, setup):
    """The tuned variants of one chosen candidate, in order: τ (with its grid), then the solver's learned coefficients
    with τ, starting where the first ended (its grid and τ; prepared once the first is fitted); `config.coefficients`
    True / False keeps only the second (from the plain solver) / the first, and a solver that cannot take
    coefficients has only the first."""
    first = candidate["run"]
    takes = refusal(first.solver.template) is None
    if config.coefficients is not True or not takes:
        yield {**candidate, "coefficients": False}
    if config.coefficients is False or not takes:
        return
    run = prepare(dataclasses.replace(first.config, coefficients=True), setup)
    run.known_grid_losses = first.known_grid_losses
    if first.taus is not None:  # fitted above: go on from its grid (searched, and moved where the gradient moved it)
        run.start_taus = first.taus
        if first.grid_record is not None:
            run.given_grid = (list(first.solver.grid), first.grid_record)
    yield {**candidate, "run": run, "coefficients": True}


def takes_learned_grid(scheduler: str, base_config, nfe: int, mu: float | None) -> bool:
    """Whether a solver can learn its grid on this model (a flow scheduler's shift must be invertible: no terminal
    stretch, no σ rebuilt from the grid's ends); `build` refuses every other case in one line."""
    try:
        build(scheduler, "learned", base_config, nfe, mu=mu)
    except UserError:
        return False
    return True


def plan_auto(config, setup) -> tuple[list, object]:
    """(the phases `fit_auto` will run, the first run they are timed on), before any of them — the phases of the same
    steps: the fit noises' references, the ranking's rollouts, the best plain setup's verdict steps, then each tuned
    variant's grid, fit and held-out samples — planned for the first candidate solver that takes a learned grid (the
    ranking may pick another; all spend the same evaluations per step)."""
    options = candidates(setup)
    first = prepare(dataclasses.replace(config, scheduler=options[0][0], trajectory=options[0][1]), setup)
    solver, guided = first.solver, first.solver.den.per_sample
    phases = [*(s.phase for s in fitting_steps(first) if s.result == "final"),
              Phase("ranking", f"ranking {len(options)} plain setups on the fit noises",
                    len(options) * first.fit_noise.shape[0] * solver.evaluations * guided),
              *(s.phase for s in verdict_steps(first, tuned=False) if s.listed)]
    learnable = [c for c in options if takes_learned_grid(c[0], setup.base_config, solver.nfe_steps, solver.mu)]
    scheduler = (learnable or options)[0][0]
    trajectory = "learned" if learnable else options[0][1]
    tuned = prepare(dataclasses.replace(config, scheduler=scheduler, trajectory=trajectory, coefficients=False), setup)
    for variant in variants({"run": tuned, "scheduler": scheduler, "trajectory": trajectory}, config, setup):
        run, tag = variant["run"], _tag(variant)
        if variant["coefficients"] and config.coefficients is None:
            run.given_grid = ([], {})  # the second variant takes the first one's grid
        steps = [*(s for s in fitting_steps(run) if s.result in ("grid", "fitting")),
                 *verdict_steps(run, plain=False, references=False)]
        phases += [dataclasses.replace(s.phase, name=f"{tag}: {s.phase.name}") for s in steps if s.listed]
    return phases, first


def _tag(candidate: dict) -> str:
    return f"{candidate['scheduler']}-{candidate['trajectory']}" + ("+coefficients" if candidate.get("coefficients")
                                                                    else "")


def fit_auto(config, setup, out, progress: bool = True):
    """`fit` with `--scheduler auto` (see the module's docstring); returns the `FitResult` of what was written. The
    best plain setup runs the verdict's steps untuned, each tuned variant the fitting steps and its tuned held-out
    samples (`timetuner.fitting.steps`), judged against the best plain setup's."""
    started = time.perf_counter()
    ranked = rank_candidates(config, setup)
    best_plain = ranked[0]["run"]
    on_step = bars(setup.denoiser, progress and best_plain.world.is_main)
    plain = perform(verdict_steps(best_plain, tuned=False, progress=progress), on_step)
    tuned = []
    for candidate in (v for chosen in _to_tune(ranked, config, setup) for v in variants(chosen, config, setup)):
        run = candidate["run"]
        store = run.checkpoints(None if out is None else out.with_name(f"{out.stem}.{_tag(candidate)}{out.suffix}"))
        steps = [*fitting_steps(run, store, progress and run.world.is_main),
                 *verdict_steps(run, plain=False, references=False)]
        announce(run, steps, progress)  # each tuned candidate's plan, then its steps
        done = perform(steps, on_step)
        images = done["images"]["tuned"]
        held = run.judge(plain["images"]["plain"], images, plain["reference"], plain["yardstick"])
        taus, rows = done["fitting"]
        tuned.append({**candidate, "taus": taus, "rows": rows, "held_out": held, "store": store, "images": images})
    winners = [c for c in tuned if c["held_out"]["better"]]
    chosen = _choose(winners, best_plain, plain["reference"], plain["yardstick"]) if winners else tuned[0]
    better = bool(winners)
    seconds = time.perf_counter() - started
    table, tuned_one = _tables(chosen, ranked, tuned, better, seconds, config, setup)
    if out is not None and best_plain.world.is_main:
        table.save(out)
        for candidate in tuned:
            candidate["store"].clear()
    return FitResult(table=table, tuned=tuned_one, rows=chosen["rows"], held_out=chosen["held_out"],
                     better=better, seconds=seconds, network_evaluations=setup.denoiser.evaluations,
                     fit_evaluations=setup.denoiser.evaluations, config=chosen["run"].config)


def _choose(winners: list[dict], run, reference, yardstick) -> dict:
    """Of the tuned variants that beat the best plain setup, the one each later variant must beat to replace, by the
    same rule held against each other (`judge` on their held-out images): a later variant replaces the chosen one
    only when it is better by the verdict's rule — the x0 gap significantly lower with the distribution gap not
    significantly higher, or both lower — so a point estimate within the yardstick's noise never decides."""
    chosen = winners[0]
    for candidate in winners[1:]:
        held = run.judge(chosen["images"], candidate["images"], reference, yardstick)
        candidate["against_chosen"] = {"other": _tag(chosen), **held}
        if held["better"]:
            chosen = candidate
    return chosen


def _tables(chosen, ranked, tuned, better: bool, seconds: float, config, setup):
    """(the table to write, the chosen tuned table): tuned if it beat the best plain candidate (or `force`),
    else the identity table of the best plain candidate; both record the whole selection."""
    record = {"candidates": [{k: c[k] for k in ("scheduler", "trajectory", "fit_x0_gap")} for c in ranked],
              "tuned": [{"scheduler": c["scheduler"], "trajectory": c["trajectory"],
                         "coefficients": c.get("coefficients", False), "held_out_vs_best_plain": c["held_out"],
                         **({"held_out_vs_variant": c["against_chosen"]} if "against_chosen" in c else {})}
                        for c in tuned],
              "best_plain": _tag(ranked[0]),
              "winner": f"{_tag(chosen)} (tuned)" if better else f"{_tag(ranked[0])} (plain)"}
    if config.force and not better:  # written as asked, though the best plain candidate won
        record["written"] = f"{_tag(chosen)} (tuned, --force)"
    run = chosen["run"]
    meta = table_metadata(run, chosen["rows"], chosen["held_out"], better, seconds, setup.denoiser.evaluations)
    meta.update(auto=record, compared_with=f"best plain candidate {_tag(ranked[0])}")
    tuned = tuned_table(run, meta, chosen["taus"], row_coefficients(chosen["rows"]))
    if better or config.force:
        return tuned, tuned
    plain = ranked[0]["run"]
    plain_meta = table_metadata(plain, [], chosen["held_out"], False, seconds, setup.denoiser.evaluations)
    plain_meta.update(auto=record, compared_with=f"best plain candidate {_tag(ranked[0])}",
                      identity_because_not_better=True)
    return plain.solver.identity_table(**plain_meta), tuned

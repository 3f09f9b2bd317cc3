"""A fit as named steps, in the order it runs them:

    fit noises' references → timestep grid → reference trajectories → τ (and coefficients)      `fitting_steps`
    → held-out samples → their references → the distribution gap's reference set                `verdict_steps`

then the verdict and the table (`timetuner.fitting.run.fit_one`). Each step is a phase of the plan
(`Phase`: its network evaluations, cached or not) together with the work that spends them, so
the plan a fit announces (`plan`) is the list it then runs (`perform`), and `--scheduler auto` runs the same steps
for its best plain setup and for each tuned variant (`timetuner.fitting.auto`). Progress is a callback per step
(`bars`: a bar over its network evaluations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from timetuner.core.cache import cache_key, exists
from timetuner.core.data import load_training_data
from timetuner.core.progress import counting
from timetuner.core.reference import reference_trajectory
from timetuner.fitting.grid import learn_grid, planned
from timetuner.fitting.joint import row_coefficients
from timetuner.fitting.method import OBJECTIVES, FitInputs
from timetuner.measuring.evaluation import held_out_finals
from timetuner.measuring.heldout import rows_part
from timetuner.measuring.yardstick import FidOptions

BACKWARD_FACTOR = 3  # forward + backward ≈ 3 forwards


@dataclass(frozen=True)
class Phase:
    """A step's part of the plan: a name, its network evaluations, and whether they are differentiated or cached."""

    key: str  # "references", "grid", "fitting", "held-out", "held-out references", "held-out reference set"
    name: str
    evaluations: int
    gradient: bool = False
    cached: bool = False

    @property
    def cost(self) -> int:
        """Forward-pass equivalents this phase will spend (0 when cached)."""
        return 0 if self.cached else self.evaluations * (BACKWARD_FACTOR if self.gradient else 1)

    @property
    def batch(self) -> str:
        """Whose batches the phase runs: the fit noises' or the held-out noises' (a larger batch, cheaper per
        sample)."""
        return "held-out" if self.key.startswith("held-out") else "fit"


@dataclass(frozen=True)
class Step:
    """One step of a fit: its phase of the plan and its work, (results of the earlier steps) → its result."""

    phase: Phase
    result: str  # the name its result is kept under, for the later steps
    work: Callable[[dict], object]
    listed: bool = True  # in the plan (False: nothing to spend, e.g. a grid handed over, no yardstick)
    counted: bool = True  # a bar over its evaluations (the fitting step shows its own, over τ or iterations)


def fitting_steps(run, store=None, show: bool = False) -> list[Step]:
    """The steps that fit `run`'s τ (a prepared `timetuner.fitting.run.Run`), checkpointed in `store`; the last one's
    result, "fitting", is (τ, rows). A learned grid replaces the run's solvers when its step runs."""
    config, solver = run.config, run.solver
    guided = solver.den.per_sample
    n, steps, objective = run.fit_noise.shape[0], config.reference_steps, OBJECTIVES[config.objective]
    learned = config.trajectory == "learned"
    chosen = []
    if config.strategy == "parallel" and config.data is None or "reference_final" in objective.needs or learned:
        cached = exists(run.reference_key(n, config.seed, solver, run.fit_rows))
        chosen.append(Step(Phase("references", "reference samples of the fit noises", n * steps * guided,
                                 cached=cached), "final",
                           lambda done: run.reference(run.fit_noise, config.seed, run.solver, run.fit_rows)))
    if learned:
        given = run.given_grid is not None  # auto's second variant takes the grid the first one searched
        chosen.append(Step(Phase("grid", "learning the timestep grid (at most)",
                                 0 if given else planned(solver, n, run.known_grid_losses) * guided), "grid",
                           lambda done: take_grid(run, store, done.get("final")), listed=not given))
    if "reference_states" in objective.needs:
        chosen.append(Step(Phase("references", "reference trajectories of the fit noises",
                                 n * (steps + solver.evaluations) * guided), "states",
                           lambda done: reference_states(run)))
    evaluations, gradient = objective.planned(solver, config, n)
    if config.strategy == "parallel":  # the processes take turns over the evaluations
        evaluations = -(-evaluations // run.world.size)
    chosen.append(Step(Phase("fitting", f"fitting ({config.strategy}, {config.objective}, {config.optimizer})",
                             evaluations * guided, gradient), "fitting",
                       lambda done: fit_tau(run, store, done, show), counted=False))
    return chosen


def verdict_steps(run, plain: bool = True, tuned: bool = True, references: bool = True,
                  progress: bool = False) -> list[Step]:
    """The steps of `run`'s held-out verdict: its `plain` and `tuned` held-out images (tuned: with the τ and
    coefficients of the "fitting" result), and with `references` the reference solver's images of the x0 gap's
    noises and the yardstick (its reference set grown where short)."""
    config, solver = run.config, run.solver
    guided, steps = solver.den.per_sample, config.reference_steps
    lo, hi = run.world.shard(run.eval_noise.shape[0])
    which = " and ".join(name for name, wanted in (("plain", plain), ("tuned", tuned)) if wanted)
    chosen = [Step(Phase("held-out", f"held-out samples, {which}", (plain + tuned) * (hi - lo) * solver.evaluations
                         * guided), "images", lambda done: held_out_images(run, done.get("fitting"), plain, tuned))]
    if not references:
        return chosen
    g_lo, g_hi, rows = run.held_out_share()
    key = run.reference_key(g_hi - g_lo, run.eval_seed, run.held_out_view(g_lo, g_hi), rows)
    chosen.append(Step(Phase("held-out references", "reference samples of the held-out noises",
                             (g_hi - g_lo) * steps * guided, cached=exists(key)), "reference",
                       lambda done: run.held_out_reference()))
    missing = run.held_out.reference_set_to_compute(FidOptions(features=config.features))
    name = f"the distribution gap's reference set ({config.reference_n:,} samples, {missing or 0:,} to compute)"
    chosen.append(Step(Phase("held-out reference set", name, -(-(missing or 0) // run.world.size) * steps * guided,
                             cached=missing == 0), "yardstick", lambda done: run.yardstick(progress),
                       listed=missing is not None, counted=False))  # the yardstick shows its own bar
    return chosen


def plan(run) -> list[Phase]:
    """The phases of `run`'s fit and verdict, in the order `fit_one` runs them: its steps' phases."""
    return [step.phase for step in [*fitting_steps(run), *verdict_steps(run)] if step.listed]


def bars(denoiser, show: bool):
    """The default progress callback of `perform`: a bar over each counted step's network evaluations."""

    def on_step(step: Step):
        phase = step.phase
        if not (show and step.counted and phase.evaluations) or phase.cached:
            return contextlib.nullcontext()
        return counting(denoiser, phase.evaluations, phase.name, show)

    return on_step


def perform(steps: list[Step], on_step=None, done: dict | None = None) -> dict:
    """Run `steps` in order, each inside `on_step(step)` (a context manager: progress), each given the results of
    those before it; {result name: result}."""
    done = {} if done is None else done
    for step in steps:
        with on_step(step) if on_step is not None else contextlib.nullcontext():
            done[step.result] = step.work(done)
    return done


# -- the work of the steps -----------------------------------------------------------------------------------------
def take_grid(run, store, final: torch.Tensor | None) -> list:
    """Fit the solver's grid (`fitting.grid`) against the fit noises' reference samples `final` and put the run's
    solvers on it; a checkpoint's grid, or one handed over (`run.given_grid`), is taken as it is, and every later
    checkpoint of this fit carries it."""
    saved = store.load() if store is not None else {}
    grid, run.grid_record = saved.get("grid"), saved.get("grid_record")
    if grid is None and run.given_grid is not None:
        grid, run.grid_record = run.given_grid[0], dict(run.given_grid[1])
        run.grid_record.pop("gradient", None)  # the other fit's gradient step; this fit takes its own
    if grid is None:
        inputs = FitInputs(run.fit_noise, reference_final=final, world=run.world, total=run.config.samples)
        grid, run.grid_record = learn_grid(run.solver, inputs, run.known_grid_losses)
    if store is not None:
        store.carry(grid=grid, grid_record=run.grid_record)
    run.solver, run.eval_solver = run.solver.with_grid(grid), run.eval_solver.with_grid(grid)
    return grid


def reference_states(run) -> list[torch.Tensor]:
    """The reference trajectories of the fit noises through the solver's state times (the teacher objective's)."""
    config = run.config
    key = cache_key("trajectory", run.model.weights, run.solver.identity_table().metadata, config.reference_steps,
                    config.seed, config.samples, *run.solver.den.cache_parts(), *rows_part(run.fit_rows))
    return reference_trajectory(run.solver, run.fit_noise, config.reference_steps, key=key)


def parallel_x0(run, final: torch.Tensor | None) -> torch.Tensor:
    """Eq. (11)'s x0: data when given, else the model's own high-NFE samples `final`."""
    config, den = run.config, run.model.denoiser
    if config.data is None:
        return final.clamp(-1, 1) if run.model.vae is None else final  # images live in [-1, 1]; latents do not
    shape = den.sample_shape
    data = load_training_data(config.data, shape[1], shape[0])
    idx = torch.randint(0, len(data), (config.samples,), generator=torch.Generator().manual_seed(config.seed + 1))
    return data[idx].to(den.device)


def fit_tau(run, store, done: dict, show: bool) -> tuple[list[float], list[dict]]:
    """The objective's fit of τ (`timetuner.fitting.method`) against the earlier steps' references, resuming from
    `store`; (τ, rows). Where the e2e fit moved a learned grid, the run's solvers follow it."""
    config, objective = run.config, OBJECTIVES[run.config.objective]
    final = done.get("final") if "reference_final" in objective.needs else None
    x0 = parallel_x0(run, done.get("final")) if config.strategy == "parallel" else None
    inputs = FitInputs(run.fit_noise, x0=x0, reference_states=done.get("states"), reference_final=final,
                       world=run.world, total=config.samples)
    report = Progress(run, store, show)
    resume = store.load()  # a checkpoint may carry the learned grid alone: the e2e fit then starts afresh
    if "params" not in resume and run.start_taus is not None:
        resume = {**resume, "start_taus": run.start_taus}
    taus, rows = objective.fit(run.solver, config, inputs, resume, report)
    report.close()
    if config.grid_gradient and run.grid_record is not None:  # the e2e fit may have moved the grid
        grid = [int(row["t"]) for row in rows]
        run.grid_record = {**run.grid_record, "gradient": {
            "searched": [int(v) for v in run.solver.grid], "grid": grid, "loss_before": rows[0]["loss_before"],
            "loss_after": rows[0]["loss_after"], "lr": config.e2e_grid_lr}}
        run.solver, run.eval_solver = run.solver.with_grid(grid), run.eval_solver.with_grid(grid)
    run.taus = taus
    return taus, rows


def held_out_images(run, fitted: tuple | None, plain: bool, tuned: bool) -> dict[str, torch.Tensor]:
    """{"plain", "tuned"}: the final images of the held-out noises, run as `timetuner eval` runs them (each process
    its share); tuned with the τ and learned coefficients of `fitted` = (τ, rows)."""
    taus = coefficients = None
    if tuned:
        taus, coefficients = torch.tensor(fitted[0], dtype=torch.float32), row_coefficients(fitted[1])
    lo, hi = run.world.shard(run.eval_noise.shape[0])
    views = lambda a, b: run.held_out_view(lo + a, lo + b)  # noqa: E731
    g = min(max(run.gap_n - lo, 0), hi - lo)
    images = {}
    for name, wanted, t, c in (("plain", plain, None, None), ("tuned", tuned, taus, coefficients)):
        if wanted:
            final = held_out_finals(views, run.eval_noise[lo:hi], t, g, plain=False, coefficients=c)[0]
            images[name] = run.world.gather(run.model.images(final))
    return images


class Progress:
    """`report(k, row, **state)` for the method: a progress bar, and a checkpoint whenever state comes with it."""

    def __init__(self, run, store, show: bool):
        from tqdm.auto import tqdm

        config = run.config
        scale = "" if run.model.kind is None else f" cfg={config.guidance_scale:g}"
        objective = OBJECTIVES[config.objective]
        total = objective.iterations(config) if objective.joint else run.solver.evaluations
        self.store = store
        self.bar = tqdm(total=total, desc=f"fit {config.scheduler} nfe={config.nfe}{scale}", disable=not show,
                        dynamic_ncols=True)

    def __call__(self, k: int, row: dict, **state) -> None:
        self.bar.update(1)
        if "tau" in row:
            self.bar.set_postfix(t=f"{row['t']:.1f}", tau=f"{row['tau']:.2f}", refresh=False)
        else:
            self.bar.set_postfix(loss=f"{row['loss']:.5f}", refresh=False)
        if state:
            self.store.save(**state)

    def close(self) -> None:
        self.bar.close()

"""A fit run: load the model, prepare states and references, fit τ (`fitting.method`), judge on held-out seeds,
write the table.

    from timetuner import fit
    result = fit(nfe=10)                       # embedded digits model, DDIM, e2e objective
    result.table.save("ddim-10.safetensors")

The method itself is `timetuner.fitting.method`; this module is everything around it: one model setup
(`timetuner.core.loading`), conditioning defaults, the reference samples it fits and judges against (cached), a
checkpoint after every τ (or e2e iteration) beside the output, a progress bar, the held-out verdict through
`timetuner.measuring`, and the table's metadata. Fit and held-out seeds never overlap; every table records its
held-out x0 gap (and FD where a feature extractor exists) before and after, and the identity table (τ = t) is
written when tuning did not help, unless `force`.

Conditional and latent models (Stable Diffusion, DiT): fitting runs in latent space on the guided model output
at one guidance scale (`guidance_scale`, recorded in the table); sample i of the fit uses prompt (or class
label) i mod P, sample i of the held-out verdict eval prompt i mod P' from a disjoint set (DiT: the same labels
by default, on held-out noises). The VAE only decodes the held-out samples, so the verdict's x0 gap is measured
on images. Prompts are embedded once, with the pipeline's own `encode_prompt`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from timetuner.core.denoiser import refuse_integer_timesteps
from timetuner.core.distributed import SOLO, World, current
from timetuner.core.loading import release_text_encoders
from timetuner.core.prompts import conditioning_for
from timetuner.core.solver import Solver, pipeline_grid
from timetuner.errors import UserError
from timetuner.files import write_atomic
from timetuner.fitting.config import EVAL_SEED_OFFSET, FitConfig, FitResult, for_model, resolve_conditioning
from timetuner.fitting.cost import plan_lines
from timetuner.fitting.joint import row_coefficients
from timetuner.fitting.steps import bars, fitting_steps, perform, verdict_steps
from timetuner.measuring.heldout import HeldOut
from timetuner.measuring.verdict import is_better, judge
from timetuner.measuring.yardstick import FidOptions


# -- checkpoints ---------------------------------------------------------------------------------------------------
class Checkpoints:
    """The fit's state after every τ (or e2e iteration), JSON beside the output; only a fit of the same
    configuration on the same model resumes from it."""

    def __init__(self, out: Path | None, key: dict, world: World = SOLO):
        self.path = None if out is None else out.with_name(out.name + ".partial.json")
        self.key = json.loads(json.dumps(key))  # JSON-normalised (tuples → lists), as it is read back
        self.world = world  # only the main process writes; every process resumes from what it read
        self.carried: dict = {}  # written with every checkpoint (a learned grid)

    def load(self) -> dict:
        return self.world.broadcast(self._read() if self.world.is_main else None)

    def _read(self) -> dict:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):  # not ours, or damaged: start afresh rather than fail (it is rewritten)
            return {}
        return saved if isinstance(saved, dict) and saved.get("key") == self.key else {}

    def save(self, **state) -> None:
        if self.path is None or not self.world.is_main:
            return

        text = json.dumps({"key": self.key, **self.carried, **state})
        write_atomic(self.path, lambda tmp: Path(tmp).write_text(text))

    def carry(self, **state) -> None:
        """Write `state` now and with every later checkpoint."""
        self.carried.update(state)
        self.save()

    def clear(self) -> None:
        if self.path is not None and self.world.is_main:
            self.path.unlink(missing_ok=True)


# -- the run -------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """A prepared fit: the model, the solver on the fit and held-out conditioning, the noises, and the held-out
    protocol (`measuring.heldout.HeldOut`: seed, conditioning, references, yardstick) its verdict is measured by."""

    config: FitConfig
    model: object  # timetuner.core.loading.ModelSetup
    solver: object  # timetuner.core.solver.Solver on the fit conditioning
    eval_solver: object  # the same solver on the held-out conditioning
    fit_noise: torch.Tensor
    eval_noise: torch.Tensor
    conditioning: tuple  # (fit, held-out) per-sample conditioning, or (None, None)
    held_out: HeldOut
    world: World = SOLO  # the processes this fit is split over (`timetuner.core.distributed`)
    fit_rows: tuple[int, int] | None = None  # which of the fit noises are this process's (None: all of them)
    grid_record: dict | None = None  # a learned grid's start and losses (`timetuner.fitting.grid.learn_grid`)
    known_grid_losses: dict | None = None  # {grid: its loss} measured already on these fit noises (auto's ranking)
    given_grid: tuple[list, dict] | None = None  # (grid, its record) searched already on these fit noises (auto)
    start_taus: list[float] | None = None  # e2e: start from these τ (an earlier fit's on the same grid; auto)
    taus: list[float] | None = None  # what `fit` fitted, once it has

    def reference(self, noise: torch.Tensor, seed: int, solver, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Final samples of the reference solver from `noise` (cached by model, schedule, seeds and conditioning;
        `rows`: which rows of the seed's noises `noise` is, when it is one process's share)."""
        return self.held_out.reference(solver.den, noise, seed, rows)

    def reference_key(self, n: int, seed: int, solver, rows: tuple[int, int] | None = None) -> str:
        """The cache key `reference` uses for n noises of `seed` (to tell, before any work, whether it is cached)."""
        return self.held_out.reference_key(solver.den, n, seed, rows)

    def held_out_share(self) -> tuple[int, int, tuple[int, int] | None]:
        """This process's rows lo…hi−1 of the x0 gap's held-out noises, and `rows` for their cache key."""
        lo, hi = self.world.shard(self.gap_n)
        return lo, hi, None if self.world.size == 1 else (lo, hi)

    def yardstick(self, progress: bool = True):
        """The model's yardstick for the verdict (`HeldOut.yardstick`), None without features."""

        return self.held_out.yardstick(FidOptions(features=self.config.features), progress=progress)

    def checkpoints(self, out: Path | None) -> Checkpoints:
        """The checkpoint beside `out` that only this fit (config, model, conditioning) resumes from."""
        return Checkpoints(out, {"config": dataclasses.asdict(self.config), "model_hash": self.model.weights,
                                 "conditioning": self.solver.den.cache_parts()}, self.world)

    def held_out_view(self, lo: int, hi: int):
        """The solver of held-out samples lo…hi−1, on their conditioning."""
        return self.held_out.view(self.eval_solver, self.conditioning[1], lo, hi)

    @property
    def eval_seed(self) -> int:
        """The held-out noises' seed (the fit's seed + EVAL_SEED_OFFSET)."""
        return self.held_out.seed

    @property
    def gap_n(self) -> int:
        return min(self.config.eval_gap_samples, self.config.eval_samples)

    def held_out_reference(self) -> torch.Tensor:
        """The reference solver's images from the first gap_n held-out noises (the x0 gap's targets)."""
        lo, hi, rows = self.held_out_share()
        final = self.reference(self.eval_noise[lo:hi], self.eval_seed, self.held_out_view(lo, hi), rows)
        return self.world.gather(self.model.images(final))

    def verdict(self, steps: list, done: dict, on_step=None) -> dict:
        """Run the verdict's `steps` (`timetuner.fitting.steps.verdict_steps`: held-out samples, their references,
        the yardstick) after the fitting steps' results `done`, and judge plain against tuned."""
        perform(steps, on_step, done)
        return self.judge(done["images"]["plain"], done["images"]["tuned"], done["reference"], done["yardstick"])

    def judge(self, plain: torch.Tensor, tuned: torch.Tensor, reference: torch.Tensor, yardstick) -> dict:
        """Plain against tuned held-out images, judged as `timetuner eval` judges them (`verdict.judge`), the same
        record on every process."""
        label = self.held_out.reference_label
        return self.world.broadcast(judge(yardstick, plain, tuned, reference, label) if self.world.is_main else None)


def prepare(config: FitConfig, model) -> Run:
    """Resolve the conditioning, bind it, build the solver and draw the fit and held-out noises."""
    den, kind = model.denoiser, model.kind
    config = resolve_conditioning(config, kind, repr(model.name), model.network)
    config = for_model(config, latent=model.vae is not None)
    if model.vae is not None:
        if config.features == "digits":
            raise UserError("--features digits needs a pixel-space digits model, and this model samples latents; "
                            "accepted: --features none or auto")
        if config.data is not None:
            raise UserError("--data gives images, and this model samples latents; accepted: no --data (the "
                            "parallel strategy then uses the model's own high-NFE samples)")
    fit_rows, eval_rows = ((config.prompts, config.eval_prompts) if kind == "text"
                           else (config.class_labels, config.eval_class_labels))
    world = current()  # several processes: sequential and e2e fits split the fit noises, parallel ones the evaluations
    held_out = HeldOut(model, config.seed + EVAL_SEED_OFFSET, eval_rows, config.negative_prompt, config.reference,
                       config.reference_steps, config.reference_n, world)
    conditioning = (conditioning_for(kind, model.pipeline, model.network, fit_rows, config.samples,
                                     config.negative_prompt), held_out.conditioning(config.eval_samples))
    if model.release_encoders:  # the prompts are embedded (and remembered): the network gets the GPU's memory
        release_text_encoders(model.pipeline)
    den.guidance_scale = config.guidance_scale
    if model.vae is not None:
        # Latent models are large: e2e / adam differentiate through every network call, so recompute activations
        # in the backward pass and bound one call's batch (2 × 16 rows with guidance).
        den.checkpoint, den.batch_size = True, 16
    if world.size > min(config.samples, config.eval_samples):
        raise UserError(f"{world.size} processes need at least as many --samples and --eval-samples (given "
                        f"{config.samples} and {config.eval_samples}); accepted: fewer processes or more samples")
    lo, hi = (0, config.samples) if config.strategy == "parallel" else world.shard(config.samples)
    fit_cond = None if conditioning[0] is None else conditioning[0].slice(lo, hi)
    fit_den, eval_den = den.bind(fit_cond), den.bind(conditioning[1])
    solver = Solver.named(fit_den, model.base_config, config.scheduler, config.trajectory, config.nfe)
    refuse_integer_timesteps(fit_den, solver.num_train_timesteps)
    fit_noise = torch.randn((config.samples, *den.sample_shape), generator=torch.Generator().manual_seed(config.seed))
    return Run(config, model, solver, solver.on(eval_den), fit_noise[lo:hi].to(den.device),
               held_out.noise(config.eval_samples), conditioning, held_out, world,
               None if (lo, hi) == (0, config.samples) else (lo, hi))


def fit_one(config: FitConfig, setup, out: Path | None, progress: bool = True) -> FitResult:
    """Fit one solver's τ (`config.scheduler`) for a loaded model, judge it on held-out noises, write `out`: the
    steps of `timetuner.fitting.steps`, announced as the plan, then run in that order."""
    run = prepare(config, setup)
    config, den, show = run.config, setup.denoiser, progress and run.world.is_main
    started = time.perf_counter()
    store = run.checkpoints(out)
    fitting, verdict = fitting_steps(run, store, show), verdict_steps(run, progress=progress)
    announce(run, [*fitting, *verdict], progress)
    done = perform(fitting, bars(den, show))
    fit_evaluations = den.evaluations  # what fitting cost, before the held-out verdict
    held = run.verdict(verdict, done, bars(den, show))
    taus, rows = done["fitting"]
    better = is_better(held)
    seconds = time.perf_counter() - started
    meta = table_metadata(run, rows, held, better, seconds, fit_evaluations)
    coefficients = row_coefficients(rows)
    tuned = tuned_table(run, meta, taus, coefficients)
    written = tuned if (better or config.force) else run.solver.identity_table(**meta,
                                                                                identity_because_not_better=True)
    if out is not None and run.world.is_main:
        written.save(out)
        store.clear()
    return FitResult(table=written, tuned=tuned, rows=rows, held_out=held, better=better, seconds=seconds,
                     network_evaluations=den.evaluations, fit_evaluations=fit_evaluations, config=config)


def tuned_table(run: Run, meta: dict, taus: list[float], coefficients=None):
    """The table of a fit's τ (and learned coefficients) on its run's solver, carrying `meta`."""
    table = run.solver.identity_table(**meta).with_tau(torch.tensor(taus, dtype=torch.float64))
    return table if coefficients is None else table.with_coefficients(*coefficients)


def announce(run: Run, steps: list, progress: bool) -> None:
    """Print the plan of `steps` (`timetuner.fitting.steps`) and its estimated time (`timetuner.fitting.cost`) before
    any of them runs (nothing when quiet)."""
    import sys

    if not progress:
        return
    lines = plan_lines(run, [step.phase for step in steps if step.listed])  # every process times its batch
    if run.world.is_main:
        print("\n".join(lines), file=sys.stderr, flush=True)


def table_metadata(run: Run, rows: list, held: dict, better: bool, seconds: float, fit_evaluations: int) -> dict:
    """What the table records: the model, the solver, how it was fitted, the held-out evidence, the versions."""
    import diffusers

    import timetuner

    config, model = run.config, run.model
    meta = {
        "model": model.name, "model_hash": model.weights, "model_fingerprint": model.fingerprint,
        "trajectory": run.solver.trajectory,
        "scheduler_name": config.scheduler, "strategy": config.strategy, "objective": config.objective,
        "optimizer": config.optimizer, "samples": config.samples, "fit_seed": config.seed,
        "eval_seed": run.eval_seed, "eval_samples": config.eval_samples,
        "reference": f"{config.reference}-{config.reference_steps}", "fit_config": dataclasses.asdict(config),
        "rows": rows, "held_out": held,
        "held_out_space": "images decoded by the VAE" if model.vae is not None else "samples",
        "latent": model.vae is not None, "better_on_held_out": better, "fit_seconds": round(seconds, 2),
        "network_evaluations": {"fit": fit_evaluations, "total": model.denoiser.evaluations},
        "versions": {"timetuner": timetuner.__version__, "torch": torch.__version__,
                     "diffusers": diffusers.__version__},
    }
    if run.grid_record is not None:
        meta["learned_grid"] = run.grid_record
        replaced = pipeline_grid(model.denoiser.family, run.solver.template, run.solver.nfe_steps)
        if replaced is not None:  # the σ the pipeline passes on every call (Flux), which the learned grid replaces
            meta["pipeline_sigmas"] = replaced
    if model.kind is not None:
        fit_cond, eval_cond = run.conditioning
        meta["guidance_scale"] = config.guidance_scale
        meta["conditioning"] = {"kind": model.kind, "per_sample": "sample i uses row i mod P of its set",
                                "fit": fit_cond.fingerprint(), "eval": eval_cond.fingerprint()}
    return meta

"""Plain against tuned from the same held-out noises: what `timetuner eval` prints and `timetuner report` lays out.

Truncation gap per state and at x0 against a fine DDIM reference trajectory (cached), FD and KID through
clean-fid against a reference set, FD against NFE — every before/after figure with a paired bootstrap
interval over the noises. The noises come from the table's held-out seed, never the fit's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from timetuner.assets import EVAL_PROMPTS
from timetuner.core.cache import cache_key
from timetuner.core.families import network_of
from timetuner.core.loading import load_model, load_pipeline, size_state
from timetuner.core.progress import counting
from timetuner.core.prompts import check_applies, check_disjoint, read_prompts
from timetuner.core.reference import reference_trajectory
from timetuner.core.solver import Solver
from timetuner.errors import UserError
from timetuner.measuring.heldout import HeldOut
from timetuner.measuring.metrics import truncation_gap
from timetuner.measuring.plots import curve_rows, save_gap_plot, save_nfe_plot, save_side_by_side, save_tau_shift_plot
from timetuner.measuring.verdict import judge
from timetuner.measuring.yardstick import (
    DEFAULT_GAP_N,
    DEFAULT_N,
    DEFAULT_REFERENCE_N,
    EVAL_SEED_OFFSET,
    FidOptions,
    Yardstick,
)
from timetuner.scheduler import check_model
from timetuner.table import TauTable


@dataclass
class Evaluation:
    """The JSON-able record, and the final samples (plain, tuned) for grids."""

    record: dict
    plain_final: torch.Tensor
    tuned_final: torch.Tensor


class Setup:
    """A table with the model and the solver it was fitted for, checked against each other, and the held-out
    protocol its fit was judged by (`held_out`, a `measuring.heldout.HeldOut` built from the table's metadata).

    Conditional models are evaluated as they were fitted: guided at the table's scale, sample i conditioned on
    prompt (or class label) i mod P of a held-out set — by default the table's own held-out set, and never one
    that shares a prompt with the fit. Latent models sample latents (the gaps are measured there) and the VAE
    decodes the final samples for FD, KID and the sample grids.
    """

    def __init__(self, table: str, model: str | None, prompts: str | None = None,
                 class_labels: list[int] | None = None, negative_prompt: str | None = None):
        self.path = table
        self.table = TauTable.load(table)
        pipe = load_pipeline(model)
        network = network_of(pipe)
        if network is not None:
            check_model(self.table, network)  # before moving a foreign model to the GPU
        self.model = load_model(model, pipeline=pipe, device="cuda" if torch.cuda.is_available() else None)
        self.den, self.vae, self.kind = self.model.denoiser, self.model.vae, self.model.kind
        self.fitted = self.table.metadata.get("fit_config", {})
        # the image (and video) size the table was fitted at (Flux: its mu)
        size_state(self.model, self.fitted.get("resolution"), self.fitted.get("frames"))
        rows, negative = self._held_out_rows(prompts, class_labels, negative_prompt)
        self.held_out = HeldOut(self.model, self.table.metadata.get("eval_seed", EVAL_SEED_OFFSET), rows, negative,
                                self.fitted.get("reference", "dpm++"),  # the fit's reference solver: same figures
                                int(self.fitted.get("reference_steps", 100)),
                                int(self.fitted.get("reference_n", DEFAULT_REFERENCE_N)))
        self.base_config = self.model.base_config
        self.sampler = Solver.for_table(self.den, self.base_config, self.table)
        self.scheduler_name, self.trajectory = self.sampler.name, self.sampler.trajectory
        self.weights = self.model.weights
        self.is_digits = self.model.is_digits

    def _held_out_rows(self, prompts, class_labels, negative_prompt) -> tuple[tuple, str]:
        """(the held-out prompts or class labels, the negative prompt) — () for an unconditional model; sets the
        guidance scale."""

        meta, fitted = self.table.metadata, self.fitted
        check_applies(self.kind, "this model", {"--prompts": prompts, "--class-labels": class_labels,
                                                "--negative-prompt": negative_prompt})
        if self.kind is None:
            self.conditioning_label = None
            return (), ""
        if meta.get("guidance_scale") is None:
            raise UserError(f"table {self.path!r} records no guidance scale, so it was not fitted for this "
                            "conditional model; accepted: a table from `timetuner fit` on this model")
        self.den.guidance_scale = float(meta["guidance_scale"])
        scale = f"guidance {self.den.guidance_scale:g}"
        if self.kind == "text":
            if prompts is not None:
                chosen = read_prompts(prompts, "--prompts")
            else:
                chosen = list(fitted.get("eval_prompts") or read_prompts(None, "--prompts", EVAL_PROMPTS))
            check_disjoint(list(fitted.get("prompts") or []), chosen, "--prompts", "the prompts the table was "
                           "fitted on")
            negative = fitted.get("negative_prompt", "") if negative_prompt is None else negative_prompt
            self.conditioning_label = f"{len(chosen)} held-out prompts, {scale}"
            return tuple(chosen), negative
        labels = list(class_labels if class_labels is not None else fitted.get("eval_class_labels") or [])
        if not labels:
            raise UserError("--class-labels is empty and the table records none; accepted: class labels separated "
                            "by commas, e.g. 207,360,387")
        self.conditioning_label = f"class labels {','.join(map(str, labels))}, {scale}"
        return tuple(labels), ""

    @property
    def reference(self) -> str:
        """The fit's reference solver ("dpm++" or "ddim"): the same figures as the fit's verdict."""
        return self.held_out.reference_solver

    @property
    def reference_steps(self) -> int:
        return self.held_out.reference_steps

    @property
    def reference_label(self) -> str:
        return self.held_out.reference_label

    def conditioning(self, n: int):
        """The per-sample conditioning of n held-out samples (sample i: prompt or label i mod P), or None."""
        return self.held_out.conditioning(n)

    def yardstick(self, options: FidOptions | None = None, reference_n: int | None = None, data: bool = True,
                  progress: bool = True, data_n: int | None = None) -> Yardstick | None:
        """This model's yardstick (`HeldOut.yardstick`) against the table's reference solver."""
        return self.held_out.yardstick(options, reference_n, data, progress, data_n)

    @property
    def default_n(self) -> int:
        """The fit's held-out sample count (what `eval` and `report` measure by default)."""
        return int(self.fitted.get("eval_samples", DEFAULT_N))

    @property
    def default_gap_n(self) -> int:
        return int(self.fitted.get("eval_gap_samples", DEFAULT_GAP_N))

    def view(self, solver, conditioning, lo: int, hi: int):
        """`solver` running samples lo…hi−1 of a batch conditioned by `conditioning` (itself if unconditional)."""
        return self.held_out.view(solver, conditioning, lo, hi)

    def key_parts(self, conditioning) -> list:
        """Extra cache-key parts: what the samples are conditioned on, and how strongly."""
        return self.den.bind(conditioning).cache_parts()

    def images(self, samples: torch.Tensor) -> torch.Tensor:
        """Final samples as images in about [-1, 1]: decoded by the VAE for latent models."""
        return self.model.images(samples)

    @property
    def space(self) -> str:
        return "latent space" if self.vae is not None else "VP space"

    def noise(self, n: int, seed: int | None) -> tuple[torch.Tensor, int]:
        """n held-out noises: the table's evaluation seed unless one is given."""
        meta = self.table.metadata
        if seed is not None and seed == meta.get("fit_seed"):
            raise UserError(f"--seed {seed} is the seed the table was fitted on; accepted: any other seed (default: "
                            f"the table's held-out seed {meta.get('eval_seed')})")
        seed = self.held_out.seed if seed is None else seed
        return self.held_out.noise(n, seed), seed


def check_siblings(table, others: list, paths: list[str], first: str) -> None:
    """Refuse tables that cannot join `table`'s FD-against-steps plot: another solver, grid or guidance scale."""
    mine = table.metadata
    for path, other in zip(paths, others, strict=True):
        theirs = other.metadata
        if (theirs.get("scheduler_name"), theirs.get("trajectory")) != (mine.get("scheduler_name"),
                                                                        mine.get("trajectory")):
            raise UserError(f"table {path!r} is for {theirs.get('scheduler_name')}/{theirs.get('trajectory')}; "
                            f"accepted: tables of {mine.get('scheduler_name')}/{mine.get('trajectory')} like "
                            f"{first!r}")
        if theirs.get("guidance_scale") != mine.get("guidance_scale"):
            raise UserError(f"table {path!r} is for guidance scale {theirs.get('guidance_scale')}; accepted: tables "
                            f"of guidance scale {mine.get('guidance_scale')} like {first!r}")


def _check(n: int, gap_n: int, reference_steps: int, bootstrap: int) -> None:
    if n < 2 or gap_n < 2 or reference_steps < 1 or bootstrap < 1:
        raise UserError(f"--n {n} / --gap-n {gap_n} / --reference-steps {reference_steps} / --bootstrap {bootstrap}:"
                        " accepted: --n >= 2, --gap-n >= 2, --reference-steps >= 1, --bootstrap >= 1")


@torch.no_grad()
def held_out_finals(view, noise: torch.Tensor, taus, g: int, plain: bool = True,
                    coefficients=None) -> list[torch.Tensor]:
    """[plain, tuned] final samples of the held-out noises ([tuned] without `plain`), run as fit's verdict, `eval`
    and the benches all run them: the first g (those with a reference sample) as one batch, the rest as another;
    `view(lo, hi)` is the solver for samples lo…hi−1 (their conditioning); tuned: τ = `taus` and the learned
    `coefficients` (None: none)."""
    n = noise.shape[0]
    finals = []
    for tt, cc in (((None, None), (taus, coefficients)) if plain else ((taus, coefficients),)):
        parts = ([view(0, g).rollout(noise[:g], tt, coefficients=cc)] if g else []) + (
            [view(g, n).rollout(noise[g:], tt, coefficients=cc)] if n > g else [])
        finals.append(torch.cat(parts))
    return finals


@torch.no_grad()
def held_out_figures(setup: Setup, yardstick: Yardstick | None, n: int | None = None, gap_n: int | None = None,
                     seed: int | None = None, bootstrap: int = 1000, taus=None) -> tuple[dict, list[torch.Tensor]]:
    """The `judge` record of plain against the table's τ (or `taus`) on n held-out noises of `seed` (default: the
    table's held-out seed), and the final images [plain, tuned]; what fit's verdict printed, for the same table."""
    n = setup.default_n if n is None else n
    noise, seed = setup.noise(n, seed)
    return _figures(setup, yardstick, noise, seed, setup.conditioning(n),
                    min(n, setup.default_gap_n if gap_n is None else gap_n), bootstrap, taus)


def _figures(setup: Setup, yardstick, noise, seed: int, cond, g: int, bootstrap: int, taus=None):
    # the table as it runs (τ and its learned coefficients), or τ of the caller's own on the table's solver
    taus, coefficients = (setup.table.tau.float(), setup.table.coefficients) if taus is None else (taus, None)
    finals = held_out_finals(lambda lo, hi: setup.view(setup.sampler, cond, lo, hi), noise, taus, g,
                             coefficients=coefficients)
    head = setup.view(setup.sampler, cond, 0, g)
    ref_final = setup.held_out.reference(head.den, noise[:g], seed)
    images = [setup.images(f) for f in finals]
    record = judge(yardstick, images[0], images[1], setup.images(ref_final), setup.reference_label, bootstrap)
    return {"seed": seed, **record}, images


@torch.no_grad()
def evaluate(setup: Setup, n: int | None = None, gap_n: int | None = None, reference_steps: int = 1000,
             seed: int | None = None, bootstrap: int = 1000, yardstick: Yardstick | None = None,
             progress: bool = False) -> Evaluation:
    """Plain against tuned on held-out noises: the yardstick's figures (`held_out_figures`: x0 gap on the first
    gap_n, distribution gap and data FD on all n; n and gap_n default to the fit's), and the truncation gap per
    state to a `reference_steps` DDIM trajectory on the first gap_n noises (a diagnostic: where along the way the
    tuned sampler is closer). `progress`: a bar over the network evaluations (at most those planned here)."""
    n = setup.default_n if n is None else n
    gap_n = setup.default_gap_n if gap_n is None else gap_n
    _check(n, gap_n, reference_steps, bootstrap)
    g, k = min(n, gap_n), setup.sampler.evaluations
    planned = 2 * k * n + setup.reference_steps * g + (reference_steps + k) * g + 2 * k * g
    noise, seed = setup.noise(n, seed)
    cond = setup.conditioning(n)  # a bad label or prompt is refused here, before any bar
    with counting(setup.den, planned, f"eval {setup.table.num_inference_steps} steps, {n} samples", progress):
        return _evaluate(setup, noise, seed, cond, g, reference_steps, bootstrap, yardstick)


def _evaluate(setup: Setup, noise: torch.Tensor, seed: int, cond, g: int, reference_steps: int, bootstrap: int,
              yardstick: Yardstick | None) -> Evaluation:
    figures, images = _figures(setup, yardstick, noise, seed, cond, g, bootstrap)
    head = setup.view(setup.sampler, cond, 0, g)
    key = cache_key("trajectory", setup.weights, setup.sampler.identity_table().metadata, reference_steps, seed, g,
                    *setup.key_parts(cond))
    refs = reference_trajectory(head, noise[:g], reference_steps, key=key)
    plain = truncation_gap(head, noise[:g], refs, clamp=setup.vae is None)
    tuned = truncation_gap(head, noise[:g], refs, setup.table.tau.float(), clamp=setup.vae is None,
                           coefficients=setup.table.coefficients)
    record = {"table": setup.path, "steps": setup.table.num_inference_steps, "conditioning": setup.conditioning_label,
              "trajectory_reference": f"ddim-{reference_steps}", "trajectory_gap_space": setup.space,
              "t": setup.table.t.tolist(), "tau": setup.table.tau.tolist(), "state_times": plain["times"],
              "trajectory_gap_plain": plain["per_state"], "trajectory_gap_tuned": tuned["per_state"], **figures}
    return Evaluation(record, images[0].clamp(-1, 1), images[1].clamp(-1, 1))


@torch.no_grad()
def gap_versus_nfe(setup: Setup, yardstick: Yardstick, nfes: list[int], tables: list | None = None,
                   n: int | None = None, seed: int | None = None, bootstrap: int = 200,
                   progress: bool = False) -> list[dict]:
    """The distribution gap (and data FD) of plain sampling at each NFE, and of each tuned table (same solver and
    trajectory) at its NFE, from the same held-out noises; at a table's NFE both run on the table's grid (a
    learned grid exists only there; elsewhere "learned" runs the grid it starts from).

    Rows {"nfe", "plain": {figure: value}[, "tuned": {…}, "dist_gap" / "data_fd": the paired change]}.
    `progress`: a bar over the network evaluations.
    """
    if not nfes or min(nfes) < 1:
        raise UserError(f"--nfes {nfes} is invalid; accepted: step counts >= 1, e.g. 5,10,20")
    n = setup.default_n if n is None else n
    noise, _ = setup.noise(n, seed)
    cond = setup.conditioning(n)
    by_steps = {t.num_inference_steps: t for t in [setup.table, *(tables or [])]}
    steps = sorted(set(nfes) | set(by_steps))
    planned = sum(len(by_steps[s].t) * 2 if s in by_steps else s for s in steps) * n
    with counting(setup.den, planned, f"gap against steps {','.join(map(str, steps))}", progress):
        return _gap_rows(setup, yardstick, steps, by_steps, noise, cond, n, bootstrap)


def _gap_rows(setup: Setup, yardstick: Yardstick, steps: list[int], by_steps: dict, noise, cond, n: int,
              bootstrap: int) -> list[dict]:
    rows = []
    for nfe in steps:
        table = by_steps.get(nfe)
        if table is not None:  # the table's own solver and grid (a learned grid exists at its step count only)
            sampler = Solver.for_table(setup.den, setup.base_config, table)
        else:
            sampler = Solver.named(setup.den, setup.base_config, setup.scheduler_name, setup.trajectory, nfe)
        run = setup.view(sampler, cond, 0, n)
        plain = yardstick.features(setup.images(run.rollout(noise)))
        row = {"nfe": nfe, "plain": yardstick.figures(plain)}
        if table is not None and not table.is_identity:
            tuned = yardstick.features(setup.images(run.rollout(noise, table.tau.float(),
                                                                coefficients=table.coefficients)))
            row["tuned"] = yardstick.figures(tuned)
            row.update(yardstick.changes(plain, tuned, bootstrap))
        rows.append(row)
    return rows


def save_plots(setup: Setup, evaluation: Evaluation, folder: str | Path, nfe_rows: list[dict] | None = None
               ) -> dict[str, Path]:
    """The PNGs: tau_shift, gap_per_step, samples (plain | tuned, same noises) and, given `gap_versus_nfe` rows,
    gap_vs_nfe (the distribution gap against steps; the data FD where there is no reference set)."""
    folder, rec = Path(folder), evaluation.record
    label = f"{Path(setup.path).name}, {rec['gap_n']} noises"
    paths = {
        "tau_shift": save_tau_shift_plot(setup.table.t, setup.table.tau, folder / "tau_shift.png", label),
        "gap_per_step": save_gap_plot(rec["state_times"], rec["trajectory_gap_plain"], rec["trajectory_gap_tuned"],
                                      folder / "gap_per_step.png", label),
        "samples": save_side_by_side(evaluation.plain_final[:64], evaluation.tuned_final[:64], folder / "samples.png"),
    }
    if nfe_rows:
        figure = "dist_gap" if "dist_gap" in nfe_rows[0]["plain"] else "data_fd"
        title = f"{setup.scheduler_name} / {setup.sampler.trajectory}, {rec['n']} noises"
        ylabel = (f"distribution gap to {rec['reference']} (FD, {rec['measure']})" if figure == "dist_gap" else
                  f"data FD ({rec.get('data_measure', '')})")
        paths["gap_vs_nfe"] = save_nfe_plot(curve_rows(nfe_rows, figure), folder / "gap_vs_nfe.png", title,
                                            rec.get("data_fd_reference") if figure == "data_fd" else None,
                                            f"{rec['reference']} reference", ylabel)
    return paths

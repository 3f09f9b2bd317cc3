"""The held-out protocol: what every verdict is measured on — fit's verdict, `auto`'s choice, `eval`, `report`,
`gap_versus_nfe` and the benches that load a table.

A held-out set is n noises of one seed that no fit saw (a table's eval seed: its fit seed + EVAL_SEED_OFFSET),
sample i conditioned on held-out prompt or class label i mod P (at the table's guidance scale, set on the model's
denoiser); the reference solver's final samples from the same noises are the x0 gap's targets, and the yardstick
(`build_yardstick`: a reference set of that solver, and the data) measures the distribution gap. `HeldOut` is that
definition, once: the fit (`fitting.run.Run`) and the evaluation of a saved table (`measuring.evaluation.Setup`)
each hold one, built from the fit's settings or from the table's metadata, and neither says it again.
"""

from __future__ import annotations

import torch

from timetuner.core.distributed import SOLO, World
from timetuner.core.prompts import conditioning_for, rotated
from timetuner.core.reference import reference_final, reference_final_key
from timetuner.measuring.yardstick import (
    EVAL_SEED_OFFSET,
    FidOptions,
    Yardstick,
    build_yardstick,
    reference_set_to_compute,
)

SET_STRIDE = 7919  # held-out set s of a fit seed: seed + EVAL_SEED_OFFSET + 7919·s (s = 0: the fit's own verdict set)


def set_seed(s: int, fit_seed: int = 0) -> int:
    """The seed of independent held-out set s (the benches' sets; set 0 is the one a fit of `fit_seed` judges on)."""
    return fit_seed + EVAL_SEED_OFFSET + SET_STRIDE * s


class HeldOut:
    """Held-out noises, their conditioning and their references for one model (a `core.loading.ModelSetup`).

    `rows`: the held-out prompts (text models) or class labels (class-conditional ones), sample i taking row i mod P;
    ignored for unconditional models. `reference`, `reference_steps`: the converged solver every gap is measured to;
    `reference_n`: the yardstick's reference set size. `world`: the processes that share the work.
    """

    def __init__(self, model, seed: int, rows=(), negative_prompt: str = "", reference: str = "dpm++",
                 reference_steps: int = 100, reference_n: int = 10_000, world: World = SOLO):
        self.model, self.seed, self.rows, self.negative_prompt = model, seed, tuple(rows or ()), negative_prompt
        self.reference_solver, self.reference_steps, self.reference_n = reference, reference_steps, reference_n
        self.world = world

    @property
    def reference_label(self) -> str:
        return f"{self.reference_solver}-{self.reference_steps}"

    def noise(self, n: int, seed: int | None = None) -> torch.Tensor:
        """n standard-normal starting states of `seed` (the held-out seed by default), on the model's device."""
        den = self.model.denoiser
        generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        return torch.randn((n, *den.sample_shape), generator=generator).to(den.device)

    def conditioning(self, n: int, lo: int = 0):
        """The per-sample conditioning of held-out samples lo … lo + n − 1 (sample i: row i mod P); None for an
        unconditional model."""

        model = self.model
        if model.kind is None:
            return None
        return conditioning_for(model.kind, model.pipeline, model.network, rotated(self.rows, lo), n,
                                self.negative_prompt)

    def denoiser_for(self, lo: int, hi: int):
        """The denoiser of held-out samples lo … hi − 1 (their conditioning): the yardstick's reference blocks."""
        cond = self.conditioning(hi - lo, lo)
        return self.model.denoiser if cond is None else self.model.denoiser.bind(cond)

    def view(self, solver, conditioning, lo: int, hi: int):
        """`solver` running samples lo … hi − 1 of a set conditioned by `conditioning` (itself if unconditional)."""
        return solver if conditioning is None else solver.on(self.model.denoiser.bind(conditioning.slice(lo, hi)))

    def reference(self, denoiser, noise: torch.Tensor, seed: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The reference solver's final samples from `noise` (rows `rows` of `seed`'s noises, None: from the first)
        over `denoiser` (a view's, with its conditioning); cached by model, schedule, seeds and conditioning."""

        return reference_final(self.model, denoiser, self.reference_solver, self.reference_steps, noise, seed,
                               *rows_part(rows))

    def reference_key(self, denoiser, n: int, seed: int, rows: tuple[int, int] | None = None) -> str:
        """The cache key `reference` uses for n noises of `seed` (to tell, before any work, whether it is cached)."""

        return reference_final_key(self.model, denoiser, self.reference_solver, self.reference_steps, n, seed,
                                   *rows_part(rows))

    def reference_set_to_compute(self, options: FidOptions | None = None) -> int | None:
        """Samples of the yardstick's reference set not cached yet (None: no yardstick applies): for a plan."""
        return reference_set_to_compute(self.model, self.denoiser_for, self.reference_solver, self.reference_steps,
                                        self.reference_n, options)

    def yardstick(self, options: FidOptions | None = None, reference_n: int | None = None, data: bool = True,
                  progress: bool = True, data_n: int | None = None) -> Yardstick | None:
        """The model's yardstick against the reference solver (`build_yardstick`), None without features."""
        n = self.reference_n if reference_n is None else reference_n
        return build_yardstick(self.model, self.denoiser_for, self.reference_solver, self.reference_steps, n, options,
                               data, progress and self.world.is_main, data_n, world=self.world)


def rows_part(rows: tuple[int, int] | None) -> list:
    """The cache-key part naming one process's share of a seed's noises ([] for all of them)."""
    return [] if rows is None else [list(rows)]

"""Plain against tuned from the same held-out noises: what `timetuner eval` prints and `timetuner report` lays out.

Truncation gap per state and at x0 against a fine DDIM reference trajectory (cached), FD and KID through
clean-fid against a reference set, FD against NFE — every before/after figure with a paired bootstrap
interval over the noises. The noises come from the table's held-out seed, never the fit's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from timetuner.errors import UserError
from timetuner.metrics import (
    feature_statistics,
    frechet_distance,
    kernel_distance,
    paired_bootstrap,
    truncation_gap,
)

FD_RESAMPLES = 200  # each FD resample costs a matrix square root: capped, whatever --bootstrap asks
KID_RESAMPLES = 50  # each KID resample runs clean-fid's 100 subsets


@dataclass(frozen=True)
class FidOptions:
    """How FD/KID are measured: the reference set and the feature extractor."""

    ref: str | None = None  # folder, .zip, clean-fid .npz, digits:test / digits:train; None: digits:test for digits
    features: str = "auto"  # auto (digits for digits models, else inception), inception, digits, package.module:factory
    inception_weights: str | None = None


@dataclass
class Measure:
    """A feature extractor with its reference features (or statistics), ready to score sample sets."""

    extractor: object
    reference: np.ndarray | tuple
    label: str

    @classmethod
    def build(cls, options: FidOptions, is_digits_model: bool, n: int | None, seed: int = 0) -> Measure:
        from timetuner.fid import default_reference, load_extractor, reference_features

        ref = options.ref or default_reference(is_digits_model)
        if ref is None:
            raise UserError("--fid needs a reference set for this model; accepted: --ref FOLDER (or .zip, a "
                            "clean-fid .npz, digits:test)")
        features = options.features
        if features == "auto":
            features = "digits" if is_digits_model else "inception"
        extractor = load_extractor(features, options.inception_weights)
        reference = reference_features(ref, extractor, n=n, seed=seed)
        return cls(extractor=extractor, reference=reference, label=f"{features} features vs {ref}")

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self.reference, tuple):
            return self.reference
        if not hasattr(self, "_stats"):
            self._stats = feature_statistics(self.reference)
        return self._stats

    def features(self, images: torch.Tensor) -> np.ndarray:
        from timetuner.fid import tensor_features

        return tensor_features(images, self.extractor)

    def fd(self, features: np.ndarray) -> float:
        return frechet_distance(features, self.stats)

    def kid(self, features: np.ndarray) -> float | None:
        if isinstance(self.reference, tuple):
            return None
        scale = self.extractor.kid_scale
        return kernel_distance(features / scale, self.reference / scale)


@dataclass
class Evaluation:
    """The JSON-able record, and the final samples (plain, tuned) for grids."""

    record: dict
    plain_final: torch.Tensor
    tuned_final: torch.Tensor


class Setup:
    """A table with the model and the solver it was fitted for, checked against each other.

    Conditional models are evaluated as they were fitted: guided at the table's scale, sample i conditioned on
    prompt (or class label) i mod P of a held-out set — by default the table's own held-out set, and never one
    that shares a prompt with the fit. Latent models sample latents (the gaps are measured there) and the VAE
    decodes the final samples for FD, KID and the sample grids.
    """

    def __init__(self, table: str, model: str | None, prompts: str | None = None,
                 class_labels: list[int] | None = None, negative_prompt: str | None = None):
        from timetuner.loading import load_model, load_pipeline, network_of
        from timetuner.scheduler import check_model
        from timetuner.solver import Solver
        from timetuner.table import TauTable

        self.path = table
        self.table = TauTable.load(table)
        pipe = load_pipeline(model)
        network = network_of(pipe)
        if network is not None:
            check_model(self.table, network)  # before moving a foreign model to the GPU
        self.model = load_model(model, pipeline=pipe, device="cuda" if torch.cuda.is_available() else None)
        self.den, self.vae, self.kind = self.model.denoiser, self.model.vae, self.model.kind
        self._conditioning = self._conditioner(prompts, class_labels, negative_prompt)
        self.base_config = self.model.base_config
        self.sampler = Solver.for_table(self.den, self.base_config, self.table)
        self.scheduler_name, self.trajectory = self.sampler.name, self.sampler.trajectory
        self.weights = self.model.weights
        self.is_digits = self.model.is_digits

    def _conditioner(self, prompts, class_labels, negative_prompt):
        """n ↦ the per-sample conditioning of n held-out samples (None: unconditional); sets the guidance scale."""
        from timetuner.assets import EVAL_PROMPTS
        from timetuner.prompts import check_applies, check_disjoint, conditioning_for, read_prompts

        meta = self.table.metadata
        fitted = meta.get("fit_config", {})
        check_applies(self.kind, "this model", {"--prompts": prompts, "--class-labels": class_labels,
                                                "--negative-prompt": negative_prompt})
        if self.kind is None:
            self.conditioning_label = None
            return lambda n: None
        if meta.get("guidance_scale") is None:
            raise UserError(f"table {self.path!r} records no guidance scale, so it was not fitted for this "
                            "conditional model; accepted: a table from `timetuner fit` on this model")
        self.den.guidance_scale = float(meta["guidance_scale"])
        scale = f"guidance {self.den.guidance_scale:g}"
        pipe, network = self.model.pipeline, self.model.network
        if self.kind == "text":
            if prompts is not None:
                chosen = read_prompts(prompts, "--prompts")
            else:
                chosen = list(fitted.get("eval_prompts") or read_prompts(None, "--prompts", EVAL_PROMPTS))
            check_disjoint(list(fitted.get("prompts") or []), chosen, "--prompts", "the prompts the table was "
                           "fitted on")
            negative = fitted.get("negative_prompt", "") if negative_prompt is None else negative_prompt
            self.conditioning_label = f"{len(chosen)} held-out prompts, {scale}"
            return lambda n: conditioning_for("text", pipe, network, tuple(chosen), n, negative)
        labels = list(class_labels if class_labels is not None else fitted.get("eval_class_labels") or [])
        if not labels:
            raise UserError("--class-labels is empty and the table records none; accepted: class labels separated "
                            "by commas, e.g. 207,360,387")
        self.conditioning_label = f"class labels {','.join(map(str, labels))}, {scale}"
        return lambda n: conditioning_for("class", pipe, network, tuple(labels), n)

    def conditioning(self, n: int):
        """The per-sample conditioning of n held-out samples (sample i: prompt or label i mod P), or None."""
        return self._conditioning(n)

    def view(self, solver, conditioning, lo: int, hi: int):
        """`solver` running samples lo…hi−1 of a batch conditioned by `conditioning` (itself if unconditional)."""
        return solver if conditioning is None else solver.on(self.den.bind(conditioning.slice(lo, hi)))

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
        seed = meta.get("eval_seed", 1_000_003) if seed is None else seed
        gen = torch.Generator().manual_seed(seed)
        return torch.randn((n, *self.den.sample_shape), generator=gen).to(self.den.device), seed


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
def evaluate(setup: Setup, n: int = 256, gap_n: int = 256, reference_steps: int = 1000, seed: int | None = None,
             bootstrap: int = 1000, measure: Measure | None = None) -> Evaluation:
    """Gap per state and at x0 (first min(n, gap_n) noises), FD and KID (all n) of plain vs tuned sampling."""
    from timetuner.cache import cache_key
    from timetuner.reference import reference_trajectory

    _check(n, gap_n, reference_steps, bootstrap)
    noise, seed = setup.noise(n, seed)
    cond = setup.conditioning(n)
    taus = setup.table.tau.float()
    g = min(n, gap_n)
    head = setup.view(setup.sampler, cond, 0, g)
    key = cache_key("trajectory", setup.weights, setup.sampler.identity_table().metadata, reference_steps, seed, g,
                    *setup.key_parts(cond))
    refs = reference_trajectory(head, noise[:g], reference_steps, key=key)
    pixels = setup.vae is None
    plain = truncation_gap(head, noise[:g], refs, clamp=pixels)
    tuned = truncation_gap(head, noise[:g], refs, taus, clamp=pixels)
    record = {"table": setup.path, "steps": setup.table.num_inference_steps, "n": n, "gap_n": g, "seed": seed,
              "reference": f"ddim-{reference_steps}", "gap_space": setup.space,
              "conditioning": setup.conditioning_label,
              "t": setup.table.t.tolist(), "tau": setup.table.tau.tolist(), "state_times": plain["times"],
              "gap_plain": plain["per_state"], "gap_tuned": tuned["per_state"],
              "x0_gap_plain": plain["x0"], "x0_gap_tuned": tuned["x0"],
              "x0_gap_change": paired_bootstrap(plain["x0_per_sample"].numpy(), tuned["x0_per_sample"].numpy(),
                                                resamples=bootstrap)}
    plain_final, tuned_final = plain["final"], tuned["final"]
    if n > g:
        tail = setup.view(setup.sampler, cond, g, n)
        plain_final = torch.cat([plain_final, tail.rollout(noise[g:])])
        tuned_final = torch.cat([tuned_final, tail.rollout(noise[g:], taus)])
    plain_final, tuned_final = setup.images(plain_final), setup.images(tuned_final)
    if measure is not None:
        record.update(_distances(measure, plain_final, tuned_final, bootstrap))
        if g == n:  # the fine reference sampler on the same noises: the yardstick tuning can approach
            record["fd_reference"] = measure.fd(measure.features(setup.images(refs[-1]).clamp(-1, 1)))
            excess = record["fd_plain"] - record["fd_reference"]
            if excess > 0:
                record["fd_headroom_removed"] = (record["fd_plain"] - record["fd_tuned"]) / excess
    return Evaluation(record, plain_final.clamp(-1, 1), tuned_final.clamp(-1, 1))


def _distances(measure: Measure, plain_final: torch.Tensor, tuned_final: torch.Tensor, bootstrap: int) -> dict:
    fa, fb = measure.features(plain_final.clamp(-1, 1)), measure.features(tuned_final.clamp(-1, 1))
    fd = paired_bootstrap(fa, fb, statistic=measure.fd, resamples=min(bootstrap, FD_RESAMPLES))
    out = {"fd_measure": measure.label, "fd_plain": fd["plain"], "fd_tuned": fd["tuned"], "fd_change": fd}
    if not isinstance(measure.reference, tuple):
        kid = paired_bootstrap(fa, fb, statistic=measure.kid, resamples=min(bootstrap, KID_RESAMPLES))
        out.update(kid_plain=kid["plain"], kid_tuned=kid["tuned"], kid_change=kid)
    return out


@torch.no_grad()
def fd_versus_nfe(setup: Setup, measure: Measure, nfes: list[int], tables: list | None = None, n: int = 256,
                  seed: int | None = None, bootstrap: int = 200) -> list[dict]:
    """FD of plain sampling at each NFE, and of each tuned table (same solver and trajectory) at its NFE.

    Rows {"nfe", "fd_plain"[, "fd_tuned", "fd_change" (paired interval)]}, from the same held-out noises.
    """
    from timetuner.solver import Solver

    if not nfes or min(nfes) < 1:
        raise UserError(f"--nfes {nfes} is invalid; accepted: step counts >= 1, e.g. 5,10,20")
    noise, _ = setup.noise(n, seed)
    cond = setup.conditioning(n)
    by_steps = {t.num_inference_steps: t for t in [setup.table, *(tables or [])]}
    rows = []
    for nfe in sorted(set(nfes) | set(by_steps)):
        sampler = Solver.named(setup.den, setup.base_config, setup.scheduler_name, setup.trajectory, nfe)
        run = setup.view(sampler, cond, 0, n)
        plain = measure.features(setup.images(run.rollout(noise)).clamp(-1, 1))
        row = {"nfe": nfe, "fd_plain": measure.fd(plain)}
        table = by_steps.get(nfe)
        if table is not None and not table.is_identity:
            table.check_scheduler(sampler.template)
            tuned = measure.features(setup.images(run.rollout(noise, table.tau.float())).clamp(-1, 1))
            change = paired_bootstrap(plain, tuned, statistic=measure.fd, resamples=min(bootstrap, FD_RESAMPLES))
            row.update(fd_tuned=change["tuned"], fd_change=change)
        rows.append(row)
    return rows


def save_plots(setup: Setup, evaluation: Evaluation, folder: str | Path, fd_rows: list[dict] | None = None
               ) -> dict[str, Path]:
    """The PNGs: tau_shift, gap_per_step, samples (plain | tuned, same noises) and, given rows, fd_vs_nfe."""
    from timetuner.plots import save_fd_nfe_plot, save_gap_plot, save_side_by_side, save_tau_shift_plot

    folder, rec = Path(folder), evaluation.record
    label = f"{Path(setup.path).name}, {rec['gap_n']} noises"
    paths = {
        "tau_shift": save_tau_shift_plot(setup.table.t, setup.table.tau, folder / "tau_shift.png", label),
        "gap_per_step": save_gap_plot(rec["state_times"], rec["gap_plain"], rec["gap_tuned"],
                                      folder / "gap_per_step.png", label),
        "samples": save_side_by_side(evaluation.plain_final[:64], evaluation.tuned_final[:64], folder / "samples.png"),
    }
    if fd_rows:
        title = f"{setup.scheduler_name} / {setup.sampler.trajectory}, {rec['n']} noises"
        paths["fd_vs_nfe"] = save_fd_nfe_plot(fd_rows, folder / "fd_vs_nfe.png", title, rec.get("fd_reference"),
                                              f"{rec['reference'].upper()} reference")
    return paths


@torch.no_grad()
def held_out_verdict(solver, taus, noise, reference_final, extractor=None, images=None, resamples: int = 200) -> dict:
    """x0 gap to the reference (RMS per sample, mean over samples) and FD, plain vs tuned, on held-out noise.

    `images` maps final samples to images (the VAE decoder for latent models; `reference_final` is given as
    images then). Each change comes with a 95 % paired bootstrap interval over the noises ("gap_change",
    "fd_change"); FD is in the digits-feature space against the held-out digits when `extractor` is given.
    """
    from timetuner.metrics import digits_features

    out, gaps, feats = {}, {}, {}
    for name, tt in (("plain", None), ("tuned", taus)):
        final = solver.rollout(noise, None if tt is None else torch.tensor(tt))
        final = final if images is None else images(final)
        gaps[name] = (final.clamp(-1, 1) - reference_final.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3)).sqrt()
        out[f"gap_{name}"] = float(gaps[name].mean())
        if extractor is not None:
            feats[name] = digits_features(final.clamp(-1, 1).cpu(), extractor)
    out["gap_change"] = paired_bootstrap(gaps["plain"].cpu().numpy(), gaps["tuned"].cpu().numpy(),
                                         resamples=resamples)
    if extractor is not None:
        from timetuner.data import load_digits_tensor

        held_out_digits = feature_statistics(digits_features(load_digits_tensor("test")[0], extractor))
        fd_change = paired_bootstrap(feats["plain"], feats["tuned"], resamples=resamples,
                                     statistic=lambda rows: frechet_distance(rows, held_out_digits))
        out.update(fd_plain=fd_change["plain"], fd_tuned=fd_change["tuned"], fd_change=fd_change)
        out["fd_reference"] = frechet_distance(digits_features(reference_final.clamp(-1, 1).cpu(), extractor),
                                               held_out_digits)
    return out


def is_better(held: dict) -> bool:
    """The verdict: a lower held-out x0 gap, and a lower FD where one was measured."""
    better = held["gap_tuned"] < held["gap_plain"]
    if "fd_tuned" in held:
        better = better and held["fd_tuned"] < held["fd_plain"]
    return better

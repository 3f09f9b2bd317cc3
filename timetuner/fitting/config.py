"""A fit's settings: `FitConfig` and its checks (one-line errors before any work), the defaults that depend on
the model, the output's name, and `FitResult`, what a fit returns."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from timetuner.assets import EVAL_PROMPTS, FIT_PROMPTS
from timetuner.coefficients import COEFFICIENT_SOLVERS
from timetuner.core.data import list_images
from timetuner.core.families import family_of
from timetuner.core.loading import resolve_model
from timetuner.core.prompts import (
    check_applies,
    check_disjoint,
    format_resolution,
    prompt_set,
    resolution_sides,
    scale_tag,
)
from timetuner.core.trajectories import DEFAULT_TRAJECTORY, SCHEDULERS, TRAJECTORIES, check_family
from timetuner.errors import UserError, check_choice
from timetuner.fitting.grid import grid_gradient_names
from timetuner.fitting.method import OBJECTIVES, OPTIMIZERS, STRATEGIES
from timetuner.measuring.yardstick import (  # noqa: F401 (EVAL_SEED_OFFSET: its old home)
    DEFAULT_GAP_N,
    DEFAULT_LATENT_N,
    DEFAULT_N,
    DEFAULT_REFERENCE_N,
    EVAL_SEED_OFFSET,
)
from timetuner.table import TauTable, is_flow

PARALLEL_SCHEDULERS = ("ddim", "euler", "flow-euler")  # every evaluation is a whole step: no state carried between


GRID_GRADIENT = grid_gradient_names()  # dpm++, dpm++3m, dpm++1: their learned grids move with τ (fitting.grid's rule)


# e2e Adam iterations: fewer on a learned grid, which already fits the reference, than on a fixed grid, where τ moves
# further (chosen by held-out figures: docs/results.md, "The figures behind the defaults").
E2E_ITERS, E2E_ITERS_LEARNED_GRID = 40, 15
# The grid gradient's default reach in NFE: where it lowered the held-out distribution gap (docs/results.md, "The
# figures behind the defaults").
GRID_GRADIENT_MAX_NFE = 8
# Coefficients learned with τ: Adam's step and iterations (docs/results.md, "Learned solver coefficients").
COEFFICIENT_LR, COEFFICIENT_ITERS = 0.02, 40
COEFFICIENT_PARTS = ("all", "scale", "corrections")


DEFAULT_EVAL_SAMPLES = DEFAULT_N  # the held-out protocol's constants have one home: timetuner.measuring.yardstick
# Fit noises and reference steps: pixel models (the embedded ones) and latent models (every published checkpoint,
# whose plan at the pixel defaults says hours on one GPU). The latent ones were chosen by measurement on the embedded
# models: docs/results.md, "A cheaper fit for big models".
FIT_SAMPLES, FIT_SAMPLES_LATENT = 128, 64
REFERENCE_STEPS, REFERENCE_STEPS_LATENT = 100, 50


@dataclass(frozen=True)
class FitConfig:
    """Every setting of a fit; stored in the table's metadata."""

    nfe: int = 10  # num_inference_steps of the sampler (Heun: 2·nfe − 1 network evaluations)
    # None: "auto" (rank the plain solvers, tune the best, ship the best against the best plain one) — or, with a
    # --trajectory or --strategy parallel, which auto does not take, "ddim" (a flow model: "flow-euler"; `resolved`)
    scheduler: str | None = None
    trajectory: str | None = None  # None: the scheduler's default (timetuner.core.trajectories.DEFAULT_TRAJECTORY)
    strategy: str = "sequential"
    # None: "e2e" (chosen by held-out evidence in bench/fit.py, docs/results.md); "paper" for --strategy parallel,
    # whose states are independent of the other τ by construction.
    objective: str | None = None
    optimizer: str = "search"
    samples: int | None = None  # fit noises; None: FIT_SAMPLES, FIT_SAMPLES_LATENT for latent models (`for_model`)
    eval_samples: int | None = None  # held-out noises; None: DEFAULT_N for pixel models, DEFAULT_LATENT_N for latent
    eval_gap_samples: int = DEFAULT_GAP_N  # of which the first this many carry the x0 gap
    reference_n: int = DEFAULT_REFERENCE_N  # samples of the reference solver the distribution gap is measured against
    seed: int = 0
    data: str | None = None  # parallel strategy: "digits" or an image folder; None: the model's own samples
    search_points: int = 7
    search_refine: int = 8
    adam_iters: int = 500
    adam_lr: float = 2e-3
    # None: E2E_ITERS_LEARNED_GRID on a learned grid (auto's), else E2E_ITERS (`resolved`)
    e2e_iters: int | None = None
    e2e_lr: float = 0.05  # in units of the local step spacing
    # e2e on a learned DPM-Solver++ grid: move the grid by gradient jointly with τ after the search (LD3). None: on
    # wherever it applies up to GRID_GRADIENT_MAX_NFE — auto's grid, and --trajectory learned with a DPM-Solver++
    # and e2e (`resolved`).
    grid_gradient: bool | None = None
    e2e_grid_lr: float = 0.02  # Adam's step on the grid's log-gaps (docs/results.md, "The figures behind the defaults")
    # e2e: learn the solver's coefficients with τ (`timetuner.coefficients`). None: auto tunes its solver both with
    # and without them and ships what wins on its held-out set; a named solver fits none (`resolved`).
    coefficients: bool | None = None
    e2e_coefficient_lr: float = COEFFICIENT_LR  # Adam's step on the corrections and the log output scales
    coefficient_iters: int | None = None  # e2e iterations of a fit with coefficients; None: COEFFICIENT_ITERS
    coefficient_parts: str = "all"  # which coefficients: "all", "scale" (output scales only), "corrections"
    reference: str = "dpm++"  # reference sampler: "dpm++" (DPM-Solver++ 2M) or "ddim"
    reference_steps: int | None = None  # None: REFERENCE_STEPS, REFERENCE_STEPS_LATENT for latent models
    features: str = "auto"  # "digits", "none" or "auto" (digits for digits models)
    # image side in pixels, or (height, width) (latents: / VAE factor); None: the network's own
    resolution: int | tuple[int, int] | None = None
    frames: int | None = None  # video models: frames per video (Wan: 1 + 4k); None: the pipeline's default (81)
    force: bool = False
    # Conditional models only (None: the defaults below, resolved and recorded by `fit`).
    guidance_scale: float | None = None  # None: the pipeline's own default (SD 7.5, DiT 4.0); <= 1: no CFG
    prompts: tuple[str, ...] | None = None  # text models; None: assets/prompts/fit.txt
    eval_prompts: tuple[str, ...] | None = None  # held out, disjoint from prompts; None: assets/prompts/eval.txt
    negative_prompt: str = ""  # the unconditional branch of CFG, as StableDiffusionPipeline's default
    class_labels: tuple[int, ...] | None = None  # DiT; None: 16 classes spread evenly over the label range
    eval_class_labels: tuple[int, ...] | None = None  # None: the fit's labels, on held-out noises


@dataclass
class FitResult:
    """The table written (tuned, or the identity when tuning did not help), with the evidence."""

    table: TauTable
    tuned: TauTable
    rows: list[dict]
    held_out: dict
    better: bool
    seconds: float
    network_evaluations: int  # per sample, everything: references, fitting, the held-out verdict
    fit_evaluations: int  # per sample, up to the end of fitting (references included, verdict excluded)
    config: FitConfig = field(default_factory=FitConfig)


# -- settings ------------------------------------------------------------------------------------------------------
def validate(config: FitConfig, flow: bool | None = None) -> None:
    """Every setting checked before any work: one-line UserErrors naming the value and what is accepted.
    `flow`: whether the model is a flow-matching one (None: not known yet, before the model is read)."""
    check_choice("--scheduler", config.scheduler, (*SCHEDULERS, "auto"))
    if flow is not None:
        check_family(config.scheduler, flow, also=("auto",))
    if config.scheduler == "auto" and (config.trajectory is not None or config.strategy != "sequential"):
        raise UserError("--scheduler auto chooses the solver and its grid and fits along its trajectory; accepted: "
                        "no --trajectory, --strategy sequential (or name one --scheduler)")
    check_choice("--strategy", config.strategy, STRATEGIES)
    check_choice("--objective", config.objective, OBJECTIVES)
    check_choice("--optimizer", config.optimizer, OPTIMIZERS)
    check_choice("--reference", config.reference, ("dpm++", "ddim"))
    check_choice("--coefficient-parts", config.coefficient_parts, COEFFICIENT_PARTS)
    check_choice("--features", config.features, ("auto", "digits", "none"))
    for name, value in (("--eval-samples", config.eval_samples), ("--eval-gap-samples", config.eval_gap_samples)):
        if value is not None and value < 2:
            raise UserError(f"{name} {value} is invalid; accepted: integers >= 2 (intervals need two samples)")
    sides = resolution_sides(config.resolution)
    if config.resolution is not None and (len(sides) not in (1, 2) or min(sides) < 1):
        raise UserError(f"--resolution {format_resolution(sides)} is invalid; accepted: an image side in pixels "
                        "(1024) or (height, width) (768x1344)")
    if len(set(sides)) == 2 and config.data is not None:
        raise UserError(f"--resolution {format_resolution(sides)} is not square and --data images are loaded "
                        "square; accepted: a square --resolution with --data, or no --data")
    if config.frames is not None and config.frames < 1:
        raise UserError(f"--frames {config.frames} is invalid; accepted: a frame count, e.g. 81")
    if config.reference_n < 0:
        raise UserError(f"--reference-n {config.reference_n} is invalid; accepted: integers >= 0 (0: no "
                        "distribution gap)")
    for name, value in (("--nfe", config.nfe), ("--samples", config.samples),
                        ("--reference-steps", config.reference_steps), ("--adam-iters", config.adam_iters),
                        ("--e2e-iters", config.e2e_iters), ("--search-points", config.search_points),
                        ("--coefficient-iters", config.coefficient_iters)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value} is invalid; accepted: integers >= 1")
    if config.grid_gradient and not grid_can_move(config):
        raise UserError("--grid-gradient moves a learned grid with τ by the e2e gradient; accepted: --scheduler "
                        f"auto, or --scheduler {'/'.join(GRID_GRADIENT)} --trajectory learned, with --objective e2e "
                        f"(given: --scheduler {config.scheduler}, --trajectory {config.trajectory}, --objective "
                        f"{config.objective})")
    if config.coefficients:
        check_coefficients_apply(config)
    if config.trajectory is not None and config.trajectory not in TRAJECTORIES.get(config.scheduler, {}):
        raise UserError(f"--trajectory {config.trajectory!r} is not available for --scheduler {config.scheduler}; "
                        f"accepted: {', '.join(sorted(TRAJECTORIES[config.scheduler]))}")
    if config.strategy == "parallel" and config.scheduler not in PARALLEL_SCHEDULERS:
        raise UserError(f"--strategy parallel needs a solver whose evaluations are whole steps; --scheduler "
                        f"{config.scheduler} carries state between them; accepted: {', '.join(PARALLEL_SCHEDULERS)}")
    if config.data is not None:
        if config.strategy != "parallel":
            raise UserError(f"--data {config.data!r} gives the clean images of the parallel strategy; accepted: "
                            "--strategy parallel --data …, or no --data")
        if config.data != "digits":
            list_images(config.data)  # a missing, empty or mixed folder is refused before any model is loaded
    if config.objective == "e2e" and config.strategy == "parallel":
        raise UserError("--objective e2e fits along the whole trajectory; accepted: --strategy sequential")
    if config.guidance_scale is not None and not (math.isfinite(config.guidance_scale) and config.guidance_scale >= 1):
        raise UserError(f"--guidance-scale {config.guidance_scale!r} is invalid; accepted: numbers >= 1 (1 means no "
                        "classifier-free guidance)")


def resolved(config: FitConfig, flow: bool | None = None) -> FitConfig:
    """The config with its default scheduler, objective, e2e iterations and grid gradient filled in (`flow`: the
    model is a flow-matching one: its learned grid is a searched σ grid, never moved by gradient)."""
    if config.scheduler is None:
        plain = config.trajectory is not None or config.strategy != "sequential"
        config = dataclasses.replace(config, scheduler=("flow-euler" if flow else "ddim") if plain else "auto")
    if config.e2e_iters is None:  # auto tunes on a learned grid
        learned = config.scheduler == "auto" or config.trajectory == "learned"
        config = dataclasses.replace(config, e2e_iters=E2E_ITERS_LEARNED_GRID if learned else E2E_ITERS)
    if config.objective is None:
        config = dataclasses.replace(config, objective="paper" if config.strategy == "parallel" else "e2e")
    if config.grid_gradient is None:
        on = config.nfe <= GRID_GRADIENT_MAX_NFE and grid_can_move(config) and not flow
        config = dataclasses.replace(config, grid_gradient=on)
    if config.coefficients is None and config.scheduler != "auto":
        config = dataclasses.replace(config, coefficients=False)
    if config.coefficient_iters is None:
        config = dataclasses.replace(config, coefficient_iters=COEFFICIENT_ITERS)
    return config


def for_model(config: FitConfig, latent: bool) -> FitConfig:
    """The config with the defaults that depend on the model's kind filled in: fit noises, reference steps and
    held-out noises, fewer for latent models (see the constants above); a value given is kept."""
    defaults = {"samples": FIT_SAMPLES_LATENT if latent else FIT_SAMPLES,
                "reference_steps": REFERENCE_STEPS_LATENT if latent else REFERENCE_STEPS,
                "eval_samples": DEFAULT_LATENT_N if latent else DEFAULT_EVAL_SAMPLES}
    return dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


def check_coefficients_apply(config: FitConfig) -> None:
    """--coefficients: an e2e fit (sequential) of a solver that takes them (`timetuner.coefficients`), or auto."""
    takes = [name for name, (cls, _) in SCHEDULERS.items() if cls in COEFFICIENT_SOLVERS]
    if config.objective not in (None, "e2e") or config.strategy != "sequential":
        raise UserError(f"--coefficients are fitted end to end; accepted: --objective e2e --strategy sequential "
                        f"(given: --objective {config.objective}, --strategy {config.strategy})")
    if config.scheduler != "auto" and config.scheduler not in takes:
        raise UserError(f"--coefficients: --scheduler {config.scheduler} cannot take learned coefficients; accepted: "
                        f"auto, {', '.join(takes)}")


def grid_can_move(config: FitConfig) -> bool:
    """Whether --grid-gradient applies: a learned DPM-Solver++ grid (auto's, or --trajectory learned) fitted by the
    sequential e2e objective — what `validate` demands of an explicit one and `resolved` turns on by default."""
    return config.objective in (None, "e2e") and config.strategy == "sequential" and (
        config.scheduler == "auto" or (config.scheduler in GRID_GRADIENT and config.trajectory == "learned"))


def checked_config(flow: bool | None = None, **options) -> FitConfig:
    """The `FitConfig` of `options` with its default scheduler and objective filled in, validated (`flow`: whether
    the model is a flow-matching one, None while it is not known)."""
    config = resolved(FitConfig(**options), flow)
    validate(config, flow)
    return config


def check_before_loading(model: str | None, out, **options) -> FitConfig:
    """Every setting, the output path and what a local model folder says of --nfe, judged before the (slow)
    model load: the resolved config, or a one-line UserError."""
    folder = Path(resolve_model(model))
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    saved = None
    if folder.is_dir() and scheduler_config.is_file():  # a hub id is judged once it is loaded (Solver)
        try:
            saved = json.loads(scheduler_config.read_text())
        except ValueError:
            saved = None
    flow = None if not isinstance(saved, dict) else is_flow(saved)
    config = checked_config(flow=flow, **options)
    check_out(out)
    if isinstance(saved, dict):
        try:
            total = int(saved.get("num_train_timesteps", 1000))
        except (ValueError, TypeError):
            total = None
        if total is not None and config.nfe > total:
            raise UserError(f"--nfe {config.nfe} exceeds the model's {total} training timesteps; accepted: 1 to that "
                            "number")
    return config


def resolve_conditioning(config: FitConfig, kind: str | None, model_label: str, network) -> FitConfig:
    """The config with every conditioning default filled in (so the table records what was used), checked."""
    check_applies(kind, model_label, {"--prompts": config.prompts, "--eval-prompts": config.eval_prompts,
                                      "--class-labels": config.class_labels,
                                      "--eval-class-labels": config.eval_class_labels,
                                      "--guidance-scale": config.guidance_scale})
    if kind is None:
        return config
    family = family_of(network)
    if family.distilled and config.negative_prompt:
        raise UserError(f"--negative-prompt {config.negative_prompt!r}: {type(network).__name__} distils guidance into "
                        "the network (no unconditional branch); accepted: no --negative-prompt")
    if without_guidance(network) and config.guidance_scale not in (None, 1):
        raise UserError(f"--guidance-scale {config.guidance_scale:g}: {type(network).__name__} has no guidance "
                        "embedding (Flux.1-schnell), so no scale changes its output; accepted: no --guidance-scale")
    scale = default_guidance(kind, network) if config.guidance_scale is None else float(config.guidance_scale)
    if kind == "text":
        fit_prompts = prompt_set(config.prompts, "--prompts", FIT_PROMPTS)
        eval_prompts = prompt_set(config.eval_prompts, "--eval-prompts", EVAL_PROMPTS)
        check_disjoint(list(fit_prompts), list(eval_prompts))
        return dataclasses.replace(config, guidance_scale=scale, prompts=fit_prompts, eval_prompts=eval_prompts)
    classes = int(network.config.num_embeds_ada_norm)
    labels = tuple(sorted({i * classes // 16 for i in range(min(16, classes))}) if config.class_labels is None
                   else config.class_labels)
    eval_labels = labels if config.eval_class_labels is None else tuple(config.eval_class_labels)
    for name, value in (("--class-labels", labels), ("--eval-class-labels", eval_labels)):
        if not value:
            raise UserError(f"{name} is empty; accepted: class labels separated by commas, e.g. 207,360,387")
    return dataclasses.replace(config, guidance_scale=scale, class_labels=labels, eval_class_labels=eval_labels)


def check_out(out: str | Path | None) -> Path | None:
    """The output path, judged before any work: a .safetensors file in an existing, writable folder."""
    if out is None:
        return None
    out = Path(out)
    if out.is_dir() or out.suffix != ".safetensors":
        raise UserError(f"--out {str(out)!r} is not a .safetensors file path; accepted: e.g. tau-ddim-10.safetensors")
    folder = out.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UserError(f"--out {str(out)!r}: folder {str(folder)!r} does not exist or is not writable; accepted: "
                        "a .safetensors path in an existing, writable folder")
    return out


def default_guidance(kind: str, network) -> float:
    """The guidance scale a conditional model's pipeline uses by default (SD 7.5, SD3 7, Flux 3.5, DiT 4)."""
    if without_guidance(network):
        return 1.0
    return float(family_of(network).default_guidance)


def without_guidance(network) -> bool:
    """A guidance-distilled network without a guidance embedding (Flux.1-schnell): no scale changes its output."""
    return family_of(network).without_guidance(network)


def scale_suffix(kind: str | None, guidance_scale: float | None, network=None) -> str:
    """"-cfgS" for a conditional model's table at guidance scale S (None: the pipeline's default), else ""."""
    if kind is None:
        return ""
    return "-" + scale_tag(default_guidance(kind, network) if guidance_scale is None else guidance_scale)


def default_out(scheduler: str, trajectory: str | None, nfe: int, suffix: str = "") -> str:
    """tau-SCHEDULER-TRAJECTORY-nfeN[-cfgS].safetensors (tau-auto-nfeN… for auto): what `fit` writes by default."""
    if scheduler == "auto":
        return f"tau-auto-nfe{nfe}{suffix}.safetensors"
    return f"tau-{scheduler}-{trajectory or DEFAULT_TRAJECTORY.get(scheduler, 'uniform')}-nfe{nfe}{suffix}.safetensors"

"""Fitting τ: one network timestep per evaluation of a few-step sampler (TimeTuner, Xia et al., 2023).

    from timetuner import fit
    result = fit(nfe=10)                       # embedded digits model, DDIM, e2e objective
    result.table.save("ddim-10.safetensors")

Strategies (how the state x̃_k at evaluation k is obtained):
  sequential  along the sampler's own trajectory from a fixed batch of noises, advanced with the τ already
              fitted (Alg. 1). States are cached: each evaluation costs its own search, never a re-rollout.
  parallel    x_{t_k} = α x0 + σ ε, x0 from data or the model's own high-NFE samples (Eq. 11); every k is
              independent. Needs a solver whose every evaluation is a whole step (ddim, euler).
Objectives (what τ_k minimises):
  paper       Eq. (9)/(11): ‖ε_θ(f(x̃_k, τ_k), t_{k+1}) − ε_θ(x̃_k, t_k)‖², f the real `scheduler.step`.
  teacher     ‖f(x̃_k, τ_k) − x^ref‖²: the state after the step against a high-NFE reference trajectory
              from the same noise, at the same time.
  e2e         all τ jointly, by gradient through the whole K-step trajectory, matching its final sample to the
              reference's final sample from the same noise.
Optimisers: `search` (grid scan plus golden-section refinement of the 1-D batch loss, the default) and
`adam` (the official code's recipe: τ = t·r, r₀ = 1, Adam lr 2e-3, a fixed number of iterations per τ).

The update is always the wrapped diffusers `scheduler.step` (its state snapshotted per candidate), so what is
tuned is exactly what `TunedScheduler` runs. Fit and held-out seeds never overlap; every table records its
held-out x0 gap (and FD where a feature extractor exists) before and after.

Conditional and latent models (Stable Diffusion, DiT): fitting runs in latent space on the guided model output
at one guidance scale (`guidance_scale`, recorded in the table); sample i of the fit uses prompt (or class
label) i mod P, sample i of the held-out verdict eval prompt i mod P' from a disjoint set (DiT: the same labels
by default, on held-out noises). The VAE only decodes the held-out samples, so the verdict's x0 gap is measured
on images. Prompts are embedded once, with the pipeline's own `encode_prompt`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from timetuner.denoiser import (
    Conditioning,
    Denoiser,
    class_conditioning,
    refuse_integer_timesteps,
    text_conditioning,
    to_epsilon,
)
from timetuner.errors import UserError, check_choice
from timetuner.reference import cache_key, reference_samples, reference_trajectory
from timetuner.table import TauTable, set_grid

STRATEGIES = ("sequential", "parallel")
OBJECTIVES = ("paper", "teacher", "e2e")
OPTIMIZERS = ("search", "adam")
PARALLEL_SCHEDULERS = ("ddim", "euler")  # every evaluation is a whole step: no state carried between them
EVAL_SEED_OFFSET = 1_000_003  # held-out noises come from seed + this: never the fit's


@dataclass(frozen=True)
class FitConfig:
    """Every setting of a fit; stored in the table's metadata."""

    nfe: int = 10  # num_inference_steps of the sampler (Heun: 2·nfe − 1 network evaluations)
    scheduler: str = "ddim"
    trajectory: str | None = None  # None: the scheduler's default (timetuner.trajectories.DEFAULT_TRAJECTORY)
    strategy: str = "sequential"
    # None: "e2e" (chosen by held-out evidence in bench/fit.py, README "Results"); "paper" for --strategy parallel,
    # whose states are independent of the other τ by construction.
    objective: str | None = None
    optimizer: str = "search"
    samples: int = 128  # fit noises; 128 keeps the default e2e fit under a minute on 2 CPU cores
    eval_samples: int = 256
    seed: int = 0
    data: str | None = None  # parallel strategy: "digits" or an image folder; None: the model's own samples
    search_points: int = 7
    search_refine: int = 8
    adam_iters: int = 500
    adam_lr: float = 2e-3
    e2e_iters: int = 40
    e2e_lr: float = 0.05  # in units of the local step spacing
    reference: str = "dpm++"  # reference sampler: "dpm++" (DPM-Solver++ 2M) or "ddim"
    reference_steps: int = 100
    features: str = "auto"  # "digits", "none" or "auto" (digits for digits models)
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


# -- model and scheduler ------------------------------------------------------------------------------------------
def _validate(config: FitConfig) -> None:
    from timetuner.loading import SCHEDULERS

    check_choice("--scheduler", config.scheduler, SCHEDULERS)
    check_choice("--strategy", config.strategy, STRATEGIES)
    check_choice("--objective", config.objective, OBJECTIVES)
    check_choice("--optimizer", config.optimizer, OPTIMIZERS)
    check_choice("--reference", config.reference, ("dpm++", "ddim"))
    check_choice("--features", config.features, ("auto", "digits", "none"))
    for name, value in (("--nfe", config.nfe), ("--samples", config.samples), ("--eval-samples", config.eval_samples),
                        ("--reference-steps", config.reference_steps), ("--adam-iters", config.adam_iters),
                        ("--e2e-iters", config.e2e_iters), ("--search-points", config.search_points)):
        if value < 1:
            raise UserError(f"{name} {value} is invalid; accepted: integers >= 1")
    from timetuner.trajectories import TRAJECTORIES

    if config.trajectory is not None and config.trajectory not in TRAJECTORIES[config.scheduler]:
        raise UserError(f"--trajectory {config.trajectory!r} is not available for --scheduler {config.scheduler}; "
                        f"accepted: {', '.join(sorted(TRAJECTORIES[config.scheduler]))}")
    if config.strategy == "parallel" and config.scheduler not in PARALLEL_SCHEDULERS:
        raise UserError(f"--strategy parallel needs a solver whose evaluations are whole steps; --scheduler "
                        f"{config.scheduler} carries state between them; accepted: {', '.join(PARALLEL_SCHEDULERS)}")
    if config.objective == "e2e" and config.strategy == "parallel":
        raise UserError("--objective e2e fits along the whole trajectory; accepted: --strategy sequential")
    if config.guidance_scale is not None and not (math.isfinite(config.guidance_scale) and config.guidance_scale >= 1):
        raise UserError(f"--guidance-scale {config.guidance_scale!r} is invalid; accepted: numbers >= 1 (1 means no "
                        "classifier-free guidance)")


class Sampler:
    """A named few-step sampler on a denoiser: fresh scheduler states, single steps, whole rollouts."""

    def __init__(self, denoiser: Denoiser, base_config, scheduler: str, trajectory: str | None, nfe: int):
        from timetuner.trajectories import DEFAULT_TRAJECTORY, build

        self.den = denoiser
        self.name, self.nfe_steps = scheduler, nfe
        self.trajectory = trajectory or DEFAULT_TRAJECTORY[scheduler]
        self.template, self.grid = build(scheduler, self.trajectory, base_config, nfe)
        if nfe > self.template.config.num_train_timesteps:
            raise UserError(f"--nfe {nfe} exceeds the model's {self.template.config.num_train_timesteps} "
                            "training timesteps; accepted: 1 to that number")
        self.prediction_type = self.template.config.prediction_type
        self.alphas_cumprod = self.template.alphas_cumprod
        self.num_train_timesteps = self.template.config.num_train_timesteps
        first = self.fresh()
        self.t = first.timesteps.detach().to(torch.float64).cpu()  # t_k, one per network evaluation
        self.init_noise_sigma = float(first.init_noise_sigma)

    @property
    def evaluations(self) -> int:
        return int(self.t.numel())

    def fresh(self):
        sched = copy.deepcopy(self.template)
        set_grid(sched, self.nfe_steps, self.grid, device=self.den.device)
        return sched

    def identity_table(self, **metadata) -> TauTable:
        return TauTable.identity(self.template, self.nfe_steps, timesteps=self.grid, **metadata)

    def model_output(self, sched, x, k: int, tau):
        """Network output at τ for the scaled input of evaluation k (scheduler state as given)."""
        x_in = sched.scale_model_input(x, sched.timesteps[k])
        return self.den(x_in, tau)

    def step(self, sched, output, x, k: int):
        return sched.step(output, sched.timesteps[k], x).prev_sample

    def advance(self, sched, x, k: int, tau):
        """One evaluation and update with network time τ (in place on `sched`)."""
        return self.step(sched, self.model_output(sched, x, k, tau), x, k)

    def eps_at(self, sched, x, k: int):
        """ε_θ at the honest time of evaluation k (t_k), or at t = 0 after the last evaluation."""
        if k < self.evaluations:
            x_in = sched.scale_model_input(x, sched.timesteps[k])
            t = sched.timesteps[k]
        else:
            x_in, t = x, torch.tensor(0.0)
        return to_epsilon(self.den(x_in, t), x_in, t, self.alphas_cumprod, self.prediction_type)

    def rollout(self, noise, taus=None, keep_states: bool = False):
        """Sample from unit-variance noise with network times `taus` (None: plain); final state (and states)."""
        sched = self.fresh()
        x = noise * self.init_noise_sigma
        states = [x]
        for k in range(self.evaluations):
            tau = sched.timesteps[k] if taus is None else taus[k]
            x = self.advance(sched, x, k, tau)
            states.append(x)
        return (x, states) if keep_states else x


# -- 1-D optimisers ------------------------------------------------------------------------------------------------
def golden_search(f, lo: float, hi: float, start: float, points: int = 7, refine: int = 8) -> tuple[float, float]:
    """Minimise f on [lo, hi]: a grid scan (incl. `start`), then golden-section refinement around the best point.

    Returns (argmin, min) over every point evaluated, so the result is never worse than `start` on f.
    """
    seen: dict[float, float] = {}

    def val(x: float) -> float:
        x = float(x)
        if x not in seen:
            seen[x] = float(f(x))
        return seen[x]

    grid = sorted({*torch.linspace(lo, hi, points).tolist(), float(start)})
    values = [val(x) for x in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    for _ in range(refine):
        if b - a < 1e-3:
            break
        if val(c) < val(d):
            b, d = d, c
            c = b - ratio * (b - a)
        else:
            a, c = c, d
            d = a + ratio * (b - a)
    best = min(seen, key=seen.get)
    return best, seen[best]


def adam_search(loss_fn, t: float, iters: int, lr: float, lo: float, hi: float) -> tuple[float, float]:
    """The official recipe: τ = s·r − (s − t) with s = max(t, 1) (τ = t·r for t ≥ 1), r₀ = 1, Adam on r."""
    s = max(t, 1.0)
    r = torch.ones((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([r], lr=lr)
    for _ in range(iters):
        tau = (s * r - (s - t)).clamp(lo, hi)
        loss = loss_fn(tau.float()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    tau = float((s * r.detach() - (s - t)).clamp(lo, hi))
    with torch.no_grad():
        return tau, float(loss_fn(torch.tensor(tau)).mean())


# -- the fit -------------------------------------------------------------------------------------------------------
def _bracket(t: torch.Tensor, k: int, total: int) -> tuple[float, float]:
    """Search interval for τ_k: one local step spacing either side of t_k, inside [0, T−1]."""
    distinct = torch.unique(torch.cat([t, torch.zeros(1, dtype=t.dtype)]))
    below = distinct[distinct < t[k]]
    above = distinct[distinct > t[k]]
    gaps = [float(t[k] - below.max())] if len(below) else []
    gaps += [float(above.min() - t[k])] if len(above) else []
    width = max(gaps) if gaps else total / 10
    return max(0.0, float(t[k]) - width), min(total - 1.0, float(t[k]) + width)


def _per_eval_loss(sampler: Sampler, config: FitConfig, sched, x, k: int, target_next=None):
    """The loss of τ_k at state x (scheduler snapshot `sched`), per sample; τ may carry a gradient."""
    if config.objective == "paper":
        with torch.no_grad():
            target = sampler.eps_at(copy.deepcopy(sched), x, k)  # ε_θ(x̃_k, t_k)

        def loss(tau):
            s = copy.deepcopy(sched)
            x_next = sampler.advance(s, x, k, tau)
            return (sampler.eps_at(s, x_next, k + 1) - target).pow(2).mean(dim=(1, 2, 3))

        return loss

    def teacher_loss(tau):
        s = copy.deepcopy(sched)
        x_next = sampler.advance(s, x, k, tau)
        return (x_next - target_next).pow(2).mean(dim=(1, 2, 3))

    return teacher_loss


def _parallel_state(sampler: Sampler, x0: torch.Tensor, gen: torch.Generator, k: int):
    """x_{t_k} = α x0 + σ ε for evaluation k, and a scheduler positioned at k (Eq. 11)."""
    sched = sampler.fresh()
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(k)
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    t_k = sched.timesteps[k : k + 1].expand(x0.shape[0])
    return sched, sched.add_noise(x0, eps, t_k)


def _checkpoint_path(out: Path | None) -> Path | None:
    return None if out is None else out.with_name(out.name + ".partial.json")


def _fit_per_eval(sampler, config, noise, x0_parallel, reference_states, checkpoint, progress) -> tuple[list, list]:
    """Sequential or parallel fit of τ_k one evaluation at a time; returns (taus, rows)."""
    taus: list[float] = list(checkpoint.get("taus", []))
    rows: list[dict] = list(checkpoint.get("rows", []))
    total = sampler.num_train_timesteps
    sched, x = sampler.fresh(), noise * sampler.init_noise_sigma
    gen = torch.Generator().manual_seed(config.seed + 7)
    for k in range(sampler.evaluations):
        t_k = float(sampler.t[k])
        if config.strategy == "parallel":
            sched, x = _parallel_state(sampler, x0_parallel, gen, k)
        if k < len(taus):  # resumed: only advance the cached state with the τ fitted before
            if config.strategy == "sequential":
                with torch.no_grad():
                    x = sampler.advance(sched, x, k, taus[k])
            progress(k, rows[k])
            continue
        target_next = reference_states[k + 1] if config.objective == "teacher" else None
        loss_fn = _per_eval_loss(sampler, config, sched, x, k, target_next)
        lo, hi = _bracket(sampler.t, k, total)
        started = time.perf_counter()
        with torch.no_grad():
            before = float(loss_fn(torch.tensor(t_k)).mean())
        if config.optimizer == "search":
            with torch.no_grad():
                tau, after = golden_search(lambda v, f=loss_fn: f(torch.tensor(v)).mean(), lo, hi, t_k,
                                           config.search_points, config.search_refine)
        else:
            tau, after = adam_search(loss_fn, t_k, config.adam_iters, config.adam_lr, 0.0, total - 1.0)
        taus.append(tau)
        rows.append({"k": k, "t": t_k, "tau": tau, "loss_before": before, "loss_after": after,
                     "seconds": round(time.perf_counter() - started, 3)})
        if config.strategy == "sequential":
            with torch.no_grad():
                x = sampler.advance(sched, x, k, tau)
        progress(k, rows[-1], taus=taus, rows=rows)
    return taus, rows


def _fit_e2e(sampler, config, noise, reference_final, checkpoint, progress) -> tuple[list, list]:
    """All τ jointly: Adam on δ (τ = t + Δ·δ, Δ the local spacing) through the whole trajectory."""
    total = sampler.num_train_timesteps
    t = sampler.t.float()
    spacing = torch.tensor([_bracket(sampler.t, k, total)[1] - float(sampler.t[k]) or 1.0
                            for k in range(sampler.evaluations)]).clamp(min=1.0)
    delta = torch.tensor(checkpoint.get("delta", [0.0] * sampler.evaluations), requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.e2e_lr)

    def taus_of(d):
        return (t + spacing * d).clamp(0.0, total - 1.0)

    def loss_of(d):
        final = sampler.rollout(noise, taus_of(d))
        return (final - reference_final).pow(2).mean()

    with torch.no_grad():
        before = float(loss_of(torch.zeros_like(delta)))
    best = (before, torch.zeros_like(delta))
    start_iter = int(checkpoint.get("iteration", 0))
    for it in range(start_iter, config.e2e_iters):
        loss = loss_of(delta)
        if loss.item() < best[0]:
            best = (loss.item(), delta.detach().clone())
        opt.zero_grad()
        loss.backward()
        opt.step()
        progress(it, {"k": it, "loss": loss.item()}, delta=delta.detach().tolist(), iteration=it + 1, e2e=True)
    with torch.no_grad():
        last = float(loss_of(delta))
    if last < best[0]:
        best = (last, delta.detach().clone())
    taus = taus_of(best[1]).tolist()
    rows = [{"k": k, "t": float(sampler.t[k]), "tau": taus[k], "loss_before": before, "loss_after": best[0]}
            for k in range(sampler.evaluations)]
    return taus, rows


def _held_out(sampler, taus, noise, reference_final, extractor, resamples: int = 200) -> dict:
    """x0 gap to the reference (RMS per sample, mean over samples) and FD, plain vs tuned, on held-out noise.

    Each change comes with a 95 % paired bootstrap interval over the noises ("gap_change", "fd_change").
    """
    from timetuner.metrics import digits_features, feature_statistics, frechet_distance, paired_bootstrap

    out, gaps, feats = {}, {}, {}
    with torch.no_grad():
        for name, tt in (("plain", None), ("tuned", taus)):
            final = sampler.rollout(noise, None if tt is None else torch.tensor(tt))
            gaps[name] = (final.clamp(-1, 1) - reference_final.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3)).sqrt()
            out[f"gap_{name}"] = float(gaps[name].mean())
            if extractor is not None:
                feats[name] = digits_features(final.clamp(-1, 1).cpu(), extractor)
    out["gap_change"] = paired_bootstrap(gaps["plain"].cpu().numpy(), gaps["tuned"].cpu().numpy(),
                                         resamples=resamples)
    if extractor is not None:
        from timetuner.trainers.data import load_digits_tensor

        held_out_digits = feature_statistics(digits_features(load_digits_tensor("test")[0], extractor))
        fd_change = paired_bootstrap(feats["plain"], feats["tuned"], resamples=resamples,
                                     statistic=lambda rows: frechet_distance(rows, held_out_digits))
        out.update(fd_plain=fd_change["plain"], fd_tuned=fd_change["tuned"], fd_change=fd_change)
        out["fd_reference"] = frechet_distance(digits_features(reference_final.clamp(-1, 1).cpu(), extractor),
                                               held_out_digits)
    return out


def _is_better(held: dict) -> bool:
    better = held["gap_tuned"] < held["gap_plain"]
    if "fd_tuned" in held:
        better = better and held["fd_tuned"] < held["fd_plain"]
    return better


def _uses_digits_features(config: FitConfig, model_path: str, denoiser: Denoiser) -> bool:
    if config.features != "auto":
        return config.features == "digits"
    if denoiser.sample_shape[0] != 1 or not model_path:
        return False
    run_config = Path(model_path) / "train_config.json"
    from timetuner.assets import EMBEDDED_MODEL

    if Path(model_path).resolve() == EMBEDDED_MODEL.resolve():
        return True
    return run_config.is_file() and json.loads(run_config.read_text()).get("data") == "digits"


# -- conditional and latent models --------------------------------------------------------------------------------
DEFAULT_GUIDANCE = {"text": 7.5, "class": 4.0}  # StableDiffusionPipeline's and DiTPipeline's own defaults


def _resolve_conditioning(config: FitConfig, kind: str | None, model_name: str, network) -> FitConfig:
    """The config with every conditioning default filled in (so the table records what was used), checked."""
    given = [name for name, value in (("--prompts", config.prompts), ("--eval-prompts", config.eval_prompts),
                                      ("--class-labels", config.class_labels),
                                      ("--eval-class-labels", config.eval_class_labels),
                                      ("--guidance-scale", config.guidance_scale)) if value is not None]
    if kind is None:
        if given:
            raise UserError(f"{given[0]} applies to conditional models, and {model_name} is unconditional; "
                            "accepted: text-to-image (Stable Diffusion) or class-conditional (DiT) pipelines")
        return config
    from timetuner.assets import EVAL_PROMPTS, FIT_PROMPTS
    from timetuner.prompts import check_disjoint, read_prompts

    scale = DEFAULT_GUIDANCE[kind] if config.guidance_scale is None else float(config.guidance_scale)
    if kind == "text":
        for name in ("--class-labels", "--eval-class-labels"):
            if name in given:
                raise UserError(f"{name} applies to class-conditional models, and {model_name} takes prompts; "
                                "accepted: --prompts / --eval-prompts")

        def prompts(value, option, default):
            if value is None or isinstance(value, str):
                return tuple(read_prompts(value, option, default))
            if not value or not all(isinstance(v, str) and v.strip() for v in value):
                raise UserError(f"{option} holds an empty prompt; accepted: non-empty prompt texts")
            return tuple(value)

        fit_prompts = prompts(config.prompts, "--prompts", FIT_PROMPTS)
        eval_prompts = prompts(config.eval_prompts, "--eval-prompts", EVAL_PROMPTS)
        check_disjoint(list(fit_prompts), list(eval_prompts))
        return dataclasses.replace(config, guidance_scale=scale, prompts=fit_prompts, eval_prompts=eval_prompts)
    for name in ("--prompts", "--eval-prompts"):
        if name in given:
            raise UserError(f"{name} applies to text-to-image models, and {model_name} takes class labels; "
                            "accepted: --class-labels / --eval-class-labels")
    classes = int(network.config.num_embeds_ada_norm)
    labels = tuple(sorted({i * classes // 16 for i in range(min(16, classes))}) if config.class_labels is None
                   else config.class_labels)
    eval_labels = labels if config.eval_class_labels is None else tuple(config.eval_class_labels)
    for name, value in (("--class-labels", labels), ("--eval-class-labels", eval_labels)):
        if not value:
            raise UserError(f"{name} is empty; accepted: class labels separated by commas, e.g. 207,360,387")
    return dataclasses.replace(config, guidance_scale=scale, class_labels=labels, eval_class_labels=eval_labels)


def _conditionings(config: FitConfig, kind: str | None, pipeline, network) -> tuple:
    """(fit, held-out) per-sample conditioning: sample i uses prompt / label i mod P of its set."""
    if kind is None:
        return None, None
    if kind == "text":
        if pipeline is None or getattr(pipeline, "encode_prompt", None) is None:
            raise UserError("a text-conditional network needs its pipeline (text encoder and tokenizer) to embed "
                            "the prompts; accepted: fit(model=...) or fit(pipeline=...)")
        return (text_conditioning(pipeline, list(config.prompts), config.samples, config.negative_prompt),
                text_conditioning(pipeline, list(config.eval_prompts), config.eval_samples, config.negative_prompt))
    return (class_conditioning(network, list(config.class_labels), config.samples),
            class_conditioning(network, list(config.eval_class_labels), config.eval_samples))


def _latent_decoder(pipeline):
    """The pipeline's autoencoder (`vae`, or `vqvae` for LDM), or None for a pixel-space model."""
    if pipeline is None:
        return None
    return getattr(pipeline, "vae", None) or getattr(pipeline, "vqvae", None)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Images in about [-1, 1] from latents, as the pipelines decode them (divide by the VAE's scaling factor)."""
    param = next(vae.parameters())
    scale = getattr(vae.config, "scaling_factor", 1.0)
    out = [vae.decode((chunk / scale).to(param.device, param.dtype)).sample.to(torch.float32)
           for chunk in latents.split(batch_size)]
    return torch.cat(out).to(latents.device)


def conditioning_kind(pipeline) -> str | None:
    """"text" (Stable Diffusion), "class" (DiT) or None (unconditional) for a loaded pipeline."""
    from timetuner.denoiser import family_of

    network = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    return None if network is None else family_of(network).conditional


class _DecodedSampler:
    """A sampler view whose rollouts come back decoded by the VAE: the held-out verdict compares images."""

    def __init__(self, sampler: Sampler, vae):
        self.sampler, self.vae = sampler, vae

    def rollout(self, noise, taus=None, keep_states: bool = False):
        return decode_latents(self.vae, self.sampler.rollout(noise, taus))


def fit(model: str | None = None, out: str | Path | None = None, progress: bool = True, unet=None,
        base_scheduler_config=None, pipeline=None, **options) -> FitResult:
    """Fit a τ table for `model` (hub id or folder; default: the embedded digits model); see `FitConfig`.

    `pipeline`: the pipeline `model` names, already loaded (e.g. to fit several guidance scales without
    reloading); `unet` with
    `base_scheduler_config`: a bare unconditional network. Writes the table to `out` when given (the identity
    table if tuning did not beat the plain sampler on held-out seeds, unless `force=True`); checkpoints after
    every τ and resumes from `out`'s checkpoint.
    """
    from tqdm.auto import tqdm

    from timetuner.scheduler import model_hash

    config = FitConfig(**options)
    if config.objective is None:
        config = dataclasses.replace(config, objective="paper" if config.strategy == "parallel" else "e2e")
    _validate(config)
    out = Path(out) if out is not None else None
    if out is not None and (out.is_dir() or out.suffix != ".safetensors"):
        raise UserError(f"--out {str(out)!r} is not a .safetensors file path; accepted: e.g. tau-ddim-10.safetensors")
    model_path = ""
    if unet is None:
        from timetuner.loading import load_pipeline, resolve_model

        model_path = resolve_model(model)  # with `pipeline`: where it came from (None: the embedded model)
        if pipeline is None:
            pipeline = load_pipeline(model)
        unet = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
        if unet is None:
            raise UserError(f"--model {model!r} has no unet or transformer; accepted: UNet2DModel pipelines (DDPM, "
                            "DDIM, LDM), Stable Diffusion (UNet2DConditionModel) or DiT pipelines")
        base_scheduler_config = pipeline.scheduler.config
    model_name = model or ("embedded:digits-ddpm" if model_path else "in-memory")
    unet.eval().requires_grad_(False)
    den = Denoiser(unet)
    kind = den.family.conditional
    config = _resolve_conditioning(config, kind, repr(model_name), unet)
    vae = _latent_decoder(pipeline)
    if vae is not None:
        vae.eval().requires_grad_(False)
        if config.features == "digits":
            raise UserError("--features digits needs a pixel-space digits model, and this model samples latents; "
                            "accepted: --features none or auto")
        if config.data is not None:
            raise UserError("--data gives images, and this model samples latents; accepted: no --data (the "
                            "parallel strategy then uses the model's own high-NFE samples)")
    fit_cond, eval_cond = _conditionings(config, kind, pipeline, unet)
    den.guidance_scale = config.guidance_scale
    if vae is not None:
        # Latent models are large: e2e / adam differentiate through every network call, so recompute activations
        # in the backward pass and bound one call's batch (2 × 16 rows with guidance).
        den.checkpoint, den.batch_size = True, 16
    fit_den, eval_den = den.bind(fit_cond), den.bind(eval_cond)
    sampler = Sampler(fit_den, base_scheduler_config, config.scheduler, config.trajectory, config.nfe)
    refuse_integer_timesteps(fit_den, sampler.num_train_timesteps)
    eval_sampler = copy.copy(sampler)
    eval_sampler.den = eval_den
    weights = model_hash(unet)
    started = time.perf_counter()

    shape = den.sample_shape
    fit_noise = torch.randn((config.samples, *shape), generator=torch.Generator().manual_seed(config.seed))
    eval_seed = config.seed + EVAL_SEED_OFFSET
    eval_noise = torch.randn((config.eval_samples, *shape), generator=torch.Generator().manual_seed(eval_seed))
    fit_noise, eval_noise = fit_noise.to(den.device), eval_noise.to(den.device)

    def conditioned(d: Denoiser) -> list:
        """Extra cache-key parts for a conditional denoiser: what it is conditioned on, and how strongly."""
        cond: Conditioning | None = d.conditioning
        return [] if cond is None else [cond.fingerprint(), d.guidance_scale]

    def reference(noise, seed, d):
        key = cache_key("samples", weights, dict(base_scheduler_config), config.reference, config.reference_steps,
                        seed, noise.shape[0], list(shape), *conditioned(d))
        return reference_samples(d, base_scheduler_config, noise, config.reference, config.reference_steps, key)

    # Checkpoint: resume only a fit of the same configuration on the same model (JSON-normalised, tuples → lists).
    ckpt_path = _checkpoint_path(out)
    checkpoint: dict = {}
    identity_key = json.loads(json.dumps({"config": dataclasses.asdict(config), "model_hash": weights,
                                          "conditioning": conditioned(fit_den)}))
    if ckpt_path is not None and ckpt_path.is_file():
        saved = json.loads(ckpt_path.read_text())
        if saved.get("key") == identity_key:
            checkpoint = saved

    def save_checkpoint(**state):
        if ckpt_path is None:
            return
        from timetuner.files import write_atomic

        text = json.dumps({"key": identity_key, **state})
        write_atomic(ckpt_path, lambda tmp: Path(tmp).write_text(text))

    scale_note = "" if kind is None else f" cfg={config.guidance_scale:g}"
    bar = tqdm(total=config.e2e_iters if config.objective == "e2e" else sampler.evaluations,
               desc=f"fit {config.scheduler} nfe={config.nfe}{scale_note}", disable=not progress, dynamic_ncols=True)

    def on_progress(k, row, **state):
        bar.update(1)
        if "tau" in row:
            bar.set_postfix(t=f"{row['t']:.1f}", tau=f"{row['tau']:.2f}", refresh=False)
        else:
            bar.set_postfix(loss=f"{row['loss']:.5f}", refresh=False)
        if state:
            save_checkpoint(**state)

    x0_parallel = None
    reference_states = None
    if config.strategy == "parallel":
        if config.data is not None:
            from timetuner.trainers.data import load_training_data

            x0_parallel = load_training_data(config.data, shape[1], shape[0])
            idx = torch.randint(0, len(x0_parallel), (config.samples,), generator=torch.Generator().manual_seed(
                config.seed + 1))
            x0_parallel = x0_parallel[idx].to(den.device)
        else:
            x0_parallel = reference(fit_noise, config.seed, fit_den)
            if vae is None:  # images live in [-1, 1]; latents have no such range
                x0_parallel = x0_parallel.clamp(-1, 1)
    if config.objective == "teacher":
        reference_states = reference_trajectory(
            sampler, fit_noise, config.reference_steps,
            key=cache_key("trajectory", weights, sampler.identity_table().metadata, config.reference_steps,
                          config.seed, config.samples, *conditioned(fit_den)))

    if config.objective == "e2e":
        taus, rows = _fit_e2e(sampler, config, fit_noise, reference(fit_noise, config.seed, fit_den), checkpoint,
                              on_progress)
    else:
        taus, rows = _fit_per_eval(sampler, config, fit_noise, x0_parallel, reference_states, checkpoint,
                                   on_progress)
    bar.close()
    fit_evaluations = den.evaluations  # what fitting cost, before the held-out verdict

    extractor = None
    if vae is None and _uses_digits_features(config, model_path, den):
        from timetuner.features import load_digits_features

        extractor = load_digits_features()
    reference_final = reference(eval_noise, eval_seed, eval_den)
    if vae is None:
        held = _held_out(eval_sampler, taus, eval_noise, reference_final, extractor)
    else:
        held = _held_out(_DecodedSampler(eval_sampler, vae), taus, eval_noise,
                         decode_latents(vae, reference_final), None)
    better = _is_better(held)
    seconds = time.perf_counter() - started

    meta = {
        "model": model_name,
        "model_hash": weights,
        "trajectory": sampler.trajectory,
        "scheduler_name": config.scheduler,
        "strategy": config.strategy,
        "objective": config.objective,
        "optimizer": config.optimizer,
        "samples": config.samples,
        "fit_seed": config.seed,
        "eval_seed": eval_seed,
        "eval_samples": config.eval_samples,
        "reference": f"{config.reference}-{config.reference_steps}",
        "fit_config": dataclasses.asdict(config),
        "rows": rows,
        "held_out": held,
        "held_out_space": "images decoded by the VAE" if vae is not None else "samples",
        "latent": vae is not None,
        "better_on_held_out": better,
        "fit_seconds": round(seconds, 2),
        "network_evaluations": {"fit": fit_evaluations, "total": den.evaluations},
        "versions": _versions(),
    }
    if kind is not None:
        meta["guidance_scale"] = config.guidance_scale
        meta["conditioning"] = {"kind": kind, "per_sample": "sample i uses row i mod P of its set",
                                "fit": fit_cond.fingerprint(), "eval": eval_cond.fingerprint()}
    tuned = sampler.identity_table(**meta).with_tau(torch.tensor(taus, dtype=torch.float64))
    written = tuned if (better or config.force) else sampler.identity_table(**meta, identity_because_not_better=True)
    if out is not None:
        written.save(out)
        if ckpt_path is not None:
            ckpt_path.unlink(missing_ok=True)
    return FitResult(table=written, tuned=tuned, rows=rows, held_out=held, better=better, seconds=seconds,
                     network_evaluations=den.evaluations, fit_evaluations=fit_evaluations, config=config)


def _versions() -> dict:
    import diffusers

    import timetuner

    return {"timetuner": timetuner.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}

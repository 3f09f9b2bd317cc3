"""`timetuner fit`: fit a τ table for a model and a few-step sampler, judged on held-out seeds.

The options that are `FitConfig` fields take their name, type and default from it (this module describes them);
the others (loading, placement, output) are the command's own.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from timetuner.cli.options import Cpu, Dtype, Model, Revision, Variant, options_from, user_command
from timetuner.fitting.auto import CANDIDATES
from timetuner.fitting.config import (
    COEFFICIENT_ITERS,
    COEFFICIENT_PARTS,
    DEFAULT_LATENT_N,
    DEFAULT_N,
    E2E_ITERS,
    E2E_ITERS_LEARNED_GRID,
    FIT_SAMPLES,
    FIT_SAMPLES_LATENT,
    GRID_GRADIENT_MAX_NFE,
    REFERENCE_STEPS,
    REFERENCE_STEPS_LATENT,
    FitConfig,
)

HELP = {
    "nfe": "Sampler steps (num_inference_steps).",
    "scheduler": f"auto (the default: rank {len(CANDIDATES)} plain solver × grid setups, learn the grid and τ of the "
                 "best solver that takes a grid, and ship the best against the best plain setup), ddim (the default "
                 "with --trajectory or --strategy parallel), dpm2 (DPM-Solver-2), dpm++ / dpm++3m / dpm++1 "
                 "(DPM-Solver++ 2M / 3M / order 1), unipc (UniPC-bh2), deis, heun, euler; flow-matching models: "
                 "flow-euler (the default with --trajectory), flow-heun, flow-dpm++, flow-unipc.",
    "trajectory": "uniform, trailing, linspace, quadratic, logsnr, karras, ays (Align-Your-Steps), learned (fitted to "
                  "the model: dpm++, dpm++3m, dpm++1, dpm2; a sigma grid for flow-euler, flow-unipc); flow: shift1, "
                  "shift3, exponential, beta; default per scheduler (ddim: uniform, dpm2: logsnr, dpm++: ays, heun: "
                  "karras, flow: the model's shift).",
    "strategy": "sequential (Alg. 1) or parallel (Eq. 11).",
    "objective": "e2e (the default: best on held-out figures), paper (Eq. 9/11; the default with --strategy "
                 "parallel) or teacher.",
    "optimizer": "search (bracketed 1-D search) or adam (official recipe).",
    "samples": f"Noises the fit uses. Default: {FIT_SAMPLES} ({FIT_SAMPLES_LATENT} for latent models: half the cost, "
               "most of the gain; docs/results.md).",
    "eval_samples": f"Held-out noises for the verdict (distribution gap and data FD). Default: {DEFAULT_N} "
                    f"({DEFAULT_LATENT_N} for latent models).",
    "eval_gap_samples": "Of those, how many carry the x0 gap (each needs a reference sample).",
    "reference_n": "Reference-solver samples the distribution gap is measured against (cached by model; grown when "
                   "more are asked).",
    "data": "parallel: x0 from 'digits' or an image folder; default: the model's own high-NFE samples.",
    "reference_steps": "Steps of the DPM-Solver++ reference (the converged sampler every gap is measured to). "
                       f"Default: {REFERENCE_STEPS} ({REFERENCE_STEPS_LATENT} for latent models).",
    "adam_iters": "adam: iterations per τ.",
    "e2e_iters": f"e2e: Adam iterations on all τ. Default: {E2E_ITERS_LEARNED_GRID} on a learned grid (auto's), "
                 f"{E2E_ITERS} otherwise.",
    "grid_gradient": "e2e on a learned DPM-Solver++ grid (auto's, or --trajectory learned): after the grid search, "
                     "move the grid by gradient jointly with τ (LD3). Default: on wherever it applies at --nfe <= "
                     f"{GRID_GRADIENT_MAX_NFE}; above, τ alone on the searched grid (why: docs/results.md).",
    "coefficients": "e2e: learn the solver's coefficients with τ (per step: corrections on the last data predictions "
                    "and an output scale; dpm++, dpm++3m, unipc, deis, flow-euler, flow-dpm++, flow-unipc). Default: "
                    "auto tunes its solver with and without them and ships what wins on held-out seeds; a named "
                    "--scheduler fits none.",
    "coefficient_iters": f"e2e with --coefficients: Adam iterations. Default: {COEFFICIENT_ITERS}.",
    "coefficient_parts": f"With --coefficients: {', '.join(COEFFICIENT_PARTS)} (all; the output scales only; only "
                         "the corrections).",
    "force": "Write the tuned table even when it is not better on held-out seeds.",
    "prompts": "Text models: a prompt file (one per line) or one prompt; sample i uses prompt i mod P. Default: the "
               "shipped assets/prompts/fit.txt.",
    "eval_prompts": "Text models: held-out prompts for the verdict, disjoint from --prompts. Default: "
                    "assets/prompts/eval.txt.",
    "negative_prompt": "Text models: the unconditional branch of guidance.",
    "class_labels": "DiT: class labels, e.g. 207,360,387; sample i uses label i mod P. Default: 16 classes spread "
                    "over the range.",
    "eval_class_labels": "DiT: labels for the held-out verdict. Default: --class-labels, on held-out noises.",
    "guidance_scale": "Conditional models: classifier-free guidance scale(s); 3,5,7.5 fits one table per scale "
                      "(Flux: its distilled guidance). Default: the pipeline's (SD 7.5, SD3 7, Flux 3.5, DiT 4).",
    "resolution": "Image size in pixels the table is fitted for: a side (1024) or HEIGHTxWIDTH (768x1344); latent "
                  "models: its latents are size / the VAE's factor; Flux's mu follows it. Default: the network's own "
                  "(Flux: 1024).",
    "frames": "Video models: frames per video the table is fitted for (Wan: 1 + a multiple of 4). Default: the "
              "pipeline's (Wan: 81).",
    "seed": "Seed of every random draw; same seed, same result.",
}
# Options the command reads as text and parses (lists, sizes) before they become FitConfig's values.
AS_TEXT = {name: str | None for name in ("prompts", "eval_prompts", "class_labels", "eval_class_labels",
                                          "guidance_scale", "resolution")}


@user_command
@options_from(FitConfig, HELP, names={"seed": ("--seed",)}, types=AS_TEXT)
def fit(
    model: Model = None,
    revision: Revision = None,
    variant: Variant = None,
    dtype: Dtype = None,
    cpu: Cpu = False,
    device: Annotated[str | None, typer.Option(help="Where to fit: cpu, cuda, cuda:N or mps. Default: the GPU where "
                                               "there is one (--cpu: the CPU).")] = None,
    offload: Annotated[bool, typer.Option(help="Text models: keep the text encoders on the CPU from the start (they "
                                          "embed the prompts there, rounded as the CPU rounds). Default: they embed "
                                          "on the device, then leave it before the fit.")] = False,
    plan_only: Annotated[bool, typer.Option("--plan", help="Print what the fit will spend (network evaluations per "
                                            "phase, the time at one timed batch's rate, memory) and stop: nothing "
                                            "is fitted or written.")] = False,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Table file (.safetensors); default: "
                                            "tau-SCHEDULER-TRAJECTORY-nfeN[-cfgS].safetensors. With several "
                                            "--guidance-scale values, -cfgS is added to each.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per table (a line each) instead of "
                                          "the table.")] = False,
    processes: Annotated[int, typer.Option(help="Split the fit over this many processes (`accelerate launch` "
                                           "--multi_gpu: one GPU each, or CPU processes over gloo).")] = 1,
    **settings,
) -> None:
    """Fit one network timestep τ per evaluation of a few-step sampler, and write the table.

        timetuner fit --nfe 10                                  # auto: the best solver, grid and τ

        timetuner fit --scheduler dpm++ --trajectory learned --nfe 5

        timetuner fit --model runs/digits-ddpm --scheduler dpm2 --nfe 5 --objective e2e --out dpm2-5.safetensors

        timetuner fit --model runwayml/stable-diffusion-v1-5 --prompts prompts.txt --guidance-scale 3,7.5 --nfe 10

        timetuner fit --model facebook/DiT-XL-2-256 --class-labels 207,360,387,974 --guidance-scale 4 --nfe 10

    The fit ends by sampling plain and tuned from held-out noises: if the tuned table is not better (x0 gap to
    the reference and, where features exist, the distribution gap to the reference sampler), it says so and
    writes the identity table unless --force.

    Several processes (CPU or GPUs), each fitting on its share of the noises, every one holding the same τ:

        accelerate launch --multi_gpu --num_processes 2 -m timetuner.cli.main fit --nfe 10

        timetuner fit --nfe 10 --processes 2                  # the same launch, made for you

    What a fit will spend (evaluations per phase, time, memory), before spending it:

        timetuner fit --model black-forest-labs/FLUX.1-dev --nfe 10 --plan

    Text-to-image and class-conditional models are fitted in latent space on the guided output at each
    --guidance-scale (the table records the scale); the held-out gap is measured on VAE-decoded images.
    """
    from timetuner.core.distributed import current, launched, relaunch
    from timetuner.core.loading import default_dtype, load_pipeline, parse_device, parse_dtype, place, quiet_loading
    from timetuner.core.prompts import parse_class_labels, parse_guidance_scales, parse_resolution
    from timetuner.errors import UserError
    from timetuner.fitting.api import fit_scales, plan
    from timetuner.fitting.config import check_before_loading

    scales = parse_guidance_scales(settings.pop("guidance_scale"))
    labels = parse_class_labels(settings["class_labels"])
    eval_labels = parse_class_labels(settings["eval_class_labels"], "--eval-class-labels")
    options = {**settings, "resolution": parse_resolution(settings["resolution"]),
               "class_labels": None if labels is None else tuple(labels),
               "eval_class_labels": None if eval_labels is None else tuple(eval_labels)}
    check_before_loading(model, out, **options)  # every setting and path, before the slow model load
    if processes < 1:
        raise UserError(f"--processes {processes} is invalid; accepted: integers >= 1")
    if processes > 1 and not launched():
        raise typer.Exit(relaunch(processes, "fit"))
    quiet_loading()
    target = parse_device(device, cpu)  # latent models are impractical to fit on a CPU; the digits model either way
    world = current(cpu)  # under `accelerate launch`: this process's share and device
    if world.size > 1:
        if device is not None:
            raise UserError(f"--device {device} with several processes; accepted: no --device (each process takes "
                            "its own GPU)")
        target = world.device
    torch_dtype = parse_dtype(dtype) or default_dtype(model, target.type == "cuda")  # every component in one dtype
    pipe = place(load_pipeline(model, revision=revision, variant=variant, torch_dtype=torch_dtype), target, offload)
    if plan_only:
        for scale in scales:
            lines = plan(model, pipeline=pipe, guidance_scale=scale, **options)
            if world.is_main:
                typer.echo("\n".join(lines if scale is None else [f"guidance scale {scale:g}", *lines]))
        return
    for name, result in fit_scales(model, scales, out=out, pipeline=pipe, progress=not as_json,
                                   release_text_encoders=target.type == "cuda", **options):
        if world.is_main:
            _report(result, name, settings["force"], as_json)


def _report(result, name: str, force: bool, as_json: bool) -> None:
    """Print one fitted table: t, τ and losses, then the held-out verdict (or one JSON line)."""
    held = result.held_out
    scale = result.table.metadata.get("guidance_scale")
    if as_json:
        typer.echo(json.dumps({"out": name, "guidance_scale": scale, "better": result.better, "written": "tuned" if not
                               result.table.is_identity else "identity", "t": result.tuned.t.tolist(),
                               "tau": result.tuned.tau.tolist(), "rows": result.rows, "held_out": held,
                               "seconds": round(result.seconds, 2),
                               "network_evaluations": result.network_evaluations,
                               "fit_network_evaluations": result.fit_evaluations}))
        return
    joint = result.config.objective == "e2e"
    auto = result.table.metadata.get("auto")
    if auto:
        typer.echo("plain candidates, x0 gap to the reference on the fit noises: " + ", ".join(
            f"{c['scheduler']}/{c['trajectory']} {c['fit_x0_gap']:.4f}" for c in auto["candidates"]))
        typer.echo(f"tuned: {', '.join(c['scheduler'] + '/' + c['trajectory'] for c in auto['tuned'])}; held-out "
                   f"figures below compare the winner with the best plain candidate {auto['best_plain']}")
    if scale is not None:
        typer.echo(f"guidance scale {scale:g}")
    typer.echo(f"{'k':>3} {'t':>9} {'tau':>9}" + ("" if joint else f" {'loss before':>12} {'loss after':>12}"))
    for row in result.rows:
        typer.echo(f"{row['k']:>3} {row['t']:>9.2f} {row['tau']:>9.2f}" + (
            "" if joint else f" {row['loss_before']:>12.5g} {row['loss_after']:>12.5g}"))
    if joint and result.rows:
        typer.echo(f"joint loss (final samples vs reference, fit noises): {result.rows[0]['loss_before']:.5g} -> "
                   f"{result.rows[0]['loss_after']:.5g}")
    from timetuner.measuring.verdict import describe_judgement

    if result.table.metadata.get("latent"):
        typer.echo("held-out figures on VAE-decoded images")
    for line in describe_judgement(held):
        typer.echo(f"held-out {line}")
    if auto:
        typer.echo(f"winner: {auto['winner']}; wrote {name} ({result.seconds:.1f} s)")
    elif result.better:
        typer.echo(f"tuned table is better on held-out seeds; wrote {name} ({result.seconds:.1f} s)")
    elif force:
        typer.echo(f"tuned table is NOT better on held-out seeds; wrote it anyway (--force) to {name}")
    else:
        typer.echo(f"tuned table is NOT better on held-out seeds; wrote the identity table (tau = t) to {name}; "
                   "--force writes the tuned one")


"""The entry points of a fit: `fit` (one table; `--scheduler auto` hands over to `timetuner.fitting.auto`) and
`fit_scales` (one table per guidance scale).

    from timetuner import fit
    result = fit(nfe=10)                       # embedded digits model, auto
    result.table.save("tau-auto-nfe10.safetensors")
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from timetuner.core.loading import ModelSetup, load_model, size_state
from timetuner.fitting.auto import fit_auto
from timetuner.fitting.config import FitConfig, FitResult, check_out, checked_config, default_out, scale_suffix
from timetuner.fitting.run import fit_one


def fit(model: str | None = None, out: str | Path | None = None, progress: bool = True, unet=None,
        base_scheduler_config=None, pipeline=None, release_text_encoders: bool = False, **options) -> FitResult:
    """Fit a τ table for `model` (hub id or folder; default: the embedded digits model); see `FitConfig`.

    `pipeline`: the pipeline `model` names, already loaded (and on the device to fit on); `unet` with
    `base_scheduler_config`: a bare unconditional network. Writes the table to `out` when given (the identity
    table if tuning did not beat the plain sampler on held-out seeds, unless `force=True`); checkpoints after
    every τ and resumes from `out`'s checkpoint. `release_text_encoders`: move the pipeline's text encoders off the
    GPU once the prompts are embedded (a pipeline that samples afterwards needs them back: the CLI's choice).
    """
    config = checked_config(**options)
    out = check_out(out)
    if unet is None:
        setup = load_model(model, pipeline=pipeline)
        setup.release_encoders = release_text_encoders
    else:
        setup = ModelSetup.from_network(unet, base_scheduler_config)
        setup.name = model or setup.name
    config = checked_config(flow=setup.flow, **options)  # the model's family known: its solvers and defaults
    size_state(setup, config.resolution, config.frames)
    if config.scheduler == "auto":
        return fit_auto(config, setup, out, progress)
    return fit_one(config, setup, out, progress)


def plan(model: str | None = None, pipeline=None, **options) -> list[str]:
    """What `fit(model, **options)` would spend, said before any of it is spent (`timetuner fit --plan`): the
    network evaluations of each phase, the time they take at one timed batch's rate, and the memory; nothing is
    fitted or written."""
    from timetuner.fitting.auto import plan_auto
    from timetuner.fitting.cost import plan_lines
    from timetuner.fitting.run import prepare
    from timetuner.fitting.steps import plan as phases_of

    checked_config(**options)
    setup = load_model(model, pipeline=pipeline)
    config = checked_config(flow=setup.flow, **options)
    size_state(setup, config.resolution, config.frames)
    if config.scheduler == "auto":
        phases, run = plan_auto(config, setup)
    else:
        run = prepare(config, setup)
        phases = phases_of(run)
    return plan_lines(run, phases)


def fit_scales(model: str | None, guidance_scales: list[float | None], out: str | None = None, pipeline=None,
               release_text_encoders: bool = False, **options):
    """Fit one table per classifier-free guidance scale (None: the pipeline's default); yields (path, result).

    Each table goes to `out` (one scale), to `out` with -cfgS added (several), or to `default_out`.
    """
    setup = load_model(model, pipeline=pipeline)  # loaded once, shared by every scale's fit
    kind, pipeline = setup.kind, setup.pipeline
    for scale in guidance_scales:
        suffix = scale_suffix(kind, scale, setup.network)
        if out is None:
            settings = {k: v for k, v in options.items() if k in {f.name for f in dataclasses.fields(FitConfig)}}
            config = checked_config(**settings)
            path = default_out(config.scheduler, options.get("trajectory"), config.nfe, suffix)
        else:
            path = out if len(guidance_scales) == 1 else out.removesuffix(".safetensors") + suffix + ".safetensors"
        yield path, fit(model, out=path, pipeline=pipeline, guidance_scale=scale,
                        release_text_encoders=release_text_encoders, **options)

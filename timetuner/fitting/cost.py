"""What a fit will cost, said before it is paid: a time estimate of its plan (the phases of its steps,
`timetuner.fitting.steps.plan`) from one timed batch, and where its memory goes.

    phases = plan(run)                      # references, fitting, held-out samples and their references
    print("\n".join(describe(phases, seconds_per_evaluation(run))))

A network evaluation is one sample through the network (two with classifier-free guidance), as
`Denoiser.evaluations` counts them; one process's share under several processes. Phases whose results are
already in the cache cost nothing and are listed as such. Differentiated evaluations (e2e, the adam optimiser)
are costed at three forward passes (the backward pass takes about two).
"""

from __future__ import annotations

import time

import torch

from timetuner.fitting.steps import Phase, plan  # noqa: F401 (a fit's phases are its steps': their home)

LONG_FIT = 3600  # seconds from which the plan says how to spend less


def plan_lines(run, phases: list[Phase]) -> list[str]:
    """What the user reads before a fit: each phase's evaluations, the total and its time at one timed batch's rate,
    and the memory (on a GPU with the peak of a differentiated batch where a phase differentiates)."""
    per_evaluation = seconds_per_evaluation(run, differentiated=any(p.gradient and not p.cached for p in phases))
    return [*describe(phases, per_evaluation, run.world.size), memory_line(run, per_evaluation)]


@torch.no_grad()
def seconds_per_evaluation(run, differentiated: bool = False) -> dict[str, float]:
    """Seconds per network evaluation in a batch of the fit noises and in one of the held-out noises, each from one
    timed call (not counted as evaluations); on a GPU also "peak": the most memory allocated during those calls,
    and with `differentiated` "differentiated peak": during one forward and backward pass of a fit batch (what an
    e2e step holds per network call)."""
    timings = {}
    lo, hi = run.world.shard(run.eval_noise.shape[0])
    cuda = run.fit_noise.is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats(run.fit_noise.device)
    for name, solver, noise in (("fit", run.solver, run.fit_noise), ("held-out", run.held_out_view(lo, hi),
                                                                     run.eval_noise[lo:hi])):
        den = solver.den
        x, t = noise[: min(noise.shape[0], den.batch_size)], solver.t[0].item()
        if den.conditioning is not None:  # the rows of the timed batch's samples only
            den = den.bind(den.conditioning.slice(0, x.shape[0]))
        before = den.evaluations
        den(x[:1] if den.conditioning is None else x, t)  # warm-up: first-call allocations would inflate it
        started = time.perf_counter()
        den(x, t)
        if cuda:
            torch.cuda.synchronize(x.device)
        timings[name] = (time.perf_counter() - started) / (x.shape[0] * den.per_sample)
        den.evaluations = before
    if cuda:
        timings["peak"] = torch.cuda.max_memory_allocated(run.fit_noise.device)
        if differentiated:
            timings["differentiated peak"] = _differentiated_peak(run.solver, run.fit_noise)
    return timings


def _differentiated_peak(solver, noise: torch.Tensor) -> int:
    """The most GPU memory allocated during one forward and backward pass of a fit batch through the network (as
    the e2e objective differentiates it: gradient checkpointing where the denoiser uses it)."""
    den = solver.den
    x = noise[: min(noise.shape[0], den.batch_size)].detach().clone().requires_grad_(True)
    if den.conditioning is not None:
        den = den.bind(den.conditioning.slice(0, x.shape[0]))
    before = den.evaluations
    torch.cuda.reset_peak_memory_stats(x.device)
    with torch.enable_grad():
        den(x, solver.t[0].item()).float().square().mean().backward()
    den.evaluations = before
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device)


def weights_by_device(pipeline, network) -> dict[str, int]:
    """Bytes of parameters and buffers per device over the pipeline's modules (the network alone without one)."""
    modules = [c for c in (pipeline.components.values() if pipeline is not None else [network])
               if isinstance(c, torch.nn.Module)]
    sizes: dict[str, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            device = str(tensor.device)
            sizes[device] = sizes.get(device, 0) + tensor.numel() * tensor.element_size()
    return sizes


def memory_line(run, per_evaluation: dict) -> str:
    """Where the model's weights sit, and on a GPU the peak of the timed forward batches and of a differentiated one
    (e2e: activations recomputed per network call, gradient checkpointing, where the denoiser uses it)."""
    sizes = weights_by_device(run.model.pipeline, run.model.network)
    weights = ", ".join(f"{_gib(size)} on {device}" for device, size in sorted(sizes.items()))
    line = f"memory: weights {weights}"
    if "peak" in per_evaluation:
        line += f"; peak in a timed forward batch {_gib(per_evaluation['peak'])}"
    if "differentiated peak" in per_evaluation:
        line += f", in a forward and backward batch {_gib(per_evaluation['differentiated peak'])}"
    return line


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.1f} MiB"


def describe(phases: list[Phase], per_evaluation: dict[str, float], processes: int = 1) -> list[str]:
    """Lines for the user: each phase's evaluations, the total, and the estimated time."""
    lines = []
    for p in phases:
        state = "cached" if p.cached else f"{p.evaluations:,} evaluations" + (" with gradients" if p.gradient else "")
        lines.append(f"  {p.name}: {state}")
    total = sum(p.evaluations for p in phases if not p.cached)
    seconds = sum(p.cost * per_evaluation[p.batch] for p in phases)
    share = f" per process ({processes} processes)" if processes > 1 else ""
    lines.insert(0, f"plan: {total:,} network evaluations{share}, about {_duration(seconds)} (from one timed batch: "
                    f"{per_evaluation['fit'] * 1e3:.3g} ms each in the fit's, {per_evaluation['held-out'] * 1e3:.3g} "
                    "ms in the held-out ones')")
    if seconds >= LONG_FIT:
        lines.append(f"  {_duration(seconds)}: fewer --samples, --no-coefficients, or one --scheduler with its "
                     "--trajectory cost less (what each costs in quality: docs/results.md, \"A cheaper fit for big "
                     "models\")")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"

"""Figures for the TimeTuner core on the embedded digits model, one JSON line each, all from one run.

    python bench/fit.py                  # everything (about an hour on a 2-core CPU)
    python bench/fit.py --quick          # NFE 5 and 10 only, fewer configurations

(a) default optimiser (search) vs the official Adam recipe: network evaluations, wall time, held-out paper loss
    and x0 gap, at NFE 10 on the same fit/held-out noises;
(b) plain vs tuned, per objective, at NFE 5/10/20 for DDIM (uniform, trailing), DPM-Solver-2 (log-SNR), Heun
    (Karras) and DPM-Solver++ 2M (Align-Your-Steps): the distribution gap to the converged sampler, the x0 gap and
    the data FD (`timetuner.measuring`, the yardstick fit and eval use), each the mean over --sets independent
    held-out noise sets with a 95 % interval of the mean change (`evaluation.combine_sets`);
(c) sampling time of a DDPMPipeline with the plain scheduler vs the TunedScheduler, and its network calls.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def held_out_paper_loss(sampler, taus, noise) -> float:
    """Σ_k of the paper loss (Eq. 9) at τ_k along the trajectory that τ itself produces, on held-out noise."""
    import copy

    sched, x = sampler.fresh(), noise * sampler.init_noise_sigma
    total = 0.0
    with torch.no_grad():
        for k in range(sampler.evaluations):
            target = sampler.eps_at(copy.deepcopy(sched), x, k)
            s = copy.deepcopy(sched)
            x_next = sampler.advance(s, x, k, taus[k])
            total += float((sampler.eps_at(s, x_next, k + 1) - target).pow(2).mean())
            x = sampler.advance(sched, x, k, taus[k])
    return total


def optimiser_comparison(args) -> None:
    from timetuner.core import Denoiser, Solver, load_pipeline
    from timetuner.fitting import EVAL_SEED_OFFSET, fit

    pipe = load_pipeline(None)
    sampler = Solver.named(Denoiser(pipe.unet.eval()), pipe.scheduler.config, "ddim", None, 10)
    noise = torch.randn((args.eval_samples, *sampler.den.sample_shape),
                        generator=torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET))
    for optimizer in ("search", "adam"):
        start = time.perf_counter()
        result = fit(None, progress=False, nfe=10, objective="paper", optimizer=optimizer, samples=args.adam_samples,
                     eval_samples=args.eval_samples, adam_iters=args.adam_iters, seed=args.seed, force=True)
        seconds = time.perf_counter() - start
        emit({"figure": "optimizer", "optimizer": optimizer, "nfe": 10, "samples": args.adam_samples,
              "adam_iters": args.adam_iters if optimizer == "adam" else None,
              "fit_network_evaluations": result.fit_evaluations,
              "network_evaluations": result.network_evaluations, "seconds": round(seconds, 1),
              "held_out_paper_loss_plain": held_out_paper_loss(sampler, sampler.t.float(), noise),
              "held_out_paper_loss_tuned": held_out_paper_loss(sampler, result.tuned.tau.float(), noise),
              "gap_plain": result.held_out["x0_gap"]["plain"], "gap_tuned": result.held_out["x0_gap"]["tuned"]})


def figures(held: dict) -> dict:
    """The three figures of a judge / combine_sets record, rounded, with their intervals (and per-set changes)."""
    out = {}
    for key in ("dist_gap", "x0_gap", "data_fd"):
        if key in held:
            v = held[key]
            digits = 5 if key == "x0_gap" else 3
            out[key] = {"plain": round(v["plain"], digits), "tuned": round(v["tuned"], digits),
                        "change_pct": round(100 * v["change"] / v["plain"], 1),
                        "ci": [round(v["low"], digits), round(v["high"], digits)], "significant": v["significant"]}
            if "per_set" in v:
                out[key]["per_set"] = [round(c, digits) for c in v["per_set"]]
    return out


def over_sets(table_path, taus, args) -> dict:
    """Plain vs `taus` on --sets independent held-out noise sets (the table's own held-out seed first)."""
    from timetuner.measuring import Setup, combine_sets, held_out_figures, set_seed

    setup = Setup(str(table_path), None)
    yard = setup.yardstick(progress=False)
    records = [held_out_figures(setup, yard, seed=set_seed(s, args.seed), taus=taus)[0] for s in range(args.sets)]
    return combine_sets(records)


def default_fit_time(args) -> None:
    import tempfile

    from timetuner.fitting import fit

    for nfe in [int(v) for v in args.default_nfes.split(",")]:
        out = tempfile.mkdtemp() + "/t.safetensors"
        start = time.perf_counter()
        result = fit(None, out=out, progress=False, nfe=nfe, seed=args.seed, objective=args.default_objective)
        seconds = round(time.perf_counter() - start, 1)
        combined = over_sets(out, result.tuned.tau.float(), args)
        emit({"figure": "default_fit", "nfe": nfe, "objective": args.default_objective, "seconds": seconds,
              "fit_network_evaluations": result.fit_evaluations, "network_evaluations": result.network_evaluations,
              "fit_verdict": figures(result.held_out), "better": result.better, "sets": args.sets,
              "over_sets": figures(combined), "better_over_sets": combined["better"]})


def quality_grid(args) -> None:
    import tempfile

    from timetuner.fitting import fit

    configs = [tuple(c.split("/")) for c in args.configs.split(",")]
    nfes = [int(v) for v in args.nfes.split(",")] if args.nfes else ([5, 10] if args.quick else [5, 10, 20])
    objectives = args.objectives.split(",")
    for nfe in nfes:
        for scheduler, trajectory in configs:
            for objective in objectives:
                out = tempfile.mkdtemp() + "/t.safetensors"
                start = time.perf_counter()
                result = fit(None, out=out, progress=False, nfe=nfe, scheduler=scheduler, trajectory=trajectory,
                             objective=objective, samples=args.samples, e2e_iters=args.e2e_iters, seed=args.seed,
                             force=True)
                seconds = round(time.perf_counter() - start, 1)
                combined = over_sets(out, result.tuned.tau.float(), args)
                emit({"figure": "quality", "scheduler": scheduler, "trajectory": trajectory, "nfe": nfe,
                      "evaluations": result.tuned.nfe, "objective": objective, "sets": args.sets,
                      **figures(combined), "better": combined["better"], "fit_better": result.better,
                      "fit_seconds": seconds})


def sampling_overhead(args) -> None:
    from diffusers import DDIMScheduler, DDPMPipeline

    from timetuner import TauTable, TunedScheduler
    from timetuner.assets import EMBEDDED_MODEL

    pipe = DDPMPipeline.from_pretrained(EMBEDDED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    plain = DDIMScheduler.from_config(pipe.scheduler.config)
    table = TauTable.identity(plain, 10)
    # "wrapped": τ = t, the wrapper's own cost (same network work); "tuned": τ ≠ t, as after a fit.
    schedulers = {"plain": plain, "wrapped": TunedScheduler.from_table(plain, table),
                  "tuned": TunedScheduler.from_table(plain, table.with_tau((table.t + 7.5).clamp(max=999)))}
    calls = {"n": 0}
    pipe.unet.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    timings = {name: [] for name in schedulers}
    evaluations = {}
    names = list(schedulers)
    for repeat in range(args.repeats):
        for name in names[repeat % 3:] + names[: repeat % 3]:  # rotate who runs first
            pipe.scheduler = schedulers[name]
            calls["n"] = 0
            start = time.perf_counter()
            pipe(batch_size=256, num_inference_steps=10, generator=torch.Generator().manual_seed(0))
            timings[name].append(time.perf_counter() - start)
            evaluations[name] = calls["n"]
    med = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
    emit({"figure": "sampling_time", "pipeline": "DDPMPipeline", "scheduler": "ddim", "nfe": 10, "batch": 256,
          "repeats": args.repeats, **{f"{k}_seconds": round(v, 4) for k, v in med.items()},
          "wrapper_overhead_pct": round(100 * (med["wrapped"] / med["plain"] - 1), 2),
          "tuned_overhead_pct": round(100 * (med["tuned"] / med["plain"] - 1), 2),
          **{f"network_calls_{k}": v for k, v in evaluations.items()}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="optimizer,default,quality,sampling")
    parser.add_argument("--objectives", default="paper,teacher,e2e")
    parser.add_argument("--nfes", default=None, help="comma-separated NFEs for the quality grid")
    parser.add_argument("--default-objective", default="e2e")
    parser.add_argument("--default-nfes", default="10", help="NFEs of the default fit's time, comma-separated")
    parser.add_argument("--configs", default="ddim/uniform,ddim/trailing,dpm2/logsnr,heun/karras,dpm++/ays",
                        help="solver/grid pairs of the quality grid")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sets", type=int, default=3, help="independent held-out noise sets per figure")
    parser.add_argument("--eval-samples", type=int, default=512, help="held-out noises of the optimiser comparison")
    parser.add_argument("--adam-samples", type=int, default=64)
    parser.add_argument("--adam-iters", type=int, default=500)
    parser.add_argument("--e2e-iters", type=int, default=None, help="default: timetuner fit's")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    parts = args.only.split(",")
    emit({"figure": "machine", "threads": torch.get_num_threads(), "torch": torch.__version__})
    if "sampling" in parts:
        sampling_overhead(args)
    if "default" in parts:
        default_fit_time(args)
    if "quality" in parts:
        quality_grid(args)
    if "optimizer" in parts:
        optimiser_comparison(args)


if __name__ == "__main__":
    main()

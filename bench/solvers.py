"""The leaderboard: every plain diffusers solver configuration against timetuner's variants, per NFE
(docs/results.md). One JSON line per method and NFE, each line written as it is measured.

    python bench/solvers.py                          # NFE 3,4,5,6,8,10 on the embedded model, 6 sets (GPU: minutes)
    python bench/solvers.py --quick                  # NFE 5, a few configurations, 1 set of 200: checks the script
    python bench/solvers.py --model FOLDER --nfes 5,10 --out runs/solvers.jsonl
    python bench/solvers.py --plot bench/results/solvers-cpu.jsonl,bench/results/solvers.jsonl --floor 4.203

NFE counts network evaluations. Per NFE, on --sets held-out noise sets that no fit saw (seeds EVAL_SEED_OFFSET +
7919·s, s = 1 … sets; set 0 is the fits' own held-out verdict set, on which `auto` chooses):
- plain: every scheduler × grid of `timetuner.core.trajectories` whose sampler makes exactly NFE evaluations (Heun and
  DPM-Solver-2 at the step count that gives NFE), τ = t; DDPM (stochastic) left out;
- timetuner, each fitted with the defaults of `timetuner fit` (fit seed 0): "tau" — e2e τ on DPM-Solver++ 2M with
  Align-Your-Steps steps (a flow model: on its own Euler; "grid" / "grid+tau" its learned σ grid; and "auto",
  which tunes UniPC's learned σ grid where UniPC ranks first); "grid" — the learned grid
  (`--trajectory learned`, `timetuner.fitting.grid`) with τ = t;
  "grid+tau" — that grid with its e2e τ (`--no-grid-gradient`, the default above NFE 8; one fit gives both; its
  seconds are the fit's); "gradient" — that grid then moved by the e2e gradient jointly with τ (`--grid-gradient`,
  LD3's joint fit, the default on a learned grid up to NFE 8); "auto" — the table `--scheduler auto` writes (its
  solver tuned with and without learned coefficients, the winner on its own held-out set); "auto-tau" — what auto
  writes without coefficients (`--no-coefficients`: the default before them); "coefficients" — auto's tuned table
  with the learned coefficients (`--coefficients --force`); "scale" — the same with the output scales alone
  (`--coefficient-parts scale`).
Every method's distribution gap, x0 gap and data FD (the yardstick of `timetuner eval`: n held-out samples, the
first gap-n with a reference sample) are means over the sets; "vs_best_plain" is the change against the best plain
configuration (lowest mean distribution gap at that NFE, chosen on these same sets — the comparison is as hard for
timetuner as it can be) with 95 % intervals over the sets (`evaluation.combine_sets`), for timetuner's variants and
the next two plain configurations.

Cheaper fits, run only when named in --variants: "auto-s64", "auto-s32" (auto on 64 or 32 fit noises), "auto-r50",
"auto-r25" (a 50- or 25-step reference for the fit and its own verdict; the sets here keep dpm++-100): what a
cheaper default for big models costs (docs/results.md, "A cheaper fit for big models"). Every timetuner line
carries its fit's seconds and network evaluations, its own held-out verdict included ("fit_seconds",
"fit_evaluations": `FitResult.network_evaluations`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = ("tau", "grid", "grid+tau", "gradient", "auto", "auto-tau", "coefficients", "scale")
# what is fitted for each variant (a flow model's first three: below); "grid" comes with "grid+tau"
COMMON_RUNS = {"auto": dict(scheduler="auto"), "auto-tau": dict(scheduler="auto", coefficients=False),
               "coefficients": dict(scheduler="auto", coefficients=True, force=True),
               "scale": dict(scheduler="auto", coefficients=True, coefficient_parts="scale", force=True)}
BUDGETS = {"auto-s64": dict(scheduler="auto", samples=64), "auto-s32": dict(scheduler="auto", samples=32),
           "auto-r50": dict(scheduler="auto", reference_steps=50),
           "auto-r25": dict(scheduler="auto", reference_steps=25)}


def emit(record: dict, out: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        with out.open("a") as f:
            f.write(line + "\n")


def plain_configs(den, base, nfe: int, only: list[str] | None):
    """(name, solver) of every plain configuration making exactly nfe network evaluations."""
    from timetuner import UserError
    from timetuner.core import TRAJECTORIES, Solver

    for scheduler, grids in TRAJECTORIES.items():
        if scheduler == "ddpm":
            continue
        for trajectory in grids:
            name = f"{scheduler}/{trajectory}"
            if trajectory == "learned" or (only and name not in only):
                continue
            for steps in sorted({nfe, (nfe + 1) // 2, max(nfe // 2, 1)}, reverse=True):
                try:
                    solver = Solver.named(den, base, scheduler, trajectory, steps)
                except (UserError, ValueError):
                    continue
                if solver.evaluations == nfe:
                    yield name, solver
                    break


def fitted(args, pipe, den, nfe: int) -> dict:
    """{variant: (solver over `den`, τ or None, (fit seconds, evaluations), auto's winner, learned coefficients or
    None)} of timetuner's variants at nfe."""
    from timetuner import is_flow
    from timetuner.core import Solver
    from timetuner.fitting import fit

    folder = Path(tempfile.mkdtemp())
    runs = {"tau": dict(scheduler="dpm++", trajectory="ays", force=True),
            "grid+tau": dict(scheduler="dpm++", trajectory="learned", grid_gradient=False, force=True),
            "gradient": dict(scheduler="dpm++", trajectory="learned", grid_gradient=True, force=True), **COMMON_RUNS}
    if is_flow(pipe.scheduler.config):  # the flow pipelines' own Euler: τ alone, the learned σ grid with τ; auto
        runs = {"tau": dict(scheduler="flow-euler", trajectory="uniform", force=True),
                "grid+tau": dict(scheduler="flow-euler", trajectory="learned", force=True), **COMMON_RUNS}
    runs.update(BUDGETS)
    out = {}
    for variant, options in runs.items():
        if variant not in args.variants and not (variant == "grid+tau" and "grid" in args.variants):
            continue
        started = time.perf_counter()
        options = {"samples": args.samples, **options}
        result = fit(args.model, out=folder / f"{variant}-{nfe}.safetensors", pipeline=pipe, progress=False, nfe=nfe,
                     seed=0, **options)
        cost = (round(time.perf_counter() - started, 1), result.network_evaluations)
        table = result.tuned if options.get("force") else result.table
        solver = Solver.for_table(den, pipe.scheduler.config, table)
        taus = None if table.is_identity else table.tau.float()
        out[variant] = (solver, taus, cost, table.metadata.get("auto", {}).get("winner"), table.coefficients)
        if variant == "grid+tau":
            out["grid"] = (solver, None, cost, None, None)
    return {k: v for k, v in out.items() if k in args.variants}


def leaderboard(args, model, pipe, yard, nfe: int, out: Path | None) -> None:
    from timetuner.measuring import HeldOut, combine_sets, judge, set_seed

    den, base = model.denoiser, model.base_config
    methods = {name: (solver.on(den), None, None, None, None)
               for name, solver in plain_configs(den, base, nfe, args.only)}
    plain_names = list(methods)
    methods.update(fitted(args, pipe, den, nfe))
    images = {name: [] for name in methods}
    references, held = [], HeldOut(model, set_seed(0))  # the held-out protocol: its sets, reference dpm++-100
    for s in range(1, args.sets + 1):
        seed = set_seed(s)
        noise = held.noise(args.n, seed)
        g = min(args.gap_n, args.n)
        references.append((seed, model.images(held.reference(den, noise[:g], seed))))
        with torch.no_grad():
            for name, (solver, taus, _, _, coefficients) in methods.items():
                images[name].append(model.images(torch.cat([solver.rollout(c, taus, coefficients=coefficients)
                                                             for c in noise.split(args.batch)])).cpu())
    own = {name: [_own_figures(yard, imgs, ref.cpu()) for imgs, (_, ref) in zip(images[name], references,
                                                                                  strict=True)] for name in methods}
    score = {name: sum(r.get("dist_gap", r["x0_gap"]) for r in own[name]) / args.sets for name in methods}
    ranked = sorted(plain_names, key=score.get)
    best = ranked[0]
    for name, (solver, taus, cost, winner, coefficients) in methods.items():
        means = {key: round(sum(r[key] for r in own[name]) / args.sets, 5)
                 for key in ("dist_gap", "x0_gap", "data_fd") if key in own[name][0]}
        record = {"figure": "leaderboard", "nfe": nfe, "method": name,
                  "kind": "plain" if name in plain_names else "timetuner", "evaluations": solver.evaluations,
                  "steps": solver.nfe_steps, "grid": [round(float(v), 2) for v in solver.t],
                  "tuned": taus is not None or coefficients is not None, "coefficients": coefficients is not None,
                  **means, "best_plain": best, "sets": args.sets, "n": args.n, "gap_n": min(args.gap_n, args.n)}
        if name != best and (name not in plain_names or name in ranked[:3]):  # intervals: the contenders only
            records = [{"seed": seed, **judge(yard, b, m, ref.cpu(), "dpm++-100", bootstrap=args.bootstrap)}
                       for b, m, (seed, ref) in zip(images[best], images[name], references, strict=True)]
            record["vs_best_plain"] = _figures(combine_sets(records))
        if cost is not None:
            record["fit_seconds"], record["fit_evaluations"] = cost
        if winner is not None:
            record["auto_winner"] = winner
        emit(record, out)


def _own_figures(yard, images: torch.Tensor, reference: torch.Tensor) -> dict:
    """One method's distribution gap and data FD (n images) and x0 gap (the first g, against `reference`)."""
    g = reference.shape[0]
    x0 = (images[:g].clamp(-1, 1) - reference.clamp(-1, 1)).pow(2).flatten(1).mean(1).sqrt().mean()
    return {"x0_gap": float(x0), **({} if yard is None else yard.figures(yard.features(images)))}


def _figures(combined: dict) -> dict:
    out = {}
    for key in ("dist_gap", "x0_gap", "data_fd"):
        if key in combined:
            v = combined[key]
            out[key] = {"ratio": round(v["tuned"] / v["plain"], 3), "change": round(v["change"], 5),
                        "ci": [round(v["low"], 5), round(v["high"], 5)], "significant": v["significant"],
                        "per_set": [round(c, 5) for c in v["per_set"]]}
    return out


def plot(lines: list[dict], path: str, floor: float | None = None) -> None:
    """Distribution gap against NFE: the best plain configuration at each NFE, three named plain ones, and
    timetuner's variants; `floor`: the gap of the reference sampler's own samples (bench/yardstick.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from timetuner.measuring import save_figure

    rows = [r for r in lines if r.get("figure") == "leaderboard" and "dist_gap" in r]
    complete = {r["nfe"] for r in rows if r["kind"] != "plain"}  # NFEs whose run reached timetuner's variants
    rows = [r for r in rows if r["nfe"] in complete]
    nfes = sorted(complete)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    best = [min(r["dist_gap"] for r in rows if r["nfe"] == n and r["kind"] == "plain") for n in nfes]
    ax.plot(nfes, best, "k-o", label="best plain diffusers configuration (per NFE)", linewidth=2)
    for name, style in (("dpm++/ays", "k--"), ("unipc/uniform", "k:"), ("ddim/uniform", "0.6")):
        points = sorted((r["nfe"], r["dist_gap"]) for r in rows if r["method"] == name)
        if points:
            ax.plot(*zip(*points, strict=True), style, label=f"plain {name}")
    for name, style in (("tau", "C0-s"), ("grid+tau", "C2-D"), ("auto-tau", "C1--^"), ("auto", "C3:o"),
                        ("coefficients", "C4-v")):
        points = sorted((r["nfe"], r["dist_gap"]) for r in rows if r["method"] == name)
        if points:
            ax.plot(*zip(*points, strict=True), style, label=f"timetuner {name}")
    if floor is not None:
        ax.axhline(floor, color="0.4", linewidth=0.8, linestyle="-.",
                   label=f"floor: the reference sampler itself, other noises ({floor:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("distribution gap to DPM-Solver++ 100 (FD)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    print(f"wrote {save_figure(fig, path)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or folder; default: the embedded model")
    parser.add_argument("--nfes", default="5,10,4,6,8,3", help="in the order they are run")
    parser.add_argument("--sets", type=int, default=6)
    parser.add_argument("--n", type=int, default=1000, help="held-out samples per set")
    parser.add_argument("--gap-n", type=int, default=256, help="of which the first this many carry the x0 gap")
    parser.add_argument("--samples", type=int, default=128, help="fit noises of every fit")
    parser.add_argument("--variants", default=None, help=f"default: {','.join(VARIANTS)}")
    parser.add_argument("--only", default=None, help="plain configurations to run, e.g. dpm++/ays,unipc/uniform")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--out", default=None, help="also append the lines to this file")
    parser.add_argument("--plot", default=None, help="draw the figure from these lines (.jsonl files, comma-separated;"
                        " the first file's line for a method and NFE counts), and stop")
    parser.add_argument("--figure", default="bench/results/solvers.png")
    parser.add_argument("--floor", type=float, default=None, help="the yardstick's floor to draw (bench/yardstick.py)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.plot:
        lines, seen = [], set()  # several files: the first one's line for a (method, NFE) counts
        for path in args.plot.split(","):
            for line in Path(path).read_text().splitlines():
                record = json.loads(line) if line.strip() else {}
                key = (record.get("method"), record.get("nfe"))
                if record.get("figure") == "leaderboard" and key not in seen:
                    seen.add(key)
                    lines.append(record)
        plot(lines, args.figure, args.floor)
        return
    if args.quick:  # what is not given on the command line
        given = set(sys.argv)
        for flag, value in (("--nfes", "5"), ("--sets", 1), ("--n", 200), ("--gap-n", 100), ("--samples", 32)):
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
        args.only = args.only or "ddim/uniform,dpm++/ays,unipc/uniform,heun/karras"
        args.variants = args.variants or "tau,grid"
    args.variants = (args.variants or ",".join(VARIANTS)).split(",")
    args.only = args.only.split(",") if args.only else None
    from timetuner.core import load_model, load_pipeline
    from timetuner.measuring import DEFAULT_REFERENCE_N, build_yardstick

    pipe = load_pipeline(args.model)
    if torch.cuda.is_available():
        pipe = pipe.to("cuda")
    model = load_model(args.model, pipeline=pipe)
    yard = build_yardstick(model, lambda lo, hi: model.denoiser, "dpm++", 100, DEFAULT_REFERENCE_N, progress=False)
    out = Path(args.out) if args.out else None
    emit({"figure": "machine", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          "threads": torch.get_num_threads(), "torch": torch.__version__}, out)
    for nfe in [int(v) for v in args.nfes.split(",")]:
        leaderboard(args, model, pipe, yard, nfe, out)


if __name__ == "__main__":
    main()

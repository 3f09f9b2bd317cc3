"""Training speed-up of the timestep samplers on the digits preset, run to convergence: FD against iteration.

    python bench/train.py                            # headline: uniform, SpeeD, CLTS + MDLRC, adaptive; 3 seeds × 8000
    python bench/train.py --grid ablations           # SpeeD without CAW / k = 2, CLTS alone, MDLRC alone, …
    python bench/train.py --grid open-values --steps 2000 --evals 250,500,1000,1500,2000 --targets 1000,2000 \
        --report --markdown --against clts+mdlrc     # CLTS/MDLRC's open values (docs/training.md)
    python bench/train.py --report                   # only the summary and plot of the runs recorded so far
    python bench/train.py --overhead                 # per-step wall-clock cost of each method (a quiet machine)

Protocol (docs/training.md): every method trains the `digits` preset (the embedded model's) for `--steps` iterations
from the same seed, i.e. the same initial weights, batches and noises (the loop draws each from its own generator, so
no sampler can shift them). At each of `--evals` the EMA model samples `--n` images with DDIM (`--eval-steps`) built
from the run's own scheduler config (no clipping) from the same noises for every method, and its FD against the
held-out digits is measured with the shipped feature extractor; the EMA model's loss per timestep band on a fixed
held-out batch is recorded beside it, with the sampler's mass per band from the run's log.

Resumable: each finished (method, seed) run is one "curve" line appended to `--results`, and a rerun skips it; an
unfinished run resumes from its last checkpoint under `--work` (outside the repository). Runs go to `--workers`
processes of one thread each. Then printed, one JSON line each:
- "speedup": per method and target iteration s ∈ `--targets`: the iterations it needs to reach uniform's FD at s
  (same seed; linear between evaluations), as s / those iterations, the mean over seeds and a Student-t interval
  over seeds; and the final FD's paired difference from uniform with its interval;
and the plot (`--plot`) of FD against iteration (mean and range over seeds) and of each sampler's p(t)·w(t).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from timetuner.measuring import markdown_table
from timetuner.trainers import against_table, by_method, half_table, speedup_table, summarise

# CLTS's ramp was 4000 steps by default until the open-values grid measured 1000 faster (docs/training.md): the runs
# recorded before pin it, so that they rerun as they ran.
RAMP_4000 = {"clts_ramp_steps": 4000}
METHODS = {
    "uniform": {},
    "speed": {"sampler": "speed"},  # the published setting: k = 5, τ = 700, dual partner, CAW λ = 0.6
    "clts+mdlrc": {"sampler": "clts", "mdlrc": True, **RAMP_4000},
    "clts+mdlrc-default": {"sampler": "clts", "mdlrc": True},  # today's defaults (ramp 1000)
    "adaptive": {"sampler": "adaptive"},
    "speed-no-caw": {"sampler": "speed", "weighting": "none"},
    "speed-ffhq": {"sampler": "speed", "speed_setting": "ffhq"},  # k = 2
    "clts": {"sampler": "clts", **RAMP_4000},
    "mdlrc": {"mdlrc": True},
    "momentum-decay": {"mdlrc": True, "mdlrc_compensation": False},
    "lognormal": {"sampler": "lognormal"},
    "min-snr": {"weighting": "min-snr"},
    # The values the CLTS/MDLRC paper leaves open, one changed at a time from clts+mdlrc (the `open-values` grid)
    "clts+momentum": {"sampler": "clts", "mdlrc": True, "mdlrc_compensation": False, **RAMP_4000},
    "clts+mdlrc-beta0.7": {"sampler": "clts", "mdlrc": True, "mdlrc_beta1_end": 0.7, **RAMP_4000},
    "clts+mdlrc-ramp1000": {"sampler": "clts", "mdlrc": True, "clts_ramp_steps": 1000},
    "clts+mdlrc-mu0.2": {"sampler": "clts", "mdlrc": True, "clts_mu": 0.2, **RAMP_4000},
    "clts+mdlrc-mu0.5": {"sampler": "clts", "mdlrc": True, "clts_mu": 0.5, **RAMP_4000},
}
GRIDS = {"headline": ["uniform", "speed", "clts+mdlrc", "adaptive", "clts+mdlrc-default"],
         "ablations": ["uniform", "speed-no-caw", "speed-ffhq", "clts", "mdlrc", "momentum-decay", "lognormal",
                       "min-snr"],
         "open-values": ["uniform", "clts+mdlrc", "clts+momentum", "clts+mdlrc-beta0.7", "clts+mdlrc-ramp1000",
                         "clts+mdlrc-mu0.2", "clts+mdlrc-mu0.5"]}
BANDS = 10  # timestep bands of the probe loss: [0, 100), [100, 200), …
FD_FILE = "fd.jsonl"  # inside a run's work folder: one line per evaluation done


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


KEY = ("method", "seed", "preset", "steps", "evals", "n", "eval_steps")  # what makes two runs the same run


def same_run(record: dict) -> str:
    return json.dumps({k: record[k] for k in KEY})


def run_key(method: str, seed: int, args) -> dict:
    return {"method": method, "seed": seed, "preset": args.preset, "steps": args.steps, "evals": args.evals,
            "n": args.n, "eval_steps": args.eval_steps}


def read_curves(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def as_run(record: dict, args) -> dict | None:
    """The record as a run of `args`' length: itself, or the first `--steps` iterations of a longer recorded run.

    The bench trains at a constant learning rate after warm-up and sets every schedule (CLTS's ramp, MDLRC's decay,
    the adaptive sampler's updates) in steps, so a longer run's first S iterations are the S-iteration run; its
    evaluations up to S must be `--evals`. None when the record cannot stand for such a run."""
    if any(record[k] != getattr(args, k) for k in ("preset", "n", "eval_steps")) or record["steps"] < args.steps:
        return None
    if ",".join(str(s) for s, _ in record["fd"] if s <= args.steps) != args.evals:
        return None

    def cut(pairs):
        return [p for p in pairs if p[0] <= args.steps]

    if record["steps"] == args.steps:
        return record
    return {**record, "steps": args.steps, "evals": args.evals, "cut_from": record["steps"], "fd": cut(record["fd"]),
            "probe_loss": cut(record["probe_loss"]), "sampler_bucket_mass": cut(record["sampler_bucket_mass"])}


def _probe_batch(n_per_band: int):
    """A fixed held-out batch: test digits, noise and timesteps spread evenly over each band."""
    from timetuner.core import load_digits_tensor

    gen = torch.Generator().manual_seed(424242)
    test = load_digits_tensor("test")[0]
    x0 = test[torch.randint(0, test.shape[0], (BANDS * n_per_band,), generator=gen)]
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.cat([torch.linspace(b * 1000 / BANDS, (b + 1) * 1000 / BANDS - 1, n_per_band).round().long()
                   for b in range(BANDS)])
    return x0, noise, t


@torch.no_grad()
def _evaluate(step: int, unet, noise_scheduler, noise, probe) -> dict:
    from diffusers import DDIMScheduler

    from timetuner.core import sample_images
    from timetuner.measuring import digits_fd

    # The run's own scheduler config (clip_sample false): DDIM built from a clipping config would score haze.
    scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    images = sample_images(unet, scheduler, noise, ARGS.eval_steps, batch_size=500)
    x0, eps, t = probe
    pred = torch.cat([unet(noise_scheduler.add_noise(a, b, c), c).sample
                      for a, b, c in zip(x0.split(500), eps.split(500), t.split(500), strict=True)])
    per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))
    return {"step": step, "fd": round(digits_fd(images, "test"), 4),
            "probe_loss": [round(float(v), 6) for v in per_sample.view(BANDS, -1).mean(1)]}


ARGS = None  # the worker's copy of the arguments (set by _init)


def _init(args) -> None:
    global ARGS
    ARGS = args
    torch.set_num_threads(1)


def train_one(job: tuple[str, int]) -> dict:
    """Train one (method, seed) to the end, evaluating at each of `--evals`; resumes from its work folder."""
    from timetuner.core import initial_noise
    from timetuner.trainers import TrainConfig, checkpoint_dirs, noise_scheduler_for, train

    method, seed = job
    args = ARGS
    folder = Path(args.work) / f"{args.preset}-{args.steps}-{method}-s{seed}"
    evals = [int(s) for s in args.evals.split(",")]
    fd_path = folder / FD_FILE
    done = {r["step"]: r for r in read_curves(fd_path)}
    # A checkpoint at an evaluation step whose FD was not recorded (killed in between) is dropped: resume before it.
    for checkpoint in checkpoint_dirs(folder):
        step = int(checkpoint.name.split("-")[1])
        if step in evals and step not in done:
            shutil.rmtree(checkpoint)
    resume = bool(checkpoint_dirs(folder))
    if not resume and folder.exists():
        shutil.rmtree(folder)
        done = {}
    config = TrainConfig(out=str(folder), preset=args.preset, steps=args.steps, seed=seed, cpu=True,
                         checkpoint_every=args.checkpoint_every, keep_checkpoints=2, log_every=50, sample_n=0,
                         resume=resume, **METHODS[method])
    noise_scheduler = noise_scheduler_for(config)
    noise = initial_noise(args.n, (1, 8, 8), torch.Generator().manual_seed(10_000 + seed))
    probe = _probe_batch(100)

    def on_checkpoint(step, unet):
        if step in evals and step not in done:
            done[step] = _evaluate(step, unet, noise_scheduler, noise, probe)
            with fd_path.open("a") as f:
                f.write(json.dumps(done[step]) + "\n")

    start = time.perf_counter()
    train(config, on_checkpoint=on_checkpoint)
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    mass = {r["step"]: r["sampler_bucket_mass"] for r in log}
    record = {"figure": "curve", **run_key(method, seed, args), "config": METHODS[method],
              "seconds_last_sitting": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
              "fd": [[s, done[s]["fd"]] for s in evals],
              "probe_loss": [[s, done[s]["probe_loss"]] for s in evals],
              "sampler_bucket_mass": [[s, mass.get(s)] for s in evals]}
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the record holds what the summary needs
    return record


def overhead(methods: list[str], args) -> None:
    """Seconds per training step against uniform (interleaved short runs, first quarter excluded), and the cost of
    the sampler draw + loss weight alone (batch 128, without the network)."""
    import statistics
    import tempfile

    from diffusers import DDPMScheduler

    from timetuner.trainers import TrainConfig, build_sampler, build_weighting, train

    noise_scheduler, x0 = DDPMScheduler(num_train_timesteps=1000, clip_sample=False), torch.randn(128, 1, 8, 8)
    for method in methods:
        config = TrainConfig(out="unused", **METHODS[method])
        sampler, weighting = build_sampler(config, noise_scheduler), build_weighting(config)
        calls, start = 0, None
        for step in range(1, 2050):
            if step == 50:
                start = time.perf_counter()
            if step % 40 == 0:
                continue  # learned samplers' update steps need the model: their cost is in the "overhead" line
            t, _ = sampler.sample(128, step, torch.Generator().manual_seed(step), x0=x0)
            weighting(t, noise_scheduler)
            calls += step >= 50
        emit({"figure": "draw_cost", "method": method, "batch": 128,
              "ms_per_step": round(1e3 * (time.perf_counter() - start) / calls, 4)})
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    for repeat in range(args.overhead_repeats):
        for method in methods[repeat % len(methods):] + methods[: repeat % len(methods)]:  # rotate who runs first
            with tempfile.TemporaryDirectory() as tmp:
                steps = args.overhead_steps
                train(TrainConfig(out=str(Path(tmp) / "run"), preset=args.preset, steps=steps, seed=repeat, cpu=True,
                                  checkpoint_every=10**9, log_every=steps // 4, sample_n=0, **METHODS[method]))
                log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
            seconds[method].append((log[-1]["seconds"] - log[0]["seconds"]) / (log[-1]["step"] - log[0]["step"]))
    base = statistics.median(seconds["uniform"])
    for method, values in seconds.items():
        emit({"figure": "overhead", "method": method, "preset": args.preset, "steps": args.overhead_steps,
              "repeats": args.overhead_repeats, "seconds_per_step": round(statistics.median(values), 5),
              "overhead_pct": round(100 * (statistics.median(values) / base - 1), 1),
              "threads": torch.get_num_threads()})


def where_it_learns(curves: list[dict], steps: tuple[int, ...] = (1000, 2000, 8000)) -> str:
    """Why a method is faster or not, measured: its EMA model's probe loss per band of 100 timesteps divided by
    uniform's at the same seed and iteration (mean over paired seeds), beside the sampler's mass per band there."""
    grouped = by_method(curves)
    uniform = grouped.get("uniform", {})
    rows = []
    for method, runs in grouped.items():
        seeds = sorted(set(runs) & set(uniform)) if method != "uniform" else []
        for step in steps:
            loss = [np.asarray(dict(map(tuple, runs[s]["probe_loss"])).get(step, np.nan))
                    / np.asarray(dict(map(tuple, uniform[s]["probe_loss"])).get(step, np.nan)) for s in seeds]
            mass = [dict(map(tuple, runs[s]["sampler_bucket_mass"])).get(step) for s in seeds]
            if not loss or np.isnan(np.mean(loss)):
                continue
            rows.append([method, str(step), "loss ÷ uniform's", *[f"{v:.2f}" for v in np.mean(loss, 0)]])
            if all(m is not None for m in mass):
                rows.append([method, str(step), "sampler mass", *[f"{v:.3f}" for v in np.mean(mass, 0)]])
    bands = [f"{100 * b}–{100 * (b + 1)}" for b in range(BANDS)]
    return markdown_table(["method", "iteration", "what", *bands], rows)


def plot(curves: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import DDPMScheduler

    from timetuner.measuring import save_figure
    from timetuner.trainers import TrainConfig, build_sampler, build_weighting

    by = {method: list(runs.values()) for method, runs in by_method(curves).items()}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    palette = plt.get_cmap("tab20").colors  # one colour per method in both panels, distinct up to 20 methods
    for i, (method, runs) in enumerate(by.items()):
        color = palette[(2 * i) % 20 + (i // 10) % 2]
        style = "-" if len(runs) > 1 else "--"  # single-seed runs (ablations) dashed
        steps = [s for s, _ in runs[0]["fd"]]
        fds = np.array([[f for _, f in r["fd"]] for r in runs])
        ax.plot(steps, fds.mean(0), style, marker="o", ms=3, color=color, label=f"{method} (seeds={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, fds.min(0), fds.max(0), color=color, alpha=0.15)
        if method == "adaptive":  # learned: its logged mass per band of 100 timesteps at each evaluation
            logged = runs[0]["sampler_bucket_mass"][:: max(1, len(steps) // 3)]
            for j, (step, mass) in enumerate(logged):
                if mass is not None:
                    bx.step(np.arange(0, 1000, 100), np.asarray(mass) / 100, where="post", color=color,
                            alpha=0.35 + 0.65 * (j + 1) / len(logged),
                            label=f"adaptive p(t), step {step} (seed {runs[0]['seed']})")
            continue
        config = TrainConfig(out="unused", **runs[0]["config"])
        scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
        sampler, weighting = build_sampler(config, scheduler), build_weighting(config)
        step = steps[-1]
        pw = sampler.probabilities(step) * weighting(torch.arange(1000), scheduler).double()
        bx.plot(np.arange(1000), (pw / pw.sum()).numpy(), style, color=color, label=f"{method} (step {step})")
    ax.set_yscale("log")
    ax.set(xlabel="training iteration", ylabel="FD vs held-out digits (digits features)")
    bx.set(xlabel="timestep t", ylabel="p(t)·w(t), normalised")
    for a in (ax, bx):
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default=None, help=f"one of {sorted(GRIDS)}; default: headline (the report: every "
                        "recorded method)")
    parser.add_argument("--methods", default=None, help="comma-separated METHODS; default: the grid's")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--evals", default="250,500,1000,1500,2000,3000,4000,5000,6000,7000,8000")
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--targets", default="1000,2000,4000,8000")
    parser.add_argument("--n", type=int, default=1000, help="samples per FD")
    parser.add_argument("--eval-steps", type=int, default=50, help="DDIM steps of the evaluation sampler")
    parser.add_argument("--workers", type=int, default=2, help="processes of one thread each")
    parser.add_argument("--results", default="bench/results/train.jsonl")
    parser.add_argument("--work", default=os.path.expanduser("~/.cache/timetuner-bench/train"))
    parser.add_argument("--plot", default="bench/results/train_fd.png")
    parser.add_argument("--report", action="store_true", help="summarise the recorded runs only")
    parser.add_argument("--markdown", action="store_true", help="also print the summary as the README's table")
    parser.add_argument("--against", default=None, help="with --markdown: also each method's FD minus this "
                        "method's, paired by seed, at every evaluation (e.g. clts+mdlrc for the open-values grid)")
    parser.add_argument("--overhead", action="store_true", help="time the methods' per-step cost only")
    parser.add_argument("--overhead-steps", type=int, default=200)
    parser.add_argument("--overhead-repeats", type=int, default=3)
    args = parser.parse_args()
    if args.grid is not None and args.grid not in GRIDS:
        parser.error(f"--grid {args.grid!r} is invalid; accepted: {', '.join(sorted(GRIDS))}")
    methods = args.methods.split(",") if args.methods else GRIDS[args.grid or "headline"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods {','.join(unknown)!r} is invalid; accepted: {', '.join(METHODS)}")
    if args.overhead:
        emit({"figure": "machine", "threads": torch.get_num_threads(), "torch": torch.__version__})
        overhead(["uniform", *[m for m in methods if m != "uniform"]], args)
        return
    evals = [int(s) for s in args.evals.split(",")]
    if evals[-1] != args.steps or any(s % args.checkpoint_every for s in evals):
        parser.error(f"--evals {args.evals!r} is invalid; accepted: multiples of --checkpoint-every ending at --steps")
    results = Path(args.results)
    recorded = {same_run(r) for r in (as_run(record, args) for record in read_curves(results)) if r is not None}
    jobs = [(m, s) for s in map(int, args.seeds.split(",")) for m in methods
            if same_run(run_key(m, s, args)) not in recorded]
    if not args.report and jobs:
        emit({"figure": "machine", "cpus": os.cpu_count(), "workers": args.workers, "torch": torch.__version__,
              "to_run": [f"{m}/s{s}" for m, s in jobs]})
        Path(args.work).mkdir(parents=True, exist_ok=True)
        results.parent.mkdir(parents=True, exist_ok=True)
        context = multiprocessing.get_context("spawn")
        with context.Pool(args.workers, initializer=_init, initargs=(args,), maxtasksperchild=1) as pool:
            for record in pool.imap_unordered(train_one, jobs):
                with results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                emit({k: record[k] for k in ("figure", "method", "seed", "fd")})
    # One curve per (method, seed): the run of this length where recorded, else the start of a longer one.
    runs = sorted((r for r in (as_run(record, args) for record in read_curves(results)) if r is not None),
                  key=lambda r: "cut_from" not in r)
    curves = [r for r in {(r["method"], r["seed"]): r for r in runs}.values()
              if r["method"] in methods or not (args.grid or args.methods)]
    targets = [int(s) for s in args.targets.split(",")]
    lines = summarise(curves, targets)
    for line in lines:
        emit(line)
    if args.markdown:
        print(speedup_table(lines, targets))
        print()
        print(half_table(lines, targets))
        print()
        print(where_it_learns(curves))
        if args.against:
            print()
            print(against_table(curves, args.against))
    if curves:
        plot(curves, args.plot)


if __name__ == "__main__":
    main()

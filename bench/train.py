"""Training speed-up of the timestep samplers on the digits preset: FD against iteration, one JSON line each.

    python bench/train.py                                  # 5 methods × 3 seeds × 3000 steps (hours on 2 cores)
    python bench/train.py --steps 1500 --eval-every 250    # what the README reports
    python bench/train.py --only overhead                  # per-step wall-clock overhead only

Every method trains the same preset for the same steps from the same seeds (same initial weights, batches and
noise); every `--eval-every` steps the EMA model samples `--n` images with DDIM (`--eval-steps`) from the same
noises and its FD against the held-out digits is measured with the shipped feature extractor. Printed:
- one "curve" line per (method, seed): FD at every evaluation;
- one "speedup" line per method: the iterations it needs to reach uniform's final FD (same seed, FD linearly
  interpolated between evaluations), as uniform's steps / its steps: median and range over seeds;
- one "overhead" line per method: median wall-clock seconds per training step relative to uniform, measured in
  separate interleaved short runs without evaluation, and the cost of the draw + weight alone ("draw_cost");
and the FD-vs-iteration plot is saved to `--plot`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

METHODS = {
    "uniform": {},
    "speed+caw": {"sampler": "speed", "weighting": "caw"},
    "adaptive": {"sampler": "adaptive"},
    "clts+mdlrc": {"sampler": "clts", "mdlrc": True},
    "min-snr": {"weighting": "min-snr"},
}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def fd_curve(method: str, seed: int, args) -> list[tuple[int, float]]:
    from diffusers import DDIMScheduler

    from timetuner.metrics import digits_fd
    from timetuner.solver import initial_noise, sample_images
    from timetuner.trainers import TrainConfig, train

    curve: list[tuple[int, float]] = []
    noise = initial_noise(args.n, (1, 8, 8), torch.Generator().manual_seed(10_000 + seed))

    def evaluate(step, unet):
        scheduler = DDIMScheduler(num_train_timesteps=1000)
        images = sample_images(unet, scheduler, noise, args.eval_steps, batch_size=args.n)
        curve.append((step, digits_fd(images, "test")))

    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(out=str(Path(tmp) / "run"), preset=args.preset, steps=args.steps, seed=seed,
                             checkpoint_every=args.eval_every, keep_checkpoints=1, log_every=args.eval_every,
                             sample_n=0, cpu=True, **METHODS[method])
        start = time.perf_counter()
        train(config, on_checkpoint=evaluate)
    emit({"figure": "curve", "method": method, "seed": seed, "preset": args.preset, "steps": args.steps,
          "n": args.n, "eval_steps": args.eval_steps, "seconds": round(time.perf_counter() - start, 1),
          "fd": [[s, round(f, 3)] for s, f in curve]})
    return curve


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First iteration where FD ≤ target, linear between evaluations; None if never."""
    previous = None
    for step, fd in curve:
        if fd <= target:
            if previous is None:
                return float(step)
            s0, f0 = previous
            return s0 + (step - s0) * (f0 - target) / (f0 - fd)
        previous = (step, fd)
    return None


def overhead(args) -> None:
    from timetuner.trainers import TrainConfig, train

    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    names = list(METHODS)
    for repeat in range(args.overhead_repeats):
        for method in names[repeat % len(names):] + names[: repeat % len(names)]:  # rotate who runs first
            with tempfile.TemporaryDirectory() as tmp:
                config = TrainConfig(out=str(Path(tmp) / "run"), preset=args.preset, steps=args.overhead_steps,
                                     checkpoint_every=10**9, log_every=args.overhead_steps // 4, sample_n=0,
                                     cpu=True, seed=repeat, **METHODS[method])
                train(config)
                log = [json.loads(line) for line in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
            # Per-step time after the first quarter (start-up and warm-up excluded).
            seconds[method].append((log[-1]["seconds"] - log[0]["seconds"]) / (log[-1]["step"] - log[0]["step"]))
    base = statistics.median(seconds["uniform"])
    for method, values in seconds.items():
        emit({"figure": "overhead", "method": method, "preset": args.preset, "steps": args.overhead_steps,
              "repeats": args.overhead_repeats, "seconds_per_step": round(statistics.median(values), 5),
              "overhead_pct": round(100 * (statistics.median(values) / base - 1), 1),
              "threads": torch.get_num_threads()})


def draw_cost(args) -> None:
    """Time of the sampler draw + loss weight alone, per step (batch 128), without the network."""
    from diffusers import DDPMScheduler

    from timetuner.trainers import TrainConfig
    from timetuner.trainers.loop import build_sampler, build_weighting

    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.randn(128, 1, 8, 8)
    for method, options in METHODS.items():
        config = TrainConfig(out="unused", **options)
        sampler, weighting = build_sampler(config, noise_scheduler), build_weighting(config)
        for step in range(1, 50):  # warm-up; steps not divisible by the adaptive update interval
            t, _ = sampler.sample(128, step, torch.Generator().manual_seed(step), x0=x0)
            weighting(t, noise_scheduler)
        start, calls = time.perf_counter(), 0
        for step in range(1, 2001):
            if step % 40 == 0:
                continue  # learned samplers' update steps need the model; their cost is in "overhead"
            t, _ = sampler.sample(128, step, torch.Generator().manual_seed(step), x0=x0)
            weighting(t, noise_scheduler)
            calls += 1
        emit({"figure": "draw_cost", "method": method, "batch": 128,
              "ms_per_step": round(1e3 * (time.perf_counter() - start) / calls, 4)})


def plot(curves: dict[str, list[list[tuple[int, float]]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from timetuner.plots import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        fds = torch.tensor([[f for _, f in run] for run in runs])
        mean = fds.mean(0)
        ax.plot(steps, mean.numpy(), marker="o", ms=3, label=f"{method} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(steps, fds.min(0).values.numpy(), fds.max(0).values.numpy(), alpha=0.15)
    ax.set_yscale("log")
    ax.set_xlabel("training iteration")
    ax.set_ylabel("FD vs held-out digits (digits features)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="curves,overhead")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n", type=int, default=512, help="samples per FD")
    parser.add_argument("--eval-steps", type=int, default=25, help="DDIM steps of the fixed evaluation sampler")
    parser.add_argument("--overhead-steps", type=int, default=200)
    parser.add_argument("--overhead-repeats", type=int, default=3)
    parser.add_argument("--plot", default="bench/train_fd.png")
    args = parser.parse_args()
    methods = args.methods.split(",")
    if "uniform" not in methods:
        parser.error("--methods must include uniform (the baseline)")
    emit({"figure": "machine", "threads": torch.get_num_threads(), "torch": torch.__version__})
    parts = args.only.split(",")
    if "curves" in parts:
        seeds = [int(s) for s in args.seeds.split(",")]
        curves = {m: [fd_curve(m, seed, args) for seed in seeds] for m in methods}
        for method in methods:
            ratios = []
            for seed_index in range(len(seeds)):
                target = curves["uniform"][seed_index][-1][1]
                reached = steps_to_reach(curves[method][seed_index], target)
                ratios.append(None if reached is None else round(args.steps / reached, 2))
            found = [r for r in ratios if r is not None]
            emit({"figure": "speedup", "method": method, "steps": args.steps, "seeds": seeds,
                  "ratio_per_seed": ratios, "ratio_median": statistics.median(found) if found else None,
                  "ratio_min": min(found) if found else None, "ratio_max": max(found) if found else None,
                  "final_fd_mean": round(statistics.mean(c[-1][1] for c in curves[method]), 3),
                  "final_fd_range": [round(min(c[-1][1] for c in curves[method]), 3),
                                     round(max(c[-1][1] for c in curves[method]), 3)]})
        plot(curves, args.plot)
    if "overhead" in parts:
        draw_cost(args)
        overhead(args)


if __name__ == "__main__":
    main()

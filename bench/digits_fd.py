"""Figures for the embedded digits model, one JSON line each (the table in assets/README.md).

    python bench/digits_fd.py [--model assets/digits-ddpm] [--n 1000] [--steps 10,20,50,100,1000]
    python bench/digits_fd.py --model assets/digits-flow --clipped ""      # a flow model: its Euler, DPM-Solver++

Prints: the network forward time on 256 samples; the floor (n training digits against the 360 held-out ones);
for DDIM at each step count (the model's own config, and with clip_sample=True, the config it shipped with
before) and DPM-Solver++ 2M at 100 steps, from the same n noises: the data FD against the held-out digits with
its 95 % bootstrap interval, the paired change from the previous step count (same solver), and the distribution
gap to the reference set (`timetuner.measuring.evaluation`, the one measurement path). A flow-matching model runs
its own Euler (FlowMatchEulerDiscreteScheduler, the model's shift) in place of DDIM and DPM-Solver++ 2M on flow
sigmas as the reference.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def forward_seconds(unet) -> dict:
    size = unet.config.sample_size
    x = torch.randn(256, unet.config.in_channels, size, size)
    t = torch.full((256,), 500.0)
    with torch.no_grad():
        for _ in range(3):
            unet(x, t)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            unet(x, t)
            times.append(time.perf_counter() - start)
    return {"figure": "forward_256_seconds", "median": round(sorted(times)[10], 4),
            "threads": torch.get_num_threads(), "params": sum(p.numel() for p in unet.parameters())}


def interval(features: np.ndarray, statistic, resamples: int = 200, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of statistic(features) over the rows."""
    rng = np.random.default_rng(seed)
    values = [statistic(features[rng.integers(0, len(features), len(features))]) for _ in range(resamples)]
    return [round(float(v), 3) for v in np.quantile(values, [0.025, 0.975])]


def main() -> None:
    from timetuner.core import Solver, load_digits_tensor, load_model, make_scheduler
    from timetuner.measuring import DEFAULT_REFERENCE_N, build_yardstick, paired_bootstrap

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--n", type=int, default=1000, help="samples per figure")
    parser.add_argument("--steps", default="10,20,50,100,1000", help="DDIM step counts, comma-separated")
    parser.add_argument("--clipped", default="100,1000", help="DDIM step counts also run with clip_sample=True")
    parser.add_argument("--reference-n", type=int, default=DEFAULT_REFERENCE_N)
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    model = load_model(args.model)
    print(json.dumps(forward_seconds(model.network)), flush=True)
    yard = build_yardstick(model, lambda lo, hi: model.denoiser, "dpm++", 100, args.reference_n, progress=False)
    data = yard.data
    train = load_digits_tensor("train")[0]
    pick = torch.from_numpy(np.random.default_rng(args.seed).choice(len(train), min(args.n, len(train)), False))
    floor = yard.features(train[pick])
    print(json.dumps({"figure": "floor_train_vs_test", "n": len(pick), "fd": round(data.fd(floor), 3),
                      "fd_ci": interval(floor, data.fd)}), flush=True)
    noise = torch.randn((args.n, *model.denoiser.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    few, reference = ("flow-euler", "flow-dpm++") if model.flow else ("ddim", "dpm++")
    runs = [(few, s, {}) for s in map(int, args.steps.split(","))]
    runs += [(few, s, {"clip_sample": True}) for s in map(int, filter(None, args.clipped.split(",")))]
    runs += [(reference, 100, {})]
    previous = {}
    for name, steps, overrides in runs:
        scheduler = make_scheduler(name, model.base_config)
        scheduler = type(scheduler).from_config(scheduler.config, **overrides)
        start = time.perf_counter()
        feats = yard.features(Solver(model.denoiser, scheduler, steps).rollout(noise))
        row = {"figure": "sampler", "solver": name, "steps": steps, **overrides, "n": args.n,
               "sample_seconds": round(time.perf_counter() - start, 1), "data_fd": round(data.fd(feats), 3),
               "data_fd_ci": interval(feats, data.fd), "dist_gap": round(yard.dist_gap(feats), 3),
               "dist_gap_ci": interval(feats, yard.dist_gap)}
        label = (name, json.dumps(overrides))
        if label in previous:
            change = paired_bootstrap(previous[label][1], feats, statistic=data.fd, resamples=200)
            row["data_fd_change_from"] = [previous[label][0], round(change["change"], 3),
                                          [round(change["low"], 3), round(change["high"], 3)]]
        previous[label] = (steps, feats)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

"""The resolution of the yardstick on the embedded model, one JSON line each (docs/measuring.md).

    python bench/yardstick.py [--model M] [--ns 250,500,1000,2000,4000] [--sets 3] [--reference-n 10000]
    python bench/yardstick.py --floor-only --floor-n 4000   # the floor alone, at another n
    python bench/yardstick.py --model assets/digits-flow --floor-only --floor-sets 6   # + on the leaderboard's sets

On `--sets` independent held-out noise sets, for two samplers at NFE 10 (plain DDIM, uniform steps, and plain
DPM-Solver++ 2M on Align-Your-Steps steps), from the same noises:
- "paired": for each n, the 95 % paired-bootstrap interval of the change in distribution gap between them, its
  width against 10 % of DDIM-10's own distribution gap (the issue's bar: width < that), and the x0 gap's;
- "floor": the distribution gap of the reference sampler's own samples (other noises) and of pure noise;
- "floor_sets" (with `--floor-sets K`): the reference sampler's own distribution gap on each of the held-out sets
  1 … K that `bench/solvers.py` scores every method on, and their mean — the floor of the leaderboard's column (one
  set of n is one draw of it);
- "subsets": DDIM-10's distribution gap at the default n against random halves of the reference set (the spread
  that comes from the reference set's own size).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    from timetuner.core import Solver, load_model, reference_samples
    from timetuner.measuring import (
        DEFAULT_N,
        DEFAULT_REFERENCE_N,
        HeldOut,
        build_yardstick,
        feature_statistics,
        frechet_distance,
        paired_bootstrap,
        set_seed,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--ns", default="250,500,1000,2000,4000")
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--gap-n", type=int, default=256)
    parser.add_argument("--reference-n", type=int, default=DEFAULT_REFERENCE_N)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--floor-n", type=int, default=DEFAULT_N, help="samples of the floor's two sets")
    parser.add_argument("--floor-only", action="store_true", help="only the floor line (at --floor-n)")
    parser.add_argument("--floor-sets", type=int, default=0, help="also the floor on held-out sets 1 … this many")
    args = parser.parse_args()
    ns = [int(v) for v in args.ns.split(",")]

    model = load_model(args.model)
    den, base = model.denoiser, model.base_config
    yard = build_yardstick(model, lambda lo, hi: den, "dpm++", 100, args.reference_n, progress=False)
    # the two NFE-10 samplers of the paired lines (none for the floor alone, which a flow model can measure too)
    solvers = {} if args.floor_only else {"ddim": Solver.named(den, base, "ddim", None, 10),
                                          "dpm++/ays": Solver.named(den, base, "dpm++", "ays", 10)}
    default_feats = None
    held = HeldOut(model, set_seed(0))  # the held-out protocol: its sets, reference dpm++-100
    for s in range(0 if args.floor_only else args.sets):
        seed = set_seed(s)
        noise = held.noise(max(ns), seed)
        finals = {name: solver.rollout(noise) for name, solver in solvers.items()}
        feats = {name: yard.features(x) for name, x in finals.items()}
        ref = held.reference(den, noise[: args.gap_n], seed).clamp(-1, 1)
        gaps = {name: (x[: args.gap_n].clamp(-1, 1) - ref).pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
                for name, x in finals.items()}
        x0 = paired_bootstrap(gaps["ddim"], gaps["dpm++/ays"])
        for n in ns:
            a, b = feats["ddim"][:n], feats["dpm++/ays"][:n]
            change = paired_bootstrap(a, b, statistic=yard.dist_gap, resamples=200)
            width = change["high"] - change["low"]
            emit({"figure": "paired", "set": s, "seed": seed, "n": n, "dist_gap_ddim10": round(change["plain"], 3),
                  "dist_gap_dpmpp_ays10": round(change["tuned"], 3), "change": round(change["change"], 3),
                  "ci": [round(change["low"], 3), round(change["high"], 3)], "width": round(width, 3),
                  "width_over_10pct_of_ddim10": round(width / (0.1 * change["plain"]), 3),
                  "x0_gap_n": args.gap_n, "x0_gap_ddim10": round(x0["plain"], 5),
                  "x0_gap_dpmpp_ays10": round(x0["tuned"], 5),
                  "x0_width_over_10pct_of_ddim10": round((x0["high"] - x0["low"]) / (0.1 * x0["plain"]), 3)})
        if s == 0:
            default_feats = feats["ddim"][:DEFAULT_N]
    other = torch.randn((args.floor_n, *den.sample_shape), generator=torch.Generator().manual_seed(424242))
    own = yard.features(reference_samples(den, base, other, "dpm++", 100))
    noise_feats = yard.features(torch.randn((args.floor_n, *den.sample_shape)).clamp(-1, 1))
    emit({"figure": "floor", "n": args.floor_n, "reference_n": args.reference_n,
          "dist_gap_reference_sampler_other_noises": round(yard.dist_gap(own), 3),
          "kid_reference_sampler_other_noises": round(yard.dist_kid(own), 5),
          "dist_gap_pure_noise": round(yard.dist_gap(noise_feats), 3),
          "kid_pure_noise": round(yard.dist_kid(noise_feats), 5)})
    if args.floor_sets:
        own_gaps = [yard.dist_gap(yard.features(reference_samples(den, base, held.noise(args.floor_n, set_seed(s)),
                                                                  "dpm++", 100)))
                    for s in range(1, args.floor_sets + 1)]
        emit({"figure": "floor_sets", "n": args.floor_n, "reference_n": args.reference_n,
              "sets": list(range(1, args.floor_sets + 1)),
              "dist_gap_reference_sampler": [round(v, 3) for v in own_gaps],
              "mean": round(float(np.mean(own_gaps)), 3)})
    if args.floor_only:
        return
    rng = np.random.default_rng(0)
    values = []
    for _ in range(args.subsets):
        half = yard.reference[rng.choice(len(yard.reference), len(yard.reference) // 2, replace=False)]
        values.append(frechet_distance(default_feats, feature_statistics(half)))
    emit({"figure": "subsets", "n": DEFAULT_N, "subset_size": len(yard.reference) // 2, "subsets": args.subsets,
          "dist_gap_ddim10_full_set": round(yard.dist_gap(default_feats), 3),
          "mean": round(float(np.mean(values)), 3), "sd": round(float(np.std(values, ddof=1)), 3),
          "min": round(float(np.min(values)), 3), "max": round(float(np.max(values)), 3)})


if __name__ == "__main__":
    main()

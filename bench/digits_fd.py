"""Figures for the embedded digits model, one JSON line each (the numbers in assets/README.md).

    python bench/digits_fd.py [--model assets/digits-ddpm] [--n 1000]

Prints: the network forward time on 256 samples; FD (digits features, clean-fid) of DDIM samples at
1000/100/10 steps against the held-out digits; the floor (held-out vs training digits).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    from timetuner.assets import EMBEDDED_MODEL
    from timetuner.data import load_digits_tensor
    from timetuner.metrics import digits_fd
    from timetuner.solver import initial_noise, sample_images
    from timetuner.trajectories import make_scheduler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(EMBEDDED_MODEL))
    parser.add_argument("--n", type=int, default=1000, help="samples per FD")
    parser.add_argument("--steps", default="1000,100,10", help="DDIM step counts, comma-separated")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()

    unet = UNet2DModel.from_pretrained(f"{args.model}/unet").eval()
    base = DDPMScheduler.from_pretrained(f"{args.model}/scheduler").config
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
    print(json.dumps({"figure": "forward_256_seconds", "median": round(sorted(times)[10], 4),
                      "threads": torch.get_num_threads(), "params": sum(p.numel() for p in unet.parameters())}))

    test, train = load_digits_tensor("test")[0], load_digits_tensor("train")[0]
    print(json.dumps({"figure": "fd_floor_test_vs_train", "fd": round(digits_fd(test, "train"), 3),
                      "n": [len(test), len(train)]}))
    for steps in [int(s) for s in args.steps.split(",")]:
        noise = initial_noise(args.n, (unet.config.in_channels, size, size), torch.Generator().manual_seed(args.seed))
        start = time.perf_counter()
        images = sample_images(unet, make_scheduler("ddim", base), noise, steps, batch_size=1000)
        seconds = time.perf_counter() - start
        print(json.dumps({"figure": "fd_ddim_vs_test", "steps": steps, "n": args.n,
                          "fd": round(digits_fd(images, "test"), 3),
                          "fd_vs_train": round(digits_fd(images, "train"), 3),
                          "sample_seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()

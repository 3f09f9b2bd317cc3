"""Run under `accelerate launch` by tests/test_distributed.py: fits or trains as every process of a launch.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/distributed_run.py fit MODEL OUT
    ... tests/distributed_run.py train OUT

`fit`: each of `FITS` to OUT/NAME.safetensors (the main process writes them). `train`: a few steps of the adaptive
sampler, then every process writes a digest of its EMA weights and sampler state to OUT/rank-R.json, which must
agree across processes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

SMALL = dict(scheduler="ddim", samples=16, eval_samples=24, eval_gap_samples=16, reference_steps=8, reference_n=64,
             search_points=5, search_refine=3, force=True)
FITS = {
    "sequential-paper": dict(SMALL, nfe=3, objective="paper"),
    "parallel-paper": dict(SMALL, nfe=3, strategy="parallel", objective="paper"),
    "sequential-e2e": dict(SMALL, nfe=3, objective="e2e", e2e_iters=4),
}


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def train_config(out: str):
    from timetuner.trainers import TrainConfig

    return TrainConfig(out=out, preset="digits-tiny", steps=6, batch_size=8, checkpoint_every=3, log_every=3,
                       sample_n=4, sample_steps=2, warmup_steps=1, cpu=True, sampler="adaptive",
                       adaptive_update_every=2)


def main(what: str, *args: str) -> None:
    torch.set_num_threads(1)
    if what == "fit":
        from timetuner.fitting.api import fit

        model, out = args
        for name, options in FITS.items():
            fit(model, out=Path(out) / f"{name}.safetensors", progress=False, **options)
        return
    from timetuner.trainers.config import resolved
    from timetuner.trainers.loop import _Training, load_training_data

    (out,) = args
    config = resolved(train_config(out))
    run = _Training(config)
    data = load_training_data(config.data, config.resolution, config.channels).to(run.accelerator.device)
    while run.state.step < config.steps:
        run.step(data)
    sampler = run.sampler.state_dict()
    policy = [v for v in (sampler.get("policy") or {}).values() if torch.is_tensor(v)] + [sampler["buffer_y"]]
    record = {"step": run.state.step, "selected": sampler["selected"], "ema": digest(run.ema.shadow_params),
              "policy": digest(policy), "model": digest(run.accelerator.unwrap_model(run.unet).parameters())}
    Path(out, f"rank-{run.accelerator.process_index}.json").write_text(json.dumps(record))
    run.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])

"""A training run's folder: the files in it, the checks before a run may write there, checkpoints (accelerate's
state plus timetuner's own as safetensors + JSON, via a temp folder) and the diffusers pipeline it ends as."""


from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from timetuner.core.distributed import current
from timetuner.errors import UserError
from timetuner.files import save_tree, write_atomic
from timetuner.trainers.config import (
    TrainConfig,
)

CONFIG_FILE = "train_config.json"


LOG_FILE = "log.jsonl"


EXTRAS_FILE = "timetuner_state.safetensors"  # EMA, sampler, step counter, MDLRC: beside accelerate's own files


CHECKPOINTS = "checkpoints"


# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_MUST_MATCH = ("preset", "data", "resolution", "channels", "num_train_timesteps", "beta_schedule",
                     "prediction_type", "sampler", "weighting", "importance", "mdlrc", "mdlrc_compensation")


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
            and p.name.split("-", 1)[1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-", 1)[1]))


def check_output(config: TrainConfig) -> None:
    """Refuse to clobber another run, and `--resume` without a compatible checkpoint."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {config.out!r} is a file; accepted: a new or existing run folder")
    if config.resume:
        if not checkpoint_dirs(out):
            raise UserError(f"--resume: no checkpoint under {str(out / CHECKPOINTS)!r}; accepted: the --out "
                            "folder of an earlier run that saved a checkpoint")
        saved_path = out / CONFIG_FILE
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())
            for key in RESUME_MUST_MATCH:
                if key in saved and saved[key] != getattr(config, key):
                    raise UserError(f"--resume: --{key.replace('_', '-')} {getattr(config, key)!r} differs from "
                                    f"the checkpointed run's {saved[key]!r}; accepted: the same value")
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"--out {config.out!r} already holds files; accepted: an empty or new folder, "
                        "or --resume to continue that run")


def write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def save_pipeline(unet, noise_scheduler, out: Path) -> None:
    """Write the diffusers pipeline files into `out` via a temp folder, so no half-written model remains."""
    from diffusers import DDPMPipeline

    tmp = Path(tempfile.mkdtemp(prefix=".pipeline-", dir=out))
    try:
        DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(tmp)
        for entry in tmp.iterdir():
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def step_of(line: str) -> float:
    """The step of a log line; infinity for a line a kill cut short (so it is dropped on resume)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def check_output_once(config: TrainConfig) -> None:
    """`check_output` on the main process, its verdict on all (one process must not see the other's new run)."""
    world = current(config.cpu)
    problem = None
    if world.is_main:
        try:
            check_output(config)
        except UserError as err:
            problem = str(err)
    problem = world.broadcast(problem)
    if problem is not None:
        raise UserError(problem)


def save_checkpoint(accelerator, out: Path, step: int, keep: int, extras: dict) -> None:
    """`accelerator.save_state` and `extras` (EXTRAS_FILE) into checkpoints/checkpoint-STEP via a temp folder; keep
    the newest `keep`."""
    root = out / CHECKPOINTS
    final = root / f"checkpoint-{step}"
    if final.exists():
        return
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_tree(tmp / EXTRAS_FILE, extras)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()

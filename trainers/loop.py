"""The training loop behind `timetuner train`: accelerate, EMA, checkpoints and resume, pipeline output.

    from timetuner.trainers import TrainConfig, train
    train(TrainConfig(out="runs/digits", preset="digits", steps=20_000))

The run folder ends up as a diffusers pipeline (`DDPMPipeline.from_pretrained(out)` loads it, with the EMA
weights as its UNet) beside `train_config.json`, `log.jsonl`, `samples.png` and `checkpoints/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from timetuner.core.data import load_training_data
from timetuner.core.solver import initial_noise, sample_images
from timetuner.errors import UserError
from timetuner.files import load_tree, write_atomic
from timetuner.measuring.plots import save_distribution_plot, save_grid
from timetuner.trainers.checkpoints import (
    CONFIG_FILE,
    EXTRAS_FILE,
    LOG_FILE,
    check_output_once,
    checkpoint_dirs,
    save_checkpoint,
    save_pipeline,
    step_of,
    write_json_atomic,
)
from timetuner.trainers.config import (
    TrainConfig,
    build_sampler,
    build_weighting,
    make_mdlrc,
    noise_scheduler_for,
    resolved,
)
from timetuner.trainers.objectives import make_objective
from timetuner.trainers.presets import get_preset

LOSS_BUCKETS = 10


@dataclass
class TrainState:
    """The step counter and the logged running loss, checkpointed with the model."""

    step: int = 0
    loss_ema: float | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "loss_ema": self.loss_ema}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss_ema = int(state["step"]), state.get("loss_ema")


def _probe(model, objective, config: TrainConfig):
    """probe(x0, t, noise) → per-sample training loss without gradient, in chunks of the batch size."""

    def probe(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for a, b, c in zip(x0.split(config.batch_size), t.split(config.batch_size),
                               noise.split(config.batch_size), strict=True):
                pred = model(objective.noisy(a, c, b), objective.network_time(b)).sample
                out.append((pred.float() - objective.target(a, c, b).float()).pow(2).mean(dim=(1, 2, 3)))
        return torch.cat(out)

    return probe


def train(config: TrainConfig, on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None) -> Path:
    """Train a UNet2DModel DDPM as `config` says; return the run folder (a diffusers pipeline).

    `on_checkpoint(step, ema_unet)`, if given, runs on the main process after every checkpoint with a copy
    of the EMA model in eval mode (e.g. to measure FD against iteration, as `bench/train.py` does).
    """
    from tqdm.auto import tqdm

    config = resolved(config)
    check_output_once(config)
    data = load_training_data(config.data, config.resolution, config.channels)  # errors before any output
    run = _Training(config)
    data = data.to(run.accelerator.device)
    progress = tqdm(total=config.steps, initial=min(run.state.step, config.steps), desc="train",
                    disable=not run.accelerator.is_main_process, dynamic_ncols=True)
    while run.state.step < config.steps:
        per_sample, t, value = run.step(data)
        run.losses.add(t, per_sample, value)
        progress.update(1)
        progress.set_postfix(loss=f"{run.losses.running:.4f}", refresh=False)
        if run.state.step % config.log_every == 0 or run.state.step == config.steps:
            run.log(value)
        if run.state.step % config.checkpoint_every == 0 or run.state.step == config.steps:
            run.checkpoint(on_checkpoint)
    progress.close()
    run.finish()
    return Path(config.out)


class _Losses:
    """Per-timestep-bucket loss sums since the last log line, and the running mean of the loss."""

    def __init__(self, config: TrainConfig, device):
        self.buckets, self.timesteps = LOSS_BUCKETS, config.num_train_timesteps
        self.sum = torch.zeros(LOSS_BUCKETS, device=device)
        self.count = torch.zeros(LOSS_BUCKETS, device=device)
        self.running = None

    def add(self, t: torch.Tensor, per_sample: torch.Tensor, value: float) -> None:
        bucket = (t * self.buckets // self.timesteps).clamp(max=self.buckets - 1)
        self.sum.index_add_(0, bucket, per_sample.detach().float())
        self.count.index_add_(0, bucket, torch.ones_like(per_sample, dtype=torch.float32))
        self.running = value if self.running is None else 0.98 * self.running + 0.02 * value


class _Training:
    """One run's model, optimiser, EMA, sampler and accelerator, built (or resumed) in a fixed order so that the
    same seed gives the same run; `step` is one training iteration."""

    def __init__(self, config: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers import UNet2DModel
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        self.config, self.out = config, Path(config.out)
        # No GPU: under `accelerate launch` the processes still form one run, over gloo (MULTI_CPU).
        self.accelerator = accelerator = Accelerator(cpu=config.cpu or not torch.cuda.is_available(),
                                                     mixed_precision=config.mixed_precision,
                                                     project_config=ProjectConfiguration(project_dir=str(self.out)))
        if accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / CONFIG_FILE, {**dataclasses.asdict(config),
                                                        "num_processes": accelerator.num_processes})
        accelerator.wait_for_everyone()
        torch.manual_seed(config.seed)  # model initialisation
        unet = UNet2DModel(**get_preset(config.preset).unet_config(config.resolution, config.channels))
        self.noise_scheduler = noise_scheduler_for(config)
        self.objective = make_objective(config.objective, self.noise_scheduler, config.prediction_type)
        self.sampler = build_sampler(config, self.noise_scheduler)
        self.weighting = build_weighting(config)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        lr_scheduler = get_scheduler(
            "cosine" if config.lr_schedule == "cosine" else "constant_with_warmup", optimizer,
            num_warmup_steps=config.warmup_steps * accelerator.num_processes,
            num_training_steps=config.steps * accelerator.num_processes,
        )
        self.ema = EMAModel(unet.parameters(), decay=config.ema_decay, model_cls=UNet2DModel, model_config=unet.config)
        self.state = TrainState()
        self.unet, self.optimizer, self.lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        self.mdlrc = make_mdlrc(self.optimizer, config) if config.mdlrc else None
        self.ema.to(accelerator.device)
        # Saved beside accelerate's state as safetensors + JSON (`files.save_tree`), not registered with accelerate,
        # whose custom-object checkpoints are pickles it loads with weights_only=False.
        self.extras = {"ema": self.ema, "sampler": self.sampler, "state": self.state,
                       **({"mdlrc": self.mdlrc} if self.mdlrc else {})}
        if hasattr(self.sampler, "bind"):  # learned samplers score the model's loss before and after an update
            self.sampler.bind(_probe(accelerator.unwrap_model(self.unet), self.objective, config))
        if config.resume:
            self._resume(checkpoint_dirs(self.out)[-1])
        if self.mdlrc:
            self.mdlrc.step(self.state.step)
        self.losses = _Losses(config, accelerator.device)
        self.losses.running = self.state.loss_ema
        self.started = time.perf_counter()

    def _resume(self, latest: Path) -> None:
        """Model, optimiser, LR scheduler and RNG states (accelerate), then EMA, sampler, step counter and MDLRC;
        the log loses the lines written after the checkpoint (the resumed run writes them again, identically)."""
        accelerator = self.accelerator
        if not (latest / EXTRAS_FILE).is_file():
            raise UserError(f"--resume: {str(latest)!r} has no {EXTRAS_FILE} (written by an older timetuner, whose "
                            "checkpoints were pickles); accepted: a checkpoint of this version, or a fresh --out")
        accelerator.load_state(str(latest))
        extras = load_tree(latest / EXTRAS_FILE)
        for name, obj in self.extras.items():
            obj.load_state_dict(extras[name])
        self.ema.to(accelerator.device)
        log = self.out / LOG_FILE
        if accelerator.is_main_process and log.is_file():
            kept = [line for line in log.read_text().splitlines(keepends=True) if step_of(line) <= self.state.step]
            write_atomic(log, lambda tmp: Path(tmp).write_text("".join(kept)))
        accelerator.wait_for_everyone()
        accelerator.print(f"resumed from {latest} at step {self.state.step}")

    def step(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One iteration: draw a batch, timesteps and noise, take the optimiser step; (per-sample loss, t, loss)."""
        config, accelerator, step = self.config, self.accelerator, self.state.step
        x0, noise, sampler_generator = self.draw(data, step)
        t, w_sampler = self.sampler.sample(config.batch_size, step, sampler_generator, x0=x0)
        t, w_sampler = t.to(x0.device), w_sampler.to(x0.device)
        objective = self.objective
        noisy = objective.noisy(x0, noise, t)
        with accelerator.accumulate(self.unet):
            pred = self.unet(noisy, objective.network_time(t)).sample
            target = objective.target(x0, noise, t)
            per_sample = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
            loss = (w_sampler * self.weighting(t, self.noise_scheduler).to(x0.device) * per_sample).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.grad_clip > 0:
                accelerator.clip_grad_norm_(self.unet.parameters(), config.grad_clip)
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.mdlrc:
                self.mdlrc.step(step + 1)
            self.optimizer.zero_grad(set_to_none=True)
        self.sampler.update(t, per_sample.detach(), step)
        self.ema.step(accelerator.unwrap_model(self.unet).parameters())
        self.state.step += 1
        return per_sample, t, loss.item()

    def draw(self, data: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
        """The batch, the noise and the timestep sampler's generator of `step`: (x0, ε, generator).

        Each comes from its own generator keyed by (seed, step, process, stream), so a resumed run sees exactly the
        draws of the uninterrupted run, and every sampler and weighting sees the same batches and noises at a given
        (seed, step): a sampler's draws cannot shift the noise, which a paired comparison of methods needs.
        """
        config, batch = self.config, self.config.batch_size
        data_gen, noise_gen, sampler_gen = (
            torch.Generator(device="cpu").manual_seed(
                ((config.seed * 1_000_003 + step) * 4099 + self.accelerator.process_index) * 3 + stream)
            for stream in range(3))
        idx = torch.randint(0, data.shape[0], (batch,), generator=data_gen)
        x0 = data[idx.to(data.device)]
        if config.hflip:
            flip = torch.rand(batch, generator=data_gen) < 0.5
            x0 = torch.where(flip.to(x0.device)[:, None, None, None], x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=noise_gen).to(x0.device)
        return x0, noise, sampler_gen

    def log(self, value: float) -> None:
        """Append a line to log.jsonl: loss, learning rate, loss per timestep bucket, the sampler's mass per bucket."""
        config, accelerator, losses, step = self.config, self.accelerator, self.losses, self.state.step
        sums, counts = accelerator.reduce(losses.sum, "sum"), accelerator.reduce(losses.count, "sum")
        if accelerator.is_main_process:
            total = config.num_train_timesteps
            record = {
                "step": step, "loss": value, "loss_ema": losses.running, "lr": self.lr_scheduler.get_last_lr()[0],
                "seconds": round(time.perf_counter() - self.started, 2),
                "sampler_bucket_mass": [round(float(m), 6) for m in
                                        self.sampler.probabilities(step).reshape(LOSS_BUCKETS, -1).sum(1)]
                if total % LOSS_BUCKETS == 0 else None,
                **({"beta1": self.optimizer.param_groups[0]["betas"][0]} if self.mdlrc else {}),
                **({"sampler_reward": self.sampler.last_reward}
                   if getattr(self.sampler, "last_reward", None) is not None else {}),
                "bucket_loss": [round(float(s / c), 6) if c > 0 else None for s, c in zip(sums, counts, strict=True)],
                self.objective.level_name: [round(float(v), 6) for v in self.objective.level_at(torch.tensor(
                    [min(i * total // LOSS_BUCKETS, total - 1) for i in range(LOSS_BUCKETS)]))],
            }
            with (self.out / LOG_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
        losses.sum.zero_()
        losses.count.zero_()

    def ema_model(self) -> torch.nn.Module:
        """A copy of the network with the EMA weights, in eval mode."""
        from diffusers import UNet2DModel

        model = UNet2DModel.from_config(self.accelerator.unwrap_model(self.unet).config)
        self.ema.copy_to(model.parameters())
        return model.eval()

    def checkpoint(self, on_checkpoint) -> None:
        """Save a resumable checkpoint, run the caller's hook on the EMA model, redraw sampler.png."""
        config, step = self.config, self.state.step
        self.state.loss_ema = self.losses.running
        save_checkpoint(self.accelerator, self.out, step, config.keep_checkpoints,
                         {name: obj.state_dict() for name, obj in self.extras.items()})
        if on_checkpoint is not None and self.accelerator.is_main_process:
            on_checkpoint(step, self.ema_model().to(self.accelerator.device))
        if self.accelerator.is_main_process:
            save_distribution_plot(self.sampler.probabilities(step), self.weighting(
                torch.arange(config.num_train_timesteps), self.noise_scheduler), self.out / "sampler.png",
                f"{config.sampler} + {config.weighting}, step {step}")

    def finish(self) -> None:
        """Write the EMA model as a diffusers pipeline and its sample grid (main process), end the run."""
        from diffusers import DDIMScheduler

        config, accelerator = self.config, self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = self.ema_model()
            save_pipeline(final, self.noise_scheduler, self.out)
            if config.sample_n > 0:  # DDIM for a DDPM model, the saved FlowMatchEuler for a flow one
                gen = torch.Generator(device="cpu").manual_seed(config.seed)
                noise = initial_noise(config.sample_n, (config.channels, config.resolution, config.resolution), gen)
                sampler = type(self.noise_scheduler) if config.objective == "flow" else DDIMScheduler
                images = sample_images(final.to(accelerator.device), sampler.from_config(self.noise_scheduler.config),
                                       noise, config.sample_steps)
                save_grid(images, self.out / "samples.png", nrow=int(math.ceil(math.sqrt(config.sample_n))))
        accelerator.wait_for_everyone()
        accelerator.end_training()

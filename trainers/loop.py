"""The training loop behind `timetuner train`: accelerate, EMA, checkpoints and resume, pipeline output.

    from timetuner.trainers import TrainConfig, train
    train(TrainConfig(out="runs/digits", preset="digits", steps=20_000))

The run folder ends up as a diffusers pipeline (`DDPMPipeline.from_pretrained(out)` loads it, with the EMA
weights as its UNet) beside `train_config.json`, `log.jsonl`, `samples.png` and `checkpoints/`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from timetuner.data import load_training_data
from timetuner.errors import UserError, check_choice
from timetuner.files import write_atomic
from timetuner.trainers.mdlrc import MDLRC
from timetuner.trainers.presets import get_preset
from timetuner.trainers.samplers import SAMPLERS, make_sampler, speed_setting
from timetuner.trainers.weighting import make_weighting

CONFIG_FILE = "train_config.json"
LOG_FILE = "log.jsonl"
EXTRAS_FILE = "timetuner_state.safetensors"  # EMA, sampler, step counter, MDLRC: beside accelerate's own files
CHECKPOINTS = "checkpoints"
LOSS_BUCKETS = 10
# Settings a resumed run must share with the run that wrote the checkpoint.
RESUME_MUST_MATCH = ("preset", "data", "resolution", "channels", "num_train_timesteps", "beta_schedule",
                     "prediction_type", "sampler", "weighting", "importance", "mdlrc", "mdlrc_compensation")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; written to `train_config.json` beside its output."""

    out: str
    preset: str = "digits"
    data: str = "digits"  # "digits" or an image folder
    resolution: int | None = None  # None: the preset's default
    channels: int | None = None  # None: 1 for digits, 3 for image folders
    steps: int = 20_000
    batch_size: int | None = None  # per process; None: the preset's default
    learning_rate: float | None = None  # None: the preset's default
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # "constant" or "cosine" (after warm-up)
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    sampler: str = "uniform"
    weighting: str | None = None  # None: "caw" with the speed sampler (the published method), "none" otherwise
    importance: bool = False  # weight 1/(T·p(t)): non-uniform sampling as an unbiased uniform objective
    # Method hyperparameters: a field "<name>_<kwarg>" is passed as <kwarg> to the sampler or weighting <name>.
    speed_setting: str = "paper"  # the published values the None fields below take (samplers.SPEED_SETTINGS)
    speed_k: float | None = None
    speed_tau: int | None = None
    speed_r: float | None = None  # set: τ from SpeeD's threshold formula instead of speed_tau
    speed_dual: bool | None = None
    caw_lam: float | None = None
    caw_tau: int | None = None  # None: speed_tau (or τ from speed_r)
    adaptive_update_every: int = 40
    adaptive_subset: int = 3
    adaptive_buffer: int = 20
    adaptive_lr: float = 1e-2
    adaptive_entropy: float = 1e-2
    adaptive_probe_stride: int = 1
    adaptive_reward: str = "vlb"
    clts_mu: float = 0.3
    clts_sigma: float = 0.2
    clts_lambda_start: float = 0.0
    clts_lambda_end: float = 0.8
    clts_ramp_steps: int = 4000  # in steps, never a fraction of --steps (samplers.CLTSSampler)
    lognormal_mean: float = -1.2
    lognormal_std: float = 1.2
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    min_snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    mdlrc: bool = False
    mdlrc_beta1_end: float = 0.5
    mdlrc_steps: int = 8000  # in steps, never a fraction of --steps (mdlrc.MDLRC)
    mdlrc_compensation: bool = True  # False: the momentum decay alone (an ablation)
    hflip: bool = False
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 50
    sample_n: int = 64
    sample_steps: int = 100  # DDIM steps for the final sample grid
    seed: int = 0
    resume: bool = False
    cpu: bool = False
    mixed_precision: str = "no"


@dataclass
class TrainState:
    """The step counter and the logged running loss, checkpointed with the model."""

    step: int = 0
    loss_ema: float | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "loss_ema": self.loss_ema}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss_ema = int(state["step"]), state.get("loss_ema")


def _resolved(config: TrainConfig) -> TrainConfig:
    """Fill the preset-dependent defaults and check every setting; raises UserError for a bad one."""
    preset = get_preset(config.preset)
    resolution = config.resolution or preset.resolution
    preset.check_resolution(config.preset, resolution)
    channels = config.channels or (1 if config.data == "digits" else 3)
    for name, value, low in (("--steps", config.steps, 1), ("--batch-size", config.batch_size, 1),
                             ("--checkpoint-every", config.checkpoint_every, 1),
                             ("--keep-checkpoints", config.keep_checkpoints, 1),
                             ("--log-every", config.log_every, 1), ("--sample-n", config.sample_n, 0),
                             ("--sample-steps", config.sample_steps, 1), ("--warmup-steps", config.warmup_steps, 0)):
        if value is not None and value < low:
            raise UserError(f"{name} {value} is invalid; accepted: integers >= {low}")
    if config.learning_rate is not None and not config.learning_rate > 0:
        raise UserError(f"--learning-rate {config.learning_rate} is invalid; accepted: a positive number")
    if not 0.0 <= config.ema_decay < 1.0:
        raise UserError(f"--ema-decay {config.ema_decay} is invalid; accepted: 0 <= decay < 1")
    check_choice("--lr-schedule", config.lr_schedule, {"constant", "cosine"})
    check_choice("--beta-schedule", config.beta_schedule, {"linear", "scaled_linear", "squaredcos_cap_v2"})
    check_choice("--prediction-type", config.prediction_type, {"epsilon", "v_prediction", "sample"})
    check_choice("--mixed-precision", config.mixed_precision, {"no", "fp16", "bf16"})
    config = _method_defaults(config)
    build_sampler(config, _noise_scheduler(config))
    build_weighting(config)
    if config.mdlrc:
        _mdlrc(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]), config)
    return dataclasses.replace(
        config,
        resolution=resolution,
        channels=channels,
        batch_size=config.batch_size or preset.batch_size,
        learning_rate=config.learning_rate or preset.learning_rate,
    )


def _mdlrc(optimizer: torch.optim.Optimizer, config: TrainConfig) -> MDLRC:
    return MDLRC(optimizer, config.mdlrc_steps, config.mdlrc_beta1_end, compensation=config.mdlrc_compensation)


def _method_options(config: TrainConfig, name: str) -> dict:
    """The config fields "<name>_<kwarg>" as {kwarg: value} (name with '-' read as '_')."""
    prefix = name.replace("-", "_") + "_"
    return {f[len(prefix):]: getattr(config, f) for f in TrainConfig.__dataclass_fields__ if f.startswith(prefix)}


def _method_defaults(config: TrainConfig) -> TrainConfig:
    """Fill the method settings whose default depends on others (SpeeD's published setting, CAW's τ and the
    weighting that goes with SpeeD)."""
    published = speed_setting(config.speed_setting)
    speed_tau = config.speed_tau if config.speed_tau is not None else published["tau"]
    return dataclasses.replace(
        config,
        weighting=config.weighting or ("caw" if config.sampler == "speed" else "none"),
        speed_k=config.speed_k if config.speed_k is not None else published["k"],
        speed_tau=speed_tau,
        speed_dual=config.speed_dual if config.speed_dual is not None else published["dual"],
        caw_lam=config.caw_lam if config.caw_lam is not None else published["lam"],
        caw_tau=config.caw_tau if config.caw_tau is not None else (
            _speed_threshold(config) if config.speed_r is not None else speed_tau),
    )


def _speed_threshold(config: TrainConfig) -> int:
    from timetuner.trainers.samplers import schedule_of, speed_threshold

    return speed_threshold(schedule_of(_noise_scheduler(config), config.num_train_timesteps), config.speed_r)


def build_sampler(config: TrainConfig, noise_scheduler):
    """The timestep sampler `config` names, with its hyperparameters from the config."""
    config = _method_defaults(config)
    cls = SAMPLERS[check_choice("--sampler", config.sampler, SAMPLERS)]
    accepted = inspect.signature(cls).parameters
    extra = {"noise_scheduler": noise_scheduler, "importance": config.importance, "seed": config.seed}
    options = {**{k: v for k, v in extra.items() if k in accepted}, **_method_options(config, config.sampler)}
    return make_sampler(config.sampler, config.num_train_timesteps, **options)


def build_weighting(config: TrainConfig):
    """The loss weighting `config` names, with its hyperparameters from the config."""
    config = _method_defaults(config)
    return make_weighting(config.weighting, **_method_options(config, config.weighting))


def checkpoint_dirs(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint-")
            and p.name.split("-", 1)[1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("-", 1)[1]))


def _check_output(config: TrainConfig) -> None:
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


def _noise_scheduler(config: TrainConfig):
    from diffusers import DDPMScheduler

    # clip_sample=False: DDIM built from a config that clips x0 at every step recomputes ε from the clipped x0,
    # which at small σ adds haze that grows with the step count — the embedded model's 1000-step DDIM scored worse
    # than 100 steps for that reason alone (assets/README.md). The solver's limit must be the model's ODE solution.
    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=False)


def _target(noise_scheduler, x0, noise, t, prediction_type):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(x0, noise, t)
    return x0


def _probe(model, noise_scheduler, config: TrainConfig):
    """probe(x0, t, noise) → per-sample training loss without gradient, in chunks of the batch size."""

    def probe(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for a, b, c in zip(x0.split(config.batch_size), t.split(config.batch_size),
                               noise.split(config.batch_size), strict=True):
                pred = model(noise_scheduler.add_noise(a, c, b), b).sample
                target = _target(noise_scheduler, a, c, b, config.prediction_type)
                out.append((pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3)))
        return torch.cat(out)

    return probe


def _write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def _save_pipeline(unet, noise_scheduler, out: Path) -> None:
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


def _step_of(line: str) -> float:
    """The step of a log line; infinity for a line a kill cut short (so it is dropped on resume)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _check_output_once(config: TrainConfig) -> None:
    """`_check_output` on the main process, its verdict on all (one process must not see the other's new run)."""
    from timetuner.distributed import current

    world = current(config.cpu)
    problem = None
    if world.is_main:
        try:
            _check_output(config)
        except UserError as err:
            problem = str(err)
    problem = world.broadcast(problem)
    if problem is not None:
        raise UserError(problem)


def train(config: TrainConfig, on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None) -> Path:
    """Train a UNet2DModel DDPM as `config` says; return the run folder (a diffusers pipeline).

    `on_checkpoint(step, ema_unet)`, if given, runs on the main process after every checkpoint with a copy
    of the EMA model in eval mode (e.g. to measure FD against iteration, as `bench/train.py` does).
    """
    from tqdm.auto import tqdm

    config = _resolved(config)
    _check_output_once(config)
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
            _write_json_atomic(self.out / CONFIG_FILE, {**dataclasses.asdict(config),
                                                        "num_processes": accelerator.num_processes})
        accelerator.wait_for_everyone()
        torch.manual_seed(config.seed)  # model initialisation
        unet = UNet2DModel(**get_preset(config.preset).unet_config(config.resolution, config.channels))
        self.noise_scheduler = _noise_scheduler(config)
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
        self.mdlrc = _mdlrc(self.optimizer, config) if config.mdlrc else None
        self.ema.to(accelerator.device)
        # Saved beside accelerate's state as safetensors + JSON (`files.save_tree`), not registered with accelerate,
        # whose custom-object checkpoints are pickles it loads with weights_only=False.
        self.extras = {"ema": self.ema, "sampler": self.sampler, "state": self.state,
                       **({"mdlrc": self.mdlrc} if self.mdlrc else {})}
        if hasattr(self.sampler, "bind"):  # learned samplers score the model's loss before and after an update
            self.sampler.bind(_probe(accelerator.unwrap_model(self.unet), self.noise_scheduler, config))
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
        from timetuner.files import load_tree, write_atomic

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
            kept = [line for line in log.read_text().splitlines(keepends=True) if _step_of(line) <= self.state.step]
            write_atomic(log, lambda tmp: Path(tmp).write_text("".join(kept)))
        accelerator.wait_for_everyone()
        accelerator.print(f"resumed from {latest} at step {self.state.step}")

    def step(self, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One iteration: draw a batch, timesteps and noise, take the optimiser step; (per-sample loss, t, loss)."""
        config, accelerator, step = self.config, self.accelerator, self.state.step
        x0, noise, sampler_generator = self.draw(data, step)
        t, w_sampler = self.sampler.sample(config.batch_size, step, sampler_generator, x0=x0)
        t, w_sampler = t.to(x0.device), w_sampler.to(x0.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        with accelerator.accumulate(self.unet):
            pred = self.unet(noisy, t).sample
            target = _target(self.noise_scheduler, x0, noise, t, config.prediction_type)
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
            total, alphas = config.num_train_timesteps, self.noise_scheduler.alphas_cumprod
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
                "alpha_bar_at_bucket_edges": [round(float(alphas[min(i * total // LOSS_BUCKETS, total - 1)]), 6)
                                              for i in range(LOSS_BUCKETS)],
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
        from timetuner.plots import save_distribution_plot

        config, step = self.config, self.state.step
        self.state.loss_ema = self.losses.running
        _save_checkpoint(self.accelerator, self.out, step, config.keep_checkpoints,
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

        from timetuner.plots import save_grid
        from timetuner.solver import initial_noise, sample_images

        config, accelerator = self.config, self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final = self.ema_model()
            _save_pipeline(final, self.noise_scheduler, self.out)
            if config.sample_n > 0:
                gen = torch.Generator(device="cpu").manual_seed(config.seed)
                noise = initial_noise(config.sample_n, (config.channels, config.resolution, config.resolution), gen)
                ddim = DDIMScheduler.from_config(self.noise_scheduler.config)
                images = sample_images(final.to(accelerator.device), ddim, noise, config.sample_steps)
                save_grid(images, self.out / "samples.png", nrow=int(math.ceil(math.sqrt(config.sample_n))))
        accelerator.wait_for_everyone()
        accelerator.end_training()


def _save_checkpoint(accelerator, out: Path, step: int, keep: int, extras: dict) -> None:
    """`accelerator.save_state` and `extras` (EXTRAS_FILE) into checkpoints/checkpoint-STEP via a temp folder; keep
    the newest `keep`."""
    from timetuner.files import save_tree

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

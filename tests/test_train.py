"""The training loop and `timetuner train`: output pipeline, logs, resume, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from timetuner.cli.main import app
from timetuner.errors import UserError
from timetuner.trainers import train
from timetuner.trainers.loop import TrainConfig, checkpoint_dirs

runner = CliRunner()


def test_run_folder_is_a_ddpm_pipeline_that_samples(tiny_run):
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(tiny_run)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    assert (tiny_run / "samples.png").is_file()
    config = json.loads((tiny_run / "train_config.json").read_text())
    assert config["preset"] == "digits-tiny" and config["steps"] == 20 and config["resolution"] == 8
    assert [p.name for p in checkpoint_dirs(tiny_run)] == ["checkpoint-10", "checkpoint-20"]


def test_log_has_loss_per_timestep_bucket(tiny_run):
    records = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    buckets = records[-1]["bucket_loss"]
    assert len(buckets) == 10
    assert all(b is None or b > 0 for b in buckets) and any(b is not None for b in buckets)


def test_saved_unet_holds_the_ema_weights(tiny_run):
    final = load_file(tiny_run / "unet" / "diffusion_pytorch_model.safetensors")
    raw = load_file(tiny_run / "checkpoints" / "checkpoint-20" / "model.safetensors")
    assert final.keys() == raw.keys()
    assert any(not torch.equal(final[k], raw[k]) for k in final)


def test_resume_continues_step_counter_and_optimizer_state(tmp_path):
    straight = train(tiny_config(tmp_path / "straight"))
    half = train(tiny_config(tmp_path / "resumed", steps=10))
    resumed = train(tiny_config(tmp_path / "resumed", steps=20, resume=True))
    assert resumed == half
    ckpt_a, ckpt_b = straight / "checkpoints" / "checkpoint-20", resumed / "checkpoints" / "checkpoint-20"
    opt_a = torch.load(ckpt_a / "optimizer.bin", weights_only=True)
    opt_b = torch.load(ckpt_b / "optimizer.bin", weights_only=True)
    # AdamW's own counter carried on from 10 to 20: the moments were restored, not restarted.
    assert {float(s["step"]) for s in opt_b["state"].values()} == {20.0}
    for key in opt_a["state"][0]:
        assert torch.equal(opt_a["state"][0][key], opt_b["state"][0][key]), key
    # Same seeds, same batches: the resumed run ends bit-identical to the uninterrupted one.
    weights_a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    weights_b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20]


@pytest.mark.parametrize(
    "method",
    [dict(sampler="speed", weighting="caw", speed_dual=True),
     dict(sampler="adaptive", weighting="min-snr", adaptive_update_every=3, adaptive_probe_stride=100),
     dict(sampler="clts", clts_ramp_steps=15, mdlrc=True, mdlrc_steps=20)],
    ids=["speed+caw", "adaptive+min-snr", "clts+mdlrc"],
)
def test_resume_restores_sampler_and_mdlrc_state(tmp_path, method):
    """A run interrupted at a checkpoint and resumed ends bit-identical: learned sampler state is saved too."""
    straight = train(tiny_config(tmp_path / "straight", **method))
    train(tiny_config(tmp_path / "resumed", steps=10, **method))
    resumed = train(tiny_config(tmp_path / "resumed", steps=20, resume=True, **method))
    weights_a = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    weights_b = load_file(resumed / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    log = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert abs(sum(log[-1]["sampler_bucket_mass"]) - 1) < 1e-5  # rounded to 6 places
    assert (resumed / "sampler.png").is_file()
    if method.get("mdlrc"):
        assert log[-1]["beta1"] == pytest.approx(0.5)  # decayed over its 20 steps: 0.9 → 0.5
    if method["sampler"] == "adaptive":
        assert "sampler_reward" in log[-1]


def test_cli_train_finishes(tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["train", "--preset", "digits-tiny", "--steps", "4", "--out", str(out),
                                 "--batch-size", "8", "--sample-n", "4", "--sample-steps", "2", "--cpu"])
    assert result.exit_code == 0, result.output
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()


def _write_png(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--preset", "huge"], "--preset 'huge'"),
        (["--data", "{tmp}/missing"], "missing"),
        (["--data", "{tmp}/empty"], "holds no images"),
        (["--data", "{tmp}/bad"], "broken.png"),
        (["--preset", "digits", "--resolution", "10"], "--resolution 10"),
        (["--resume"], "--resume"),
        (["--sampler", "magic"], "--sampler 'magic'"),
        (["--steps", "0"], "--steps 0"),
        (["--sampler", "speed", "--speed-k", "0"], "--speed-k 0"),
        (["--sampler", "speed", "--speed-k", "1"], "--speed-k 1.0"),
        (["--sampler", "speed", "--speed-tau", "1001"], "--speed-tau 1001"),
        (["--sampler", "speed", "--speed-tau", "0"], "--speed-tau 0"),
        (["--sampler", "speed", "--speed-setting", "cifar"], "--speed-setting 'cifar'"),
        (["--sampler", "speed", "--caw-lambda", "1.5"], "--caw-lambda 1.5"),
        (["--weighting", "caw", "--caw-tau", "0"], "--caw-tau 0"),
        (["--sampler", "clts", "--clts-ramp-steps", "0"], "--clts-ramp-steps 0"),
        (["--mdlrc", "--mdlrc-steps", "0"], "--mdlrc-steps 0"),
        (["--weighting", "caw", "--caw-lambda", "0.4"], "--caw-lambda 0.4"),
        (["--weighting", "min-snr", "--min-snr-gamma", "0"], "--min-snr-gamma 0"),
        (["--weighting", "p2", "--p2-gamma", "-1"], "--p2-gamma -1"),
        (["--sampler", "clts", "--clts-lambda-end", "1.5"], "--clts-lambda-end 1.5"),
        (["--sampler", "adaptive", "--adaptive-update-every", "0"], "--adaptive-update-every 0"),
        (["--mdlrc", "--mdlrc-beta1-end", "1"], "--mdlrc-beta1-end 1"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_leaves_no_output(tmp_path, args, needle):
    (tmp_path / "empty").mkdir()
    _write_png(tmp_path / "bad" / "ok.png")
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    result = runner.invoke(app, ["train", "--out", str(out), "--steps", "2", *args] if "--steps" not in args
                           else ["train", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert not out.exists()


def test_out_folder_of_another_run_is_not_clobbered(tiny_run):
    with pytest.raises(UserError, match="already holds files"):
        train(TrainConfig(out=str(tiny_run), preset="digits-tiny", steps=1))


def test_resume_refuses_a_different_architecture(tiny_run):
    with pytest.raises(UserError, match="--preset 'digits'"):
        train(TrainConfig(out=str(tiny_run), preset="digits", steps=30, resume=True))


def test_clts_and_mdlrc_schedules_at_a_step_do_not_depend_on_the_run_length(tmp_path):
    """Schedules are set in steps: at step s a 2,000-step and a 50,000-step run sample and step alike."""
    from diffusers import DDPMScheduler

    from timetuner.trainers.config import build_sampler, make_mdlrc

    runs = [TrainConfig(out="unused", sampler="clts", mdlrc=True, steps=steps) for steps in (2000, 50_000)]
    samplers = [build_sampler(c, DDPMScheduler(num_train_timesteps=1000)) for c in runs]
    mdlrcs = [make_mdlrc(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), c) for c in runs]
    for step in (0, 1000, 1999, 4000, 7999, 20_000):
        assert torch.equal(samplers[0].probabilities(step), samplers[1].probabilities(step))
        assert mdlrcs[0].beta1(step) == mdlrcs[1].beta1(step) and mdlrcs[0].lr_factor(step) == mdlrcs[1].lr_factor(
            step)
    assert samplers[0].mixture_weight(1000) == pytest.approx(0.8) and mdlrcs[0].beta1(8000) == pytest.approx(0.5)
    assert samplers[0].mixture_weight(500) < 0.8 and mdlrcs[0].beta1(1000) > 0.5


def test_momentum_decay_without_compensation_keeps_the_learning_rate():
    from timetuner.trainers import MDLRC

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    mdlrc = MDLRC(optimizer, 100, compensation=False)
    mdlrc.step(100)
    assert optimizer.param_groups[0]["betas"][0] == pytest.approx(0.5) and optimizer.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("seed", [0, 3])
def test_every_method_sees_one_noise_tensor_and_one_batch_at_a_given_seed_and_step(tmp_path, seed):
    """Paired comparisons: the same initial weights, batches and noises whatever the sampler draws."""
    from timetuner.core.data import load_training_data
    from timetuner.trainers.config import resolved
    from timetuner.trainers.loop import _Training

    methods = [{}, dict(sampler="speed"), dict(sampler="adaptive", adaptive_update_every=2),
               dict(sampler="clts", mdlrc=True), dict(sampler="lognormal", weighting="min-snr")]
    runs = []
    for i, method in enumerate(methods):
        config = resolved(tiny_config(tmp_path / str(i), seed=seed, **method))
        data = load_training_data(config.data, config.resolution, config.channels)
        run = _Training(config)
        initial = [p.detach().clone() for p in run.unet.parameters()]
        draws = []
        for _ in range(3):  # the draws of steps 0-2, with the sampler drawing and learning in between
            x0, noise, _generator = run.draw(data, run.state.step)
            draws.append((x0, noise))
            run.step(data)
        runs.append((initial, draws))
    for initial, draws in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(initial, runs[0][0], strict=True))
        for (x0, noise), (x0_ref, noise_ref) in zip(draws, runs[0][1], strict=True):
            assert torch.equal(x0, x0_ref) and torch.equal(noise, noise_ref)
    assert not torch.equal(runs[0][1][0][1], runs[0][1][1][1])  # a new noise each step

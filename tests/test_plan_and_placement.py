"""Before a fit on a real checkpoint: `timetuner fit --plan` says what the fit will spend (every phase, the reference
set included, and the memory) and stops; `--device` is checked in one line; text encoders can stay on the CPU
(`--offload`) or leave the device once the prompts are embedded, and each prompt list is embedded once."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tests.test_conditional import one_thread
from timetuner.cli.main import app
from timetuner.core.loading import load_model, parse_device, place, text_encoders
from timetuner.errors import UserError
from timetuner.fitting import run as fitting_run
from timetuner.fitting.api import fit, fit_scales, plan

runner = CliRunner()
FAST = dict(samples=16, eval_samples=16, reference_steps=10, reference_n=500, search_points=5, search_refine=4)


def _total(lines: list[str]) -> int:
    return int(lines[0].split("plan: ")[1].split(" network")[0].replace(",", ""))


def test_plan_stops_before_any_work_and_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "t.safetensors"
    result = runner.invoke(app, ["fit", "--model", str(tiny_run), "--nfe", "3", "--plan", "--out", str(out),
                                 "--samples", "16", "--eval-samples", "16", "--reference-steps", "10",
                                 "--reference-n", "500"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("plan: ") and "network evaluations" in lines[0]
    assert any("ranking" in line for line in lines) and any("+coefficients: fitting" in line for line in lines)
    assert any("reference set (500 samples" in line for line in lines)  # the distribution gap's yardstick, costed
    assert lines[-1].startswith("memory: weights ") and "on cpu" in lines[-1]
    assert not list(tmp_path.iterdir())  # no table, no checkpoint


@pytest.mark.parametrize(("scheduler", "reference_n"), [("ddim", 300), ("auto", 200)])
def test_the_plan_s_evaluations_are_close_to_what_the_fit_then_spends(tiny_run, scheduler, reference_n):
    options = dict(FAST, nfe=3, scheduler=scheduler, e2e_iters=3, coefficient_iters=3, seed=23, force=True,
                   reference_n=reference_n)  # a reference set of its own size: not cached by another test
    lines = plan(str(tiny_run), **options)
    planned = _total(lines)
    cached = [line for line in lines if line.endswith(": cached")]
    assert not any("reference set" in line for line in cached)
    result = fit(str(tiny_run), progress=False, **options)
    assert 0.5 * result.network_evaluations <= planned <= 2.0 * result.network_evaluations
    assert any("reference set" in line and line.endswith(": cached") for line in plan(str(tiny_run), **options))


@pytest.mark.parametrize("device", ["tpu", "cuda:7", "gpu0"])
def test_a_device_this_machine_lacks_is_refused_in_one_line(device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight GPUs")
    with pytest.raises(UserError, match="accepted: cpu, cuda") as err:
        parse_device(device)
    assert "\n" not in str(err.value)
    assert parse_device(None, cpu=True) == torch.device("cpu") and parse_device("cpu") == torch.device("cpu")
    result = runner.invoke(app, ["fit", "--device", device, "--nfe", "3"])
    assert result.exit_code == 2 and f"--device {device}" in result.output.replace("'", "")


def test_offload_keeps_the_text_encoders_on_the_cpu_and_moves_the_rest(sd_folders):
    model = load_model(str(sd_folders["sd"]))
    pipe = place(model.pipeline, "meta", offload=True)  # any device but the CPU shows what moves
    assert set(text_encoders(pipe)) == {"text_encoder"}
    assert next(pipe.text_encoder.parameters()).device.type == "cpu"
    assert next(pipe.unet.parameters()).device.type == "meta" and next(pipe.vae.parameters()).device.type == "meta"


def test_prompts_are_embedded_once_and_the_encoders_released_after_the_first_fit_s_embedding(sd_folders, monkeypatch,
                                                                                            tmp_path):
    model = load_model(str(sd_folders["sd"]))
    pipe, calls, released = model.pipeline, [], []
    encode = pipe.encode_prompt
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: calls.append(len(released)) or encode(*a, **k))
    monkeypatch.setattr(fitting_run, "release_text_encoders", lambda p: released.append(p))
    with one_thread():
        results = list(fit_scales(str(sd_folders["sd"]), [3.0, 7.5], out=str(tmp_path / "t.safetensors"),
                                  pipeline=pipe, progress=False, nfe=2,
                                  scheduler="ddim", e2e_iters=1, prompts=("a cat",), eval_prompts=("a dog",),
                                  release_text_encoders=True, samples=4, eval_samples=4, eval_gap_samples=4,
                                  reference_steps=4, reference_n=8))
    assert len(results) == 2 and all(r.config.guidance_scale in (3.0, 7.5) for _, r in results)
    assert calls == [0, 0]  # the fit's and the held-out prompts, each once, both before the encoders left
    assert released and all(p is pipe for p in released)
    calls.clear()
    released.clear()
    with one_thread():
        fit(str(sd_folders["sd"]), pipeline=pipe, progress=False, nfe=2, scheduler="ddim", e2e_iters=1,
            prompts=("a cat",), eval_prompts=("a dog",), samples=4, eval_samples=4, eval_gap_samples=4,
            reference_steps=4, reference_n=8)
    assert not released  # a library call keeps the user's pipeline as it was


def test_a_latent_text_model_s_plan_times_a_batch_smaller_than_its_fit_noises(sd_folders):
    """The timed batch (16 latents) takes its own conditioning rows, not all the fit noises' (it raised before)."""
    with one_thread():
        lines = plan(str(sd_folders["sd"]), nfe=2, scheduler="ddim", samples=40, eval_samples=24, eval_gap_samples=8,
                     reference_steps=4, prompts=("a cat", "a dog"), eval_prompts=("a bird",))
    assert "ms each in the fit's" in lines[0] and "fitting" in "\n".join(lines)


def test_the_differentiated_peak_runs_one_backward_pass_and_counts_nothing(tiny_run, monkeypatch):
    """The plan's GPU memory figure for e2e: one forward and backward pass of a fit batch (the CUDA memory counters
    replaced here, as this machine has no GPU), which leaves the evaluation counter and the network as they were."""
    from timetuner.fitting.config import FitConfig
    from timetuner.fitting.cost import _differentiated_peak

    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1234)
    run = fitting_run.prepare(FitConfig(nfe=3, scheduler="ddim", **FAST), load_model(str(tiny_run)))
    before = run.solver.den.evaluations
    assert _differentiated_peak(run.solver, run.fit_noise) == 1234
    assert calls == ["reset", "sync"] and run.solver.den.evaluations == before
    assert all(p.grad is None for p in run.model.network.parameters())  # frozen: the gradient reached the input only


def test_a_latent_model_s_fit_takes_the_cheaper_defaults_and_an_explicit_value_wins(sd_folders, tiny_run):
    """Fit noises, reference steps and held-out noises default by the model's kind (`config.for_model`): the pixel
    figures for the embedded-size models, the cheaper ones for latent models; a value the user gives is kept."""
    from timetuner.fitting.config import (
        DEFAULT_EVAL_SAMPLES,
        DEFAULT_LATENT_N,
        FIT_SAMPLES,
        FIT_SAMPLES_LATENT,
        REFERENCE_STEPS,
        REFERENCE_STEPS_LATENT,
        FitConfig,
    )

    with one_thread():
        latent = fitting_run.prepare(FitConfig(nfe=2, scheduler="ddim"), load_model(str(sd_folders["sd"])))
        given = fitting_run.prepare(FitConfig(nfe=2, scheduler="ddim", samples=8, reference_steps=7),
                                    load_model(str(sd_folders["sd"])))
    pixel = fitting_run.prepare(FitConfig(nfe=2, scheduler="ddim"), load_model(str(tiny_run)))
    assert (latent.config.samples, latent.config.reference_steps, latent.config.eval_samples) == (
        FIT_SAMPLES_LATENT, REFERENCE_STEPS_LATENT, DEFAULT_LATENT_N)
    assert latent.fit_noise.shape[0] == FIT_SAMPLES_LATENT and latent.held_out.reference_steps == REFERENCE_STEPS_LATENT
    assert (pixel.config.samples, pixel.config.reference_steps, pixel.config.eval_samples) == (
        FIT_SAMPLES, REFERENCE_STEPS, DEFAULT_EVAL_SAMPLES)
    assert (given.config.samples, given.config.reference_steps, given.fit_noise.shape[0]) == (8, 7, 8)


def test_a_plan_of_hours_says_how_to_spend_less():
    """From an hour on, the plan's lines end with the options that lower the cost and where their price in quality
    is measured; a short fit's plan does not."""
    from timetuner.fitting.cost import LONG_FIT, describe
    from timetuner.fitting.steps import Phase

    phases = [Phase("fitting", "fitting", 1000, gradient=True), Phase("verdict", "held-out samples", 500)]
    long = describe(phases, {"fit": LONG_FIT / 1000, "held-out": LONG_FIT / 1000})
    short = describe(phases, {"fit": 1e-3, "held-out": 1e-3})
    assert "--samples" in long[-1] and "A cheaper fit for big models" in long[-1] and " h" in long[0]
    assert not any("--samples" in line for line in short)

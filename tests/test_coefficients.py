"""Learned solver coefficients (`timetuner.coefficients`): zero corrections and unit scales are the plain scheduler
bitwise; a table carrying them samples in DDPMPipeline, StableDiffusionPipeline, StableDiffusion3Pipeline and
FluxPipeline as the fit's solver does; save/load and saved pipelines keep them; bad tables are refused in one line;
`fit` learns them and `auto` ranks them against the τ-only variant."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler

from timetuner import TauTable, TunedScheduler
from timetuner.coefficients import COEFFICIENT_SOLVERS, history_length
from timetuner.core.denoiser import Denoiser, text_conditioning
from timetuner.core.solver import Solver
from timetuner.core.trajectories import make_scheduler
from timetuner.errors import UserError
from timetuner.fitting.api import fit
from timetuner.tiny import tiny_pixel_unet

DDPM_BASE = DDIMScheduler(num_train_timesteps=1000).config
FLOW_BASE = FlowMatchEulerDiscreteScheduler(shift=3.0).config
SOLVERS = [("dpm++", DDPM_BASE), ("dpm++3m", DDPM_BASE), ("dpm++1", DDPM_BASE), ("unipc", DDPM_BASE),
           ("deis", DDPM_BASE), ("flow-euler", FLOW_BASE), ("flow-dpm++", FLOW_BASE), ("flow-unipc", FLOW_BASE)]
STEPS = 5
FAST = dict(samples=8, eval_samples=16, eval_gap_samples=8, reference_steps=10, reference_n=64)


class Formula:
    """A smooth stand-in network: its output depends on the input and on the time it is fed."""

    device = torch.device("cpu")

    def __call__(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[0]
        return 0.6 * x + 0.2 * torch.sin(x * 3 + t / 150)


def pipeline_loop(scheduler, noise, steps: int = STEPS) -> list[torch.Tensor]:
    """Every state of a pipeline's loop (`scale_model_input` where the scheduler has one, then `step`)."""
    den = Formula()
    scheduler.set_timesteps(steps)
    x, states = noise * getattr(scheduler, "init_noise_sigma", 1.0), []
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(den(x_in, t), t, x).prev_sample
        states.append(x)
    return states


def coefficients_of(scheduler, seed: int = 0, steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = history_length(scheduler)
    return 0.1 * torch.randn(steps, width, generator=gen), 1 + 0.05 * torch.randn(steps, generator=gen)


@pytest.mark.parametrize("name,base", SOLVERS, ids=[s for s, _ in SOLVERS])
def test_zero_corrections_and_unit_scales_are_the_plain_scheduler_bitwise(name, base):
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    solver = Solver(Formula(), make_scheduler(name, base), STEPS)
    width = history_length(solver.template)
    plain = solver.rollout(noise)
    assert torch.equal(plain, solver.rollout(noise, coefficients=(torch.zeros(STEPS, width), torch.ones(STEPS))))
    # A table whose only learned value is the last step's scale: the wrapper runs its corrector at every step, and
    # every state before the last is the plain scheduler's, bitwise.
    table = TauTable.identity(make_scheduler(name, base), STEPS)
    scale = torch.ones(STEPS, dtype=torch.float64)
    scale[-1] = 1.25
    tuned = table.with_coefficients(torch.zeros(STEPS, width), scale)
    assert tuned.has_coefficients and not tuned.is_identity
    expected = pipeline_loop(make_scheduler(name, base), noise)
    got = pipeline_loop(TunedScheduler.from_table(make_scheduler(name, base), tuned), noise)
    assert all(torch.equal(a, b) for a, b in zip(expected[:-1], got[:-1], strict=True))
    assert not torch.equal(expected[-1], got[-1])
    # Zero coefficients stored in a table are the identity table: nothing of the corrector runs.
    assert table.with_coefficients(torch.zeros(STEPS, width), torch.ones(STEPS)).is_identity


@pytest.mark.parametrize("name,base", SOLVERS, ids=[s for s, _ in SOLVERS])
def test_tuned_coefficients_run_in_the_wrapper_as_in_the_fit_s_solver(name, base):
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    solver = Solver(Formula(), make_scheduler(name, base), STEPS)
    table = TauTable.identity(make_scheduler(name, base), STEPS)
    table = table.with_tau(table.t - 0.3 * (table.t - table.t.roll(-1)).clamp(min=0)).with_coefficients(
        *coefficients_of(solver.template))
    ours = solver.rollout(noise, table.tau.float(), coefficients=table.coefficients)
    theirs = pipeline_loop(TunedScheduler.from_table(make_scheduler(name, base), table), noise)[-1]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, solver.rollout(noise, table.tau.float()), atol=1e-3)


def test_coefficients_are_differentiable_through_a_rollout():
    solver = Solver(Formula(), make_scheduler("flow-unipc", FLOW_BASE), STEPS)
    corrections = torch.zeros(STEPS, 3, requires_grad=True)
    log_scale = torch.zeros(STEPS, requires_grad=True)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    solver.rollout(noise, coefficients=(corrections, log_scale.exp())).pow(2).sum().backward()
    assert torch.isfinite(corrections.grad).all() and corrections.grad[:, 0].abs().gt(0).all()
    assert corrections.grad[0, 1:].eq(0).all()  # step 0 has no earlier data prediction to correct with
    assert log_scale.grad.abs().gt(0).all()


def test_a_table_with_coefficients_round_trips_through_safetensors_and_a_dict(tmp_path):
    scheduler = make_scheduler("dpm++", DDPM_BASE)
    table = TauTable.identity(scheduler, STEPS).with_coefficients(*coefficients_of(scheduler))
    loaded = TauTable.load(table.save(tmp_path / "c.safetensors"))
    assert torch.equal(loaded.corrections, table.corrections) and torch.equal(loaded.scale, table.scale)
    again = TauTable.from_dict(table.to_dict())
    assert torch.equal(again.corrections, table.corrections) and torch.equal(again.scale, table.scale)
    plain = TauTable.load(TauTable.identity(scheduler, STEPS).save(tmp_path / "p.safetensors"))
    assert plain.corrections is None and plain.coefficients is None and plain.is_identity  # tables as before


@pytest.mark.parametrize("corrections,scale,needle", [
    (torch.zeros(STEPS + 1, 3), torch.ones(STEPS), "corrections have shape"),
    (torch.zeros(STEPS, 4), torch.ones(STEPS), "J from 1 to 3"),
    (torch.zeros(STEPS, 3), torch.ones(STEPS - 1), "scale has shape"),
    (torch.full((STEPS, 3), float("nan")), torch.ones(STEPS), "non-finite"),
    (torch.zeros(STEPS, 3), -torch.ones(STEPS), "scales > 0"),
])
def test_bad_coefficients_are_refused_in_one_line(corrections, scale, needle):
    table = TauTable.identity(make_scheduler("dpm++", DDPM_BASE), STEPS)
    with pytest.raises(UserError, match=needle) as err:
        table.with_coefficients(corrections, scale)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name,needle", [("ddim", "cannot take learned coefficients"),
                                         ("heun", "cannot take learned coefficients"),
                                         ("dpm++1", "reach 3 outputs back")])
def test_coefficients_on_a_solver_that_cannot_take_them_are_refused(name, needle):
    target = make_scheduler(name, DDPM_BASE)
    base = TauTable.identity(target, STEPS)  # coefficients recorded for another solver, as a foreign file's would be
    foreign = TauTable(base.t, base.t, base.metadata, torch.full((base.nfe, 3), 0.1), torch.ones(base.nfe))
    with pytest.raises(UserError, match=needle) as err:
        TunedScheduler.from_table(target, foreign)
    assert "\n" not in str(err.value)
    assert type(target).__name__ not in COEFFICIENT_SOLVERS or name == "dpm++1"


def test_a_table_with_coefficients_samples_in_ddpm_pipeline_and_a_saved_pipeline_reloads_it(tmp_path):
    unet = tiny_pixel_unet()
    scheduler = make_scheduler("dpm++", DDPM_BASE)
    table = TauTable.identity(scheduler, 4)
    table = table.with_tau(table.t - 5).with_coefficients(*coefficients_of(scheduler, steps=4))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = Solver(Denoiser(unet), make_scheduler("dpm++", DDPM_BASE), 4).rollout(
            noise, table.tau.float(), coefficients=table.coefficients)
    pipe = DDPMPipeline(unet=unet, scheduler=TunedScheduler.from_table(make_scheduler("dpm++", DDPM_BASE), table))
    pipe.set_progress_bar_config(disable=True)
    # DDPMPipeline draws its own noise: the same generator draws `noise` (B, C, H, W), and it returns [0, 1] images
    got = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(4), output_type="np")
    torch.testing.assert_close(torch.from_numpy(got.images).permute(0, 3, 1, 2),
                               (ours / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)
    pipe.save_pretrained(tmp_path / "saved")
    script = f"""
import torch, timetuner
from diffusers import DDPMPipeline
pipe = DDPMPipeline.from_pretrained({str(tmp_path / 'saved')!r})
table = pipe.scheduler.tables[4]
assert table.has_coefficients and torch.equal(table.scale, torch.load({str(tmp_path / 's.pt')!r}))
"""
    torch.save(table.scale, tmp_path / "s.pt")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)


def test_a_table_with_coefficients_samples_in_stable_diffusion_with_guidance(sd_pipe):
    from tests.test_conditional import FIT_PROMPTS

    base = make_scheduler("dpm++", sd_pipe.scheduler.config)
    table = TauTable.identity(base, 4)
    table = table.with_tau(table.t - 9).with_coefficients(*coefficients_of(base, seed=5, steps=4))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    den = Denoiser(sd_pipe.unet, guidance_scale=7.5).bind(text_conditioning(sd_pipe, FIT_PROMPTS[:2], 2))
    with torch.no_grad():
        ours = Solver(den, make_scheduler("dpm++", sd_pipe.scheduler.config), 4).rollout(
            noise, table.tau.float(), coefficients=table.coefficients)
    sd_pipe.scheduler = TunedScheduler.from_table(base, table)
    theirs = sd_pipe(FIT_PROMPTS[:2], num_inference_steps=4, guidance_scale=7.5, latents=noise,
                     output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_fit_learns_coefficients_that_lower_the_loss_and_the_table_carries_them(tiny_run, tmp_path):
    out = tmp_path / "c.safetensors"
    result = fit(str(tiny_run), out=out, progress=False, nfe=4, scheduler="dpm++", trajectory="learned",
                 coefficients=True, coefficient_iters=12, force=True, **FAST)
    rows = result.rows
    assert rows[0]["loss_after"] < rows[0]["loss_before"]
    table = TauTable.load(out)
    assert table.has_coefficients and table.corrections.shape == (4, 3)
    assert torch.allclose(table.scale.float(), torch.tensor([r["scale"] for r in rows]))
    assert table.metadata["fit_config"]["coefficients"] is True
    # the held-out verdict ran the same rollout the table gives
    solver = Solver.for_table(Denoiser(DDPMPipeline.from_pretrained(tiny_run).unet.eval()),
                              DDPMPipeline.from_pretrained(tiny_run).scheduler.config, table)
    noise = torch.randn(2, 1, *solver.den.sample_shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(solver.rollout(noise, table.tau.float(), coefficients=table.coefficients),
                                  solver.rollout(noise, table.tau.float()), atol=1e-4)


def test_auto_tunes_its_solver_with_and_without_coefficients_and_records_both(tiny_run):
    result = fit(str(tiny_run), progress=False, nfe=3, coefficient_iters=6, e2e_iters=3, **FAST)
    record = result.table.metadata["auto"]
    tuned = record["tuned"]
    assert [t["coefficients"] for t in tuned] == [False, True]
    assert tuned[0]["scheduler"] == tuned[1]["scheduler"] and tuned[0]["trajectory"] == "learned"
    assert ("+coefficients" in record["winner"]) == result.tuned.has_coefficients or "(plain)" in record["winner"]
    only = fit(str(tiny_run), progress=False, nfe=3, coefficients=False, e2e_iters=3, **FAST)
    assert [t["coefficients"] for t in only.table.metadata["auto"]["tuned"]] == [False]


@pytest.mark.parametrize("args,needle", [
    (dict(scheduler="ddim", coefficients=True), "cannot take learned coefficients"),
    (dict(scheduler="dpm++", objective="paper", coefficients=True), "fitted end to end"),
    (dict(coefficient_iters=0), "--coefficient-iters 0"),
])
def test_fit_refuses_coefficients_where_they_do_not_apply_in_one_line(tiny_run, args, needle):
    with pytest.raises(UserError, match=needle) as err:
        fit(str(tiny_run), progress=False, nfe=3, **FAST, **args)
    assert "\n" not in str(err.value)


def test_auto_s_coefficient_variant_starts_from_the_tau_variant_s_tau_when_it_checkpoints(tiny_run, tmp_path,
                                                                                           monkeypatch):
    from timetuner.fitting.method import OBJECTIVES

    e2e, starts = OBJECTIVES["e2e"], []
    real = type(e2e).fit

    def spy(self, solver, config, inputs, resume, report):
        taus, rows = real(self, solver, config, inputs, resume, report)
        starts.append((config.coefficients, resume.get("start_taus"), taus))
        return taus, rows

    monkeypatch.setattr(type(e2e), "fit", spy)
    fit(str(tiny_run), out=tmp_path / "a.safetensors", progress=False, nfe=3, coefficient_iters=2, e2e_iters=2,
        **FAST)
    (first, none, tau_variant), (second, start, _) = starts
    assert (first, second) == (False, True) and none is None
    assert start == pytest.approx(tau_variant)  # the grid checkpoint does not hide the warm start

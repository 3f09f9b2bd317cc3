"""TunedScheduler: bit-identical at τ = t for DDIM, DPM-Solver-2 and Heun; tuned differs; save/load; refusals."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

from timetuner import TauTable, TunedScheduler
from timetuner.core.solver import sample_images
from timetuner.core.trajectories import make_scheduler
from timetuner.errors import UserError
from timetuner.tiny import tiny_pixel_unet


@pytest.fixture(scope="module")
def unet():
    return tiny_pixel_unet()


BASE = DDIMScheduler(num_train_timesteps=1000).config
NOISE = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["ddim", "dpm2", "dpm++", "dpm++3m", "dpm++1", "unipc", "deis", "heun"])
def test_identity_table_is_bit_identical_in_a_sampling_loop(unet, name):
    plain = make_scheduler(name, BASE)
    tuned = TunedScheduler.from_table(plain, TauTable.identity(make_scheduler(name, BASE), 6))
    a = sample_images(unet, make_scheduler(name, BASE), NOISE, 6)
    b = sample_images(unet, tuned, NOISE, 6)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["ddim", "dpm2"])
def test_identity_table_is_bit_identical_in_ddpm_pipeline(unet, name):
    def run(scheduler):
        pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(3),
                    output_type="np").images

    tuned = TunedScheduler.from_table(make_scheduler(name, BASE), TauTable.identity(make_scheduler(name, BASE), 5))
    assert (run(make_scheduler(name, BASE)) == run(tuned)).all()


@pytest.mark.parametrize("name", ["ddim", "dpm2", "heun"])
def test_tuned_table_feeds_tau_to_the_network_and_changes_samples(unet, name):
    table = TauTable.identity(make_scheduler(name, BASE), 4)
    shifted = table.with_tau((table.t - 25).clamp(min=0))
    tuned = TunedScheduler.from_table(make_scheduler(name, BASE), shifted)
    seen = []
    hook = unet.register_forward_pre_hook(lambda m, args: seen.append(float(args[1].flatten()[0])))
    try:
        b = sample_images(unet, tuned, NOISE, 4)
    finally:
        hook.remove()
    assert seen == pytest.approx(shifted.tau.tolist(), abs=1e-3)
    assert len(seen) == table.nfe
    assert not torch.equal(sample_images(unet, make_scheduler(name, BASE), NOISE, 4), b)


def test_step_count_selects_the_table_and_other_counts_run_plain(unet):
    t5 = TauTable.identity(DDIMScheduler.from_config(BASE), 5)
    t5 = t5.with_tau((t5.t - 10).clamp(min=0))
    t8 = TauTable.identity(DDIMScheduler.from_config(BASE), 8)
    sched = TunedScheduler.from_table(DDIMScheduler.from_config(BASE), [t5, t8.with_tau((t8.t - 5).clamp(min=0))])
    sched.set_timesteps(5)
    assert torch.allclose(sched.timesteps.double(), t5.tau)
    sched.set_timesteps(8)
    assert torch.allclose(sched.timesteps.double(), (t8.t - 5).clamp(min=0))
    sched.set_timesteps(7)
    inner = DDIMScheduler.from_config(BASE)
    inner.set_timesteps(7)
    assert torch.equal(sched.timesteps, inner.timesteps)


def test_a_table_carries_its_solver_onto_another_class_of_the_same_noise_schedule():
    table = TauTable.identity(DDIMScheduler.from_config(BASE), 5)
    sched = TunedScheduler.from_table(make_scheduler("dpm2", BASE), table)  # a pipeline shipping DPM-Solver-2
    assert type(sched.inner).__name__ == "DDIMScheduler" and sched.config["_timetuner"]["solver_class"] == (
        "DDIMScheduler")
    plain = DDIMScheduler.from_config(BASE)
    sched.set_timesteps(5)
    plain.set_timesteps(5)
    x, out = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 1, 8, 8)
    for t in plain.timesteps:
        assert torch.equal(sched.step(out, t, x).prev_sample, plain.step(out, t, x).prev_sample)
    other = make_scheduler("dpm2", DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear").config)
    with pytest.raises(UserError, match="another noise schedule"):
        TunedScheduler.from_table(other, table)


def test_mismatched_table_is_refused():
    table = TauTable.identity(DDIMScheduler.from_config(BASE), 5)
    trailing = DDIMScheduler.from_config(BASE, timestep_spacing="trailing")
    with pytest.raises(UserError, match="timestep_spacing"):
        TunedScheduler.from_table(trailing, table)


def test_mismatched_model_is_refused(unet):
    from timetuner.scheduler import model_hash

    table = TauTable.identity(DDIMScheduler.from_config(BASE), 5, model="tiny", model_hash=model_hash(unet))
    TunedScheduler.from_table(DDIMScheduler.from_config(BASE), table, unet=unet)
    other = UNet2DModel.from_config(unet.config)
    with pytest.raises(UserError, match="fitted for tiny"):
        TunedScheduler.from_table(DDIMScheduler.from_config(BASE), table, unet=other)


def test_pipeline_round_trip_in_a_fresh_process(unet, tmp_path):
    table = TauTable.identity(DDIMScheduler.from_config(BASE), 5)
    table = table.with_tau((table.t - 7).clamp(min=0))
    pipe = DDPMPipeline(unet=unet, scheduler=TunedScheduler.from_table(DDIMScheduler.from_config(BASE), table))
    pipe.save_pretrained(tmp_path / "pipe")
    assert '"TunedScheduler"' in (tmp_path / "pipe" / "model_index.json").read_text()
    script = textwrap.dedent(f"""
        import timetuner, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "pipe")!r})
        assert type(pipe.scheduler).__name__ == "TunedScheduler", type(pipe.scheduler)
        pipe.scheduler.set_timesteps(5)
        print(",".join(f"{{v:.4f}}" for v in pipe.scheduler.timesteps.tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert [float(v) for v in out.stdout.strip().split(",")] == pytest.approx(table.tau.tolist(), abs=1e-3)

"""TunedScheduler inside diffusers pipelines built from tiny local components: with identity tables every pipeline
gives exactly the plain pipeline's output (DDPM, DDIM, SD txt2img / img2img / inpaint, SDXL with a
`denoising_end` → `denoising_start` hand-over, DiT), across solvers; with a tuned table they still run end to end."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDPMPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

from timetuner import TauTable, TunedScheduler
from timetuner.scheduler import OWN
from timetuner.tiny import quiet, tiny_pixel_unet, tiny_sdxl

STEPS = 4
PROMPTS = ["a yellow boat at sea", "an orange house"]
SOLVERS = ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler", "UniPCMultistepScheduler"]


def identity(scheduler, steps: int = STEPS) -> TunedScheduler:
    return TunedScheduler.from_table(scheduler, TauTable.identity(scheduler, steps))


def shifted(scheduler, steps: int = STEPS) -> TunedScheduler:
    """A tuned (non-identity) table: every τ a few timesteps below its t."""
    table = TauTable.identity(scheduler, steps)
    return TunedScheduler.from_table(scheduler, table.with_tau((table.t - 7.0).clamp(min=0.0)))


def solver(name: str, base_config):
    return getattr(diffusers, name).from_config(base_config)


def run(pipe, scheduler, **call):
    pipe.scheduler = scheduler
    return pipe(generator=torch.Generator().manual_seed(5), output_type="pt", **call).images


@pytest.fixture(scope="module")
def pixel_unet():
    return tiny_pixel_unet()


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_ddpm_and_ddim_pipelines(pixel_unet, name):
    for cls, call in ((DDPMPipeline, {}), (DDIMPipeline, {"eta": 0.0})):
        pipe = quiet(cls(unet=pixel_unet, scheduler=getattr(diffusers, name)()))
        scheduler = pipe.scheduler  # DDIMPipeline converts any scheduler to DDIM
        call = dict(call, batch_size=2, num_inference_steps=STEPS, output_type="np")
        plain = pipe(generator=torch.Generator().manual_seed(1), **call).images
        pipe.scheduler = identity(scheduler)
        assert (plain == pipe(generator=torch.Generator().manual_seed(1), **call).images).all()
        pipe.scheduler = shifted(scheduler)
        assert not (plain == pipe(generator=torch.Generator().manual_seed(1), **call).images).all()


def test_a_dpm_solver_table_loads_onto_a_pipeline_that_ships_ddim(pixel_unet):
    """The table brings its solver (same noise schedule): the pipeline then samples as plain DPM-Solver++ would."""
    pipe = quiet(DDPMPipeline(unet=pixel_unet, scheduler=diffusers.DDIMScheduler()))
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    call = dict(batch_size=2, num_inference_steps=STEPS, output_type="np")
    pipe.scheduler = dpm
    plain = pipe(generator=torch.Generator().manual_seed(1), **call).images
    pipe.scheduler = TunedScheduler.from_table(diffusers.DDIMScheduler(), TauTable.identity(dpm, STEPS))
    assert type(pipe.scheduler.inner).__name__ == "DPMSolverMultistepScheduler"
    assert (plain == pipe(generator=torch.Generator().manual_seed(1), **call).images).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_stable_diffusion_txt2img_img2img_and_inpaint(sd_pipe, name):
    base = solver(name, sd_pipe.scheduler.config)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:12, 4:12] = 1.0
    calls = [(sd_pipe, {}),
             (quiet(StableDiffusionImg2ImgPipeline(**sd_pipe.components)), {"image": image, "strength": 0.6}),
             (quiet(StableDiffusionInpaintPipeline(**sd_pipe.components)), {"image": image, "mask_image": mask,
                                                                           "strength": 0.75})]
    for pipe, extra in calls:
        call = dict(extra, prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=7.5)
        plain = run(pipe, base, **call)
        assert torch.equal(plain, run(pipe, identity(base), **call)), type(pipe).__name__
        assert torch.isfinite(run(pipe, shifted(base), **call)).all()
    # What pipelines read from scheduler.config works on the wrapper, and swapping back gives the plain class.
    sd_pipe.scheduler = identity(base)
    assert sd_pipe.scheduler.config.num_train_timesteps == 1000 and sd_pipe.scheduler.config.steps_offset == 1
    swapped = diffusers.EulerDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    expected = diffusers.EulerDiscreteScheduler.from_config(base.config)
    assert {k: v for k, v in swapped.config.items() if k != OWN} == {k: v for k, v in expected.config.items()
                                                                     if k != OWN}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tiny_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"])
def test_sdxl_base_to_refiner_hand_over(sdxl, name):
    base = solver(name, sdxl.scheduler.config)
    refiner = quiet(StableDiffusionXLImg2ImgPipeline(**sdxl.components))
    steps = 6

    def hand_over(scheduler):
        call = dict(prompt=PROMPTS[:1], num_inference_steps=steps, guidance_scale=5.0, height=16, width=16)
        sdxl.scheduler = scheduler
        latents = sdxl(generator=torch.Generator().manual_seed(2), denoising_end=0.6, output_type="latent",
                       **call).images
        refiner.scheduler = scheduler
        return refiner(image=latents, denoising_start=0.6, generator=torch.Generator().manual_seed(3),
                       output_type="pt", **call).images

    plain = hand_over(base)
    assert torch.equal(plain, hand_over(identity(base, steps)))
    assert torch.isfinite(hand_over(shifted(base, steps))).all()


def test_dit_pipeline(dit_pipe):
    base = solver("DPMSolverMultistepScheduler", dit_pipe.scheduler.config)
    call = dict(class_labels=[1, 7], guidance_scale=4.0, num_inference_steps=STEPS)
    plain = run(dit_pipe, base, **call)
    assert torch.equal(plain, run(dit_pipe, identity(base), **call))
    assert not torch.equal(plain, run(dit_pipe, shifted(base), **call))


@pytest.mark.parametrize(("edit", "needle"), [
    ("scheduler", "'NoSuchScheduler' is not a diffusers scheduler"),
    ("tables", "non-finite"),
    ("model_index", "could not be loaded"),
])
def test_a_saved_pipeline_naming_a_bad_solver_or_table_is_refused_in_one_line(pixel_unet, tmp_path, edit, needle):
    import json

    from typer.testing import CliRunner

    from timetuner.cli.main import app

    folder = tmp_path / "pipe"
    DDPMPipeline(unet=pixel_unet, scheduler=identity(diffusers.DDIMScheduler())).save_pretrained(folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    if edit == "scheduler":
        config[OWN]["solver_class"] = "NoSuchScheduler"
    elif edit == "tables":
        config[OWN]["tables"][str(STEPS)]["tau"][1] = float("nan")
    else:
        index = json.loads((folder / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "NoSuchScheduler"]
        (folder / "model_index.json").write_text(json.dumps(index))
    config_file.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["sample", "--model", str(folder), "--n", "2", "--steps", "2",
                                      "--out", str(tmp_path / "s.png")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and not (tmp_path / "s.png").exists()

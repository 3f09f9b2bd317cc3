"""TunedScheduler over flow-matching schedulers (SD3, Flux, Sana, Wan): identity tables are bit-identical to the
scheduler they wrap over whole loops, for every option of the stock classes; tuned tables feed the network τ while the
solver keeps its σ; the σ grid and the dynamic shift `mu` a table was fitted at decide where it applies; tiny SD3
(txt2img, img2img) and Flux pipelines run bit-identically with identity tables and end to end with tuned ones."""

from __future__ import annotations

import logging

import diffusers
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from timetuner import TauTable, TunedScheduler
from timetuner.errors import UserError
from timetuner.table import is_flow
from timetuner.tiny import tiny_flux, tiny_sd3

STEPS = 5
FLUX_SIGMAS = np.linspace(1.0, 1 / STEPS, STEPS)  # what FluxPipeline passes on every call
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
# (class, config, what the pipeline passes to set_timesteps besides the step count)
CASES = [
    ("FlowMatchEulerDiscreteScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), dict(mu=0.8)),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=1.1)),
    ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), dict(mu=0.8, sigmas=FLUX_SIGMAS)),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0, shift_terminal=0.1), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_karras_sigmas=True), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_exponential_sigmas=True, shift=2.0), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(use_beta_sigmas=True), {}),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True, shift=3.0), {}),
    ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0), {}),
    ("DPMSolverMultistepScheduler", dict(FLOW), {}),
    ("DPMSolverMultistepScheduler", dict(FLOW, solver_order=3, algorithm_type="dpmsolver++"), {}),
    ("UniPCMultistepScheduler", dict(FLOW), {}),
]
IDS = [f"{name}-{i}" for i, (name, _, _) in enumerate(CASES)]


def model(x: torch.Tensor, t) -> torch.Tensor:
    """A formula for the velocity: depends on x and the (float) time, so a wrong time or input shows."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[0]
    return 0.3 * x * torch.cos(t / 300.0) + 0.05 * torch.sin(t / 100.0)


def loop(scheduler, passed: dict, seen: list | None = None, begin: int = 0) -> torch.Tensor:
    scheduler.set_timesteps(STEPS, **passed)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)  # stochastic sampling draws from it
    if begin:
        scheduler.set_begin_index(begin)
        x = scheduler.scale_noise(x, scheduler.timesteps[begin:begin + 1], torch.ones_like(x))
    for t in scheduler.timesteps[begin:]:
        if seen is not None:
            seen.append(float(t))
        kwargs = {"generator": generator} if "FlowMatch" in type(scheduler.inner if hasattr(scheduler, "inner")
                                                                   else scheduler).__name__ else {}
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(x_in, t), t, x, **kwargs).prev_sample
    return x


def tables(name: str, config: dict, passed: dict):
    plain = getattr(diffusers, name)(**config)
    identity = TauTable.identity(plain, STEPS, **passed)
    tuned = identity.with_tau((identity.t * 0.96).clamp(min=0.0))
    return plain, identity, tuned


@pytest.mark.parametrize(("name", "config", "passed"), CASES, ids=IDS)
def test_identity_tables_are_bit_identical_over_whole_loops_and_tuned_ones_feed_tau(name, config, passed):
    plain, identity, tuned_table = tables(name, config, passed)
    assert is_flow(plain)
    cls = getattr(diffusers, name)
    wrapped = TunedScheduler.from_table(cls(**config), identity)
    assert torch.equal(loop(plain, passed), loop(wrapped, passed))
    assert wrapped.compatibles == plain.compatibles and wrapped.compatibles
    tuned = TunedScheduler.from_table(cls(**config), tuned_table)
    seen: list[float] = []
    out = loop(tuned, passed, seen)
    assert not torch.equal(out, loop(plain, passed)) and torch.isfinite(out).all()
    assert seen == pytest.approx(tuned_table.tau.tolist(), abs=1e-3)  # the network got τ, the solver ran its σ
    assert torch.equal(tuned.inner.timesteps, plain.timesteps)


@pytest.mark.parametrize(("name", "config", "passed"), [c for c in CASES if c[0] == "FlowMatchEulerDiscreteScheduler"],
                         ids=[i for i, c in zip(IDS, CASES, strict=True) if c[0] == "FlowMatchEulerDiscreteScheduler"])
def test_img2img_scale_noise_and_begin_index(name, config, passed):
    plain, identity, tuned_table = tables(name, config, passed)
    cls = getattr(diffusers, name)
    wrapped = TunedScheduler.from_table(cls(**config), identity)
    assert torch.equal(loop(plain, passed, begin=2), loop(wrapped, passed, begin=2))
    # A tuned table: the pipeline hands scale_noise τ_k; the sample is noised to σ_k, as the plain scheduler does.
    tuned = TunedScheduler.from_table(cls(**config), tuned_table)
    plain.set_timesteps(STEPS, **passed)
    tuned.set_timesteps(STEPS, **passed)
    x, noise = torch.zeros(1, 2), torch.ones(1, 2)
    noised = plain.scale_noise(x, plain.timesteps[2:3], noise)
    assert torch.equal(noised, tuned.scale_noise(x, tuned.timesteps[2:3], noise))


def test_a_table_runs_only_on_its_sigma_grid_and_at_its_mu(caplog):
    cls, config = diffusers.FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True)
    table = TauTable.identity(cls(**config), STEPS, sigmas=FLUX_SIGMAS, mu=0.8)
    table = table.with_tau(table.t * 0.96)
    assert table.sigmas == pytest.approx(FLUX_SIGMAS.tolist()) and table.mu == 0.8
    tuned = TunedScheduler.from_table(cls(**config), table)
    tuned.set_timesteps(STEPS, sigmas=FLUX_SIGMAS, mu=0.8)
    assert torch.allclose(tuned.timesteps.double(), table.tau)
    tuned.set_timesteps(STEPS, mu=0.8)  # no sigmas passed: the table's own grid
    assert torch.allclose(tuned.timesteps.double(), table.tau)
    with pytest.raises(UserError, match=r"fitted at mu=0.8 and the pipeline passes mu=1.1 .*image size"):
        tuned.set_timesteps(STEPS, sigmas=FLUX_SIGMAS, mu=1.1)
    with caplog.at_level(logging.WARNING, logger="timetuner.scheduler"):
        tuned.set_timesteps(STEPS, sigmas=np.linspace(1.0, 0.1, STEPS), mu=0.8)  # the caller's own grid: plain
    assert "schedule of its own" in caplog.text
    plain = cls(**config)
    plain.set_timesteps(STEPS, sigmas=np.linspace(1.0, 0.1, STEPS), mu=0.8)
    assert torch.equal(tuned.timesteps, plain.timesteps)
    # A static-shift table ignores the mu Flux always passes, as the stock scheduler does.
    static = TauTable.identity(cls(shift=3.0), STEPS)
    wrapped = TunedScheduler.from_table(cls(shift=3.0), static.with_tau(static.t * 0.96))
    wrapped.set_timesteps(STEPS, mu=0.3)
    assert torch.allclose(wrapped.timesteps.double(), static.t * 0.96)


def test_an_identity_table_runs_plainly_at_any_image_size():
    """Nothing in an identity table is tuned for one size: at another mu the pipeline's own schedule runs, as plain."""
    cls, config = diffusers.FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True)
    identity = TauTable.identity(cls(**config), STEPS, sigmas=FLUX_SIGMAS, mu=0.8)
    wrapped = TunedScheduler.from_table(cls(**config), identity)
    for mu in (0.8, 1.1):
        plain = cls(**config)
        plain.set_timesteps(STEPS, sigmas=FLUX_SIGMAS, mu=mu)
        wrapped.set_timesteps(STEPS, sigmas=FLUX_SIGMAS, mu=mu)
        assert torch.equal(wrapped.timesteps, plain.timesteps) and torch.equal(wrapped.sigmas, plain.sigmas)
    learned = TauTable.identity(cls(**config), STEPS, sigmas=FLUX_SIGMAS * 0.9 + 0.1 * FLUX_SIGMAS ** 2, mu=0.8,
                                learned_grid={"grid": "searched"}, pipeline_sigmas=FLUX_SIGMAS.tolist())
    # (a learned grid is tuned for its size; the pipeline's own σ, which it replaces, is recorded as a fit records it)
    with pytest.raises(UserError, match="mu follows the image size"):
        TunedScheduler.from_table(cls(**config), learned).set_timesteps(STEPS, sigmas=FLUX_SIGMAS, mu=1.1)


def test_flow_tables_refuse_ddpm_schedulers_and_the_reverse():
    flow = TauTable.identity(diffusers.FlowMatchEulerDiscreteScheduler(), STEPS)
    with pytest.raises(UserError, match="fitted on a flow-matching model and this DDIMScheduler samples a DDPM-style"):
        TunedScheduler.from_table(diffusers.DDIMScheduler(), flow)
    ddim = TauTable.identity(diffusers.DDIMScheduler(), STEPS)
    with pytest.raises(UserError, match="fitted on a DDPM-style .* samples a flow-matching model"):
        TunedScheduler.from_table(diffusers.FlowMatchEulerDiscreteScheduler(), ddim)
    with pytest.raises(UserError, match="needs mu"):
        TauTable.identity(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), STEPS)
    with pytest.raises(UserError, match="not strictly decreasing"):
        TauTable.identity(diffusers.FlowMatchEulerDiscreteScheduler(), 3, sigmas=[1.0, 0.2, 0.5])


def test_a_missing_attribute_reads_as_python_says_it():
    wrapped = TunedScheduler.from_table(diffusers.FlowMatchEulerDiscreteScheduler(),
                                        TauTable.identity(diffusers.FlowMatchEulerDiscreteScheduler(), STEPS))
    with pytest.raises(AttributeError) as err:
        wrapped.does_not_exist  # noqa: B018
    assert str(err.value) == "'TunedScheduler' object has no attribute 'does_not_exist'"
    ddim = TunedScheduler.from_table(diffusers.DDIMScheduler(), TauTable.identity(diffusers.DDIMScheduler(), STEPS))
    assert not hasattr(ddim, "scale_noise") and ddim.compatibles == diffusers.DDIMScheduler().compatibles


# -- pipelines built in code ---------------------------------------------------------------------------------------
EMBEDS = dict(prompt_embeds=torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(3)),
              pooled_prompt_embeds=torch.randn(1, 8, generator=torch.Generator().manual_seed(4)))
SD3_CALL = dict(EMBEDS, negative_prompt_embeds=torch.zeros(1, 4, 16), negative_pooled_prompt_embeds=torch.zeros(1, 8),
                num_inference_steps=STEPS, height=8, width=8, output_type="pt")


def images(pipe, **call):
    return pipe(generator=torch.Generator().manual_seed(0), **call).images


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_sd3_pipelines(img2img, tmp_path):
    call = dict(SD3_CALL)
    if img2img:
        call.update(image=torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)), strength=0.6)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = tiny_sd3(scheduler, img2img=img2img)
    plain = images(pipe, **call)
    table = TauTable.identity(scheduler, STEPS)
    pipe.scheduler = TunedScheduler.from_table(scheduler, table)
    assert torch.equal(plain, images(pipe, **call))
    pipe.scheduler = TunedScheduler.from_table(scheduler, table.with_tau(table.t * 0.9))
    tuned = images(pipe, **call)
    assert torch.isfinite(tuned).all() and not torch.equal(plain, tuned)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, TunedScheduler) and sorted(loaded.scheduler.tables) == [STEPS]
    assert torch.equal(tuned, images(loaded, **call))


def test_flux_pipeline_at_its_sigmas_and_mu():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                          max_image_seq_len=256)
    pipe = tiny_flux(scheduler)
    call = dict(EMBEDS, num_inference_steps=STEPS, height=16, width=16, output_type="pt")
    plain = images(pipe, **call)
    c = scheduler.config  # Flux: the latent is packed into (16/2)·(16/2) tokens at vae scale factor 1
    mu = calculate_shift(64, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    table = TauTable.identity(scheduler, STEPS, sigmas=FLUX_SIGMAS, mu=mu)
    pipe.scheduler = TunedScheduler.from_table(scheduler, table)
    assert torch.equal(plain, images(pipe, **call))
    pipe.scheduler = TunedScheduler.from_table(scheduler, table.with_tau(table.t * 0.9))
    tuned = images(pipe, **call)
    assert torch.isfinite(tuned).all() and not torch.equal(plain, tuned)
    with pytest.raises(UserError, match="mu follows the image size"):
        images(pipe, **dict(call, height=32, width=32))  # another resolution, another mu

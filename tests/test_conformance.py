"""TunedScheduler conformance: with an identity table it is the scheduler it wraps, for every public call.

For each solver and a sweep of the configurations diffusers itself tests, the wrapper and the plain scheduler get
the same calls and must give bitwise-equal results (or raise the same exception type): timesteps before and after
`set_timesteps`, whole loops with a formula as the model (with noise where the solver draws it), `add_noise`,
`scale_model_input` at arbitrary t, `set_begin_index` loops, custom timesteps / sigmas, `config`, `from_config` in
both directions, save / load, `len`, dtypes, attribute writes.
"""

from __future__ import annotations

import copy
import inspect

import diffusers
import pytest
import torch

from timetuner import TauTable, TunedScheduler
from timetuner.errors import UserError
from timetuner.scheduler import OWN

STEPS = 6
SAMPLE = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

CASES = [
    ("DDIMScheduler", {}),
    ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                           timestep_spacing="trailing", rescale_betas_zero_snr=True)),
    ("DDIMScheduler", dict(prediction_type="sample", thresholding=True, timestep_spacing="linspace")),
    ("DDPMScheduler", {}),
    ("DDPMScheduler", dict(SD, variance_type="fixed_large", clip_sample=False, timestep_spacing="trailing")),
    ("DPMSolverMultistepScheduler", dict(solver_order=1)),
    ("DPMSolverMultistepScheduler", dict(SD)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", prediction_type="v_prediction",
                                         use_exponential_sigmas=True, final_sigmas_type="sigma_min")),
    ("DPMSolverMultistepScheduler", dict(use_beta_sigmas=True, thresholding=True, prediction_type="sample")),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", timestep_spacing="trailing")),
    ("DPMSolverSinglestepScheduler", dict(solver_order=2)),
    ("UniPCMultistepScheduler", dict(solver_type="bh2")),
    ("DEISMultistepScheduler", dict(SD)),
    ("EulerDiscreteScheduler", {}),
    ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, timestep_spacing="trailing")),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", timestep_type="continuous",
                                    use_karras_sigmas=True)),
    ("EulerAncestralDiscreteScheduler", dict(SD)),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("KDPM2DiscreteScheduler", {}),
    ("LCMScheduler", {}),
    ("PNDMScheduler", dict(skip_prk_steps=True)),
]
IDS = [f"{name}-{i}" for i, (name, _) in enumerate(CASES)]


def model(x: torch.Tensor, t) -> torch.Tensor:
    """A formula for the network: depends on x and (float) t, so a wrong t or a wrong input shows."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[0]
    return 0.3 * x * torch.cos(t / 300.0) + 0.05 * torch.sin(t / 100.0)


def pair(name: str, config: dict, steps: int = STEPS):
    plain = getattr(diffusers, name)(**config)
    tuned = TunedScheduler.from_table(getattr(diffusers, name)(**config), TauTable.identity(plain, steps))
    return plain, tuned


def outcome(fn):
    """("ok", result) or ("raise", exception type): the plain and the wrapped call must agree on either."""
    try:
        return "ok", fn()
    except Exception as err:  # comparing what both raise
        return "raise", type(err)


def assert_same(a, b):
    assert a[0] == b[0], (a, b)
    if a[0] == "raise":
        assert a[1] is b[1]
        return
    x, y = a[1], b[1]
    if isinstance(x, torch.Tensor):
        assert x.dtype == y.dtype and x.device == y.device and torch.equal(x, y)
    else:
        assert x == y


def loop(s, begin: int = 0, seed: int = 0, eta: float | None = None, **set_args):
    """A pipeline's denoising loop: set_timesteps, optionally start mid-way, scale, model, step (with noise)."""
    s.set_timesteps(**({"num_inference_steps": STEPS} | set_args))
    if begin:
        s.set_begin_index(begin)
    gen = torch.Generator().manual_seed(seed)
    x = SAMPLE * s.init_noise_sigma
    extra = {"generator": gen} if "generator" in inspect.signature(s.step).parameters else {}
    if eta is not None:
        extra["eta"] = eta
    for t in s.timesteps[begin:]:
        x = s.step(model(s.scale_model_input(x, t), t), t, x, **extra).prev_sample
    return x


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_timesteps_config_and_len_match_before_and_after_set_timesteps(name, config):
    plain, tuned = pair(name, config)
    assert_same(("ok", plain.timesteps), ("ok", tuned.timesteps))
    assert {k: v for k, v in tuned.config.items() if k != OWN} == dict(plain.config)
    assert tuned.config[OWN]["solver_class"] == name
    for key, value in plain.config.items():  # what pipelines read: scheduler.config.<key>
        assert getattr(tuned.config, key) == value
    assert len(tuned) == len(plain) and tuned.order == plain.order
    plain.set_timesteps(STEPS)
    tuned.set_timesteps(STEPS)
    assert_same(("ok", plain.timesteps), ("ok", tuned.timesteps))
    assert_same(("ok", torch.as_tensor(plain.init_noise_sigma)), ("ok", torch.as_tensor(tuned.init_noise_sigma)))
    assert {k: v for k, v in tuned.config.items() if k != OWN} == dict(plain.config)  # rewritten by set_timesteps


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_whole_loops_are_bit_identical(name, config):
    plain, tuned = pair(name, config)
    assert_same(outcome(lambda: loop(plain)), outcome(lambda: loop(tuned)))
    # The same scheduler object, run again (state reset by set_timesteps), and with another noise seed.
    assert_same(outcome(lambda: loop(plain, seed=1)), outcome(lambda: loop(tuned, seed=1)))


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_begin_index_loops_add_noise_and_scale_model_input_at_any_t(name, config):
    plain, tuned = pair(name, config)
    if hasattr(plain, "set_begin_index"):
        assert_same(outcome(lambda: loop(plain, begin=2)), outcome(lambda: loop(tuned, begin=2)))
    for s in (plain, tuned):
        s.set_timesteps(STEPS)
    before_plain, before_tuned = copy.deepcopy(plain), copy.deepcopy(tuned)
    noise = torch.randn(SAMPLE.shape, generator=torch.Generator().manual_seed(3))
    at = plain.timesteps[[1, 3]] if plain.timesteps is not None else torch.tensor([500, 100])
    assert_same(outcome(lambda: plain.add_noise(SAMPLE, noise, at)),
                outcome(lambda: tuned.add_noise(SAMPLE, noise, at)))
    for t in (plain.timesteps[2], 0.0, 999, 17.5):  # on and off the schedule, each on fresh step state
        fresh_plain, fresh_tuned = copy.deepcopy(before_plain), copy.deepcopy(before_tuned)
        assert_same(outcome(lambda s=fresh_plain, t=t: s.scale_model_input(SAMPLE, t)),
                    outcome(lambda s=fresh_tuned, t=t: s.scale_model_input(SAMPLE, t)))


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_custom_timesteps_and_sigmas_run_as_the_plain_class(name, config):
    plain, tuned = pair(name, config)
    accepted = inspect.signature(plain.set_timesteps).parameters
    ran = 0
    if "timesteps" in accepted:
        custom = [999, 800, 500, 300, 120, 10] if name != "LCMScheduler" else [999, 759, 499, 259, 19]
        assert_same(outcome(lambda: loop(plain, num_inference_steps=None, timesteps=custom)),
                    outcome(lambda: loop(tuned, num_inference_steps=None, timesteps=custom)))
        ran += 1
    if "sigmas" in accepted:
        sigmas = [14.6, 6.0, 2.5, 1.0, 0.4, 0.1]
        assert_same(outcome(lambda: loop(plain, num_inference_steps=None, sigmas=sigmas)),
                    outcome(lambda: loop(tuned, num_inference_steps=None, sigmas=sigmas)))
        ran += 1
    if not ran:  # a class without custom grids refuses them through the wrapper as the pipelines check it
        assert "timesteps" not in inspect.signature(plain.set_timesteps).parameters
        with pytest.raises(ValueError, match="does not support custom timesteps"):
            tuned.set_timesteps(timesteps=[999, 500, 10])


@pytest.mark.parametrize(("name", "config"), CASES, ids=IDS)
def test_from_config_both_ways_and_save_load(name, config, tmp_path):
    plain, tuned = pair(name, config)
    cls = getattr(diffusers, name)
    # tuned → plain: the everyday swap `X.from_config(pipe.scheduler.config)`, to the same and to another class.
    for target in (cls, diffusers.EulerDiscreteScheduler, diffusers.DPMSolverMultistepScheduler):
        a, b = target.from_config(plain.config), target.from_config(tuned.config)
        assert {k: v for k, v in b.config.items() if k != OWN} == dict(a.config)
        assert_same(outcome(lambda a=a: loop(a)), outcome(lambda b=b: loop(b)))
    # plain → tuned, and tuned → tuned (tables kept).
    again = TunedScheduler.from_config(tuned.config)
    assert dict(again.config) == dict(tuned.config) and sorted(again.tables) == [STEPS]
    wrapped = TunedScheduler.from_config(plain.config, solver_class=name)
    assert {k: v for k, v in wrapped.config.items() if k != OWN} == dict(plain.config)
    tuned.save_pretrained(tmp_path)
    loaded = TunedScheduler.from_pretrained(tmp_path)
    assert type(loaded.inner) is cls and sorted(loaded.tables) == [STEPS]
    assert_same(outcome(lambda: loop(plain)), outcome(lambda: loop(loaded)))


@pytest.mark.parametrize("config", [{}, dict(SD, timestep_spacing="trailing")])
def test_ddim_with_eta_draws_the_same_noise(config):
    plain, tuned = pair("DDIMScheduler", config)
    a, b = loop(plain, eta=0.7, seed=4), loop(tuned, eta=0.7, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, loop(plain, eta=0.0, seed=4))


def test_attribute_reads_and_writes_reach_the_solver():
    plain, tuned = pair("DPMSolverMultistepScheduler", {})
    tuned.set_timesteps(STEPS)
    tuned.model_outputs = [SAMPLE, SAMPLE]  # as DPM-Solver users and tests do
    assert tuned.inner.model_outputs[0] is SAMPLE and "model_outputs" not in tuned.__dict__
    tuned.lower_order_nums = 1
    assert tuned.inner.lower_order_nums == 1 and tuned.step_index is None and tuned.sigmas is tuned.inner.sigmas
    with pytest.raises(AttributeError, match="^'TunedScheduler' object has no attribute 'no_such_thing'$"):
        _ = tuned.no_such_thing
    assert tuned.guidance_scale is None and tuned.tables[STEPS].is_identity


def test_identity_timesteps_keep_the_plain_dtype_and_a_tuned_table_runs_off_schedule_values_plainly(caplog):
    plain, tuned = pair("DDIMScheduler", {})
    tuned.set_timesteps(STEPS)
    assert tuned.timesteps.dtype == torch.int64
    table = TauTable.identity(plain, STEPS)
    moved = TunedScheduler.from_table(diffusers.DDIMScheduler(), table.with_tau((table.t - 3.5).clamp(min=0)))
    moved.set_timesteps(STEPS)
    assert moved.timesteps.dtype == torch.float32 and moved.timesteps[0] == table.t[0] - 3.5
    reference = diffusers.DDIMScheduler()
    reference.set_timesteps(STEPS)
    # A loop that passes the solver's own t (not τ): the plain behaviour, with one warning.
    with caplog.at_level("WARNING", logger="timetuner.scheduler"):
        for t in reference.timesteps:
            a = reference.step(model(SAMPLE, t), t, SAMPLE).prev_sample
            b = moved.step(model(SAMPLE, t), t, SAMPLE).prev_sample
            assert torch.equal(a, b)
    assert sum("no tuned τ" in r.message for r in caplog.records) == 1
    # Starting mid-schedule without set_begin_index: τ_k is looked up as the plain classes look t up.
    moved.set_timesteps(STEPS)
    reference.set_timesteps(STEPS)
    x_ref = reference.step(model(SAMPLE, 500), reference.timesteps[3], SAMPLE).prev_sample
    x_tuned = moved.step(model(SAMPLE, 500), moved.timesteps[3], SAMPLE).prev_sample
    assert torch.equal(x_ref, x_tuned)


def test_tables_in_the_solvers_own_time_units():
    plain = diffusers.EulerDiscreteScheduler(prediction_type="v_prediction", timestep_type="continuous")
    table = TauTable.identity(plain, STEPS)  # τ = ¼ log σ: negative near the data
    assert (table.tau < 0).any()
    TunedScheduler.from_table(plain, table.with_tau(table.tau * 0.99))
    with pytest.raises(UserError, match="leaves the solver's time range"):
        TunedScheduler.from_table(plain, table.with_tau(table.tau + 50.0))


@pytest.mark.parametrize(("config", "needle"), [
    ({"_class_name": "TunedScheduler", OWN: {"solver_class": "NoSuchScheduler"}}, "'NoSuchScheduler' is not a"),
    ({"_class_name": "TunedScheduler", "inner_class": "UNet2DModel", "inner_config": {}}, "'UNet2DModel' is not a"),
])
def test_a_config_naming_no_diffusers_solver_is_refused_in_one_line(config, needle):
    with pytest.raises(UserError, match=needle):
        TunedScheduler.from_config(config)


def test_tables_of_another_noise_schedule_or_broken_tables_are_refused_on_load():
    plain, tuned = pair("DDIMScheduler", {})
    config = dict(tuned.config)
    other = {**{k: v for k, v in config.items() if k != "_use_default_values"}, "beta_schedule": "scaled_linear"}
    with pytest.raises(UserError, match="beta_schedule"):
        TunedScheduler.from_config(other)
    table = dict(config[OWN]["tables"][str(STEPS)])
    for tau, needle in (([float("nan")] * STEPS, "non-finite"), (list(range(STEPS)), "increases")):
        broken = {**config, OWN: {**config[OWN], "tables": {str(STEPS): {**table, "tau": tau, "t": tau}}}}
        with pytest.raises(UserError, match=needle):
            TunedScheduler.from_config(broken)


def test_legacy_saved_configs_still_load():
    plain = diffusers.DDIMScheduler()
    table = TauTable.identity(plain, STEPS)
    legacy = {"_class_name": "TunedScheduler", "inner_class": "DDIMScheduler",
              "inner_config": {k: v for k, v in plain.config.items() if not k.startswith("_")},
              "tables": {str(STEPS): table.to_dict()}, "guidance_scale": None}
    loaded = TunedScheduler.from_config(legacy)
    assert type(loaded.inner) is diffusers.DDIMScheduler and sorted(loaded.tables) == [STEPS]
    assert_same(outcome(lambda: loop(plain)), outcome(lambda: loop(loaded)))


def test_a_pipeline_folder_and_a_table_saved_before_the_restructure_still_load():
    """tests/fixtures/pre-move-*: saved by commit 1e7d0c2, the release before the subpackage move (a tiny DDPM
    pipeline with a tuned DDIM table, its table file, and the images it sampled then)."""
    from pathlib import Path

    import numpy as np
    from diffusers import DiffusionPipeline

    fixtures = Path(__file__).parent / "fixtures"
    pipe = DiffusionPipeline.from_pretrained(fixtures / "pre-move-pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, TunedScheduler) and sorted(pipe.scheduler.tables) == [4]
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    # Sampled then on another CPU: float32 kernels differ there by a few ulps (2.4e-6 seen on pixels in [0, 1]); a
    # changed τ, grid or solver moves pixels by orders of magnitude more.
    assert np.allclose(images, np.load(fixtures / "pre-move-images.npy"), atol=1e-5, rtol=0)
    table = TauTable.load(fixtures / "pre-move-table.safetensors")
    assert torch.equal(table.tau, pipe.scheduler.tables[4].tau) and not table.is_identity

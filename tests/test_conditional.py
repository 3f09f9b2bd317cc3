"""Conditional and latent models: tiny Stable Diffusion (text + CFG, ε and v), tiny DiT (class labels + CFG).

Every pipeline is built in code, saved to a temporary folder and loaded back with `from_pretrained(folder)`;
nothing touches the network. Checks: the adapters reproduce the pipelines' guided sampling; fit at NFE 4 runs
end to end; τ = t is bit-identical to the plain pipeline with guidance > 1 (and img2img at strength < 1); tables
select by guidance scale and round-trip through save_pretrained / from_pretrained in a fresh process; models
that cannot take a fractional τ, overlapping prompt sets and bad scales are refused in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DiTTransformer2DModel,
    StableDiffusionImg2ImgPipeline,
    UNet2DModel,
)
from typer.testing import CliRunner

from timetuner import TauTable, TunedScheduler
from timetuner.cli.main import app
from timetuner.core.denoiser import Denoiser, class_conditioning, refuse_integer_timesteps, text_conditioning
from timetuner.core.solver import Solver
from timetuner.errors import UserError
from timetuner.fitting.api import fit
from timetuner.tiny import quiet

runner = CliRunner()
FIT_PROMPTS = ["a red cube on a table", "a blue sphere in the sky", "a green cat"]
EVAL_PROMPTS = ["a yellow boat at sea", "an orange house"]
# The paper objective with a short search always moves τ on these untrained networks; two e2e Adam steps may not.
FAST = dict(scheduler="ddim", samples=4, eval_samples=4, reference_steps=8, reference_n=500, objective="paper",
            search_points=3, search_refine=2)


@contextlib.contextmanager
def one_thread():
    """Tiny networks gain nothing from intra-op threads; on a busy 2-core machine two threads that wait on each
    other made these fits ~100× slower (0.6 s → 150 s per fit), so this module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


# -- tiny pipelines (sd_folders, dit_folder, sd_pipe, dit_pipe) are built once per session in conftest.py -------
@pytest.fixture(scope="session")
def tables_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tables")


@pytest.fixture(scope="session")
def fitted(sd_folders, dit_folder, tables_dir):
    """NFE-4 fits, end to end from the folders: SD (ε) at 7.5 and 3, SD (v) at 5, DiT at 4 (tables on disk)."""
    out = tables_dir
    runs = {
        "sd": (sd_folders["sd"], dict(guidance_scale=7.5, prompts=FIT_PROMPTS, eval_prompts=EVAL_PROMPTS)),
        "sd-cfg3": (sd_folders["sd"], dict(guidance_scale=3.0, prompts=FIT_PROMPTS, eval_prompts=EVAL_PROMPTS)),
        "sd-v": (sd_folders["sd-v"], dict(guidance_scale=5.0, prompts=FIT_PROMPTS, eval_prompts=EVAL_PROMPTS)),
        "dit": (dit_folder, dict(guidance_scale=4.0, class_labels=(1, 7, 42))),
    }
    with one_thread():
        return {name: fit(str(folder), out=out / f"{name}.safetensors", progress=False, nfe=4, force=True,
                          **{**FAST, **options}) for name, (folder, options) in runs.items()}


# -- the adapters reproduce the pipelines ---------------------------------------------------------------------------
def test_text_adapter_reproduces_stable_diffusion_with_guidance(sd_pipe):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    den = Denoiser(sd_pipe.unet, guidance_scale=7.5)
    den = den.bind(text_conditioning(sd_pipe, FIT_PROMPTS[:2], 2))
    sampler = Solver.named(den, sd_pipe.scheduler.config, "ddim", None, 4)
    with torch.no_grad():
        ours = sampler.rollout(noise)
    sd_pipe.scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    theirs = sd_pipe(FIT_PROMPTS[:2], num_inference_steps=4, guidance_scale=7.5, latents=noise,
                     output_type="latent").images
    assert den.evaluations == 2 * 2 * 4  # guided: one batched call of 2N per evaluation
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_class_adapter_reproduces_dit_with_guidance_and_learned_sigma(dit_pipe):
    from timetuner.core.loading import decode_latents

    labels = [3, 999]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    den = Denoiser(dit_pipe.transformer, guidance_scale=4.0).bind(class_conditioning(dit_pipe.transformer, labels, 2))
    sampler = Solver.named(den, dit_pipe.scheduler.config, "ddim", None, 4)
    with torch.no_grad():
        ours = (decode_latents(dit_pipe.vae, sampler.rollout(noise)) / 2 + 0.5).clamp(0, 1)
    dit_pipe.scheduler = DDIMScheduler.from_config(dit_pipe.scheduler.config)
    theirs = dit_pipe(labels, guidance_scale=4.0, num_inference_steps=4, generator=torch.Generator().manual_seed(2),
                      output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_conditioning_follows_the_samples_through_batch_splits(sd_pipe):
    cond = text_conditioning(sd_pipe, FIT_PROMPTS, 5)
    assert cond.index.tolist() == [0, 1, 2, 0, 1]  # sample i uses prompt i mod P
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([900.0, 700.5, 500.0, 300.25, 100.0])
    with torch.no_grad():
        whole = Denoiser(sd_pipe.unet, guidance_scale=7.5).bind(cond)(x, t)
        split = Denoiser(sd_pipe.unet, guidance_scale=7.5, batch_size=2).bind(cond)(x, t)
        alone = [Denoiser(sd_pipe.unet, guidance_scale=7.5).bind(text_conditioning(sd_pipe, [FIT_PROMPTS[i % 3]], 1))(
            x[i : i + 1], t[i : i + 1]) for i in range(5)]
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-4)  # float noise of other batch sizes only
    torch.testing.assert_close(torch.cat(alone), whole, rtol=0, atol=1e-4)  # text encoder: batch of 1 vs 3
    with pytest.raises(RuntimeError, match="bound conditioning has 5 rows but the batch has 4"):
        Denoiser(sd_pipe.unet, guidance_scale=7.5).bind(cond)(x[:4], t[:4])


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_gradient_reaches_tau_through_the_guided_output(sd_pipe, dit_pipe, kind):
    # What e2e and adam optimise: d(final sample)/dτ through CFG, the timestep embedding and scheduler.step.
    pipe = sd_pipe if kind == "sd" else dit_pipe
    network = pipe.unet if kind == "sd" else pipe.transformer
    cond = (text_conditioning(pipe, FIT_PROMPTS, 3) if kind == "sd" else class_conditioning(network, [1, 2], 3))
    grads = []
    for checkpoint in (False, True):  # gradient checkpointing (latent fits) must not change the gradient
        den = Denoiser(network, guidance_scale=6.0, checkpoint=checkpoint, batch_size=2).bind(cond)
        sampler = Solver.named(den, pipe.scheduler.config, "ddim", None, 3)
        taus = sampler.t.float().clone().requires_grad_(True)
        noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
        sampler.rollout(noise, taus).pow(2).sum().backward()
        grads.append(taus.grad)
    assert torch.isfinite(grads[0]).all() and (grads[0][:-1] != 0).all()
    torch.testing.assert_close(grads[0], grads[1])


# -- fit end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd", "sd-v", "dit"])
def test_fit_at_nfe_4_runs_end_to_end(fitted, tables_dir, name):
    result = fitted[name]
    table = TauTable.load(tables_dir / f"{name}.safetensors")
    assert table.nfe == 4 and torch.equal(table.tau, result.tuned.tau) and not table.is_identity
    meta = table.metadata
    assert meta["latent"] and meta["held_out_space"] == "images decoded by the VAE"
    assert "x0_gap" in meta["held_out"] and "dist_gap" not in meta["held_out"]  # no feature extractor by default
    assert meta["guidance_scale"] == {"sd": 7.5, "sd-v": 5.0, "dit": 4.0}[name]
    assert meta["conditioning"]["kind"] == ("class" if name == "dit" else "text")
    assert all(r["loss_after"] <= r["loss_before"] for r in result.rows)
    if name == "dit":
        # held out: the same labels on held-out noises, recorded as such
        assert meta["fit_config"]["class_labels"] == meta["fit_config"]["eval_class_labels"] == [1, 7, 42]
    else:
        assert meta["fit_config"]["prompts"] == FIT_PROMPTS and meta["fit_config"]["eval_prompts"] == EVAL_PROMPTS
    if name == "sd-v":
        assert meta["scheduler_config"]["prediction_type"] == "v_prediction"


# -- τ = t is bit-identical in the pipelines; τ reaches the network ---------------------------------------------------
def _sd_run(pipe, scheduler, img2img: bool = False):
    pipe.scheduler = scheduler
    gen = torch.Generator().manual_seed(5)
    if img2img:
        image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
        pipe = quiet(StableDiffusionImg2ImgPipeline(**pipe.components))
        return pipe(EVAL_PROMPTS, image=image, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
                    generator=gen, output_type="pt").images
    return pipe(EVAL_PROMPTS, num_inference_steps=4, guidance_scale=7.5, generator=gen, output_type="pt").images


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_identity_table_is_bit_identical_in_stable_diffusion_with_guidance(sd_pipe, fitted, img2img):
    base = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    table = fitted["sd"].tuned
    identity = TunedScheduler.from_table(base, table.with_tau(table.t), guidance_scale=7.5)
    assert torch.equal(_sd_run(sd_pipe, base, img2img), _sd_run(sd_pipe, identity, img2img))
    seen = []
    hook = sd_pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(float(args[1].reshape(-1)[0])))
    try:
        tuned = _sd_run(sd_pipe, TunedScheduler.from_table(base, table, guidance_scale=7.5), img2img)
    finally:
        hook.remove()
    begin = 4 - len(seen)  # img2img at strength 0.6 runs the last evaluations only
    assert (begin > 0) == img2img
    assert seen == pytest.approx(table.tau.tolist()[begin:], abs=1e-3)
    assert not torch.equal(tuned, _sd_run(sd_pipe, base, img2img))


def test_identity_table_is_bit_identical_in_dit_with_guidance(dit_pipe, fitted):
    base = DDIMScheduler.from_config(dit_pipe.scheduler.config)
    table = fitted["dit"].tuned

    def run(scheduler):
        dit_pipe.scheduler = scheduler
        return dit_pipe([1, 7], guidance_scale=4.0, num_inference_steps=4, generator=torch.Generator().manual_seed(8),
                        output_type="pt").images

    plain = run(base)
    assert torch.equal(plain, run(TunedScheduler.from_table(base, table.with_tau(table.t), guidance_scale=4.0)))
    assert not torch.equal(plain, run(TunedScheduler.from_table(base, table, guidance_scale=4.0)))


# -- per-scale selection and the fresh-process round trip ------------------------------------------------------------
def test_tables_are_selected_by_guidance_scale(sd_pipe, fitted):
    base = DDIMScheduler.from_config(sd_pipe.scheduler.config)
    both = [fitted["sd"].tuned, fitted["sd-cfg3"].tuned]
    with pytest.raises(UserError, match=r"guidance scale 3, guidance scale 7\.5.*one of 3, 7\.5"):
        TunedScheduler.from_table(base, both)
    for scale, name in ((7.5, "sd"), (3, "sd-cfg3")):
        sched = TunedScheduler.from_table(base, both, guidance_scale=scale)
        sched.set_timesteps(4)
        assert sched.guidance_scale == scale
        assert torch.equal(sched.timesteps, fitted[name].tuned.tau.float())
    with pytest.raises(UserError, match=r"no table was fitted at guidance scale 5 .*3, guidance scale 7\.5"):
        TunedScheduler.from_table(base, both, guidance_scale=5)
    one = TunedScheduler.from_table(base, fitted["sd"].tuned)  # a single scale needs no choice
    assert one.guidance_scale == 7.5
    with pytest.raises(UserError, match="holds tables for guidance scale 7.5"):
        TunedScheduler.from_table(one, fitted["sd-cfg3"].tuned)
    unconditional = TauTable.identity(base, 4)
    with pytest.raises(UserError, match="an unconditional model, guidance scale 7.5"):
        TunedScheduler.from_table(base, [unconditional, fitted["sd"].tuned])
    assert TunedScheduler.from_table(base, unconditional).guidance_scale is None


@pytest.mark.slow  # a second process loads SD (~10 s)
def test_tuned_stable_diffusion_round_trips_in_a_fresh_process(sd_folders, fitted, tmp_path):
    pipe = quiet(DiffusionPipeline.from_pretrained(sd_folders["sd"]))
    tables = [fitted["sd"].tuned, fitted["sd-cfg3"].tuned]
    pipe.scheduler = TunedScheduler.from_table(DDIMScheduler.from_config(pipe.scheduler.config), tables,
                                               unet=pipe.unet, guidance_scale=7.5)
    expected = pipe(EVAL_PROMPTS, num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(9),
                    output_type="pt").images
    pipe.save_pretrained(tmp_path / "tuned")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import timetuner, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained({str(tmp_path / "tuned")!r})
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe.scheduler).__name__ == "TunedScheduler", type(pipe.scheduler)
        images = pipe({EVAL_PROMPTS!r}, num_inference_steps=4, guidance_scale=7.5,
                      generator=torch.Generator().manual_seed(9), output_type="pt").images
        same = torch.equal(images, torch.load({str(tmp_path / "expected.pt")!r}))
        print(pipe.scheduler.guidance_scale, same, ",".join(f"{{v:.4f}}" for v in pipe.scheduler.timesteps.tolist()))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    scale, same, taus = out.stdout.strip().splitlines()[-1].split()
    assert scale == "7.5" and same == "True"
    assert [float(v) for v in taus.split(",")] == pytest.approx(fitted["sd"].tuned.tau.tolist(), abs=1e-3)


# -- the CLI: one table per scale, and one-line refusals --------------------------------------------------------------
@pytest.mark.parametrize("named", [False, True], ids=["default-names", "out"])
def test_cli_fits_one_table_per_guidance_scale(sd_folders, tmp_path, monkeypatch, named):
    monkeypatch.chdir(tmp_path)
    prompts, eval_prompts = tmp_path / "fit.txt", tmp_path / "eval.txt"
    prompts.write_text("\n".join(FIT_PROMPTS) + "\n\n# a comment\n")
    eval_prompts.write_text("\n".join(EVAL_PROMPTS) + "\n")
    result = runner.invoke(app, ["fit", "--model", str(sd_folders["sd"]), "--prompts", str(prompts), "--eval-prompts",
                                 str(eval_prompts), "--guidance-scale", "3,7.5", "--nfe", "4", "--scheduler", "ddim",
                                 "--samples", "2",
                                 "--eval-samples", "2", "--reference-steps", "6", "--e2e-iters", "2",
                                 "--dtype", "float32", "--json", *(["--out", "sd.safetensors"] if named else [])])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert [line["guidance_scale"] for line in lines] == [3.0, 7.5]
    stem = "sd" if named else "tau-ddim-uniform-nfe4"
    for scale, tag in ((3.0, "cfg3"), (7.5, "cfg7.5")):
        table = TauTable.load(tmp_path / f"{stem}-{tag}.safetensors")
        assert table.metadata["guidance_scale"] == scale and table.nfe == 4
        assert table.metadata["fit_config"]["prompts"] == FIT_PROMPTS


@pytest.mark.parametrize("args, message", [
    (["--guidance-scale", "7.5,abc"], "--guidance-scale 'abc' is invalid"),
    (["--guidance-scale", "0.5"], "--guidance-scale '0.5' is invalid"),
    (["--guidance-scale", "3,3"], "lists 3 twice"),
    (["--prompts", "FIT", "--eval-prompts", "OVERLAP"], "--eval-prompts shares 1 prompt(s) with --prompts"),
    (["--prompts", "missing.txt"], "--prompts 'missing.txt' is not a readable prompt file"),
    (["--class-labels", "1,2"], "--class-labels applies to class-conditional models"),
    (["--dtype", "float64"], "--dtype 'float64' is not known"),
    (["--variant", "fp16"], "could not be loaded: You are trying to load the model files of the `variant=fp16`"),
])
def test_cli_refuses_bad_conditioning_in_one_line(sd_folders, tmp_path, args, message):
    fit_file, overlap = tmp_path / "fit.txt", tmp_path / "overlap.txt"
    fit_file.write_text("\n".join(FIT_PROMPTS))
    overlap.write_text("something else\n  A RED cube  on a table\n")
    args = [{"FIT": str(fit_file), "OVERLAP": str(overlap)}.get(a, a) for a in args]
    result = runner.invoke(app, ["fit", "--model", str(sd_folders["sd"]), "--nfe", "4", "--out",
                                 str(tmp_path / "t.safetensors"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0
    assert not (tmp_path / "t.safetensors").exists()


def test_sample_refuses_a_latent_conditional_model_in_one_line(sd_folders, tmp_path):
    result = runner.invoke(app, ["sample", "--model", str(sd_folders["sd"]), "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2 and "not an unconditional pixel-space UNet2DModel pipeline" in result.output
    assert not (tmp_path / "x.png").exists()


def test_conditioning_options_on_an_unconditional_model_are_refused():
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    for option, value in (("guidance_scale", 7.5), ("prompts", ("a cat",)), ("class_labels", (1,))):
        with pytest.raises(UserError, match=f"--{option.replace('_', '-')} applies to conditional models"):
            fit(unet=unet, base_scheduler_config=DDIMScheduler().config, progress=False, nfe=2,
                **{**FAST, option: value})


def test_class_labels_out_of_range_are_refused(dit_folder):
    with pytest.raises(UserError, match="--class-labels 1000 is out of range; accepted: integers 0 to 999"):
        fit(str(dit_folder), progress=False, nfe=2, class_labels=(1, 1000), **FAST)


# -- networks that cannot take a fractional τ --------------------------------------------------------------------------
def test_learned_time_embedding_is_refused():
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8, time_embedding_type="learned", num_train_timesteps=1000)
    with pytest.raises(UserError, match="time embedding is learned"):
        fit(unet=unet, base_scheduler_config=DDIMScheduler().config, progress=False, nfe=2, **FAST)


class IntegerTimeUNet(UNet2DModel):
    """A UNet that truncates its timestep to an integer before the embedding (as some ports do)."""

    def forward(self, sample, timestep, *args, **kwargs):
        return super().forward(sample, torch.as_tensor(timestep).long(), *args, **kwargs)


class IntegerTimeDiT(DiTTransformer2DModel):
    def forward(self, hidden_states, timestep=None, class_labels=None, **kwargs):
        return super().forward(hidden_states, timestep=timestep.long(), class_labels=class_labels, **kwargs)


def test_a_network_that_casts_timesteps_to_integers_is_refused():
    torch.manual_seed(0)
    unet = IntegerTimeUNet(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           layers_per_block=1, norm_num_groups=8)
    with pytest.raises(UserError, match="casts timesteps to integers"):
        fit(unet=unet, base_scheduler_config=DDIMScheduler().config, progress=False, nfe=2, **FAST)
    dit = IntegerTimeDiT(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                         sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    den = Denoiser(dit, guidance_scale=4.0).bind(class_conditioning(dit, [1, 2], 2))
    with pytest.raises(UserError, match="IntegerTimeDiT gives identical outputs at t = 500 and 500.5"):
        refuse_integer_timesteps(den)
    assert den.evaluations == 0  # the probe is not counted


# -- eval and report on conditional and latent tables ------------------------------------------------------------
FEATURES = "tests.feature_module:build"  # a user's feature module: offline, any image size


@pytest.fixture(scope="session")
def small_images(tmp_path_factory):
    """Reference images of the tiny VAE's output size (16×16 RGB)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("ref16")
    gen = torch.Generator().manual_seed(5)
    for i in range(12):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def _eval_json(args):
    result = runner.invoke(app, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_eval_of_a_text_to_image_table(sd_folders, fitted, tables_dir, small_images):
    """Guided at the table's scale, on its held-out prompts; gaps in latent space, FD/KID on decoded images."""
    record = _eval_json(["--table", str(tables_dir / "sd.safetensors"), "--model", str(sd_folders["sd"]),
                         "--n", "6", "--gap-n", "4", "--reference-steps", "8", "--fid", "--ref", str(small_images),
                         "--features", FEATURES, "--bootstrap", "20", "--reference-n", "6"])
    assert record["conditioning"] == f"{len(EVAL_PROMPTS)} held-out prompts, guidance 7.5"
    assert record["trajectory_gap_space"] == "latent space"
    assert len(record["trajectory_gap_plain"]) == len(record["trajectory_gap_tuned"]) == len(record["state_times"]) >= 4
    assert record["trajectory_gap_plain"] != record["trajectory_gap_tuned"]  # the tuned τ changes the trajectory
    for name in ("x0_gap", "dist_gap", "data_fd"):
        assert record[name]["low"] <= record[name]["change"] <= record[name]["high"]
    assert record["data_fd"]["plain"] > 0 and record["reference_n"] == 6 and record["gap_n"] == 4


def test_eval_conditioning_follows_the_samples_through_the_gap_split(sd_pipe, sd_folders, fitted, tables_dir):
    """Samples beyond --gap-n keep their own prompts: the final samples do not depend on where the split falls."""
    from timetuner.measuring.evaluation import Setup, evaluate

    setup = Setup(str(tables_dir / "sd.safetensors"), str(sd_folders["sd"]))
    split = evaluate(setup, n=5, gap_n=2, reference_steps=4, bootstrap=5)
    whole = evaluate(setup, n=5, gap_n=5, reference_steps=4, bootstrap=5)
    assert split.plain_final.shape == (5, 3, 16, 16)  # decoded by the VAE
    torch.testing.assert_close(split.plain_final, whole.plain_final, atol=1e-4, rtol=0)
    torch.testing.assert_close(split.tuned_final, whole.tuned_final, atol=1e-4, rtol=0)
    other = Setup(str(tables_dir / "sd.safetensors"), str(sd_folders["sd"]), prompts="a purple owl")
    assert not torch.allclose(evaluate(other, n=5, gap_n=2, reference_steps=4, bootstrap=5).plain_final,
                              whole.plain_final)


def test_report_of_a_class_conditional_table(dit_folder, fitted, tables_dir, small_images, tmp_path):
    from test_report import check_report

    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(tables_dir / "dit.safetensors"), "--model", str(dit_folder),
                                 "--out", str(out), "--n", "4", "--gap-n", "4", "--reference-steps", "6",
                                 "--nfes", "3", "--ref", str(small_images), "--features", FEATURES,
                                 "--bootstrap", "10", "--class-labels", "3,9", "--reference-n", "4"])
    assert result.exit_code == 0, result.output
    check_report(out)
    record = json.loads((out / "report.json").read_text())
    assert record["conditioning"] == "class labels 3,9, guidance 4"
    assert [row["nfe"] for row in record["gap_vs_nfe"]] == [3, 4]
    assert "class labels 3,9, guidance 4" in (out / "report.md").read_text()


@pytest.mark.parametrize("table, args, message", [
    ("sd", ["--prompts", FIT_PROMPTS[0]], "shares 1 prompt(s) with the prompts the table was fitted on"),
    ("sd", ["--class-labels", "1,2"], "--class-labels applies to class-conditional models"),
    ("dit", ["--prompts", "a cat"], "--prompts applies to text-to-image models"),
    ("dit", ["--class-labels", "1,x"], "--class-labels 'x' is not a class label"),
    ("dit", ["--class-labels", "5000"], "--class-labels 5000 is out of range"),
])
def test_eval_refuses_bad_conditioning_in_one_line(sd_folders, dit_folder, fitted, tables_dir, table, args,
                                                   message):
    model = dit_folder if table == "dit" else sd_folders["sd"]
    result = runner.invoke(app, ["eval", "--table", str(tables_dir / f"{table}.safetensors"), "--model", str(model),
                                 "--n", "2", "--gap-n", "2", "--reference-steps", "2", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_eval_refuses_conditioning_options_on_an_unconditional_model(tiny_run, tmp_path):
    table = tmp_path / "t.safetensors"
    fit(str(tiny_run), out=table, progress=False, nfe=2, force=True, **FAST)
    result = runner.invoke(app, ["eval", "--table", str(table), "--model", str(tiny_run), "--prompts", "a cat"])
    assert result.exit_code == 2 and "--prompts applies to conditional models" in result.output

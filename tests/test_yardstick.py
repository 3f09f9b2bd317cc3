"""The yardstick: distribution gap to the converged sampler, one measurement path, hash-checked growing caches."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

from timetuner.cli.main import app
from timetuner.core.cache import cache_path, cached, grown
from timetuner.core.loading import load_model
from timetuner.core.reference import reference_key
from timetuner.measuring.evaluation import Setup, evaluate
from timetuner.measuring.yardstick import build_yardstick

runner = CliRunner()
FIT = dict(nfe=3, scheduler="ddim", objective="paper", samples=8, eval_samples=40, eval_gap_samples=16,
           reference_steps=6, reference_n=300, search_points=3, search_refine=2, force=True)


# -- the cache -----------------------------------------------------------------------------------------------------
def test_a_damaged_cache_entry_is_detected_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("TIMETUNER_CACHE", str(tmp_path))
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(100, dtype=torch.float32)}

    assert torch.equal(cached("k1", compute)["x"], torch.arange(100.0)) and len(calls) == 1
    assert torch.equal(cached("k1", compute)["x"], torch.arange(100.0)) and len(calls) == 1  # a hit
    path = cache_path("k1")
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\x00\x00\x80\x7f" * 2  # alter the tensor bytes; the file still parses
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged"):
        assert torch.equal(cached("k1", compute)["x"], torch.arange(100.0))
    assert len(calls) == 2  # recomputed, never the altered values
    path.write_bytes(path.read_bytes()[:50])  # truncated
    with pytest.warns(UserWarning, match="damaged"):
        cached("k1", compute)
    assert len(calls) == 3


def test_shipped_entries_are_found_by_key_and_checked_like_any_other(tmp_path, monkeypatch):
    from timetuner.core.cache import write

    monkeypatch.setenv("TIMETUNER_CACHE", str(tmp_path / "made"))
    write("s1", {"x": torch.ones(3)})
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    cache_path("s1").replace(shipped / "s1.safetensors")
    monkeypatch.setattr("timetuner.assets.SHIPPED_CACHE", shipped)
    assert torch.equal(cached("s1", lambda: pytest.fail("a shipped entry is not recomputed"))["x"], torch.ones(3))
    raw = bytearray((shipped / "s1.safetensors").read_bytes())
    raw[-4:] = b"\x00\x00\x00\x40"
    (shipped / "s1.safetensors").write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged"):
        assert torch.equal(cached("s1", lambda: {"x": torch.zeros(3)})["x"], torch.zeros(3))
    assert (shipped / "s1.safetensors").exists()  # the package's file is left alone; the user cache gets the new one


def test_the_embedded_models_reference_set_ships():
    from timetuner.assets import SHIPPED_CACHE
    from timetuner.core.cache import read
    from timetuner.core.reference import REFERENCE_SET_SEED
    from timetuner.measuring.fid import load_extractor

    model = load_model(None)
    key = reference_key("reference-set", model, model.denoiser, "dpm++", 100, REFERENCE_SET_SEED, 500,
                        load_extractor("digits").name)
    assert (SHIPPED_CACHE / f"{key}.safetensors").is_file()
    assert read(key)["rows"].shape == (10_000, 64)


def test_a_grown_set_computes_only_missing_blocks_and_keeps_its_first_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("TIMETUNER_CACHE", str(tmp_path))
    computed, progress = [], []

    def block(i):
        computed.append(i)
        return torch.randn(10, 3, generator=torch.Generator().manual_seed(i))

    small = grown("g", 25, 10, block)
    assert small.shape == (25, 3) and computed == [0, 1, 2]
    big = grown("g", 47, 10, block, progress=lambda done, total: progress.append((done, total)))
    assert big.shape == (47, 3) and computed == [0, 1, 2, 3, 4] and progress == [(0, 2), (1, 2), (2, 2)]
    assert torch.equal(big[:25], small)
    assert torch.equal(grown("g", 30, 10, block), big[:30]) and computed == [0, 1, 2, 3, 4]


# -- the distribution gap ------------------------------------------------------------------------------------------
def test_distribution_gap_of_the_reference_sampler_is_near_zero_and_of_noise_large():
    from timetuner.core.reference import reference_samples

    model = load_model(None)  # the embedded model: its samples are digits, far from noise
    yard = build_yardstick(model, lambda lo, hi: model.denoiser, "dpm++", 6, 600, progress=False)
    assert yard.reference.shape == (600, 64)
    noise = torch.randn((600, 1, 8, 8), generator=torch.Generator().manual_seed(123))  # disjoint from the set's
    own = yard.features(reference_samples(model.denoiser, model.base_config, noise, "dpm++", 6))
    pure_noise = yard.features(torch.randn((600, 1, 8, 8), generator=torch.Generator().manual_seed(7)).clamp(-1, 1))
    self_gap, noise_gap = yard.dist_gap(own), yard.dist_gap(pure_noise)
    assert self_gap < 0.05 * noise_gap, (self_gap, noise_gap)
    assert abs(yard.dist_kid(own)) < 0.02 * yard.dist_kid(pure_noise)


def test_reference_cache_keys_change_with_the_model_weights(tiny_run):
    a = load_model(str(tiny_run))
    b = load_model(str(tiny_run))
    with torch.no_grad():
        next(b.network.parameters()).add_(1e-3)
    for what, parts in (("samples", (1_000_003, 16)), ("reference-set", (7_000_000, 500, "digits:x"))):
        key_a = reference_key(what, a, a.denoiser, "dpm++", 100, *parts)
        assert key_a == reference_key(what, load_model(str(tiny_run)), a.denoiser, "dpm++", 100, *parts)
        assert key_a != reference_key(what, b, b.denoiser, "dpm++", 100, *parts)
        assert key_a != reference_key(what, a, a.denoiser, "dpm++", 50, *parts)


# -- one measurement path ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tiny_run, tmp_path_factory):
    from timetuner.fitting.api import fit

    out = tmp_path_factory.mktemp("yard") / "t.safetensors"
    return out, fit(str(tiny_run), out=out, progress=False, **FIT)


@pytest.mark.slow  # a fit, an evaluate and a CLI eval (~40 s)
def test_the_same_table_gives_identical_figures_through_fit_and_eval(tiny_run, fitted):
    out, result = fitted
    held = result.held_out
    record = evaluate(Setup(str(out), str(tiny_run)), reference_steps=10, bootstrap=1000,
                      yardstick=Setup(str(out), str(tiny_run)).yardstick(progress=False)).record
    assert (record["n"], record["gap_n"], record["reference_n"]) == (40, 16, 300)
    for key in ("x0_gap", "dist_gap", "data_fd"):
        assert record[key] == held[key], key
    assert record["dist_kid"] == held["dist_kid"] and record["better"] == held["better"]
    cli = runner.invoke(app, ["eval", "--model", str(tiny_run), "--table", str(out), "--reference-steps", "10",
                              "--json"])
    assert cli.exit_code == 0, cli.output
    printed = json.loads(cli.stdout.strip().splitlines()[-1])
    for key in ("x0_gap", "dist_gap", "data_fd"):
        assert printed[key] == held[key], key


@pytest.mark.slow  # builds an eval setup and grows a reference set (~15 s)
def test_eval_with_more_reference_samples_grows_the_cache(tiny_run, fitted):
    out, _ = fitted
    setup = Setup(str(out), str(tiny_run))
    small = setup.yardstick(progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # growing is not an error: no damaged-entry warning
        big = setup.yardstick(reference_n=700, progress=False)
    assert big.reference.shape[0] == 700 and (big.reference[:300] == small.reference).all()


@pytest.mark.slow  # a CLI eval with a reference trajectory (~15 s)
def test_fit_and_eval_print_the_three_figures_and_decide_on_the_gaps(tiny_run, fitted):
    out, _ = fitted
    result = runner.invoke(app, ["eval", "--model", str(tiny_run), "--table", str(out), "--reference-steps", "10"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for start in ("distribution gap (FD", "x0 gap (RMS", "data FD (secondary"):
        line = next(line for line in lines if line.startswith(start))
        assert "95 % CI [" in line, line
    assert any(line.startswith("verdict (distribution gap and x0 gap)") for line in lines)

"""FID/KID through clean-fid: extractors, reference folders and their cache, and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from timetuner.cli.main import app
from timetuner.core.data import load_digits_tensor
from timetuner.errors import UserError
from timetuner.measuring.fid import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    check_reference,
    digits_extractor,
    extractor_name,
    load_extractor,
    reference_features,
    tensor_features,
    to_uint8,
)
from timetuner.measuring.metrics import frechet_distance

runner = CliRunner()


def write_pngs(images: torch.Tensor, folder, size: int | None = None):
    """Save N×C×H×W images in [-1, 1] as PNG files (optionally resized), as a user's reference folder would be."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(to_uint8(images)):
        image = Image.fromarray(array)
        if size is not None:
            image = image.resize((size, size), Image.Resampling.NEAREST)
        image.save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def digits():
    return digits_extractor()


@pytest.fixture(scope="module")
def held_out_folder(tmp_path_factory):
    return write_pngs(load_digits_tensor("test")[0], tmp_path_factory.mktemp("ref") / "held-out")


def test_clean_fid_computes_the_distance(monkeypatch, digits):
    import cleanfid.fid

    calls = []
    original = cleanfid.fid.frechet_distance
    monkeypatch.setattr(cleanfid.fid, "frechet_distance", lambda *a, **k: calls.append(1) or original(*a, **k))
    a = tensor_features(load_digits_tensor("test")[0], digits)
    b = tensor_features(load_digits_tensor("train")[0], digits)
    value = frechet_distance(a, b)
    assert calls and value == original(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def test_clean_fid_runs_on_a_scipy_without_sqrtm_disp(monkeypatch):
    """SciPy 1.18 dropped `sqrtm(..., disp=False)`, which clean-fid 0.1.35 calls: the distance must still come out."""
    import types

    import cleanfid.fid
    import scipy.linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 5)), rng.normal(0.5, 1.2, size=(64, 5))
    expected = frechet_distance(a, b)
    calls = []

    def sqrtm(matrix):  # the SciPy >= 1.18 signature: no disp, returns the root alone
        calls.append(1)
        return scipy.linalg.sqrtm(matrix)

    monkeypatch.setattr(cleanfid.fid, "linalg", types.SimpleNamespace(sqrtm=sqrtm, norm=scipy.linalg.norm))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert calls, "clean-fid's own frechet_distance did not run"


def test_folder_features_go_through_clean_fid_and_match_the_tensor_path(digits, held_out_folder, monkeypatch):
    import cleanfid.fid

    seen = []
    original = cleanfid.fid.get_files_features
    monkeypatch.setattr(cleanfid.fid, "get_files_features", lambda *a, **k: seen.append(1) or original(*a, **k))
    from_folder = reference_features(str(held_out_folder), digits)
    assert seen, "the folder's features did not come from clean-fid"
    # The same images as tensors: saved PNGs are exactly the uint8 quantisation tensor_features applies.
    assert np.allclose(from_folder, tensor_features(load_digits_tensor("test")[0], digits), atol=1e-5)


def test_held_out_digits_sit_near_the_floor_and_noise_far_above(digits, held_out_folder, tmp_path):
    train = write_pngs(load_digits_tensor("train")[0], tmp_path / "train")
    noise = torch.rand(360, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = reference_features(str(train), digits)
    floor = frechet_distance(reference_features(str(held_out_folder), digits), ref)
    far = frechet_distance(tensor_features(noise, digits), ref)
    assert floor < 10 and far > 20 * floor


def test_reference_features_are_cached_and_a_changed_file_changes_the_key(digits, tmp_path, monkeypatch):
    import cleanfid.fid

    folder = write_pngs(load_digits_tensor("test")[0][:20], tmp_path / "ref")
    first = reference_features(str(folder), digits)

    def refuse(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    original = cleanfid.fid.get_files_features
    monkeypatch.setattr(cleanfid.fid, "get_files_features", refuse)
    assert np.array_equal(reference_features(str(folder), digits), first)
    write_pngs(torch.full((1, 1, 8, 8), 1.0), tmp_path / "other")
    (tmp_path / "other" / "00000.png").replace(folder / "00003.png")  # one reference image changes
    with pytest.raises(AssertionError, match="recomputed"):
        reference_features(str(folder), digits)
    monkeypatch.setattr(cleanfid.fid, "get_files_features", original)
    assert not np.array_equal(reference_features(str(folder), digits), first)


def test_a_seeded_subset_of_n_reference_images(digits, held_out_folder):
    a = reference_features(str(held_out_folder), digits, n=50, seed=1)
    assert a.shape == (50, 64)
    assert np.array_equal(a, reference_features(str(held_out_folder), digits, n=50, seed=1))


def test_bad_reference_sets_are_refused(tmp_path, held_out_folder):
    with pytest.raises(UserError, match="does not exist"):
        check_reference(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        check_reference(str(tmp_path / "empty"))
    mixed = write_pngs(load_digits_tensor("test")[0][:3], tmp_path / "mixed")
    write_pngs(load_digits_tensor("test")[0][:1], tmp_path / "big", size=16)
    (tmp_path / "big" / "00000.png").replace(mixed / "big.png")
    with pytest.raises(UserError, match=r"mixes image sizes \(8x8 .*16x16"):
        check_reference(str(mixed))
    with pytest.raises(UserError, match=r"holds 360 images; --n 1000 needs at least 1000"):
        check_reference(str(held_out_folder), n=1000)


def test_clean_fid_npz_statistics_are_a_reference(tmp_path, digits):
    features = tensor_features(load_digits_tensor("test")[0], digits)
    np.savez(tmp_path / "stats.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    mu, sigma = reference_features(str(tmp_path / "stats.npz"), digits)
    assert frechet_distance(features, (mu, sigma)) == pytest.approx(0.0, abs=1e-6)
    np.savez(tmp_path / "bad.npz", something=np.zeros(3))
    with pytest.raises(UserError, match="not a statistics file"):
        reference_features(str(tmp_path / "bad.npz"), digits)


def test_missing_inception_weights_name_the_file_and_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr("timetuner.measuring.fid.inception_candidates", lambda: [tmp_path / INCEPTION_FILE])
    with pytest.raises(UserError) as err:
        load_extractor("inception")
    message = str(err.value)
    assert INCEPTION_FILE in message and INCEPTION_ENV in message and "--inception-weights" in message
    assert "\n" not in message
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(UserError, match="do not exist"):
        load_extractor("inception")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "junk.pt"))
    with pytest.raises(UserError, match="cannot be loaded"):
        load_extractor("inception")


class _Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 4 * 4, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 299 or x.min() < -1.0 or x.max() > 1.0:  # what clean-fid's wrapper must hand on
            raise ValueError("expected 299x299 inputs in [-1, 1]")
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.proj(pooled)[:, :, None, None]


class _StandInInception(torch.nn.Module):
    """Shaped like clean-fid's TorchScript Inception (a `layers` submodule → N×2048), not its weights."""

    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_the_inception_path_runs_through_clean_fids_wrapper(monkeypatch, tmp_path):
    """The real weights cannot be downloaded here; a stand-in TorchScript file exercises the same code path:
    clean-fid's InceptionV3W, its 299² "clean" resize and its [0, 255] → [-1, 1] normalisation."""
    torch.manual_seed(0)
    path = tmp_path / "stand-in.pt"
    torch.jit.save(torch.jit.script(_StandInInception()), str(path))
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    extractor = load_extractor("inception")
    images = load_digits_tensor("test")[0][:4]
    feats = tensor_features(images, extractor)
    assert feats.shape == (4, 2048) and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])  # different digits, different features


def test_an_extractor_s_name_is_known_without_loading_its_network(monkeypatch, tmp_path):
    """The reference set's cache key holds the extractor's name; a fit asks it before the verdict without loading
    Inception a second time (`extractor_name`), and a missing file is still said at once."""
    torch.manual_seed(0)
    path = tmp_path / "stand-in.pt"
    torch.jit.save(torch.jit.script(_StandInInception()), str(path))
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    assert extractor_name("inception") == load_extractor("inception").name
    assert extractor_name("digits") == load_extractor("digits").name
    loads = []
    monkeypatch.setattr("cleanfid.inception_torchscript.InceptionV3W", lambda *a, **k: loads.append(a))
    extractor_name("inception")
    assert loads == []
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(UserError, match="do not exist"):
        extractor_name("inception")


def test_a_users_module_is_an_extractor(digits):
    extractor = load_extractor("tests.feature_module:build")
    feats = tensor_features(load_digits_tensor("test")[0][:5], extractor)
    assert feats.shape == (5, 3)
    with pytest.raises(UserError, match="cannot be imported"):
        load_extractor("no_such_module:build")
    with pytest.raises(UserError, match="--features 'vgg' is not known"):
        load_extractor("vgg")


# -- the CLI ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_table(tiny_run, tmp_path_factory):
    from timetuner.fitting.api import fit

    out = tmp_path_factory.mktemp("table") / "t.safetensors"
    fit(str(tiny_run), out=out, progress=False, nfe=3, scheduler="ddim", objective="paper", samples=8,
        reference_n=500, eval_samples=8, reference_steps=5, force=True)
    return out


def test_eval_fid_against_a_reference_folder(tiny_run, tiny_table, held_out_folder):
    result = runner.invoke(app, ["eval", "--model", str(tiny_run), "--table", str(tiny_table), "--fid", "--ref",
                                 str(held_out_folder), "--n", "24", "--gap-n", "8", "--reference-steps", "10",
                                 "--bootstrap", "50", "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(next(line for line in result.output.splitlines() if line.startswith("{")))
    assert record["n"] == 24 and record["gap_n"] == 8 and str(held_out_folder) in record["data_measure"]
    for key in ("dist_gap", "data_fd", "x0_gap"):
        change = record[key]
        assert change["low"] <= change["change"] <= change["high"], key
    assert record["reference_n"] == 500 and set(record["dist_kid"]) == {"plain", "tuned"}
    text = runner.invoke(app, ["eval", "--model", str(tiny_run), "--table", str(tiny_table), "--fid", "--ref",
                               str(held_out_folder), "--n", "24", "--gap-n", "8", "--reference-steps", "10",
                               "--bootstrap", "50"])
    assert text.exit_code == 0 and "; KID " in text.output and "95 % CI [" in text.output
    assert "distribution gap" in text.output and "data FD (secondary" in text.output


@pytest.mark.parametrize("args, expected", [
    (["--ref", "/nonexistent/ref"], "--ref '/nonexistent/ref' does not exist"),
    (["--n", "1000"], "holds 360 images; --n 1000 needs at least 1000"),
    (["--features", "inception"], INCEPTION_FILE),
])
def test_eval_fid_bad_input_is_one_line_exit_2(tiny_run, tiny_table, held_out_folder, args, expected, monkeypatch,
                                               tmp_path):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr("timetuner.measuring.fid.inception_candidates", lambda: [tmp_path / INCEPTION_FILE])
    base = ["eval", "--model", str(tiny_run), "--table", str(tiny_table), "--fid", "--ref", str(held_out_folder)]
    result = runner.invoke(app, base + args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and expected in lines[0], result.output


def test_eval_refuses_mixed_size_references(tiny_run, tiny_table, tmp_path):
    mixed = write_pngs(load_digits_tensor("test")[0][:30], tmp_path / "mixed")
    write_pngs(load_digits_tensor("test")[0][:1], tmp_path / "big", size=32)
    (tmp_path / "big" / "00000.png").replace(mixed / "zz.png")
    result = runner.invoke(app, ["eval", "--model", str(tiny_run), "--table", str(tiny_table), "--fid", "--ref",
                                 str(mixed), "--n", "8"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "mixes image sizes" in lines[0], result.output


def test_eval_refuses_the_fit_seed(tiny_run, tiny_table):
    result = runner.invoke(app, ["eval", "--model", str(tiny_run), "--table", str(tiny_table), "--seed", "0"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "fitted on" in lines[0], result.output

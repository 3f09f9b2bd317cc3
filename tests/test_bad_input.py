"""Bad input, refused before any work: for each case of `CASES`, exit code 2, one line naming the value and what is
accepted, no file left behind, and the error within seconds (docs/errors.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from timetuner import TauTable
from timetuner.assets import DEFAULT_TABLE
from timetuner.cli.main import app

runner = CliRunner()
SMALL = ["--samples", "4", "--eval-samples", "4", "--reference-steps", "2", "--reference-n", "8"]

def train(*args: str) -> list[str]:
    return ["train", *args, "--out", "{tmp}/run"]


FLOW = ("--objective", "flow")
# (command and arguments; {model}: the tiny run, {tmp}: a fresh folder, {table}/{nan}/...: prepared files), the
# text the one error line must hold.
CASES = {
    "fit unknown scheduler": (["fit", "--scheduler", "plms"], "--scheduler 'plms'"),
    "fit unknown trajectory": (["fit", "--trajectory", "cosine"], "--trajectory 'cosine'"),
    "fit unknown objective": (["fit", "--objective", "magic"], "--objective 'magic'"),
    "fit unknown strategy": (["fit", "--strategy", "both"], "--strategy 'both'"),
    "fit nfe 0": (["fit", "--nfe", "0"], "--nfe 0"),
    "fit nfe above T": (["fit", "--nfe", "5000"], "--nfe 5000"),
    "fit samples 0": (["fit", "--samples", "0"], "--samples 0"),
    "fit eval samples 1": (["fit", "--eval-samples", "1"], "--eval-samples 1"),
    "fit reference n negative": (["fit", "--reference-n", "-1"], "--reference-n -1"),
    "fit out not safetensors": (["fit", "--out", "{tmp}/table.txt"], ".safetensors"),
    "fit out in a missing folder": (["fit", "--out", "{tmp}/no/such/t.safetensors"], "does not exist"),
    "fit out is a folder": (["fit", "--out", "{tmp}"], "is not a .safetensors file path"),
    "fit model missing": (["fit", "--model", "{tmp}/missing"], "missing"),
    "fit model folder without pipeline": (["fit", "--model", "{tmp}"], "model_index.json"),
    "fit guidance on unconditional": (["fit", "--guidance-scale", "3"], "--guidance-scale"),
    "fit parallel with multistep": (["fit", "--strategy", "parallel", "--scheduler", "heun"], "--strategy parallel"),
    "fit auto with trajectory": (["fit", "--scheduler", "auto", "--trajectory", "ays"], "--scheduler auto"),
    "fit learned grid on a solver without explicit grids": (["fit", "--scheduler", "unipc", "--trajectory",
                                                              "learned"], "--trajectory 'learned'"),
    "fit grid gradient on a fixed grid": (["fit", "--scheduler", "dpm++", "--trajectory", "ays", "--grid-gradient"],
                                          "--grid-gradient"),
    "fit data without parallel": (["fit", "--data", "digits"], "--data 'digits'"),
    "fit flow solver on a DDPM model": (["fit", "--scheduler", "flow-euler"], "does not sample a DDPM-style"),
    "fit data folder missing": (["fit", "--strategy", "parallel", "--data", "{tmp}/none"], "is not a folder"),
    "fit data folder with non-images": (["fit", "--strategy", "parallel", "--data", "{strays}"], "not images"),
    "sample garbage table": (["sample", "--table", "{garbage}"], "not a readable safetensors"),
    "sample truncated table": (["sample", "--table", "{truncated}"], "not a readable safetensors"),
    "sample NaN tau": (["sample", "--table", "{nan}"], "non-finite"),
    "sample increasing t": (["sample", "--table", "{increasing}"], "increases"),
    "sample table with a grid not decreasing": (["sample", "--table", "{bad_grid}"], "not strictly decreasing"),
    "sample table of another model": (["sample", "--table", "{other_model}"], "fitted for"),
    "sample table of another noise schedule": (["sample", "--table", "{other_schedule}"], "cannot load onto"),
    "sample steps differ from table": (["sample", "--table", "{table}", "--steps", "7"], "--steps 7"),
    "sample scheduler differs from table": (["sample", "--table", "{table}", "--scheduler", "heun"], "--scheduler"),
    "sample out not png": (["sample", "--out", "{tmp}/grid.jpg"], ".png"),
    "eval table missing": (["eval", "--table", "{tmp}/none.safetensors"], "does not exist"),
    "train unknown preset": (["train", "--preset", "huge", "--out", "{tmp}/run"], "--preset"),
    "train steps 0": (["train", "--steps", "0", "--out", "{tmp}/run"], "--steps 0"),
    "train data with non-images": (["train", "--data", "{strays}", "--out", "{tmp}/run"], "not images"),
    "train unknown objective": (train("--objective", "score"), "--objective 'score'"),
    "train flow shift 0": (train(*FLOW, "--flow-shift", "0"), "--flow-shift 0"),
    "train flow with speed": (train(*FLOW, "--sampler", "speed"), "never below its 1e-4"),
    "train flow with adaptive": (train(*FLOW, "--sampler", "adaptive"), "--sampler adaptive"),
    "train flow with min-snr": (train(*FLOW, "--weighting", "min-snr"), "--weighting min-snr"),
    "train flow with v-prediction": (train(*FLOW, "--prediction-type", "v_prediction"), "--prediction-type v_"),
    "train ddpm with a flow weighting": (train("--weighting", "cosmap"), "--weighting cosmap"),
    "train mode scale out of range": (train("--sampler", "mode", "--mode-scale", "3"), "--mode-scale 3"),
}


@pytest.fixture(scope="module")
def files(tiny_run, tmp_path_factory):
    """The prepared bad (and one good) inputs, in a folder of their own."""
    root = tmp_path_factory.mktemp("inputs")
    base = DDIMScheduler.from_pretrained(tiny_run, subfolder="scheduler")
    good = TauTable.identity(base, 3, scheduler_name="ddim", trajectory="uniform")
    good.save(root / "table.safetensors")
    (root / "garbage.safetensors").write_bytes(b"garbage")
    data = (root / "table.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with safe_open(str(root / "table.safetensors"), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    for name, change in (("nan", lambda t: {**t, "tau": torch.full_like(t["tau"], float("nan"))}),
                         ("increasing", lambda t: {**t, "t": t["t"].flip(0), "tau": t["tau"].flip(0)})):
        save_file(change(tensors), root / f"{name}.safetensors", metadata=metadata)
    # a learned-grid table whose grid (metadata, handed to set_timesteps) was edited to run upwards
    dpm = DPMSolverMultistepScheduler.from_config(base.config, solver_order=2, algorithm_type="dpmsolver++")
    TauTable.identity(dpm, 3, timesteps=[999, 500, 20], scheduler_name="dpm++", trajectory="learned").save(
        root / "grid.safetensors")
    with safe_open(str(root / "grid.safetensors"), framework="pt") as f:
        grid_tensors, grid_header = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    meta = json.loads(grid_header["metadata"])
    meta["timesteps"] = [999, 20, 500]
    save_file(grid_tensors, root / "bad_grid.safetensors", metadata={**grid_header, "metadata": json.dumps(meta)})
    (root / "grid.safetensors").unlink()
    other = DDIMScheduler.from_config(base.config, beta_schedule="squaredcos_cap_v2")
    TauTable.identity(other, 3, scheduler_name="ddim", trajectory="uniform").save(root / "other_schedule.safetensors")
    strays = root / "strays"
    strays.mkdir()
    Image.new("L", (8, 8)).save(strays / "a.png")
    (strays / "notes.txt").write_text("not an image")
    return {"table": root / "table.safetensors", "garbage": root / "garbage.safetensors",
            "truncated": root / "truncated.safetensors", "nan": root / "nan.safetensors",
            "increasing": root / "increasing.safetensors", "other_schedule": root / "other_schedule.safetensors",
            "other_model": DEFAULT_TABLE, "strays": strays, "bad_grid": root / "bad_grid.safetensors"}


def everything_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_no_output_and_fast(case, tiny_run, files, tmp_path, monkeypatch):
    args, needle = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # default outputs land in the working folder: none may appear
    args = [a.format(tmp=work, **{k: str(v) for k, v in files.items()}) for a in args]
    if "--model" not in args and args[0] in ("fit", "sample", "eval"):
        args += ["--model", str(tiny_run)]
    if args[0] == "fit":  # small sizes first, so that the case's own value is the one that counts
        args = ["fit", *SMALL, *args[1:]]
    if args[0] == "train":
        args += ["--cpu"]
    before_inputs = everything_under(Path(files["table"]).parent)
    started = time.perf_counter()
    result = runner.invoke(app, args)
    seconds = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.output
    assert "accepted" in lines[0] or "does not exist" in lines[0], lines[0]  # says what is accepted
    assert everything_under(work) == set()
    assert everything_under(Path(files["table"]).parent) == before_inputs
    assert seconds < 10, f"{case}: {seconds:.1f} s to the error"


def test_the_table_has_at_least_twenty_cases_and_the_docs_list_them():
    readme = (Path(__file__).resolve().parent.parent / "docs" / "errors.md").read_text()
    assert len(CASES) >= 20
    missing = [case for case in CASES if f"| {case} |" not in readme]
    assert not missing, missing

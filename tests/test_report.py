"""`timetuner report`: the page renders, every image it names exists, its figures carry intervals."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from timetuner.cli.main import app

runner = CliRunner()


class _Page(HTMLParser):
    """Collects the images, headings and table cells of an HTML page (and fails on unbalanced tags)."""

    def __init__(self):
        super().__init__()
        self.images, self.headings, self.cells, self.stack = [], [], [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> after {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("h1", "h2", "h3"):
            self.headings.append(data)
        if self.stack and self.stack[-1] == "td":
            self.cells.append(data)


def check_report(folder: Path) -> _Page:
    """Parse report.html and report.md; every image is a readable PNG (embedded, or a file beside the page)."""
    page = _Page()
    page.feed((folder / "report.html").read_text(encoding="utf-8"))
    assert not page.stack
    assert len(page.images) >= 3
    for image in page.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix), "the HTML page must be self-contained"
        with Image.open(io.BytesIO(base64.b64decode(image["src"][len(prefix):]))) as im:
            assert im.format == "PNG" and im.width > 100
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (folder / "report.md").read_text(encoding="utf-8"))
    assert len(linked) == len(page.images)
    for name in linked:
        with Image.open(folder / name) as im:
            assert im.format == "PNG"
    return page


@pytest.fixture(scope="module")
def tiny_tables(tiny_run, tmp_path_factory):
    from timetuner.fitting.api import fit

    folder = tmp_path_factory.mktemp("tables")
    paths = []
    for nfe in (3, 4):
        out = folder / f"t{nfe}.safetensors"
        fit(str(tiny_run), out=out, progress=False, nfe=nfe, scheduler="ddim", objective="paper", samples=8,
            reference_n=500, eval_samples=8, reference_steps=5, force=True)
        paths.append(out)
    return paths


@pytest.mark.slow  # two fits and a report (~26 s)
def test_report_for_a_table_with_a_sibling(tiny_run, tiny_tables, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["report", *map(str, tiny_tables), "--model", str(tiny_run), "--out", str(out),
                                 "--n", "16", "--reference-steps", "10", "--nfes", "2,3", "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    page = check_report(out)
    assert any("Distribution gap to the reference sampler against steps" in h for h in page.headings)
    assert any("95 % paired bootstrap" in h for h in page.headings)
    record = json.loads((out / "report.json").read_text())
    assert [row["nfe"] for row in record["gap_vs_nfe"]] == [2, 3, 4]
    assert "tuned" in record["gap_vs_nfe"][2] and "tuned" not in record["gap_vs_nfe"][0]
    assert record["gap_vs_nfe"][2]["dist_gap"]["low"] <= record["gap_vs_nfe"][2]["dist_gap"]["high"]
    assert record["x0_gap"]["low"] <= record["x0_gap"]["high"]
    # the τ table is on the page: one row per network evaluation, τ − t signed
    assert sum(1 for cell in page.cells if re.fullmatch(r"[+-]\d+\.\d{3}", cell)) >= 3


@pytest.mark.slow  # builds an eval setup (~9 s)
def test_report_refuses_tables_of_another_solver(tiny_run, tiny_tables, tmp_path):
    from timetuner.fitting.api import fit

    other = tmp_path / "dpm2.safetensors"
    fit(str(tiny_run), out=other, progress=False, nfe=3, scheduler="dpm2", objective="paper", samples=4,
        reference_n=500, eval_samples=4, reference_steps=3, force=True)
    result = runner.invoke(app, ["report", str(tiny_tables[0]), str(other), "--model", str(tiny_run), "--out",
                                 str(tmp_path / "r")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "accepted: tables of ddim/uniform" in lines[0], result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a report of the embedded model's table (~22 s)
def test_report_for_the_embedded_models_default_table(tmp_path):
    """The table `timetuner fit --nfe 10` writes for the embedded model, shipped in assets/tables."""
    from timetuner.assets import DEFAULT_TABLE

    out = tmp_path / "report"
    result = runner.invoke(app, ["report", str(DEFAULT_TABLE), "--out", str(out), "--n", "64", "--gap-n", "32",
                                 "--reference-n", "64", "--reference-steps", "100", "--nfes", "5,10",
                                 "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    page = check_report(out)
    assert len(page.images) == 4  # τ shift, gap per step, distribution gap against steps, samples
    assert "embedded:digits-ddpm" in page.cells

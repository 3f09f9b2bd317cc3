"""One page per τ table: metadata, the τ table, the evaluation figures with intervals and the plots.

`write_report` writes, into one folder, `report.html` (self-contained: the PNGs are embedded), `report.md`
with the PNGs beside it, and `report.json` (the numbers). Every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from timetuner.files import write_atomic

PLOT_TITLES = {
    "tau_shift": "Learned shift τ − t per network evaluation",
    "gap_per_step": "Truncation gap to the reference trajectory per state, plain vs tuned (paper Fig. 2)",
    "gap_vs_nfe": "Distribution gap to the reference sampler against steps, plain sampler and tuned table(s)",
    "samples": "Samples from the same held-out noises: plain (left) | tuned (right)",
}


def _fmt(value, digits: int = 5) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _interval(change: dict, digits: int = 4) -> str:
    verdict = "" if change["significant"] else " — no significant change"
    return (f"{change['change']:+.{digits}g} [{change['low']:+.{digits}g}, {change['high']:+.{digits}g}]"
            f"{verdict}")


FIGURES = (("distribution gap (FD to the reference sampler's samples)", "dist_gap"),
           ("x0 gap (RMS to the reference sample, same noise)", "x0_gap"), ("data FD (secondary)", "data_fd"))


def figure_rows(record: dict) -> list[list[str]]:
    """[figure, plain, tuned, change with its 95 % paired interval] for every before/after figure."""
    rows = []
    for name, key in FIGURES:
        change = record.get(key)
        if change is not None:
            rows.append([name, _fmt(change["plain"]), _fmt(change["tuned"]), _interval(change)])
    for row in record.get("gap_vs_nfe", []):
        for name, key in FIGURES:
            if key in row and row["nfe"] != record["steps"]:  # the table's own steps: already above
                change = row[key]
                rows.append([f"{name} at {row['nfe']} steps", _fmt(change["plain"]), _fmt(change["tuned"]),
                             _interval(change)])
    return rows


def _held_out_summary(held: dict) -> str:
    """The fit's verdict in one line; tables written before the distribution gap carry the older keys."""
    parts = []
    for label, key in (("distribution gap", "dist_gap"), ("x0 gap", "x0_gap"), ("data FD", "data_fd")):
        if key in held:
            parts.append(f"{label} {held[key]['plain']:.5g} → {held[key]['tuned']:.5g}")
    if not parts and "gap_plain" in held:
        parts.append(f"x0 gap {held['gap_plain']:.5f} → {held['gap_tuned']:.5f}")
        if "fd_plain" in held:
            parts.append(f"FD {held['fd_plain']:.3f} → {held['fd_tuned']:.3f}")
    return ", ".join(parts)


def metadata_rows(table, record: dict) -> list[list[str]]:
    """Where the table comes from and how it was fitted."""
    meta = table.metadata
    held = meta.get("held_out", {})
    rows = [
        ["model", meta.get("model", "?")],
        ["model weights hash", str(meta.get("model_hash", "?"))[:16]],
        ["scheduler", f"{meta.get('scheduler_class', '?')} ({meta.get('scheduler_name', '?')}), trajectory "
                      f"{meta.get('trajectory', '?')}"],
        ["steps / network evaluations", f"{table.num_inference_steps} / {len(table.t)}"],
        ["strategy / objective / optimiser", f"{meta.get('strategy', '?')} / {meta.get('objective', '?')} / "
                                             f"{meta.get('optimizer', '?')}"],
        ["fit noises (seed) / held-out noises (seed)",
         f"{meta.get('samples', '?')} ({meta.get('fit_seed', '?')}) / {meta.get('eval_samples', '?')} "
         f"({meta.get('eval_seed', '?')})"],
        ["fit reference", str(meta.get("reference", "?"))],
        ["fit time", f"{meta.get('fit_seconds', '?')} s"],
        ["written", "identity (τ = t): tuning was not better on held-out noises" if table.is_identity else
         "tuned τ"],
    ]
    if held:
        rows.append(["fit's held-out verdict", _held_out_summary(held)])
    versions = meta.get("versions")
    if versions:
        rows.append(["versions", ", ".join(f"{k} {v}" for k, v in versions.items())])
    if record.get("conditioning"):
        rows.append(["conditioning", record["conditioning"]])
    rows.append(["this evaluation", f"{record['n']} held-out noises (seed {record['seed']}), x0 gap on "
                                    f"{record['gap_n']}, reference {record['reference']}"
                 + (f" ({record['reference_n']} samples for the distribution gap, {record['measure']})"
                    if "reference_n" in record else "")
                 + (f", data: {record['data_measure']}" if "data_measure" in record else "")])
    return rows


def tau_rows(table) -> list[list[str]]:
    return [[str(k), f"{t:.3f}", f"{tau:.3f}", f"{tau - t:+.3f}"]
            for k, (t, tau) in enumerate(zip(table.t.tolist(), table.tau.tolist(), strict=True))]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table of `header` and `rows` (cells as strings; a "|" in a cell is escaped)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = ("body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
       "text-align:left;font-size:.9em}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}"
       "code{background:#f6f6f6;padding:0 .2em}")


def write_report(folder: str | Path, table, record: dict, plots: dict[str, Path], command: str = "") -> dict:
    """Write report.html, report.md and report.json into `folder` (the plots are already there)."""
    folder = Path(folder)
    name = Path(record["table"]).name
    sections = [
        ("Figures, plain → tuned (95 % paired bootstrap interval of the change)",
         ["figure", "plain", "tuned", "change [95 % CI]"], figure_rows(record)),
        ("Table and fit", ["", ""], metadata_rows(table, record)),
        ("τ per network evaluation", ["k", "t (solver)", "τ (network)", "τ − t"], tau_rows(table)),
    ]
    md = [f"# τ table report: {name}", ""]
    if command:
        md += [f"Made with `{command}`.", ""]
    body = [f"<h1>τ table report: {html.escape(name)}</h1>"]
    if command:
        body.append(f"<p>Made with <code>{html.escape(command)}</code>.</p>")
    for title, header, rows in sections:
        md += [f"## {title}", "", markdown_table(header, rows), ""]
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    md += ["## Plots", ""]
    body.append("<h2>Plots</h2>")
    for key, path in plots.items():
        title = PLOT_TITLES.get(key, key)
        encoded = base64.b64encode(Path(path).read_bytes()).decode()
        md += [f"### {title}", "", f"![{title}]({Path(path).name})", ""]
        body += [f"<h3>{html.escape(title)}</h3>", f'<img alt="{html.escape(title)}" '
                 f'src="data:image/png;base64,{encoded}">']
    page = ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>τ table report: {html.escape(name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")
    out = {
        "html": write_atomic(folder / "report.html", lambda tmp: Path(tmp).write_text(page, encoding="utf-8"),
                             ".html"),
        "markdown": write_atomic(folder / "report.md", lambda tmp: Path(tmp).write_text("\n".join(md),
                                                                                       encoding="utf-8"), ".md"),
        "json": write_atomic(folder / "report.json", lambda tmp: Path(tmp).write_text(
            json.dumps({**record, "plots": {k: Path(p).name for k, p in plots.items()}}, indent=1), encoding="utf-8"),
            ".json"),
    }
    return out

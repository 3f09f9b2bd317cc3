"""Figures as PNG files: sample grids, side-by-side comparisons, training-sampler distributions."""

from __future__ import annotations

from pathlib import Path

import torch

from timetuner.files import write_atomic


def grid_image(images: torch.Tensor, nrow: int | None = None, min_tile: int = 32):
    """N×C×H×W images in [-1, 1] → one PIL image, tiles upscaled (nearest) to at least `min_tile` px."""
    import math

    import torch.nn.functional as F
    from PIL import Image
    from torchvision.utils import make_grid

    x = (images.detach().float().cpu().clamp(-1, 1) + 1) / 2
    side = x.shape[-1]
    if side < min_tile:
        x = F.interpolate(x, scale_factor=math.ceil(min_tile / side), mode="nearest")
    nrow = nrow or max(1, math.ceil(math.sqrt(x.shape[0])))
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    if array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)


def save_png(image, path: str | Path) -> Path:
    """Write a PIL image as PNG atomically (temp file, then rename) and return its path."""
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"), ".png")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a sample grid PNG atomically and return its path."""
    return save_png(grid_image(images, nrow), path)


def save_side_by_side(left: torch.Tensor, right: torch.Tensor, path: str | Path,
                      labels: tuple[str, str] = ("plain", "tuned")) -> Path:
    """Two grids of the same noises (e.g. plain and tuned) side by side, labelled, as one PNG."""
    from PIL import Image, ImageDraw

    a, b = grid_image(left), grid_image(right)
    gap, top = 16, 14
    canvas = Image.new(a.mode, (a.width + gap + b.width, top + max(a.height, b.height)), 255 if a.mode == "L" else
                       (255, 255, 255))
    canvas.paste(a, (0, top))
    canvas.paste(b, (a.width + gap, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), labels[0], fill=0 if a.mode == "L" else (0, 0, 0))
    draw.text((a.width + gap + 2, 1), labels[1], fill=0 if a.mode == "L" else (0, 0, 0))
    return save_png(canvas, path)


def save_figure(figure, path: str | Path) -> Path:
    """Write a matplotlib figure as PNG atomically, close it, and return the path."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"), ".png")
    finally:
        plt.close(figure)


def _figure(width: float = 6.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_distribution_plot(p: torch.Tensor, weight: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """A training sampler's p(t) (scaled to T·p, uniform = 1) and the loss weighting w(t), over t."""
    T = p.numel()
    fig, ax = _figure(6.0, 3.0)
    ax.plot(range(T), (T * p.double()).cpu().numpy(), label="T·p(t) (sampling)")
    ax.plot(range(T), weight.double().cpu().numpy(), label="w(t) (loss weight)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_ylim(bottom=0.0, top=max(1.2, 1.05 * float(max((T * p).max(), weight.max()))))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("t (0 = clean, T−1 = noise)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_tau_shift_plot(t: torch.Tensor, tau: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """The learned shift τ − t per network evaluation (the table at a glance)."""
    fig, ax = _figure()
    k = range(len(t))
    ax.bar(k, (tau.double() - t.double()).numpy(), color="tab:orange")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xticks(list(k), [f"{v:.0f}" for v in t.tolist()], rotation=45, fontsize=7)
    ax.set_xlabel("solver timestep t of each network evaluation")
    ax.set_ylabel("τ − t")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_gap_plot(times: list[float], plain: list[float], tuned: list[float], path: str | Path,
                  title: str = "") -> Path:
    """Truncation gap to the reference trajectory after every step, plain vs tuned (the paper's Fig. 2)."""
    fig, ax = _figure()
    steps = range(len(times))
    ax.plot(steps, plain, marker="o", ms=3, label="plain")
    ax.plot(steps, tuned, marker="o", ms=3, label="tuned")
    ax.set_xticks(list(steps), [f"{v:.0f}" for v in times], rotation=45, fontsize=7)
    ax.set_xlabel("state (time)")
    ax.set_ylabel("RMS gap to the reference")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def curve_rows(rows: list[dict], figure: str) -> list[dict]:
    """`timetuner.measuring.evaluation.gap_versus_nfe` rows as the curve of one figure ("dist_gap" or "data_fd"):
    {"nfe", "plain"[, "tuned", "change": {change, low, high}]}."""
    out = []
    for row in rows:
        if figure not in row["plain"]:
            continue
        point = {"nfe": row["nfe"], "plain": row["plain"][figure]}
        if "tuned" in row:
            point.update(tuned=row["tuned"][figure], change=row.get(figure))
        out.append(point)
    return out


def draw_nfe_curve(ax, rows: list[dict], reference: float | None = None, reference_label: str = "reference sampler",
                   plain_label: str = "plain") -> None:
    """A figure against steps on `ax`: the plain sampler as a line, tuned tables as points whose error bar is the
    paired 95 % interval of their change; rows {"nfe", "plain"[, "tuned", "change": {change, low, high}]}."""
    rows = sorted(rows, key=lambda r: r["nfe"])
    ax.plot([r["nfe"] for r in rows], [r["plain"] for r in rows], marker="o", ms=4, label=plain_label)
    tuned = [r for r in rows if r.get("tuned") is not None]
    if tuned:
        c = [r.get("change") or {"change": 0.0, "low": 0.0, "high": 0.0} for r in tuned]
        ax.errorbar([r["nfe"] for r in tuned], [r["tuned"] for r in tuned],
                    yerr=[[x["change"] - x["low"] for x in c], [x["high"] - x["change"] for x in c]],
                    fmt="s", ms=5, capsize=3, color="tab:orange", label="tuned (95 % CI of the change)")
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=0.8, label=reference_label)
    ax.set_xticks([r["nfe"] for r in rows])
    ax.grid(alpha=0.3)


def save_nfe_plot(rows: list[dict], path: str | Path, title: str = "", reference: float | None = None,
                  reference_label: str = "reference sampler", ylabel: str = "distribution gap") -> Path:
    """A figure against steps, plain and tuned (see `draw_nfe_curve`), as one PNG."""
    fig, ax = _figure()
    draw_nfe_curve(ax, rows, reference, reference_label)
    ax.set_xlabel("steps (num_inference_steps; NFE for DDIM, DPM-Solver-2)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)

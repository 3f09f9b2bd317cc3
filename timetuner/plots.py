"""Figures as PNG files: sample grids, side-by-side comparisons, training-sampler distributions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


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


def _write_atomic(path: str | Path, write) -> Path:
    """Call write(temp_path) beside `path`, then rename it into place; no half-written file remains."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_png(image, path: str | Path) -> Path:
    """Write a PIL image as PNG atomically (temp file, then rename) and return its path."""
    return _write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


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
        return _write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(figure)


def save_distribution_plot(p: torch.Tensor, weight: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """A training sampler's p(t) (scaled to T·p, uniform = 1) and the loss weighting w(t), over t."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = p.numel()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(range(T), (T * p.double()).cpu().numpy(), label="T·p(t) (sampling)")
    ax.plot(range(T), weight.double().cpu().numpy(), label="w(t) (loss weight)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_ylim(bottom=0.0, top=max(1.2, 1.05 * float(max((T * p).max(), weight.max()))))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("t (0 = clean, T−1 = noise)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return save_figure(fig, path)

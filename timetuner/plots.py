"""Figures as PNG files: sample grids (more plots arrive with the measurement work)."""

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


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write a sample grid PNG atomically (temp file, then rename) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        grid_image(images, nrow).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path

"""Training data: scikit-learn's bundled 8×8 digits, or a folder of images, as tensors in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from timetuner.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The fixed, stratified train/test split of scikit-learn's digits: (images 0..16 as N×8×8, labels)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test", "all"):
        raise UserError(f"digits split {split!r} is not known; accepted: all, test, train")
    bunch = load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    if split == "all":
        return images, labels
    # One split for the whole project: the model and the feature extractor train on "train", every
    # Fréchet distance is measured against "test".
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=labels
    )
    return (tr_x, tr_y) if split == "train" else (te_x, te_y)


def load_digits_tensor(split: str = "train", resolution: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as an N×1×R×R float tensor in [-1, 1] (bilinear upscaling for R > 8) and their labels."""
    images, labels = digits_split(split)
    x = torch.from_numpy(images)[:, None] / 16.0 * 2.0 - 1.0
    if resolution != 8:
        if resolution < 8:
            raise UserError(f"--resolution {resolution} is too small for digits; accepted: 8 or more")
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(-1, 1)
    return x.contiguous(), torch.from_numpy(labels)


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly or recursively under `folder`, sorted; errors for a missing/empty folder."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--data {str(folder)!r} is not a folder; accepted: a folder of image files")
    present = sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                            p.relative_to(root).parts))
    strays = [p for p in present if p.suffix.lower() not in IMAGE_SUFFIXES]
    if strays:  # a stray file usually means the wrong folder; hidden files (.DS_Store, .git) are left alone
        raise UserError(f"--data {str(folder)!r} holds {len(strays)} file(s) that are not images, e.g. "
                        f"{str(strays[0].relative_to(root))!r}; accepted: image files only "
                        f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    files = present
    if not files:
        raise UserError(
            f"--data {str(folder)!r} holds no images; accepted suffixes: {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    return files


def load_image_folder(folder: str | Path, resolution: int, channels: int = 3) -> torch.Tensor:
    """Every image under `folder`, centre-cropped to a square and resized, as N×C×R×R in [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise UserError(f"--channels {channels} is not supported; accepted: 1, 3")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path in list_images(folder):
        try:
            with Image.open(path) as im:
                im = im.convert(mode)
                side = min(im.size)
                left, top = (im.width - side) // 2, (im.height - side) // 2
                im = im.crop((left, top, left + side, top + side))
                im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
                arrays.append(np.asarray(im, dtype=np.float32).reshape(resolution, resolution, channels))
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"image {str(path)!r} cannot be read ({err.__class__.__name__}); "
                            "accepted: files PIL can open") from None
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0
    return x.contiguous()


def load_training_data(data: str, resolution: int, channels: int | None = None) -> torch.Tensor:
    """`data` = "digits" (the train split) or an image folder path, as an N×C×R×R tensor in [-1, 1]."""
    if data == "digits":
        if channels not in (None, 1):
            raise UserError(f"--channels {channels} does not fit digits; accepted: 1")
        return load_digits_tensor("train", resolution)[0]
    return load_image_folder(data, resolution, 3 if channels is None else channels)

"""Training data: the fixed digits split and image folders, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from timetuner.core.data import digits_split, load_digits_tensor, load_image_folder, load_training_data
from timetuner.errors import UserError


def test_digits_split_is_fixed_stratified_and_disjoint():
    train_x, train_y = digits_split("train")
    test_x, test_y = digits_split("test")
    assert len(train_x) == 1437 and len(test_x) == 360
    assert set(np.bincount(test_y)) <= {35, 36, 37}  # stratified: ~36 of each class
    train_rows = {row.tobytes() for row in train_x}
    # The digits set has a handful of exact duplicate images; the split itself shares no indices.
    assert sum(row.tobytes() in train_rows for row in test_x) < 5
    again_x, _ = digits_split("test")
    np.testing.assert_array_equal(test_x, again_x)


def test_digits_tensor_range_and_resolution():
    x, y = load_digits_tensor("train")
    assert x.shape == (1437, 1, 8, 8) and y.shape == (1437,)
    assert x.min() == -1.0 and x.max() == 1.0
    x16, _ = load_digits_tensor("train", resolution=16)
    assert x16.shape == (1437, 1, 16, 16)
    assert x16.min() >= -1.0 and x16.max() <= 1.0


def _write_images(folder, n=3, size=(12, 10), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(folder / f"im{i}.png")


def test_image_folder_crops_resizes_and_scales(tmp_path):
    _write_images(tmp_path / "imgs" / "nested", n=3)
    x = load_image_folder(tmp_path / "imgs", resolution=8, channels=3)
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    gray = load_training_data(str(tmp_path / "imgs"), resolution=4, channels=1)
    assert gray.shape == (3, 1, 4, 4)


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable"])
def test_image_folder_errors_name_the_value(tmp_path, case):
    folder = tmp_path / "data"
    if case == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("no images here")
    elif case == "unreadable":
        _write_images(folder, n=1)
        (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError) as err:
        load_image_folder(folder, resolution=8)
    message = str(err.value)
    assert "\n" not in message and "accepted" in message
    assert ("broken.png" if case == "unreadable" else str(folder)) in message


def test_digits_refuse_three_channels():
    with pytest.raises(UserError, match="--channels 3"):
        load_training_data("digits", resolution=8, channels=3)

"""Training data: the digits and image folders of `timetuner.core.data`, under the trainers' import path."""

from timetuner.core.data import (  # noqa: F401
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    IMAGE_SUFFIXES,
    digits_split,
    list_images,
    load_digits_tensor,
    load_image_folder,
    load_training_data,
)

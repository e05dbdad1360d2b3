"""Image files as model inputs, by the project's one decoding and resizing rule."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import UnidentifiedImageError

from jaxrepro.data import images as imagelib
from jaxrepro.errors import UserError


class InputError(UserError, RuntimeError):
    """An image or option the user can fix; the CLIs report it with exit status 2."""


class Picture(NamedTuple):
    """An image file as the model sees it (`pixels`, uint8 [S, S, 3]) and as it is
    (`original`, uint8 [H, W, 3]), both decoded by the one rule."""

    pixels: np.ndarray
    original: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        """The original (width, height)."""
        return self.original.shape[1], self.original.shape[0]


def read_image(path: Path, image_size: int) -> Picture:
    """An image file, decoded and resized by `jaxrepro.data.images.decode_rgb` (Pillow,
    RGB, bilinear, whole image, aspect ratio not kept), the rule the training data went
    through; the original is kept for drawing the explanation on it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read image {path}: {e.strerror or e}") from None
    try:
        original = imagelib.decode_rgb(data)
        pixels = imagelib.decode_rgb(data, image_size)
    except imagelib.DECODE_ERRORS as e:
        why = (
            "not an image file Pillow can decode"
            if isinstance(e, UnidentifiedImageError)
            else f"{type(e).__name__}: {e}"
        )
        raise InputError(f"cannot read image {path}: {why}") from None
    return Picture(pixels, original)

"""Image files as model inputs, by the project's one decoding and resizing rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from jaxrepro.data import images as imagelib
from jaxrepro.errors import UserError


class InputError(UserError, RuntimeError):
    """An image or option the user can fix; the CLIs report it with exit status 2."""


def read_image(path: Path, image_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [S, S, 3] pixels, original (width, height)) of an image file.

    Decoded and resized by `jaxrepro.data.images.decode_rgb` (Pillow, RGB, bilinear,
    whole image), the rule the training data went through.
    """
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
    return pixels, (original.shape[1], original.shape[0])

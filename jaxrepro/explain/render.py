"""Heatmaps as pictures: a colour map laid over the image, as in the keras.io Grad-CAM example.

keras.io (`save_and_display_gradcam`): the map in [0, 1] is quantised to 256 levels,
coloured with matplotlib's "jet", added to the image with weight alpha = 0.4
(`jet * alpha + image`, both 0..255) and the sum rescaled to 0..255 by its minimum
and maximum (`keras.utils.array_to_img`). Signed maps (guided backprop, IG, LRP) are
scaled by their largest magnitude to [-1, 1], shifted to [0, 1] (0 -> 0.5) and coloured
with the diverging "bwr" (blue against, red for the explained class). A map drawn on an
image of another size (the original photo, not the model's square input) is coloured
at its own resolution and the colours resized to the image by Pillow's bicubic filter,
as keras.io resizes its coloured heatmap to the image. NumPy and Pillow only, so a PNG
is the same bytes every time.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

ALPHA = 0.4


def to_unit(heatmap: np.ndarray, signed: bool) -> np.ndarray:
    """A heatmap [H, W] as values in [0, 1] for a colour map (0.5 is zero when signed)."""
    h = np.asarray(heatmap, np.float32)
    if not signed:
        top = float(h.max()) if h.size else 0.0
        return np.clip(h / top, 0.0, 1.0) if top > 0 else np.zeros_like(h)
    scale = float(np.abs(h).max()) if h.size else 0.0
    return np.clip(0.5 + 0.5 * h / scale, 0.0, 1.0) if scale > 0 else np.full_like(h, 0.5)


def overlay(
    image: np.ndarray, heatmap: np.ndarray, *, signed: bool = False, alpha: float = ALPHA
) -> np.ndarray:
    """uint8 [H, W, 3]: `image` (uint8 or 0..255 floats) with the coloured heatmap added.

    The heatmap may have another size than the image (see the module doc).
    """
    cmap = matplotlib.colormaps["bwr" if signed else "jet"]
    levels = np.uint8(255 * to_unit(heatmap, signed))
    colours = cmap(np.arange(256))[:, :3][levels] * 255.0
    image = np.asarray(image, np.float64)
    if colours.shape[:2] != image.shape[:2]:
        colours = resize_channels(colours, image.shape[:2])
    out = colours * alpha + image
    out -= out.min()
    if out.max() > 0:
        out /= out.max()
    return np.asarray(np.round(out * 255.0), np.uint8)


def resize_channels(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """values [h, w, C] resized to [*size, C] (height, width), channel by channel, with
    Pillow's bicubic filter in float32."""
    height, width = size
    return np.stack(
        [
            np.asarray(
                Image.fromarray(np.asarray(values[..., c], np.float32), mode="F").resize(
                    (width, height), Image.Resampling.BICUBIC
                ),
                np.float64,
            )
            for c in range(values.shape[-1])
        ],
        axis=-1,
    )


def save_png(picture: np.ndarray, path: str | Path) -> None:
    """Write a uint8 [H, W, 3] picture as PNG."""
    Image.fromarray(np.asarray(picture, np.uint8)).save(path, format="PNG")

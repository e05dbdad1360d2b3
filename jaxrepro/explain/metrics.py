"""Scores of heatmaps: robustness (RMSE) and correctness against object masks.

- `rmse`: the thesis's eq. 7.1 (Heggen), root mean square difference of two maps.
- `pointing_game`: a hit when the heatmap's largest value lies inside the object mask
  (Zhang et al.; no tolerance margin; ties go to the first pixel in row-major order).
- `relevance_mass`: positive relevance inside the mask over positive relevance in all
  (Arras et al.'s relevance mass accuracy, positive part); NaN for a map with no
  positive value.

Host-side NumPy in float64, so a score does not depend on the device.
"""

from __future__ import annotations

import numpy as np


def rmse(transformed: np.ndarray, reference: np.ndarray) -> float:
    """sqrt(mean((transformed - reference)^2)) over all pixels (the thesis's eq. 7.1)."""
    a = np.asarray(transformed, np.float64)
    b = np.asarray(reference, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps of different shapes: {a.shape} and {b.shape}")
    return float(np.sqrt(np.mean((a - b) ** 2)))


def pointing_game(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """bool [N]: is the argmax of each heatmap [N, H, W] inside its mask (mask > 0)?"""
    h = np.asarray(heatmaps)
    m = np.asarray(masks) > 0
    if h.shape != m.shape:
        raise ValueError(f"heatmaps {h.shape} and masks {m.shape} differ in shape")
    flat = h.reshape(len(h), -1)
    top = np.argmax(flat, axis=1)
    return m.reshape(len(m), -1)[np.arange(len(m)), top]


def relevance_mass(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """float [N]: positive relevance inside the mask / all positive relevance (NaN if none)."""
    h = np.asarray(heatmaps, np.float64)
    m = np.asarray(masks) > 0
    if h.shape != m.shape:
        raise ValueError(f"heatmaps {h.shape} and masks {m.shape} differ in shape")
    positive = np.maximum(h, 0.0)
    total = positive.sum(axis=(1, 2))
    inside = (positive * m).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)

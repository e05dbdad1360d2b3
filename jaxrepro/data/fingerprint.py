"""SHA-256 fingerprints of a split's examples and of a run's epoch orders.

Why: two runs can only be expected to give the same bits if they saw the same bytes in
the same order. A run records these fingerprints; comparing them tells "the data
differ" apart from "the computation differs".
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxrepro.data.order import epoch_order

_DATA_TAG = b"jaxrepro.data_fingerprint.v1"
_ORDER_TAG = b"jaxrepro.order_fingerprint.v1"


def data_fingerprint(
    images: Any,
    labels: Sequence[int] | np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    masks: np.ndarray | None = None,
) -> str:
    """Hex SHA-256 over the examples in split order: image bytes, label, id (and mask).

    Accepts the arrays, or a loaded split (anything with .images/.labels/.ids/.masks).
    Shapes are hashed too, so a reshaped copy of the same bytes differs.
    """
    if hasattr(images, "images"):
        split = images
        images, labels, ids, masks = split.images, split.labels, split.ids, split.masks
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N,H,W,C], got {images.dtype} {images.shape}")
    if labels is None:
        raise ValueError("labels are required")
    labels = np.asarray(labels)
    n = len(images)
    if (
        len(labels) != n
        or (ids is not None and len(ids) != n)
        or (masks is not None and len(masks) != n)
    ):
        raise ValueError("images, labels, ids and masks must have the same length")
    h = hashlib.sha256(_DATA_TAG)
    h.update(repr((images.shape, masks is not None and np.shape(masks))).encode())
    masks = None if masks is None else np.ascontiguousarray(masks, dtype=np.uint8)
    for i in range(n):
        h.update(images[i].tobytes())
        h.update(int(labels[i]).to_bytes(8, "little", signed=True))
        if ids is not None:
            raw = ids[i].encode("utf-8")
            h.update(len(raw).to_bytes(8, "little") + raw)
        if masks is not None:
            h.update(masks[i].tobytes())
    return h.hexdigest()


def order_fingerprint(shuffle_key: jax.Array, num_epochs: int, num_examples: int) -> str:
    """Hex SHA-256 of the epoch orders 0..num_epochs-1 (int32 little-endian, concatenated)."""
    h = hashlib.sha256(_ORDER_TAG)
    h.update(repr((int(num_epochs), int(num_examples))).encode())
    for epoch in range(num_epochs):
        h.update(epoch_order(shuffle_key, epoch, num_examples).astype("<i4").tobytes())
    return h.hexdigest()

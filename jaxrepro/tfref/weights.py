"""The weight file the JAX and TF processes exchange: an `.npz` of named arrays.

Keys are Flax flat names, the collection first ('params/conv1/kernel',
'batch_stats/block1/bn_a/mean'); arrays are in Flax layout. No pickle: the file is
written by `np.savez` and read with `allow_pickle=False`, so loading it can only ever
yield plain numeric arrays. NumPy only, so both processes can use it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

Flat = dict[str, np.ndarray]


def flatten(variables: Mapping[str, Any], prefix: str = "") -> Flat:
    """{'params': {'conv1': {'kernel': a}}} -> {'params/conv1/kernel': np.asarray(a)}."""
    flat: Flat = {}
    for key, value in variables.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = np.asarray(value)
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The nested dict of a flat one (inverse of `flatten`)."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def save(path: str | Path, flat: Mapping[str, np.ndarray]) -> None:
    """Write named arrays to an `.npz` (uncompressed, keys sorted)."""
    for name, value in flat.items():
        if np.asarray(value).dtype == object:
            raise TypeError(f"{name}: object arrays cannot be stored without pickle")
    with open(path, "wb") as f:  # a file object: np.savez would append '.npz' to a str
        np.savez(f, **{name: np.asarray(flat[name]) for name in sorted(flat)})


def load(path: str | Path) -> Flat:
    """Read named arrays from an `.npz`; refuses pickled objects."""
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in sorted(data.files)}


def sha256(flat: Mapping[str, np.ndarray]) -> dict[str, str]:
    """SHA-256 of each array's dtype, shape and bytes (the bits, not the values)."""
    out = {}
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out[name] = h.hexdigest()
    return out

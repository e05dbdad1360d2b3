"""Exact fingerprints of arrays and pytrees, computed on the device.

A float sum depends on reduction order; an integer sum modulo 2**32 does not. So a
leaf's fingerprint reinterprets its bits as uint32, mixes each word with its index
(so a permutation of values changes it), and sums with wrap-around: the same bits
give the same fingerprint on any backend and under any reduction order, and a single
flipped bit changes it. Two independent 32-bit lanes make a 64-bit fingerprint.
SHA-256 of host bytes (`sha256_leaves`) is the stronger check used for checkpoints.
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_LANES = ((0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35), (0x7FEB352D, 0x846CA68B, 0x27D4EB2F))


def _mix(words: jax.Array, idx: jax.Array, consts: tuple[int, int, int]) -> jax.Array:
    golden, m1, m2 = (jnp.uint32(c) for c in consts)
    h = words ^ (idx * golden)
    h = h * m1
    h = h ^ (h >> 15)
    h = h * m2
    return h ^ (h >> 13)


def _words(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype.itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
    if x.dtype.itemsize == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32).ravel()
    if x.dtype.itemsize == 1:
        return (
            x.view(jnp.uint8).astype(jnp.uint32).ravel()
            if x.dtype != jnp.bool_
            else x.astype(jnp.uint32).ravel()
        )
    raise TypeError(f"cannot fingerprint dtype {x.dtype}")


def leaf_fingerprint(x: jax.Array) -> jax.Array:
    """uint32[2] fingerprint of one array's bits (jittable, order-independent sum)."""
    words = _words(x)
    idx = jnp.arange(words.size, dtype=jnp.uint32)
    lanes = [jnp.sum(_mix(words, idx, c), dtype=jnp.uint32) for c in _LANES]
    size = jnp.uint32(words.size & 0xFFFFFFFF)
    return jnp.stack(lanes) ^ jnp.stack([size, size * jnp.uint32(0x9E3779B9)])


def tree_fingerprint(tree: Any) -> Any:
    """The pytree of leaf fingerprints (uint32[2] per leaf); jittable."""
    return jax.tree.map(leaf_fingerprint, tree)


def path_name(path: tuple) -> str:
    """A readable dotted name for a pytree key path ('params.conv1.kernel')."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def to_hex(fingerprints: Any) -> dict[str, str]:
    """Host dict 'leaf.path' -> 16 hex digits, from a fingerprint tree."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(fingerprints))[0]
    return {path_name(p): "".join(f"{int(w):08x}" for w in np.asarray(v)) for p, v in flat}


def combine_hex(leaves: dict[str, str]) -> str:
    """One SHA-256 over named leaf fingerprints, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(leaves):
        h.update(f"{name}={leaves[name]}\n".encode())
    return h.hexdigest()


def sha256_leaves(tree: Any) -> dict[str, str]:
    """'leaf.path' -> SHA-256 of (dtype, shape, raw bytes) of each leaf, on the host."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    out = {}
    for p, v in flat:
        v = np.asarray(
            jax.random.key_data(v)
            if isinstance(v, jax.Array) and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key)
            else v
        )
        h = hashlib.sha256(f"{v.dtype.str}{v.shape}".encode())
        h.update(np.ascontiguousarray(v).tobytes())
        out[path_name(p)] = h.hexdigest()
    return out

"""The epoch order: which training example goes into which batch of which epoch.

Why: the order must be a pure function of (shuffle key, epoch), so that a resumed run
(which only knows epoch and batch from its checkpoint cursor) reads exactly the batches
an uninterrupted run would have read, with no iterator state to save.

The order of epoch `e` is `jax.random.permutation(fold_in(shuffle_key, e), n)`, a
permutation of the positions 0..n-1 of the training split (in its canonical order, see
`jaxrepro.data.split`). Batches are consecutive slices of it; an epoch has
`n // batch_size` batches and the last `n % batch_size` examples of each epoch's order are
dropped (different ones each epoch), so every step sees a full batch and one compiled
step serves the whole run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import numpy as np


def _key_parts(key: jax.Array) -> tuple[bytes, str | None]:
    """Hashable form of a key: raw key data and the typed key's implementation name."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)).tobytes(), str(jax.random.key_impl(key))
    return np.asarray(key, dtype=np.uint32).tobytes(), None


@functools.lru_cache(maxsize=16)
def _cached_order(key_bytes: bytes, impl: str | None, epoch: int, n: int) -> np.ndarray:
    data = np.frombuffer(key_bytes, dtype=np.uint32)
    key = jax.random.wrap_key_data(data, impl=impl) if impl else jax.numpy.asarray(data)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n), dtype=np.int32)
    order.flags.writeable = False
    return order


def epoch_order(shuffle_key: jax.Array, epoch: int, num_examples: int) -> np.ndarray:
    """Permutation (int32 [num_examples], read-only) of the training examples in `epoch`.

    A pure function of (key, epoch, num_examples); recent results are memoised.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    key_bytes, impl = _key_parts(shuffle_key)
    return _cached_order(key_bytes, impl, int(epoch), int(num_examples))


def num_batches(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the remainder is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    return num_examples // batch_size


def batch_indices(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """The full batches of an epoch order, in turn; the last `len % batch_size` are dropped."""
    for b in range(num_batches(len(order), batch_size)):
        yield order[b * batch_size : (b + 1) * batch_size]


def batch_at(
    shuffle_key: jax.Array, epoch: int, batch: int, batch_size: int, num_examples: int
) -> np.ndarray:
    """Example positions (int32 [batch_size]) of batch `batch` of epoch `epoch`."""
    count = num_batches(num_examples, batch_size)
    if not 0 <= batch < count:
        raise IndexError(
            f"batch {batch} out of range: an epoch of {num_examples} examples "
            f"has {count} full batches of {batch_size}"
        )
    order = epoch_order(shuffle_key, epoch, num_examples)
    return order[batch * batch_size : (batch + 1) * batch_size]

"""The train/validation rule: hash partitioning of example ids, balanced per class.

Why: a split must not depend on how a data set happens to be stored (TFDS shards and
shuffles records by key hash, a folder lists files in file-system order) nor on any
random state, so that the same examples land in the same split on every machine and
after every rebuild ("deterministic data partitioning by hash", as reproducible-ML practice has it).

Rule: within each class, order the examples by SHA-256 of their id (UTF-8), ties
impossible in practice and broken by the id itself. The first `num_train / 2` of each
class are the training split, the next `num_val / 2` the validation split. Each split is
then ordered by the same hash key (classes interleave), which is its canonical order:
fingerprints and epoch orders refer to positions in it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from jaxrepro.data.errors import DataError

SPLITS = ("train", "validation")


class SplitError(DataError, ValueError):
    """The requested split cannot be made from the examples at hand."""


def split_key(example_id: str) -> bytes:
    """The sort key of an example id: its SHA-256 digest."""
    return hashlib.sha256(example_id.encode("utf-8")).digest()


def _hash_order(ids: Sequence[str], indices) -> list[int]:
    return sorted((int(i) for i in indices), key=lambda i: (split_key(ids[i]), ids[i]))


def partition(
    ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    num_train: int,
    num_val: int,
    num_classes: int = 2,
) -> dict[str, np.ndarray]:
    """Indices (into `ids`) of the train and validation examples, each in canonical order.

    Raises SplitError if a count does not divide among the classes or a class has too
    few examples.
    """
    labels = np.asarray(labels)
    if len(ids) != len(labels):
        raise SplitError(f"{len(ids)} ids but {len(labels)} labels")
    if len(set(ids)) != len(ids):
        raise SplitError("example ids are not unique, so the hash split is not defined")
    for name, count in (("num_train", num_train), ("num_val", num_val)):
        if count < 0 or count % num_classes:
            raise SplitError(
                f"{name}={count} must be a non-negative multiple of "
                f"{num_classes} (the split is balanced over the classes)"
            )
    per_train, per_val = num_train // num_classes, num_val // num_classes
    chosen: dict[str, list[int]] = {"train": [], "validation": []}
    for c in range(num_classes):
        members = _hash_order(ids, np.flatnonzero(labels == c))
        if len(members) < per_train + per_val:
            raise SplitError(
                f"class {c} has {len(members)} examples, but num_train={num_train} and "
                f"num_val={num_val} need {per_train + per_val} of each class"
            )
        chosen["train"] += members[:per_train]
        chosen["validation"] += members[per_train : per_train + per_val]
    return {name: np.asarray(_hash_order(ids, idx), dtype=np.int64) for name, idx in chosen.items()}

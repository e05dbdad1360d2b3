"""The 1,000 ImageNet classes of the pretrained networks, and their top-k lists.

`imagenet_class_index.json` is Keras's class index, byte for byte: the file
`keras.applications.imagenet_utils.decode_predictions` downloads from
https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json
(MD5 c2c37ea517e94d9795004a39431a14cb, the `file_hash` Keras checks; public data, the
ILSVRC-2012 synsets in the order the networks' outputs use). It maps each index to its
WordNet id and a short name ("281": ["n02123045", "tabby"]). Shipped with the package
because jaxrepro never downloads.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

CLASS_INDEX_MD5 = "c2c37ea517e94d9795004a39431a14cb"
NUM_CLASSES = 1000


@functools.cache
def class_index() -> tuple[tuple[str, str], ...]:
    """(WordNet id, name) of each class, in output order."""
    text = resources.files(__package__).joinpath("imagenet_class_index.json").read_text()
    table = json.loads(text)
    return tuple(tuple(table[str(i)]) for i in range(len(table)))


def class_names() -> tuple[str, ...]:
    """The short name of each class, in output order ('tench', 'goldfish', ...)."""
    return tuple(name for _, name in class_index())


@dataclass(frozen=True)
class Ranked:
    """One line of a top-k list: rank (1 = most probable), class index, name, probability."""

    rank: int
    index: int
    wnid: str
    name: str
    probability: float

    def __str__(self) -> str:
        return f"{self.rank:>3}. {self.index:>4} {self.name:<28} {self.probability:.8f}"


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of logits [..., C] in float32, as Keras's softmax head gives
    them (max-subtracted exp, divided by the sum)."""
    z = np.asarray(logits, np.float32)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int = 5) -> list[Ranked]:
    """The `k` most probable classes of one image's logits [C], most probable first;
    ties go to the lower class index (a stable sort)."""
    p = softmax(logits)
    order = np.argsort(-p, kind="stable")[:k]
    table = class_index()
    return [
        Ranked(rank, int(i), table[i][0], table[i][1], float(p[i]))
        for rank, i in enumerate(order, start=1)
    ]

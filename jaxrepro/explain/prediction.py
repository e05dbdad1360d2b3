"""What the model says about an image, and which class to explain.

The paper's models' head is one logit; class 1 ("dog") when it is positive, as in
training (`(logits > 0) == labels`). The probability of the predicted class is
sigmoid(logit) for "dog" and 1 - sigmoid(logit) for "cat"; the explained score is the
logit times a sign. A multi-class head (the pretrained ImageNet networks) is explained
at one class's logit: `ranked_class` picks it by rank in the top-k list or by name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro.models import imagenet

CLASS_NAMES = ("cat", "dog")  # label 0, label 1
CLASS_CHOICES = ("predicted", *CLASS_NAMES)


@dataclass(frozen=True)
class Prediction:
    """One image's logit, predicted class and that class's probability."""

    logit: float

    @property
    def label(self) -> int:
        return int(self.logit > 0)

    @property
    def name(self) -> str:
        return CLASS_NAMES[self.label]

    @property
    def probability(self) -> float:
        dog = 1.0 / (1.0 + np.exp(-np.float64(self.logit)))
        return float(dog if self.label else 1.0 - dog)

    @property
    def target(self) -> None:
        """The class index a multi-class head explains; None: a one-logit head's sign."""
        return None

    def __str__(self) -> str:
        return f"{self.name} (p={self.probability:.4f}, logit={self.logit:+.6g})"


@dataclass(frozen=True)
class ClassPrediction:
    """One image's most probable class of a multi-class head (the ImageNet networks):
    its index, name, softmax probability (float32, as Keras's head) and logit."""

    label: int
    name: str
    probability: float
    logit: float

    @property
    def target(self) -> int:
        return self.label

    def __str__(self) -> str:
        return f"{self.label} {self.name} (p={self.probability:.4f}, logit={self.logit:+.6g})"


@functools.partial(jax.jit, static_argnames=("model",))
def logits(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    """Logits [N] of images [N, H, W, 3] (pixels 0..255), eval mode."""
    return model.apply(variables, jnp.asarray(images, jnp.float32), train=False)


def predict(
    model: nn.Module, variables: Any, images: jax.Array
) -> list[Prediction] | list[ClassPrediction]:
    """One `Prediction` per image, or a `ClassPrediction` for a head of C > 1 logits
    (class names from `jaxrepro.models.imagenet` for 1,000 classes, else 'class i')."""
    z = np.asarray(logits(model, variables, images))
    if z.ndim == 1 or z.shape[-1] == 1:
        return [Prediction(float(v)) for v in z.reshape(len(z))]
    names = imagenet.class_names() if z.shape[-1] == imagenet.NUM_CLASSES else None
    out = []
    for row in z:
        top = imagenet.top_k(row, 1)[0] if names else None
        index = top.index if top else int(np.argmax(row))
        probability = top.probability if top else float(imagenet.softmax(row)[index])
        name = names[index] if names else f"class {index}"
        out.append(ClassPrediction(index, name, probability, float(row[index])))
    return out


def class_sign(choice: str, prediction: Prediction | ClassPrediction) -> float:
    """+1 to explain "dog", -1 to explain "cat"; "predicted" follows the prediction
    (+1 for a multi-class head, whose class is its `target`)."""
    if isinstance(prediction, ClassPrediction):
        return 1.0
    if choice == "predicted":
        return 1.0 if prediction.label else -1.0
    if choice not in CLASS_NAMES:
        raise ValueError(f"unknown class {choice!r}; valid: {list(CLASS_CHOICES)}")
    return 1.0 if choice == "dog" else -1.0


def ranked_class(choice: str, logits: np.ndarray, names: tuple[str, ...]) -> int:
    """The class index `choice` names for one image's logits [C] of a multi-class head.

    "predicted" (rank 1), a rank K ("3": the third most probable class, as in the
    paper's top-k tables), or a class name ("tabby"; spaces may stand for underscores).
    ValueError for anything else.
    """
    order = np.argsort(-np.asarray(logits, np.float64), kind="stable")
    if choice == "predicted":
        return int(order[0])
    if choice.isdigit():
        rank = int(choice)
        if not 1 <= rank <= len(order):
            raise ValueError(f"--class {choice}: a rank from 1 to {len(order)}")
        return int(order[rank - 1])
    wanted = choice.replace(" ", "_")
    if wanted in names:
        return names.index(wanted)
    close = [n for n in names if wanted.lower() in n.lower()][:8]
    raise ValueError(
        f"--class {choice!r}: not a rank or a class name"
        + (f"; names containing it: {', '.join(close)}" if close else "")
    )

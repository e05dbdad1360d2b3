"""What an explanation explains: a model's score for one class, for any Flax model's head.

A model's output is a logit per image, [N] or [N, 1] (the paper's models: > 0 is class 1,
"dog"), or a multi-class head [N, C]. Every method explains one scalar per image:

* one logit: `sign * logit`, with `sign` +1 (class 1) or -1 (class 0);
* C logits: the logit of class `target` (default: the predicted class, the arg-max),
  times `sign`.

`inference_apply` runs a model in inference mode: with `train=False` if its `__call__`
takes `train` (the paper's models do), `deterministic=True` if it takes `deterministic`
(Flax's dropout convention), and with no keyword otherwise. The input's dtype is kept:
float64 inputs (with `jax_enable_x64`) are explained in float64; integer pixels become
float32.
"""

from __future__ import annotations

import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def inference_kwargs(model: nn.Module) -> dict[str, bool]:
    """The keywords that put `model` in inference mode, read from its `__call__` signature."""
    try:
        params = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return {}
    if "train" in params:
        return {"train": False}
    if "deterministic" in params:
        return {"deterministic": True}
    return {}


def inference_apply(model: nn.Module, variables: Any, images: jax.Array, **kwargs: Any) -> Any:
    """`model.apply(variables, images)` in inference mode (see module doc)."""
    return model.apply(variables, images, **inference_kwargs(model), **kwargs)


def as_input(images: Any) -> jax.Array:
    """Images as a floating array: their own float dtype, or float32 for integer pixels."""
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    return images


def signs(sign: Any, n: int, dtype: Any = jnp.float32) -> jax.Array:
    """`sign` (a number or an [N] array of +-1) as an [N] array of `dtype`."""
    return jnp.broadcast_to(jnp.asarray(sign, dtype), (n,))


def targets(target: Any, n: int) -> jax.Array | None:
    """`target` (None, a class index or an [N] array of them) as int32 [N], or None."""
    if target is None:
        return None
    return jnp.broadcast_to(jnp.asarray(target, jnp.int32), (n,))


def selected_logit(logits: jax.Array, target: jax.Array | None = None) -> jax.Array:
    """The explained logit of each image, [N], from logits [N], [N, 1] or [N, C].

    A one-logit head ignores `target` if it is None and accepts only class 0 or 1
    otherwise (the sign says which); a C-class head takes `target` [N] or, if None,
    the arg-max of each row.
    """
    if logits.ndim == 1:
        return logits
    if logits.ndim != 2:
        raise ValueError(f"expected logits [N], [N, 1] or [N, C], got shape {logits.shape}")
    if logits.shape[1] == 1:
        return logits[:, 0]
    if target is None:
        target = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
    return jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]


def score(logits: jax.Array, sign: jax.Array, target: jax.Array | None = None) -> jax.Array:
    """The explained score per image, [N]: `sign * selected_logit(logits, target)`."""
    return sign * selected_logit(logits, target)


def class_probability(
    logits: jax.Array, sign: jax.Array, target: jax.Array | None = None
) -> jax.Array:
    """The probability of the explained class per image, [N] (what LIME fits).

    One logit: sigmoid(sign * logit) (the probability of class 1 for sign +1, of class 0
    for sign -1). C logits: the softmax probability of class `target` (the sign is not
    used: a probability has no "against").
    """
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return jax.nn.sigmoid(sign * logits.reshape(logits.shape[0]))
    probs = jax.nn.softmax(logits, axis=-1)
    if target is None:
        target = jnp.argmax(logits, axis=-1)
    return jnp.take_along_axis(probs, target[:, None], axis=-1)[:, 0]


def fixed_targets(
    model: nn.Module, variables: Any, images: jax.Array, target: jax.Array | None
) -> jax.Array | None:
    """`target`, or for a multi-class head without one, each image's predicted class.

    For methods that evaluate the model at other inputs than `images` (IG's path, LIME's
    perturbations): the explained class is the one of the image itself, fixed before.
    """
    shape = jax.eval_shape(lambda: inference_apply(model, variables, images)).shape
    if target is not None or len(shape) == 1 or shape[-1] == 1:
        return target
    return jnp.argmax(inference_apply(model, variables, images), axis=-1).astype(jnp.int32)

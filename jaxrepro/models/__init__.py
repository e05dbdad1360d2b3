"""The paper's two CNNs as Flax Linen modules, a registry by name, and small helpers.

Both models take NHWC float32 images with pixel values 0..255 (augmented by the
caller), rescale them inside, and return one logit per image, shape [N].
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from jaxrepro.models.convnet import ConvNet
from jaxrepro.models.minixception import MiniXception, SeparableConv, XceptionBlock

MODELS: dict[str, type[nn.Module]] = {"convnet": ConvNet, "minixception": MiniXception}

__all__ = ["MODELS", "ConvNet", "MiniXception", "SeparableConv", "XceptionBlock",
           "count_params", "flat_intermediates", "get_model"]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """The model registered under `name`, built with `kwargs` (e.g. dropout_rate)."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}") from None
    return cls(**kwargs)


def _size(tree: Any) -> int:
    return int(sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(tree)))


def count_params(variables: Mapping[str, Any]) -> dict[str, int]:
    """Parameter counts as Keras reports them.

    `trainable` counts the `params` collection, `total` adds `batch_stats` (Keras's
    non-trainable moving mean and variance). Works on arrays or `jax.eval_shape` output.
    """
    trainable = _size(variables.get("params", {}))
    return {"trainable": trainable, "total": trainable + _size(variables.get("batch_stats", {}))}


def flat_intermediates(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Sown activations as {'block1/act_a': array, 'conv5_out': array, ...}.

    Takes the `intermediates` collection returned by `apply(..., mutable=['intermediates'])`
    and unwraps Flax's sow tuples (the value of the first call of the model).
    """
    flat: dict[str, jax.Array] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, tuple):
            flat[prefix] = node[0]
        else:
            for key, value in node.items():
                visit(f"{prefix}/{key}" if prefix else key, value)

    visit("", intermediates)
    return flat

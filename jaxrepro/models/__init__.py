"""The paper's two CNNs and the pretrained ImageNet networks as Flax Linen modules,
their specs, and a registry by name.

Every model takes NHWC float32 images with pixel values 0..255 and applies its own
preprocessing inside. The paper's two (`convnet`, `minixception`) return one logit per
image, shape [N]; the ImageNet networks of `keras.applications` (`xception`,
`inception_v3`, `vgg16`; weights from `jaxrepro.pretrained`, classes in `imagenet`)
return logits [N, 1000]. Each model file exports its module and a `ModelSpec`
(`jaxrepro.models.spec`); `SPECS` holds them by the name a config's `model` key uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jaxrepro.models import convnet, inception_v3, minixception, vgg16, xception
from jaxrepro.models.convnet import ConvNet
from jaxrepro.models.minixception import MiniXception, SeparableConv, XceptionBlock
from jaxrepro.models.spec import GradcamLayer, ModelSpec

SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        convnet.SPEC,
        minixception.SPEC,
        xception.SPEC,
        inception_v3.SPEC,
        vgg16.SPEC,
    )
}
MODELS: dict[str, type[nn.Module]] = {name: spec.module for name, spec in SPECS.items()}

__all__ = [
    "MODELS",
    "SPECS",
    "ConvNet",
    "GradcamLayer",
    "MiniXception",
    "ModelSpec",
    "SeparableConv",
    "XceptionBlock",
    "count_params",
    "flat_intermediates",
    "get_model",
    "get_spec",
    "spec_of",
]


def get_spec(name: str) -> ModelSpec:
    """The spec registered under `name` (ValueError listing the valid names)."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(SPECS)}") from None


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The spec of a module instance's class, or None for a model nobody registered."""
    return next((s for s in SPECS.values() if isinstance(model, s.module)), None)


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """The model registered under `name`, built with `kwargs` (e.g. dropout_rate)."""
    return get_spec(name).module(**kwargs)


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

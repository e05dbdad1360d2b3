"""Exact weight transfer between the Flax models and their Keras twins, both ways.

Keras layers carry the Flax module path with '_' between levels ('conv1', 'dense',
'stem', 'block3_sepconv_a', 'block3_bn_b', 'block3_residual'). Each Keras variable maps
to one Flax leaf:

| Keras variable      | Flax leaf                      | layout                          |
|---------------------|--------------------------------|---------------------------------|
| `kernel`, `bias`    | params/<m>/kernel, .../bias    | same (HWIO conv, [in, out] dense) |
| `depthwise_kernel`  | params/<m>/depthwise/kernel    | Keras [kh,kw,C,1], Flax [kh,kw,1,C] |
| `pointwise_kernel`  | params/<m>/pointwise/kernel    | same [1,1,Cin,Cout]             |
| `gamma`, `beta`     | params/<m>/scale, .../bias     | same                            |
| `moving_mean`, `moving_variance` | batch_stats/<m>/mean, .../var | same              |

The only layout change is the depthwise transposition, a permutation of axes that
moves bytes without arithmetic, so the transfer is bitwise in both directions.
Both Flattens are channels-last, so the dense kernels need no reordering.

The ImageNet networks of `keras.applications` leave many layers unnamed (Keras then
numbers them per process), so their weights are matched by position instead:
`from_keras_ordered` pairs the Keras layers that have weights, in `model.layers` order
(the order Keras reads its own h5 weight files in), with the Flax module paths the
model's spec lists (`ModelSpec.keras_weight_order`).

NumPy only: the Keras side is used through `model.layers`, `layer.weights`,
`variable.name` and `variable.assign`, so this module imports no framework.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxrepro.tfref.weights import Flat

# Keras variable name -> (Flax collection, leaf path below the module, transposed?)
KERAS_TO_FLAX: dict[str, tuple[str, str, bool]] = {
    "kernel": ("params", "kernel", False),
    "bias": ("params", "bias", False),
    "depthwise_kernel": ("params", "depthwise/kernel", True),
    "pointwise_kernel": ("params", "pointwise/kernel", False),
    "gamma": ("params", "scale", False),
    "beta": ("params", "bias", False),
    "moving_mean": ("batch_stats", "mean", False),
    "moving_variance": ("batch_stats", "var", False),
}

_BLOCK = re.compile(r"^(block\d+)_(.+)$")


class TransferError(ValueError):
    """Weights that do not fit the model: a missing, extra or misshapen array."""


def keras_layer_name(module_path: str) -> str:
    """Keras layer name of a Flax module path: 'block1/bn_a' -> 'block1_bn_a'."""
    return module_path.replace("/", "_")


def flax_module_path(layer_name: str) -> str:
    """Flax module path of a Keras layer name: 'block1_bn_a' -> 'block1/bn_a'."""
    m = _BLOCK.match(layer_name)
    return f"{m.group(1)}/{m.group(2)}" if m else layer_name


def depthwise_to_keras(kernel: np.ndarray) -> np.ndarray:
    """Flax depthwise kernel [kh, kw, 1, C] -> Keras [kh, kw, C, 1] (same bytes, moved)."""
    return np.ascontiguousarray(np.swapaxes(kernel, 2, 3))


def depthwise_to_flax(kernel: np.ndarray) -> np.ndarray:
    """Keras depthwise kernel [kh, kw, C, 1] -> Flax [kh, kw, 1, C]."""
    return np.ascontiguousarray(np.swapaxes(kernel, 2, 3))


def flax_name(layer_name: str, variable_name: str) -> tuple[str, bool]:
    """(Flax flat name, whether the layout is transposed) of one Keras variable."""
    try:
        collection, leaf, transposed = KERAS_TO_FLAX[variable_name]
    except KeyError:
        raise TransferError(f"{layer_name}/{variable_name}: no Flax counterpart") from None
    return f"{collection}/{flax_module_path(layer_name)}/{leaf}", transposed


def _variables(model: Any):
    for layer in model.layers:
        for variable in layer.weights:
            yield layer.name, variable


def from_keras(model: Any) -> Flat:
    """All weights a Keras model holds, as Flax-named arrays in Flax layout."""
    flat: Flat = {}
    for layer_name, variable in _variables(model):
        name, transposed = flax_name(layer_name, variable.name)
        value = np.array(variable.numpy())  # a copy, never a view of the live variable
        flat[name] = depthwise_to_flax(value) if transposed else value
    return flat


def weighted_layers(model: Any) -> list[Any]:
    """The layers of a Keras model that hold weights, in `model.layers` order."""
    return [layer for layer in model.layers if layer.weights]


def from_keras_ordered(model: Any, module_paths: list[str]) -> Flat:
    """All weights of a Keras model whose i-th weighted layer is Flax module `module_paths[i]`.

    A count that does not match raises `TransferError` naming both counts; a variable
    without a Flax counterpart raises too. Shapes are checked by the caller against the
    Flax model (`jaxrepro.pretrained.convert`), which knows them.
    """
    layers = weighted_layers(model)
    if len(layers) != len(module_paths):
        raise TransferError(
            f"the Keras model has {len(layers)} layers with weights, the Flax model "
            f"{len(module_paths)}: not the same architecture"
        )
    flat: Flat = {}
    for layer, path in zip(layers, module_paths):
        for variable in layer.weights:
            name = variable.name.split("/")[-1].split(":")[0]
            try:
                collection, leaf, transposed = KERAS_TO_FLAX[name]
            except KeyError:
                raise TransferError(f"{layer.name}/{name}: no Flax counterpart") from None
            value = np.array(variable.numpy())
            flat[f"{collection}/{path}/{leaf}"] = depthwise_to_flax(value) if transposed else value
    return flat


def load_into_keras(model: Any, flat: Mapping[str, np.ndarray]) -> None:
    """Assign Flax-named weights to every variable of a Keras model.

    Every Keras variable must get a value and every array must be used, with the
    exact shape and dtype: a partial or approximate load raises `TransferError`.
    """
    used = set()
    for layer_name, variable in _variables(model):
        name, transposed = flax_name(layer_name, variable.name)
        if name not in flat:
            raise TransferError(f"no array {name!r} for Keras {layer_name}/{variable.name}")
        value = depthwise_to_keras(flat[name]) if transposed else np.asarray(flat[name])
        if tuple(value.shape) != tuple(variable.shape) or value.dtype != np.dtype(variable.dtype):
            raise TransferError(
                f"{name}: {value.dtype}{list(value.shape)} does not fit Keras "
                f"{layer_name}/{variable.name} {variable.dtype}{list(variable.shape)}"
            )
        variable.assign(value)
        used.add(name)
    extra = sorted(set(flat) - used)
    if extra:
        raise TransferError(f"arrays the Keras model has no variable for: {extra}")

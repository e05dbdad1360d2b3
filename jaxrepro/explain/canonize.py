"""Batch-norm folding for LRP (a canoniser in zennit's sense, done on parameters).

LRP rules are defined for linear layers ``z = W x + b``. A batch norm in inference mode
is a per-channel affine map ``y = s * x + t`` with ``s = scale / sqrt(var + eps)`` and
``t = bias - mean * s``. Where it follows a convolution *directly* (no branch, no
nonlinearity between), the two are one linear layer, ``W' = W * s`` (per output
channel) and ``b' = b * s + t``, and the rule of that convolution should see ``W'`` and
``b'`` (Heggen's thesis, section 3.4.2: "merge the convolutional layer before the batchnorm
layer together and form a new convolutional layer").

The paper's models cannot carry ``b'`` in the convolution itself (the separable
convolutions are bias-free), so folding keeps the architecture and moves the numbers:

* the convolution's kernel becomes ``W * s``;
* the batch norm becomes a pure bias add: scale 1, mean 0, and a variance chosen so
  that ``rsqrt(var + eps)`` is exactly 1 in float32, with bias ``t``.

The folded variables run through the unchanged model and give the same logits up to
float rounding; `Folded.biases` tells the LRP code which convolution owns which bias
(the LRP rule of that convolution then treats ``t`` as its own bias, and the bias add
itself passes the gradient unchanged).

Which pairs are foldable is a property of the architecture, so each model's spec
declares them next to the model (`ModelSpec.fold_pairs`, `jaxrepro.models`): the ConvNet
has no batch norm; the mini Xception's ``blockK/bn_b`` follows a pointwise convolution
and folds, its ``bn_a`` follows a residual add and stays a batch norm, which
`jaxrepro.explain.lrp` treats as a per-channel affine layer with its own rule.

Folding is pure: it returns new variables and leaves the caller's untouched, so there is
nothing to restore afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxrepro import models
from jaxrepro.models.spec import FoldPair


class Folded(NamedTuple):
    """Result of `fold_batchnorm`.

    `variables`: new model variables (same tree structure) with the folds applied.
    `biases`: {conv path: bias} for every folded convolution; the bias lives in the
    following (now identity-scaled) batch norm and belongs to the convolution for LRP.
    `batchnorms`: paths of the batch norms that became pure bias adds.
    """

    variables: dict
    biases: dict[str, jax.Array]
    batchnorms: frozenset[str]


def fold_pairs(model: nn.Module) -> tuple[FoldPair, ...]:
    """The exactly foldable (conv, batch norm) pairs of `model`; none for unknown classes."""
    spec = models.spec_of(model)
    return spec.fold_pairs(model) if spec is not None else ()


def unit_variance(epsilon: float) -> np.float32:
    """A float32 variance `v` with `v + epsilon == 1` exactly, so `rsqrt(v + eps) == 1`."""
    eps = np.float32(epsilon)
    v = np.float32(1) - eps
    for _ in range(8):
        total = v + eps
        if total == np.float32(1):
            return v
        v = np.nextafter(
            v, np.float32(-np.inf) if total > 1 else np.float32(np.inf), dtype=np.float32
        )
    raise ValueError(f"no float32 variance makes var + {epsilon} exactly 1")


def _key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


def fold_batchnorm(model: nn.Module, variables: Mapping[str, Any]) -> Folded:
    """Fold every batch norm that directly follows a convolution into it (see module doc).

    Returns new variables; `variables` itself is not modified. The folded model's logits
    equal the original's up to float rounding. Jit-compatible.
    """
    pairs = fold_pairs(model)
    flat = traverse_util.flatten_dict(flax.core.unfreeze(variables))
    flat = dict(flat)  # a new top-level mapping; leaves are immutable arrays
    biases: dict[str, jax.Array] = {}
    for pair in pairs:
        conv, bn = _key(pair.conv), _key(pair.bn)
        kernel = flat[("params", *conv, "kernel")]
        scale = flat[("params", *bn, "scale")]
        shift = flat[("params", *bn, "bias")]
        mean = flat[("batch_stats", *bn, "mean")]
        var = flat[("batch_stats", *bn, "var")]
        # Same operation order as flax's BatchNorm: rsqrt(var + eps) * scale.
        mul = jax.lax.rsqrt(var + jnp.asarray(pair.epsilon, var.dtype)) * scale
        if ("params", *conv, "bias") in flat:
            bias = flat[("params", *conv, "bias")] * mul + (shift - mean * mul)
            flat[("params", *conv, "bias")] = jnp.zeros_like(bias)
        else:
            bias = shift - mean * mul
        flat[("params", *conv, "kernel")] = kernel * mul
        flat[("params", *bn, "scale")] = jnp.ones_like(scale)
        flat[("params", *bn, "bias")] = bias
        flat[("batch_stats", *bn, "mean")] = jnp.zeros_like(mean)
        flat[("batch_stats", *bn, "var")] = jnp.full_like(var, unit_variance(pair.epsilon))
        biases[pair.conv] = bias
    return Folded(traverse_util.unflatten_dict(flat), biases, frozenset(pair.bn for pair in pairs))

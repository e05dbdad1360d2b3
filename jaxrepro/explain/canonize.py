"""Batch norm for LRP: merged into the layer before it (canonisation), or given its own rule.

LRP rules are defined for linear layers ``z = W x + b``. A batch norm in inference mode
is a per-channel affine map ``y = s * x + t`` with ``s = scale * rsqrt(var + eps)`` and
``t = bias - mean * s`` (`affine`). Where it follows a convolution or dense layer
*directly* (its input is that layer's output, no nonlinearity between), the two are one
linear layer, ``W' = W * s`` (per output channel) and ``b' = b * s + t`` (`merge`), and
the rule of that layer should see ``W'`` and ``b'`` (Heggen's thesis, section 3.4.2:
"merge the convolutional layer before the batchnorm layer together and form a new
convolutional layer"; zennit's `SequentialMergeBatchNorm`).

How pairs are found: from the traced call order, for any Flax model, with nothing
registered. While `jaxrepro.explain.lrp` runs the model, it remembers the output of every
`nn.Conv` and `nn.Dense` call; a `nn.BatchNorm` whose input *is* one of those outputs (the
same traced array) is merged with that layer. A batch norm after anything else (a residual
add, as the mini Xception's ``bn_a``; a ReLU) is not, keeps its own rule (composite
selector ``bn``) and is named in an `UnmergedBatchNorm` warning. (The mini Xception's
``blockK/bn_b`` merge into the pointwise conv before them, ``block1/bn_a`` into the stem;
``bn_a`` of blocks 2-5 follow a residual add.)

How merging is done: in the LRP pass, not in the variables. The model runs unchanged, so
its forward values (and the explained logit) are bit for bit the plain model's; the
batch norm's relevance is propagated by the rule of the layer before it, computed with
``W'`` and ``b'`` in the parameters' own dtype (float32 or float64, nothing assumed
about either), straight to that layer's input. If the layer's output has other
consumers besides the batch norm, their share goes through the layer's own rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


class UnmergedBatchNorm(UserWarning):
    """Batch norms LRP could not merge into the layer before them (own rule instead)."""


def affine(module: Any) -> tuple[jax.Array, jax.Array]:
    """(s, t) of a bound inference-mode `nn.BatchNorm`: ``y = s * x + t`` per channel.

    The same operation order as Flax's BatchNorm (``rsqrt(var + eps) * scale``); a batch
    norm without scale (`use_scale=False`) or bias (`use_bias=False`) has s without the
    scale factor, t without the bias.
    """
    stats = module.variables["batch_stats"]
    params = module.variables.get("params", {})
    var = stats["var"]
    mul = lax.rsqrt(var + jnp.asarray(module.epsilon, var.dtype))
    if module.use_scale:
        mul = mul * params["scale"]
    shift = -stats["mean"] * mul
    if module.use_bias:
        shift = shift + params["bias"]
    return mul, shift


def merge(
    kernel: jax.Array, bias: jax.Array | None, mul: jax.Array, shift: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(W', b') of a conv/dense layer (kernel [..., out], bias [out] or None) followed by
    the batch norm ``y = mul * z + shift``: ``W' = W * mul``, ``b' = b * mul + shift``."""
    merged_bias = shift if bias is None else bias * mul + shift
    return kernel * mul, merged_bias

"""The mini Xception's convolutions in the form XLA:CPU runs fast: same maths, other sums.

Depthwise convolution as shifted multiply-adds, pointwise (1x1) convolution as a
matrix product.

XLA:CPU compiles a depthwise convolution (`feature_group_count` = channels) into a
generic grouped-convolution loop, and its gradients into slower ones still: measured
here (2 loaded cores), one 3x3 depthwise layer of 128 channels at 46x46, batch 32,
took 12.9 s forward and backward against 1.6 s for this formulation, and the whole
mini Xception's forward and backward pass ran 3.7x faster at 96 px. Written as the k*k products of a
shifted input and one kernel tap, summed in a fixed order (row-major taps), it is
elementwise code that XLA fuses; autodiff gives elementwise gradients for the input
and plain reductions for the kernel. The mathematics is the convolution's (the same
products; the order of the sums is fixed here instead of left to XLA's convolution
emitter), so the bits differ from `lax.conv_general_dilated`'s, by rounding only.

A 1x1 convolution is a matrix product over channels (after taking every s-th pixel
for stride s; SAME and VALID agree for 1x1 windows); XLA:CPU's convolution emitter
runs its forward and backward pass about 3x slower than `lax.dot_general` (measured:
32->64 channels at 92x92, batch 32).

Not the default (`MiniXception(fast_convs=True)`, `--config.fast_convs=True`): besides
other bits, a jitted step then differs from an op-by-op one in the last bits, which
the default keeps equal. Run to run, it repeats its bits like the default.

Both functions have the signature of `lax.conv_general_dilated` and are passed to
`nn.Conv(conv_general_dilated=...)`, so the layers stay `nn.Conv`s (parameters, names,
LRP's interception and the Keras weight transfer are unchanged). Any convolution they
do not cover (dilation, other layouts, other windows) falls through to
`lax.conv_general_dilated` unchanged. The matmul precision is the caller's (jaxrepro
sets "highest").
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _supported(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
               lhs_dilation: Sequence[int] | None, rhs_dilation: Sequence[int] | None,
               dimension_numbers: Any, feature_group_count: int) -> bool:
    if not _nhwc_hwio(lhs, rhs, dimension_numbers):
        return False
    channels = lhs.shape[-1]
    ones = (None, (1, 1), [1, 1])
    return (feature_group_count == channels and rhs.shape[2] == 1
            and rhs.shape[3] == channels and tuple(window_strides) == (1, 1)
            and padding == "SAME" and lhs_dilation in ones and rhs_dilation in ones)


def depthwise_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                   padding: Any, lhs_dilation: Sequence[int] | None = None,
                   rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                   feature_group_count: int = 1, precision: Any = None,
                   **kwargs: Any) -> jax.Array:
    """`lax.conv_general_dilated`, with depthwise SAME stride-1 NHWC as shifted sums."""
    if kwargs or not _supported(lhs, rhs, window_strides, padding, lhs_dilation,
                                rhs_dilation, dimension_numbers, feature_group_count):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    _, h, w, _ = lhs.shape
    kh, kw = rhs.shape[:2]
    top, left = (kh - 1) // 2, (kw - 1) // 2  # SAME at stride 1: the extra row goes below
    x = jnp.pad(lhs, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            term = x[:, i:i + h, j:j + w, :] * rhs[i, j, 0]
            out = term if out is None else out + term
    return out


def _nhwc_hwio(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def pointwise_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                   padding: Any, lhs_dilation: Sequence[int] | None = None,
                   rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                   feature_group_count: int = 1, precision: Any = None,
                   **kwargs: Any) -> jax.Array:
    """`lax.conv_general_dilated`, with a 1x1 NHWC convolution as a matrix product."""
    ones = (None, (1, 1), [1, 1])
    if (kwargs or not _nhwc_hwio(lhs, rhs, dimension_numbers) or rhs.shape[:2] != (1, 1)
            or feature_group_count != 1 or padding not in ("SAME", "VALID")
            or lhs_dilation not in ones or rhs_dilation not in ones):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision, **kwargs)
    sh, sw = window_strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    return lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision)

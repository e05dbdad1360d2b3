"""Convolutions in the form XLA:CPU runs fast: the same products, summed in other orders.

* `patch_grad_conv`: XLA's convolution, forward and input gradient unchanged, with the
  kernel gradient as one matrix product of the input's patches (im2col) and the output
  gradient. Used for the mini Xception's 1x1 convolutions, where it is about 1.7x
  faster forward and backward than XLA's (176 px, 32 channels, batch 32: 124 against
  212 ms). For 3x3 and 5x5 kernels XLA's own kernel gradient is faster now that
  jaxrepro runs convolutions outside YNNPACK (`jaxrepro.determinism`: 129 against 448 ms for the
  ConvNet's conv2 at 180 px), so the ConvNet and the stem use XLA's convolutions
  (forward and backward; the first convolution's forward pass is `first_conv`'s); with
  YNNPACK's convolutions (XLA:CPU's default) the patch form had been 2.3x faster.
* `depthwise_conv`: a depthwise convolution (SAME, stride 1) as k*k shifted
  multiply-adds in a fixed (row-major) tap order, with its gradients written out
  (`_depthwise_backward`): the input gradient is the same shifted sum over the output
  gradient with flipped taps, and each tap's gradient a sum of its shifted input times
  the output gradient. In float32 all three run as jaxrepro's own kernels
  (`depthwise.cc`, through `native`), one pass over memory each; the forward pass and
  the input gradient give the bits of the same sums as XLA ops, the tap gradients are
  summed per row, row and image in a fixed order that no core count changes. Float64
  (the explanations' checks) runs the XLA ops, the backward pass over the batch in
  chunks of whole images of at most `CHUNK_BYTES` (a `lax.scan`). XLA:CPU runs a
  depthwise convolution (`feature_group_count` = channels) as a generic
  grouped-convolution loop: one 3x3 depthwise layer of 128 channels at 46x46, batch
  32, took 12.9 s forward and backward against 1.6 s shifted (2 loaded cores); the
  kernels take 137 ms against 303 ms for the XLA ops on the mini Xception's first
  block (176 px, 32 channels, batch 32; 2-core AMD EPYC, huge pages).
* `pointwise_conv`: a 1x1 convolution (SAME and VALID agree for 1x1 windows). At
  stride 1, XLA's forward pass with the gradients written out as the matrix products
  they are (`_pointwise_matmul`), which YNNPACK runs; strided, every s-th pixel's
  stride-1 convolution through `patch_grad_conv`.
* `first_conv`: a network's first convolution, over an image's few channels (VALID,
  stride 1, at most `FIRST_CONV_CHANNELS` inputs, float32), forward by jaxrepro's
  kernel (`first_conv.cc`), which sums each output in (row, column, input channel)
  order; the gradients are XLA's convolutions. Eigen's packed product is short there
  and ran at a fifth to a third of the layers after it: the mini Xception's 5x5 stem
  took 76 against 45 ms, the ConvNet's 3x3 conv1 50 against 25 ms (batch 32 at 180
  px, 2-core AMD EPYC Zen 3, huge pages; the best of 15 calls). Both paper models
  use it in `machine` mode (their `first_conv` field); the portable mode's own
  convolution replaces it.

The mini Xception's fast path (`MiniXception(fast_convs=True)`, the config's default
`fast_convs=True`: depthwise and 1x1) trains several times faster than XLA's
convolutions at 180 px (`python -m jaxrepro.analysis.bench experiments/minixception.py
--systems jax jax-xla-convs`). The mathematics is the convolution's; the bits differ
from `lax.conv_general_dilated`'s by rounding only. Run to run each path repeats its
bits, and a jitted step equals an op-by-op one (`tests/test_train.py`,
`tests/test_native_kernels.py`).

All four have the signature of `lax.conv_general_dilated` and are passed to
`nn.Conv(conv_general_dilated=...)`, so the layers stay `nn.Conv`s (parameters, names,
LRP's interception and the Keras weight transfer are unchanged). Any convolution they
do not cover (dilation, other layouts, other windows) falls through to
`lax.conv_general_dilated` unchanged. The matmul precision is the caller's (jaxrepro
sets "highest").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro import native


def _supported(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
    feature_group_count: int,
) -> bool:
    if not is_nhwc_hwio(lhs, rhs, dimension_numbers):
        return False
    channels = lhs.shape[-1]
    ones = (None, (1, 1), [1, 1])
    return (
        feature_group_count == channels
        and rhs.shape[2] == 1
        and rhs.shape[3] == channels
        and tuple(window_strides) == (1, 1)
        and padding == "SAME"
        and lhs_dilation in ones
        and rhs_dilation in ones
    )


def depthwise_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    *,
    native: bool = True,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated`, with depthwise SAME stride-1 NHWC as shifted sums.

    `native=False` keeps float32 on the XLA ops too, whatever `NATIVE` says: the
    portable mode's bits may not depend on the host's C++ compiler.
    """
    if kwargs or not _supported(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
    ):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    return _depthwise_same(lhs, rhs[:, :, 0], native)


def _shifted_sum(padded: jax.Array, taps: jax.Array, h: int, w: int) -> jax.Array:
    """Sum over the taps (row-major) of the shifted map times the tap: `[N, h, w, C]`."""
    kh, kw = taps.shape[:2]
    out = None
    for i in range(kh):
        for j in range(kw):
            term = padded[:, i : i + h, j : j + w, :] * taps[i, j]
            out = term if out is None else out + term
    return out


def _pad_same(x: jax.Array, kh: int, kw: int, *, transposed: bool = False) -> jax.Array:
    """SAME padding at stride 1 (the extra row and column go below and right); for the
    transposed convolution, the other way round."""
    rows, cols = ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2)
    if transposed:
        rows, cols = rows[::-1], cols[::-1]
    return jnp.pad(x, ((0, 0), rows, cols, (0, 0)))


def _depthwise(x: jax.Array, taps: jax.Array) -> jax.Array:
    kh, kw = taps.shape[:2]
    return _shifted_sum(_pad_same(x, kh, kw), taps, x.shape[1], x.shape[2])


# float32 depthwise convolutions run jaxrepro's own kernels (`native`, `depthwise.cc`);
# False: the shifted sums below as XLA ops (the forward and input gradient give the
# same bits either way, the tap gradients are summed in another order). Float64 (the
# explanations' checks) always takes the XLA ops.
NATIVE = True


def _pads(kh: int, kw: int, *, transposed: bool = False) -> tuple[int, int]:
    """(top, left) SAME padding at stride 1, as `_pad_same` pads."""
    if transposed:
        return kh // 2, kw // 2
    return (kh - 1) // 2, (kw - 1) // 2


def _native(x: jax.Array, allowed: bool) -> bool:
    return allowed and NATIVE and x.dtype == jnp.float32


def _shifted_sum_native(x: jax.Array, taps: jax.Array, pads: tuple[int, int]) -> jax.Array:
    """`_shifted_sum` of `x` zero-padded by `pads` (top, left), by `depthwise.cc`."""
    native.library()
    call = jax.ffi.ffi_call(
        "jaxrepro_shifted_sum", jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential"
    )
    return call(x, taps, pad_top=np.int64(pads[0]), pad_left=np.int64(pads[1]))


def _tap_gradients_native(x: jax.Array, g: jax.Array, window: tuple[int, int]) -> jax.Array:
    """`_tap_gradients` by `depthwise.cc`: per image, row and column in a fixed order."""
    native.library()
    top, left = _pads(*window)
    call = jax.ffi.ffi_call(
        "jaxrepro_tap_gradients",
        jax.ShapeDtypeStruct((*window, x.shape[-1]), x.dtype),
        vmap_method="sequential",
    )
    return call(x, g, pad_top=np.int64(top), pad_left=np.int64(left))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_same(x: jax.Array, taps: jax.Array, native: bool) -> jax.Array:
    """Depthwise SAME stride-1 convolution of NHWC `x` with taps `[kh, kw, C]`; `native`
    allows `depthwise.cc` for float32."""
    if _native(x, native):
        return _shifted_sum_native(x, taps, _pads(*taps.shape[:2]))
    return _depthwise(x, taps)


def _depthwise_forward(x: jax.Array, taps: jax.Array, native: bool):
    return _depthwise_same(x, taps, native), (x, taps)


# Bytes of one chunk of the batch in the XLA form of the backward pass (see
# `batch_chunk`). A constant, not the host's cache size: the chunking sets the order of
# the tap gradient's sum, so it must not depend on the machine.
CHUNK_BYTES = 2 * 2**20


def batch_chunk(n: int, image_bytes: int, budget: int | None = None) -> int:
    """The largest divisor of the batch size `n` whose images fit in `budget` bytes
    (default `CHUNK_BYTES`; at least 1)."""
    budget = CHUNK_BYTES if budget is None else budget
    return max([b for b in range(1, n + 1) if n % b == 0 and b * image_bytes <= budget], default=1)


def _depthwise_backward(native: bool, residuals, g: jax.Array):
    # The input gradient is the same shifted sum over the output gradient with the
    # taps flipped and the padding transposed; each tap's gradient is one reduction of
    # its shifted input times g. Written out rather than left to autodiff, which
    # transposes each shifted product into a padded full-size map and adds the k*k maps.
    x, taps = residuals
    window = taps.shape[:2]
    if _native(x, native):
        dx = _shifted_sum_native(g, taps[::-1, ::-1], _pads(*window, transposed=True))
        return dx, _tap_gradients_native(x, g, window)
    # As XLA ops, over the batch in chunks of at most `CHUNK_BYTES` (`lax.scan`): XLA
    # writes each shifted map out in full before reducing it, and for the whole batch
    # (127 MiB for the mini Xception's first block at 180 px, batch 32) those k*k
    # writes cost more than the products themselves. The tap gradients are summed
    # chunk by chunk, in batch order.
    n, h, w, c = g.shape
    b = batch_chunk(n, h * w * c * g.dtype.itemsize)

    def chunk(dtaps, xg):
        xc, gc = xg
        return dtaps + _tap_gradients(xc, gc, window), _depthwise_input_gradient(gc, taps)

    def split(a):
        return a.reshape(n // b, b, *a.shape[1:])

    dtaps, dx = lax.scan(chunk, jnp.zeros(taps.shape, g.dtype), (split(x), split(g)))
    return dx.reshape(g.shape), dtaps


def _depthwise_input_gradient(g: jax.Array, taps: jax.Array) -> jax.Array:
    kh, kw = taps.shape[:2]
    return _shifted_sum(_pad_same(g, kh, kw, transposed=True), taps[::-1, ::-1], *g.shape[1:3])


def _tap_gradients(x: jax.Array, g: jax.Array, window: tuple[int, int]) -> jax.Array:
    """Each tap's gradient, `[kh, kw, C]`: one reduction of its shifted map times g."""
    kh, kw = window
    h, w = g.shape[1:3]
    padded = _pad_same(x, kh, kw)
    return jnp.stack(
        [
            jnp.stack(
                [jnp.sum(padded[:, i : i + h, j : j + w, :] * g, axis=(0, 1, 2)) for j in range(kw)]
            )
            for i in range(kh)
        ]
    )


_depthwise_same.defvjp(_depthwise_forward, _depthwise_backward)


def is_nhwc_hwio(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool:
    """Whether a convolution's operands and dimension numbers are NHWC / HWIO."""
    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def pointwise_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated`, with a strided 1x1 NHWC convolution as every s-th
    pixel's stride-1 1x1 convolution, whose kernel gradient is a matrix product."""
    ones = (None, (1, 1), [1, 1])
    if (
        kwargs
        or not is_nhwc_hwio(lhs, rhs, dimension_numbers)
        or rhs.shape[:2] != (1, 1)
        or feature_group_count != 1
        or padding not in ("SAME", "VALID")
        or lhs_dilation not in ones
        or rhs_dilation not in ones
    ):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    sh, sw = window_strides
    if (sh, sw) == (1, 1):
        return _pointwise_matmul(lhs, rhs, precision)
    # Strided: XLA's 1x1 convolution of the strided pixels. As a YNNPACK product, XLA
    # made the strided slice feeding it 5x slower (153 against 29 ms in the mini
    # Xception's first block, inference, batch 32).
    return _conv_patch_grad(lhs[:, ::sh, ::sw, :], rhs, "VALID", precision)


# The largest input depth `first_conv` takes to its kernel: an image's channels (RGB,
# RGBA). Deeper inputs make Eigen's product long enough to run near the peak.
FIRST_CONV_CHANNELS = 4
# `first_conv`'s kernel computes 32 output channels at a time.
FIRST_CONV_BLOCK = 32


def first_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated`, with a float32 VALID stride-1 NHWC convolution of at
    most `FIRST_CONV_CHANNELS` input channels (a network's first, over the image) by
    jaxrepro's kernel (`first_conv.cc`, other bits than XLA's); its gradients stay
    XLA's convolutions."""
    ones = (None, (1, 1), [1, 1])
    if (
        kwargs
        or not is_nhwc_hwio(lhs, rhs, dimension_numbers)
        or lhs.dtype != jnp.float32
        or rhs.dtype != jnp.float32
        or rhs.shape[2] > FIRST_CONV_CHANNELS
        or rhs.shape[3] % FIRST_CONV_BLOCK != 0
        or tuple(window_strides) != (1, 1)
        or not _is_valid(padding)
        or feature_group_count != 1
        or lhs_dilation not in ones
        or rhs_dilation not in ones
    ):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    return _first_conv(lhs, rhs, precision)


def _is_valid(padding: Any) -> bool:
    """Whether `padding` is VALID, by name or as explicit zero pads."""
    if isinstance(padding, str):
        return padding == "VALID"
    return all(tuple(pair) == (0, 0) for pair in padding)


def _first_conv_native(x: jax.Array, kernel: jax.Array) -> jax.Array:
    native.library()
    kh, kw, _, cout = kernel.shape
    n, h, w, _ = x.shape
    call = jax.ffi.ffi_call(
        "jaxrepro_first_conv",
        jax.ShapeDtypeStruct((n, h - kh + 1, w - kw + 1, cout), x.dtype),
        vmap_method="sequential",
    )
    return call(x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _first_conv(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
    """The VALID stride-1 convolution by `first_conv.cc`; the gradients are XLA's."""
    return _first_conv_native(x, kernel)


def _first_conv_forward(x, kernel, precision):
    return _first_conv_native(x, kernel), (x, kernel)


def _first_conv_backward(precision, residuals, g):
    x, kernel = residuals
    return jax.vjp(lambda a, k: _xla_conv(a, k, "VALID", precision), x, kernel)[1](g)


_first_conv.defvjp(_first_conv_forward, _first_conv_backward)


def patch_grad_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated`, whose kernel gradient, for a stride-1 NHWC convolution,
    is one matrix product of the input's patches (im2col) with the output gradient.

    The forward pass and the input gradient are XLA's own (the same bits as
    `lax.conv_general_dilated`); only the kernel gradient is summed in another order.
    XLA:CPU computes a kernel gradient as a convolution over the whole batch; for 1x1
    kernels (and for any kernel under YNNPACK) the patch matrix product, a plain
    `dot_general`, is faster (figures in the module docstring).
    """
    ones = (None, (1, 1), [1, 1])
    if (
        kwargs
        or not is_nhwc_hwio(lhs, rhs, dimension_numbers)
        or padding not in ("SAME", "VALID")
        or tuple(window_strides) != (1, 1)
        or feature_group_count != 1
        or lhs_dilation not in ones
        or rhs_dilation not in ones
    ):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    return _conv_patch_grad(lhs, rhs, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise_matmul(x: jax.Array, kernel: jax.Array, precision: Any) -> jax.Array:
    """A 1x1 stride-1 NHWC convolution: XLA's forward pass, the gradients as the matrix
    products over channels and pixels that they are.

    XLA:CPU rewrites a 1x1 convolution into a product late, after it chose which
    products YNNPACK runs, so the convolution's input gradient ran as XLA's own
    product (the mini Xception's first block: 74 ms for 32 channels at 176 px, batch
    32). As a `dot_general` YNNPACK runs it. The forward pass stays XLA's convolution:
    as a YNNPACK product it made the evaluation step slower (93 against 108 images/s,
    the mini Xception at 180 px, batch 32; 2-core AMD EPYC). The kernel gradient is
    the patch form's product for a 1x1 window.
    """
    return _xla_conv(x, kernel, "VALID", precision)


def _pointwise_matmul_forward(x, kernel, precision):
    return _pointwise_matmul(x, kernel, precision), (x, kernel)


def _pointwise_matmul_backward(precision, residuals, g):
    x, kernel = residuals
    dx = lax.dot_general(g, kernel[0, 0], (((3,), (1,)), ((), ())), precision=precision)
    dkernel = lax.dot_general(x, g, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision)
    return dx, dkernel.reshape(kernel.shape)


_pointwise_matmul.defvjp(_pointwise_matmul_forward, _pointwise_matmul_backward)


def _xla_conv(x: jax.Array, kernel: jax.Array, padding: str, precision: Any) -> jax.Array:
    return lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_patch_grad(x: jax.Array, kernel: jax.Array, padding: str, precision: Any) -> jax.Array:
    return _xla_conv(x, kernel, padding, precision)


def _conv_patch_grad_forward(x, kernel, padding, precision):
    return _xla_conv(x, kernel, padding, precision), (x, kernel)


def _conv_patch_grad_backward(padding, precision, residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda v: _xla_conv(v, kernel, padding, precision), x)[1](g)[0]
    kh, kw, cin, cout = kernel.shape
    (top, bottom), (left, right) = lax.padtype_to_pads(x.shape[1:3], (kh, kw), (1, 1), padding)
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    h, w = g.shape[1:3]
    # Columns in (row, column, input channel) order: the HWIO kernel's, flattened.
    patches = jnp.concatenate(
        [x[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    dkernel = lax.dot_general(patches, g, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision)
    return dx, dkernel.reshape(kh, kw, cin, cout)


_conv_patch_grad.defvjp(_conv_patch_grad_forward, _conv_patch_grad_backward)

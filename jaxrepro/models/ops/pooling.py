"""Max pooling with a cheaper backward pass and the same bits as Flax's.

JAX differentiates `reduce_window` max through XLA's select-and-scatter, which on
CPU walks every window with a generic loop; it was about 40% of a ConvNet training
step. With windows that do not overlap, the gradient is simpler: each output's
gradient goes to one input, the first (in row-major window order) that equals the
maximum, and every other input gets +0.0. `max_pool_2x2` computes exactly that with
four strided slices and selects, elementwise code XLA fuses. Select-and-scatter with
its `>=` selection keeps the first of tied maxima too, and adds the gradient to a zero
(which turns a -0.0 gradient into +0.0, see `_as_scattered`), so both give the same
bits (tested on inputs full of ties, on gradients with -0.0, on odd sizes whose last
row and column VALID pooling drops, and through the whole ConvNet's gradient). NaN inputs
are not covered: there the two may route the gradient differently.

The mini Xception pools 3x3 windows with stride 2 and SAME padding, so windows
overlap and one input can take the gradient of up to four windows. Select-and-scatter
walks the windows in row-major order, picks the first maximum of each (padding is never
picked) and adds the window's gradient to a zero at that input, so an input chosen by
several windows sums their gradients in window order. `max_pool_3x3_s2` finds each
window's first maximum with nine strided compares, then builds the gradient by the
parity of the input's row and column (even rows and columns are shared by two
windows), adding shared gradients in window order. About 2x faster than
select-and-scatter on the mini Xception's maps (measured: block 1 at 180 px, batch 32).

`max_pool_3x3_s2_native` is the same function whose float32 forward and backward
passes are each one call of jaxrepro's kernels (`pooling.cc`, built by `native`): the
same maxima, folded in the same order with XLA's maximum, the same first maxima and
the same sums in window order, so the same bits, in one pass over memory each. It is
the mini Xception's default: its first pool forward and backward took 206 ms as XLA
ops and 141 ms with the backward kernel, and a training step 1451 and 1261 ms (180 px,
batch 32, 2-core AMD EPYC; `docs/results/speed/pool-kernel/`). The forward kernel
reads the map once instead of writing a padded copy of it first. The portable mode
keeps the XLA form, as it keeps every op off the kernels, which the host's compiler
builds. The ConvNet keeps
`max_pool_2x2`: its windows do not overlap, XLA fuses the selects, and the kernel was
slower there (70 against 52 ms forward and backward on conv1's map).

The forward passes take the maximum of the window's strided slices in row-major window
order, elementwise code XLA fuses with the ReLU before it; they give the bits of XLA's
own `reduce_window` maximum, which are Flax's `nn.max_pool`'s (tested, signed zeros
included) except on large maps in `machine` mode: there XLA:CPU runs Flax's
`reduce_window` in YNNPACK, whose maximum of a -0.0 and a +0.0 may be -0.0 where the
slices give +0.0. The values are the same and only the sign of zero maxima differs
(tested on 4x40x40x32 maps). As a `reduce_window`, the pool was where
XLA:CPU's YNNPACK reduce fusion began, and in an inference graph that fusion took in
every convolution before it, to run them far slower than XLA's own convolutions (the
ConvNet's evaluation step was one YNNPACK fusion: 455 ms of 462 for a batch of 32 at
180 px, 2-core AMD EPYC; `docs/results/speed/`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro import native


def _as_scattered(g: jax.Array) -> jax.Array:
    """`g` as select-and-scatter adds it to a zero: -0.0 becomes +0.0."""
    zero = jnp.zeros((), g.dtype)
    return jnp.where(g == zero, zero, g)


def _single_window(pool, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    """The reference gradient for a one-element output (one window, nothing to speed up).

    XLA rewrites such a select-and-scatter into code that may keep a -0.0 gradient's
    sign, and does so differently jitted and op by op (XLA:CPU, jax 0.10.2); deferring
    to it keeps the bits in both.
    """
    return jax.vjp(pool, x)[1](g)


def flax_max_pool_2x2(x: jax.Array) -> jax.Array:
    """Flax's own 2x2 max pooling, differentiated by select-and-scatter (the reference)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _window_max(padded: jax.Array, window: tuple[int, int], out: tuple[int, int]) -> jax.Array:
    """The maximum over each stride-2 window of `padded` [N, H, W, C], `out` windows per
    axis, taken over its strided slices in row-major window order."""
    (kh, kw), (ho, wo) = window, out
    y = None
    for i in range(kh):
        for j in range(kw):
            part = padded[:, i : i + 2 * ho - 1 : 2, j : j + 2 * wo - 1 : 2]
            y = part if y is None else jnp.maximum(y, part)
    return y


def _max_2x2(x: jax.Array) -> jax.Array:
    """2x2, stride 2, VALID max pooling as four strided slices (the bits of Flax's)."""
    return _window_max(x, (2, 2), (x.shape[1] // 2, x.shape[2] // 2))


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")` for NHWC `x`."""
    return _max_2x2(x)


def _forward(x: jax.Array):
    y = _max_2x2(x)
    return y, (x, y)


def _backward(residuals, g: jax.Array):
    x, y = residuals
    if g.size == 1:  # see `_single_window`
        return _single_window(flax_max_pool_2x2, x, g)
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    zero = jnp.zeros((), g.dtype)
    g = _as_scattered(g)
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for i in (0, 1):  # window positions in row-major order, as select-and-scatter
        for j in (0, 1):
            candidate = x[:, i : 2 * h2 : 2, j : 2 * w2 : 2]
            chosen = (candidate == y) & ~taken
            taken = taken | chosen
            parts.append(jnp.where(chosen, g, zero))
    rows = [jnp.stack(parts[2 * i : 2 * i + 2], axis=3) for i in (0, 1)]  # [n, h2, w2, 2, c]
    dx = jnp.stack(rows, axis=2).reshape(n, 2 * h2, 2 * w2, c)
    # VALID pooling ignores an odd last row / column: their gradient is zero.
    return (jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0))),)


max_pool_2x2.defvjp(_forward, _backward)


def flax_max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Flax's 3x3, stride 2, SAME max pooling, differentiated by select-and-scatter."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")


def _max_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3, stride 2, SAME max pooling as nine strided slices of the input padded with
    -inf (the bits of Flax's, which pads the same way)."""
    _, h, w, _ = x.shape
    (top, bottom), (left, right) = lax.padtype_to_pads((h, w), (3, 3), (2, 2), "SAME")
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-jnp.inf)
    return _window_max(padded, (3, 3), (-(-h // 2), -(-w // 2)))


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")` for NHWC `x`."""
    return _max_3x3_s2(x)


def _forward_3x3(x: jax.Array):
    y = _max_3x3_s2(x)
    return y, (x, y)


def _prev(a: jax.Array, axis: int) -> jax.Array:
    """`a[k - 1]` at position k along `axis`, zero at 0 (one longer)."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (1, 0)
    return jnp.pad(a, pad)


def _this(a: jax.Array, axis: int) -> jax.Array:
    """`a[k]` at position k along `axis`, zero at the end (one longer)."""
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, 1)
    return jnp.pad(a, pad)


def _interleave(even: jax.Array, odd: jax.Array, axis: int) -> jax.Array:
    """even[0], odd[0], even[1], ..., odd[m-1], even[m] along `axis` (m+1 and m long)."""
    m = odd.shape[axis]
    pairs = jnp.stack([lax.slice_in_dim(even, 0, m, axis=axis), odd], axis=axis + 1)
    shape = list(odd.shape)
    shape[axis] = 2 * m
    return jnp.concatenate(
        [pairs.reshape(shape), lax.slice_in_dim(even, m, m + 1, axis=axis)], axis=axis
    )


def _backward_3x3(residuals, g: jax.Array):
    x, y = residuals
    if g.size == 1:  # see `_single_window`
        return _single_window(flax_max_pool_3x3_s2, x, g)
    _, h, w, _ = x.shape
    _, ho, wo, _ = y.shape
    (top, bottom), (left, right) = lax.padtype_to_pads((h, w), (3, 3), (2, 2), "SAME")
    spatial = ((0, 0), (top, bottom), (left, right), (0, 0))
    padded = jnp.pad(x, spatial, constant_values=-jnp.inf)  # 2*ho+1 by 2*wo+1
    inside = np.pad(np.ones((h, w), bool), spatial[1:3])[None, :, :, None]
    g = _as_scattered(g)
    zero = jnp.zeros((), g.dtype)
    # The offset (3*i + j) of each window's first maximum, as select-and-scatter's `>=`
    # picks it: scanning offsets backwards, an earlier offset overrides a later one.
    first = jnp.full(y.shape, 9, jnp.int8)
    for k in reversed(range(9)):
        i, j = divmod(k, 3)
        rows, cols = slice(i, i + 2 * ho - 1, 2), slice(j, j + 2 * wo - 1, 2)
        hit = (padded[:, rows, cols] == y) & inside[:, rows, cols]
        first = jnp.where(hit, jnp.int8(k), first)
    c = {(i, j): jnp.where(first == 3 * i + j, g, zero) for i in range(3) for j in range(3)}
    # Window (a, b) at offset (i, j) covers padded input (2a + i, 2b + j). An even
    # padded row 2a takes offset 2 of window a - 1 and offset 0 of window a; an odd
    # row 2a + 1 offset 1 of window a; the same for columns. Where several windows
    # chose one input, their gradients are added in row-major window order, as
    # select-and-scatter adds them; the zeros between do not change a sum.
    rows_, cols_ = 1, 2
    even_even = (
        (_prev(_prev(c[2, 2], rows_), cols_) + _prev(_this(c[2, 0], cols_), rows_))
        + _this(_prev(c[0, 2], cols_), rows_)
    ) + _this(_this(c[0, 0], rows_), cols_)
    even_odd = _prev(c[2, 1], rows_) + _this(c[0, 1], rows_)
    odd_even = _prev(c[1, 2], cols_) + _this(c[1, 0], cols_)
    odd_odd = c[1, 1]
    dx = _interleave(
        _interleave(even_even, even_odd, cols_), _interleave(odd_even, odd_odd, cols_), rows_
    )
    return (dx[:, top : top + h, left : left + w],)


max_pool_3x3_s2.defvjp(_forward_3x3, _backward_3x3)


# --- the forward and backward passes by jaxrepro's kernels (pooling.cc) ---------------


def _window_attributes(window: tuple[int, int], pads: tuple[int, int]) -> dict[str, np.int64]:
    """`pooling.cc`'s description of a stride-2 pool: window, strides, top and left pads."""
    return {
        "window_h": np.int64(window[0]),
        "window_w": np.int64(window[1]),
        "stride_h": np.int64(2),
        "stride_w": np.int64(2),
        "pad_top": np.int64(pads[0]),
        "pad_left": np.int64(pads[1]),
    }


def _gradient_native(
    x: jax.Array,
    y: jax.Array,
    g: jax.Array,
    window: tuple[int, int],
    pads: tuple[int, int],
) -> jax.Array:
    """Select-and-scatter's gradient of a stride-2 max pool by `pooling.cc`, one pass
    (the kernel takes any window, stride and padding; the mini Xception's is 3x3/2 SAME)."""
    native.library()
    call = jax.ffi.ffi_call(
        "jaxrepro_max_pool_gradient",
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        vmap_method="sequential",
    )
    return call(
        x,
        y,
        g,
        **_window_attributes(window, pads),
    )


def _runs_native(x: jax.Array, g: jax.Array) -> bool:
    """The kernel takes float32 maps of more than one window (see `_single_window`)."""
    return x.dtype == jnp.float32 and g.dtype == jnp.float32 and g.size > 1


def _max_native(x: jax.Array, window: tuple[int, int], pads: tuple[int, int]) -> jax.Array:
    """The stride-2 max pool of `x` by `pooling.cc`, one pass: the bits of
    `_window_max` over `x` padded with -inf by `pads` (top, left) and as much below and
    right as SAME needs."""
    native.library()
    n, h, w, c = x.shape
    call = jax.ffi.ffi_call(
        "jaxrepro_max_pool",
        jax.ShapeDtypeStruct((n, -(-h // 2), -(-w // 2), c), x.dtype),
        vmap_method="sequential",
    )
    return call(
        x,
        **_window_attributes(window, pads),
    )


def _max_3x3_s2_native(x: jax.Array) -> jax.Array:
    """`_max_3x3_s2`, by `pooling.cc` in float32."""
    if x.dtype != jnp.float32:
        return _max_3x3_s2(x)
    (top, _), (left, _) = lax.padtype_to_pads(x.shape[1:3], (3, 3), (2, 2), "SAME")
    return _max_native(x, (3, 3), (top, left))


@jax.custom_vjp
def max_pool_3x3_s2_native(x: jax.Array) -> jax.Array:
    """`max_pool_3x3_s2`, in float32 forward and backward by jaxrepro's kernels: the
    same bits."""
    return _max_3x3_s2_native(x)


def _forward_3x3_native(x: jax.Array):
    y = _max_3x3_s2_native(x)
    return y, (x, y)


def _backward_3x3_native(residuals, g: jax.Array):
    x, y = residuals
    if not _runs_native(x, g):
        return _backward_3x3(residuals, g)
    (top, _), (left, _) = lax.padtype_to_pads(x.shape[1:3], (3, 3), (2, 2), "SAME")
    return (_gradient_native(x, y, g, (3, 3), (top, left)),)


max_pool_3x3_s2_native.defvjp(_forward_3x3_native, _backward_3x3_native)


# Each fast pooling and Flax's own, which XLA differentiates by select-and-scatter (the
# reference the tests compare against and the benchmark's "before").
REFERENCE = {
    max_pool_2x2: flax_max_pool_2x2,
    max_pool_3x3_s2: flax_max_pool_3x3_s2,
    max_pool_3x3_s2_native: flax_max_pool_3x3_s2,
}

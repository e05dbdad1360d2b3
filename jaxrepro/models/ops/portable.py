"""Convolutions and dot products whose bits are the same on every x86-64 CPU.

Under the portable XLA flags (`jaxrepro.determinism.PORTABLE_FLAGS`) a dot product is
XLA's own tiled LLVM-IR GEMM, compiled for the AVX cap: the same code, and so the same
order of every sum, on any x86-64 CPU. Two things still reach a kernel library that
picks its blocking by the CPU (Eigen reads the cache sizes through CPUID): a
convolution, which XLA:CPU always hands to Eigen, and a dot whose operands are not in
canonical form (XLA folds a transpose into the dot instead of moving the data, and such
a dot goes to Eigen). So, for the models in portable mode:

* `dot_general` moves both operands into canonical [batch, M, K] x [batch, K, N] form,
  the transposes materialised behind optimization barriers, with a custom VJP whose
  two gradient products are canonical too. A long contraction (K above
  `PART`) is cut into parts of `PART` summed by a fixed pairwise tree, so its pieces
  can run in parallel; the output rows are cut into blocks run as independent dots.
  Both cuts depend on the shapes only, never on the machine.
* `conv_general_dilated` is the convolution as a matrix product of the input's patches
  (im2col: the taps concatenated in the kernel's row-major (kh, kw, cin) order) and the
  [kh*kw*cin, cout] kernel, through `dot_general`; a depthwise convolution is
  `convolutions.depthwise_conv` (shifted multiply-adds, its reductions XLA's own loops;
  never jaxrepro's own kernels, which the host's C++ compiler builds outside the lock
  file).

The mathematics is the convolution's and the dot's; the bits are other than XLA's own
ops' (other summation orders). Any other form (dilation, other layouts, other groups) is
refused rather than run through a kernel that would give other bits elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro import determinism
from jaxrepro.models.ops import convolutions

# Contraction part: a K longer than this is cut into parts of this length (zero padded),
# whose products are summed by `tree_sum`. Rows per block: the output rows are cut into
# blocks of about this many, independent dots the thread pool runs side by side. Both
# are constants of the code, so the bits depend on the shapes alone.
PART = 4096
BLOCK_ROWS = 4096
MAX_BLOCKS = 16


class NotPortable(ValueError):
    """An operation this module has no machine-independent form for."""


def tree_sum(parts: jax.Array, axis: int = 0) -> jax.Array:
    """Sum along `axis` by a fixed pairwise tree of elementwise adds.

    The axis is padded with zeros to a power of two, then the first half is added to
    the second, again and again: no reduce op, so no backend can pick its own order.
    """
    n = parts.shape[axis]
    size = 1 << max(n - 1, 0).bit_length()
    if size != n:
        pad = [(0, 0, 0)] * parts.ndim
        pad[axis] = (0, size - n, 0)
        parts = lax.pad(parts, jnp.zeros((), parts.dtype), pad)
    while size > 1:
        size //= 2
        parts = lax.slice_in_dim(parts, 0, size, axis=axis) + lax.slice_in_dim(
            parts, size, 2 * size, axis=axis
        )
    return lax.index_in_dim(parts, 0, axis, keepdims=False)


def _materialised(x: jax.Array, perm: Sequence[int]) -> jax.Array:
    """`x.transpose(perm)` as data moved, not as a dot's dimension numbers."""
    perm = list(perm)
    return x if perm == sorted(perm) else lax.optimization_barrier(x.transpose(perm))


# XLA's LLVM-IR GEMM tile in elements (`determinism.GEMM_TILE`, columns in vectors of 8
# floats): the GEMM computes wrong results when N is not a multiple of the tile's
# columns, so every operand is zero-padded to whole tiles.
TILE = (determinism.GEMM_TILE[0], determinism.GEMM_TILE[1], determinism.GEMM_TILE[2] * 8)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _canonical(a: jax.Array, b: jax.Array) -> jax.Array:
    """[B, M, K] x [B, K, N] -> [B, M, N] as one dot (XLA's LLVM-IR GEMM), the operands
    zero-padded to whole tiles (zeros add nothing to a sum)."""
    _, m, k = a.shape
    n = b.shape[2]
    if n == 1:  # a matrix-vector product: XLA's tiled GEMV
        return lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), precision=lax.Precision.HIGHEST)
    mp, kp, np_ = _round_up(m, TILE[0]), _round_up(k, TILE[1]), _round_up(n, TILE[2])
    if (mp, kp) != (m, k):
        a = jnp.pad(a, ((0, 0), (0, mp - m), (0, kp - k)))
    if (kp, np_) != (k, n):
        b = jnp.pad(b, ((0, 0), (0, kp - k), (0, np_ - n)))
    out = lax.dot_general(a, b, (((2,), (1,)), ((0,), (0,))), precision=lax.Precision.HIGHEST)
    return out if (mp, np_) == (m, n) else out[:, :m, :n]


def _in_parts(a: jax.Array, b: jax.Array) -> jax.Array:
    """`_canonical`, with a K above `PART` cut into parts summed by `tree_sum`."""
    batch, m, k = a.shape
    if k <= PART:
        return _canonical(a, b)
    parts = math.ceil(k / PART)
    if parts * PART != k:
        a = jnp.pad(a, ((0, 0), (0, 0), (0, parts * PART - k)))
        b = jnp.pad(b, ((0, 0), (0, parts * PART - k), (0, 0)))
    a = _materialised(a.reshape(batch, m, parts, PART), (0, 2, 1, 3))
    a = a.reshape(batch * parts, m, PART)
    b = b.reshape(batch * parts, PART, b.shape[2])
    products = _canonical(a, b).reshape(batch, parts, m, b.shape[2])
    return tree_sum(products, axis=1)


def _blocked(a: jax.Array, b: jax.Array) -> jax.Array:
    """`_in_parts` over row blocks of the output (each row's sum is unchanged); the
    blocks start at whole tiles, so only the last one may need padding."""
    m = a.shape[1]
    blocks = max(1, min(MAX_BLOCKS, m // BLOCK_ROWS))
    if blocks == 1:
        return _in_parts(a, b)
    rows = _round_up(-(-m // blocks), TILE[0])
    bounds = list(range(0, m, rows)) + [m]
    return jnp.concatenate(
        [_in_parts(a[:, lo:hi], b) for lo, hi in zip(bounds, bounds[1:])], axis=1
    )


@jax.custom_vjp
def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """Batched [B, M, K] x [B, K, N] -> [B, M, N], portable forward and backward."""
    return _blocked(a, b)


def _matmul_forward(a, b):
    return _blocked(a, b), (a, b)


def _matmul_backward(residuals, g):
    a, b = residuals
    da = _blocked(g, _materialised(b, (0, 2, 1)))  # [B, M, N] x [B, N, K]
    db = _blocked(_materialised(a, (0, 2, 1)), g)  # [B, K, M] x [B, M, N]
    return da, db


matmul.defvjp(_matmul_forward, _matmul_backward)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.dot_general` (signature and result layout), through `matmul`.

    Usable as `nn.Dense(dot_general=...)`. The precision is always the highest (float32
    products), as jaxrepro sets it everywhere.
    """
    del precision, kwargs  # single-device CPU, float32
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(d) for d in dims) for dims in (lc, rc, lb, rb))
    if preferred_element_type is not None:
        lhs, rhs = lhs.astype(preferred_element_type), rhs.astype(preferred_element_type)
    lf = [d for d in range(lhs.ndim) if d not in lc + lb]
    rf = [d for d in range(rhs.ndim) if d not in rc + rb]
    batch = [lhs.shape[d] for d in lb]
    left, right = [lhs.shape[d] for d in lf], [rhs.shape[d] for d in rf]
    k = math.prod(lhs.shape[d] for d in lc)
    a = _materialised(lhs, [*lb, *lf, *lc]).reshape(math.prod(batch), math.prod(left), k)
    b = _materialised(rhs, [*rb, *rc, *rf]).reshape(math.prod(batch), k, math.prod(right))
    return matmul(a, b).reshape(batch + left + right)


def _patches(
    x: jax.Array, kh: int, kw: int, strides: tuple[int, int], pads: Sequence[tuple[int, int]]
) -> jax.Array:
    """im2col of NHWC `x`: [N, Ho, Wo, kh*kw*C], the taps in row-major order."""
    (top, bottom), (left, right) = pads
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    sh, sw = strides
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    taps = [
        lax.slice(
            x,
            (0, i, j, 0),
            (x.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[3]),
            (1, sh, sw, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """`lax.conv_general_dilated` for NHWC/HWIO without XLA's convolution op.

    For `nn.Conv(conv_general_dilated=...)`: plain convolutions as patches times kernel
    (`dot_general`), depthwise ones (groups = channels, multiplier 1, SAME, stride 1) as
    `convolutions.depthwise_conv`. Raises NotPortable for any other form.
    """
    del precision, preferred_element_type
    ones = (None, (1, 1), [1, 1])
    if (
        kwargs
        or batch_group_count != 1
        or not convolutions.is_nhwc_hwio(lhs, rhs, dimension_numbers)
        or lhs_dilation not in ones
        or rhs_dilation not in ones
    ):
        raise NotPortable("portable convolutions are NHWC/HWIO without dilation or batch groups")
    kh, kw, cin_group, cout = rhs.shape
    cin = lhs.shape[3]
    if feature_group_count == cin and cin_group == 1 and cout == cin:
        if tuple(window_strides) == (1, 1) and padding == "SAME":
            return convolutions.depthwise_conv(
                lhs,
                rhs,
                window_strides,
                padding,
                dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count,
                native=False,  # depthwise.cc is built by the host's compiler
            )
        raise NotPortable("portable depthwise convolutions are SAME with stride 1")
    if feature_group_count != 1:
        raise NotPortable(f"no portable form for a convolution of {feature_group_count} groups")
    strides = tuple(window_strides)
    pads = (
        lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), strides, padding)
        if isinstance(padding, str)
        else tuple(tuple(p) for p in padding)
    )
    patches = _patches(lhs, kh, kw, strides, pads)
    return dot_general(patches, rhs.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))


# The fields a model takes in portable mode (`ModelSpec.build`).
FIELDS = {"conv": conv_general_dilated, "dot": dot_general}

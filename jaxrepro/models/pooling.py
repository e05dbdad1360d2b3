"""2x2 max pooling (stride 2, VALID) with a cheaper backward pass and the same bits.

JAX differentiates `reduce_window` max through XLA's select-and-scatter, which on
CPU walks every window with a generic loop; it was about 40% of a ConvNet training
step. With windows that do not overlap, the gradient is simpler: each output's
gradient goes to one input, the first (in row-major window order) that equals the
maximum, and every other input gets +0.0. `max_pool_2x2` computes exactly that with
four strided slices and selects, elementwise code XLA fuses. Select-and-scatter with
its `>=` selection keeps the first of tied maxima too, and adds the gradient to a zero,
so both give the same bits (tested on inputs full of ties, on odd sizes whose last row
and column VALID pooling drops, and through the whole ConvNet's gradient). NaN inputs
are not covered: there the two may route the gradient differently.

The forward pass is Flax's `nn.max_pool` itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def flax_max_pool_2x2(x: jax.Array) -> jax.Array:
    """Flax's own 2x2 max pooling, differentiated by select-and-scatter (the reference)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


_pool = flax_max_pool_2x2


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """`nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")` for NHWC `x`."""
    return _pool(x)


def _forward(x: jax.Array):
    y = _pool(x)
    return y, (x, y)


def _backward(residuals, g: jax.Array):
    x, y = residuals
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    zero = jnp.zeros((), g.dtype)
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for i in (0, 1):          # window positions in row-major order, as select-and-scatter
        for j in (0, 1):
            candidate = x[:, i:2 * h2:2, j:2 * w2:2]
            chosen = (candidate == y) & ~taken
            taken = taken | chosen
            parts.append(jnp.where(chosen, g, zero))
    rows = [jnp.stack(parts[2 * i:2 * i + 2], axis=3) for i in (0, 1)]  # [n, h2, w2, 2, c]
    dx = jnp.stack(rows, axis=2).reshape(n, 2 * h2, 2 * w2, c)
    # VALID pooling ignores an odd last row / column: their gradient is zero.
    return (jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0))),)


max_pool_2x2.defvjp(_forward, _backward)

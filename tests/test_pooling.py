"""The ConvNet's 2x2 max pooling: a cheaper backward pass with the bits of the default."""

from __future__ import annotations

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.models import convnet
from jaxrepro.models.pooling import flax_max_pool_2x2 as flax_pool
from jaxrepro.models.pooling import max_pool_2x2


def pool_vjp(pool, x, g):
    """Output and input gradient of `pool` at `x` for output gradient `g`."""
    y, back = jax.vjp(pool, x)
    return y, back(g)[0]


def inputs(kind: str, shape) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "ties":  # few distinct values: most windows hold tied maxima
        return rng.integers(0, 3, shape).astype(np.float32)
    if kind == "signed_zeros":  # +0.0 and -0.0 compare equal: ties too
        return np.where(rng.random(shape) < 0.5, np.float32(-0.0), np.float32(0.0))
    return rng.normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "no_jit"])
@pytest.mark.parametrize("kind", ["normal", "ties", "signed_zeros"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 5), (1, 2, 3, 1)])
def test_max_pool_2x2_matches_flax_bitwise(shape, kind, jit):
    x = jnp.asarray(inputs(kind, shape))
    g = jnp.asarray(np.random.default_rng(1).normal(
        size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])).astype(np.float32))
    context = contextlib.nullcontext() if jit else jax.disable_jit()
    with context:
        run = jax.jit(pool_vjp, static_argnums=0) if jit else pool_vjp
        want = run(flax_pool, x, g)
        got = run(max_pool_2x2, x, g)
    chex.assert_trees_all_equal(got, want)  # values and signs of zero, bit for bit
    assert np.count_nonzero(np.asarray(got[1])) <= g.size  # one input per window


def test_a_backward_pass_that_routes_ties_elsewhere_is_caught():
    # The comparison above can fail: send tied gradients to the last maximum instead.
    x = jnp.asarray(inputs("ties", (2, 8, 8, 3)))
    g = jnp.ones((2, 4, 4, 3), jnp.float32)
    _, want = pool_vjp(flax_pool, x, g)
    last = jax.grad(lambda v: jnp.sum(flax_pool(v[:, ::-1, ::-1])[:, ::-1, ::-1] * g))(x)
    assert not np.array_equal(np.asarray(last), np.asarray(want))


def test_the_convnet_gradient_keeps_its_bits():
    size = 84  # odd maps after the VALID convolutions: 82 -> 41 -> 39 -> 19 -> ...
    x = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, size, size, 3)),
                    jnp.float32)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0])
    fast = convnet.ConvNet(dropout_rate=0.0)
    plain = fast.clone(pool=flax_pool)
    params = fast.init(jax.random.key(0), x[:1], train=False)["params"]

    def grads(model):
        def loss(p):
            z = model.apply({"params": p}, x, train=False)
            return jnp.mean(jax.nn.softplus(z) - y * z)
        return jax.jit(jax.value_and_grad(loss))(params)

    chex.assert_trees_all_equal(grads(fast), grads(plain))

"""Max pooling with a cheaper backward pass and the bits of the default (Flax's).

The ConvNet's 2x2 VALID pooling and the mini Xception's overlapping 3x3/2 SAME pooling,
the latter also with its float32 backward pass by jaxrepro's kernel (`pooling.cc`)."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bitwise_equal, loss_and_grads

from jaxrepro.models import convnet, minixception
from jaxrepro.models.ops import pooling
from jaxrepro.models.ops.pooling import flax_max_pool_2x2 as flax_pool
from jaxrepro.models.ops.pooling import (
    flax_max_pool_3x3_s2,
    max_pool_2x2,
    max_pool_3x3_s2,
    max_pool_3x3_s2_native,
)

POOLS_3X3 = {"xla": max_pool_3x3_s2, "kernel": max_pool_3x3_s2_native}


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


def gradients(shape) -> np.ndarray:
    """Output gradients over 16 orders of magnitude (so the order of a sum shows in its
    bits), a fifth of them -0.0."""
    rng = np.random.default_rng(1)
    g = rng.normal(size=shape) * 10.0 ** rng.integers(-8, 8, shape)
    return np.where(rng.random(shape) < 0.2, -0.0, g).astype(np.float32)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "no_jit"])
@pytest.mark.parametrize("kind", ["normal", "ties", "signed_zeros"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 5), (1, 2, 3, 1)])
def test_max_pool_2x2_matches_flax_bitwise(shape, kind, jit):
    x = jnp.asarray(inputs(kind, shape))
    g = jnp.asarray(gradients((shape[0], shape[1] // 2, shape[2] // 2, shape[3])))
    context = contextlib.nullcontext() if jit else jax.disable_jit()
    with context:
        run = jax.jit(pool_vjp, static_argnums=0) if jit else pool_vjp
        want = run(flax_pool, x, g)
        got = run(max_pool_2x2, x, g)
    assert_bitwise_equal(got, want)
    assert np.count_nonzero(np.asarray(got[1])) <= g.size  # one input per window


def test_on_a_large_map_the_2x2_forward_pass_differs_from_flax_in_zero_signs_only():
    # At this size machine-mode XLA:CPU runs Flax's reduce_window in YNNPACK, whose
    # maximum of a -0.0 and a +0.0 may be -0.0 (the strided slices' is +0.0): the same
    # values, other bits in zero maxima only; the gradients keep Flax's bits.
    x = jnp.asarray(inputs("signed_zeros", (4, 40, 40, 32)))
    x = x.at[0, 0, 0, 0].set(1.0).at[1, 2, 2, 1].set(-3.0)  # some nonzero maxima too
    g = jnp.asarray(gradients((4, 20, 20, 32)))
    run = jax.jit(pool_vjp, static_argnums=0)
    (y, dx), (want_y, want_dx) = run(max_pool_2x2, x, g), run(flax_pool, x, g)
    y, want_y = np.asarray(y), np.asarray(want_y)
    assert_bitwise_equal(dx, want_dx)
    np.testing.assert_array_equal(y, want_y)  # equal values (-0.0 == +0.0)
    differing = y.view(np.uint32) != want_y.view(np.uint32)
    assert np.all(y[differing] == 0.0)


def test_a_backward_pass_that_routes_ties_elsewhere_is_caught():
    # The comparison above can fail: send tied gradients to the last maximum instead.
    x = jnp.asarray(inputs("ties", (2, 8, 8, 3)))
    g = jnp.ones((2, 4, 4, 3), jnp.float32)
    _, want = pool_vjp(flax_pool, x, g)
    last = jax.grad(lambda v: jnp.sum(flax_pool(v[:, ::-1, ::-1])[:, ::-1, ::-1] * g))(x)
    assert not np.array_equal(np.asarray(last), np.asarray(want))


@pytest.mark.parametrize("form", POOLS_3X3)
@pytest.mark.parametrize("jit", [True, False], ids=["jit", "no_jit"])
@pytest.mark.parametrize("kind", ["normal", "ties", "signed_zeros"])
@pytest.mark.parametrize(
    "shape",
    # (3, 2, 2, 4): one window per image and channel, which the kernel takes;
    # (2, 9, 9, 11): channels that are not a multiple of a vector's width.
    [
        (2, 8, 8, 3),
        (3, 7, 9, 5),
        (2, 5, 4, 2),
        (1, 2, 2, 1),
        (1, 1, 1, 1),
        (3, 2, 2, 4),
        (2, 9, 9, 11),
    ],
)
def test_max_pool_3x3_s2_matches_flax_bitwise(shape, kind, jit, form):
    x = jnp.asarray(inputs(kind, shape))
    g = jnp.asarray(gradients(flax_max_pool_3x3_s2(x).shape))
    context = contextlib.nullcontext() if jit else jax.disable_jit()
    with context:
        run = jax.jit(pool_vjp, static_argnums=0) if jit else pool_vjp
        want = run(flax_max_pool_3x3_s2, x, g)
        got = run(POOLS_3X3[form], x, g)
    assert_bitwise_equal(got, want)


def _float32(bits: int) -> np.float32:
    return np.array([bits], np.uint32).view(np.float32)[0]


# Values where maxima are delicate: signed zeros, denormals (XLA:CPU compares and
# flushes them as zeros), infinities, and NaNs of both signs, quiet and signalling,
# with payloads (XLA keeps or clears a NaN's sign by the other operand's).
SPECIAL = np.array(
    [0.0, -0.0, 1.0, -1.0, 2.5, np.inf, -np.inf]
    + [_float32(b) for b in (0x00000100, 0x80000100, 0x00400000)]
    + [_float32(b) for b in (0x7FC00001, 0xFFC00002, 0x7F800003, 0xFF800004)],
    np.float32,
)


@pytest.mark.parametrize("shape", [(2, 9, 9, 16), (3, 8, 7, 11), (1, 5, 6, 3)])
def test_the_forward_kernel_gives_the_xla_forms_bits_on_special_values(shape):
    # Most windows hold several special values, in every order; channel counts that
    # fill AVX registers (16) and that leave a remainder (11, 3).
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.choice(SPECIAL, size=shape))
    want = jax.jit(max_pool_3x3_s2)(x)
    got = jax.jit(max_pool_3x3_s2_native)(x)
    assert_bitwise_equal(got, want)
    with jax.disable_jit():
        assert_bitwise_equal(max_pool_3x3_s2_native(x), want)


def test_the_forward_comparison_tells_nan_signs_apart():
    # The comparison above can fail: the same values, one NaN's sign bit flipped.
    x = np.zeros((1, 3, 3, 8), np.float32)
    x[0, 1, 1, 0] = _float32(0xFFC00002)
    y = np.asarray(jax.jit(max_pool_3x3_s2_native)(jnp.asarray(x)))
    flipped = y.copy()
    flipped.view(np.uint32)[0, 0, 0, 0] ^= 0x80000000
    assert np.isnan(y[0, 0, 0, 0])
    assert not np.array_equal(y.view(np.uint32), flipped.view(np.uint32))


def test_an_input_chosen_by_four_windows_sums_their_gradients_in_window_order():
    # A peak at (2, 2) is the maximum of the four windows that overlap there. Summed in
    # row-major window order the gradients give 1.0; in reverse order they give 0.0, so
    # the bitwise comparison above can tell the order of the sum.
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 2, 2, 0] = 1.0
    g = np.zeros((1, 4, 4, 1), np.float32)
    g[0, :2, :2, 0] = [[1e8, 1.0], [-1e8, 1.0]]
    in_order = ((np.float32(1e8) + np.float32(1.0)) + np.float32(-1e8)) + np.float32(1.0)
    reversed_ = ((np.float32(1.0) + np.float32(-1e8)) + np.float32(1.0)) + np.float32(1e8)
    assert (in_order, reversed_) == (1.0, 0.0)
    for pool in (flax_max_pool_3x3_s2, *POOLS_3X3.values()):
        _, dx = pool_vjp(pool, jnp.asarray(x), jnp.asarray(g))
        assert float(dx[0, 2, 2, 0]) == in_order
        assert np.count_nonzero(np.asarray(dx)) == 1


def test_the_kernels_run_float32_and_float64_stays_on_xla_ops():
    # The comparisons above would pass if the kernels were never called: the forward
    # and backward program must call both in float32, and neither in float64 (the
    # explanations' checks), which the kernels do not take.
    pool = max_pool_3x3_s2_native

    def program(dtype):
        x = jnp.zeros((2, 9, 9, 3), dtype)
        return str(jax.jit(lambda x, g: jax.vjp(pool, x)[1](g)).lower(x, pool(x)).as_text())

    for target in ("@jaxrepro_max_pool(", "@jaxrepro_max_pool_gradient("):
        assert target in program(jnp.float32)
    with jax.enable_x64(True):
        assert "jaxrepro_max_pool" not in program(jnp.float64)
        x = jnp.asarray(inputs("ties", (2, 9, 9, 3)), jnp.float64)
        g = jnp.asarray(gradients(pool(x).shape), jnp.float64)
        assert_bitwise_equal(pool_vjp(pool, x, g), pool_vjp(pooling.REFERENCE[pool], x, g))


def test_the_convnet_gradient_keeps_its_bits():
    size = 84  # odd maps after the VALID convolutions: 82 -> 41 -> 39 -> 19 -> ...
    x = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, size, size, 3)), jnp.float32)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0])
    fast = convnet.ConvNet(dropout_rate=0.0)
    plain = fast.clone(pool=flax_pool)
    variables = fast.init(jax.random.key(0), x[:1], train=False)
    assert_bitwise_equal(
        loss_and_grads(fast, variables, x, y), loss_and_grads(plain, variables, x, y)
    )


def test_the_mini_xception_gradient_keeps_its_bits():
    x = jnp.asarray(np.random.default_rng(2).integers(0, 256, (4, 37, 37, 3)), jnp.float32)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0])
    fast = minixception.MiniXception(dropout_rate=0.0, sizes=(8, 16, 16), stem_features=8)
    assert fast.pool is max_pool_3x3_s2_native  # the kernel's backward pass
    plain = fast.clone(pool=flax_max_pool_3x3_s2)
    variables = fast.init(jax.random.key(0), x[:1], train=False)
    assert_bitwise_equal(
        loss_and_grads(fast, variables, x, y), loss_and_grads(plain, variables, x, y)
    )

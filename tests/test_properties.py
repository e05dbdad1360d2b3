"""Claims that hold for all inputs, checked on many drawn ones (hypothesis, chex).

* the ULP distance counts the floats between two values;
* a fingerprint changes when any one bit of any leaf flips;
* every epoch order is a permutation;
* LRP-0 and LRP-epsilon conserve relevance on bias-free ReLU nets of drawn weights;
* folding batch norms leaves the mini Xception's outputs unchanged (up to rounding).
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jaxrepro import fingerprint
from jaxrepro.data.order import epoch_order
from jaxrepro.explain import lrp
from jaxrepro.models import MiniXception
from jaxrepro.numerics import ulp_distance

# Compiled functions are reused across examples; a slow first example is compilation.
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def _step_up(x: np.float32, k: int) -> np.float32:
    for _ in range(k):
        x = np.nextafter(x, np.float32(np.inf), dtype=np.float32)
    return x


@SETTINGS
@given(x=finite_f32, k=st.integers(0, 300))
def test_ulp_distance_counts_the_floats_in_between(x, k):
    x = np.float32(x)
    y = _step_up(x, k)
    if not np.isfinite(y):
        return  # stepped past the largest float
    a, b = np.array([x], np.float32), np.array([y], np.float32)
    assert ulp_distance(a, b).tolist() == [k] == ulp_distance(b, a).tolist()


@SETTINGS
@given(a=finite_f32, b=finite_f32)
def test_ulp_distance_is_zero_exactly_for_equal_values(a, b):
    d = int(ulp_distance(np.array([a], np.float32), np.array([b], np.float32))[0])
    assert (d == 0) == (np.float32(a) == np.float32(b))


leaf_arrays = st.one_of(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(max_dims=3, max_side=6),
        elements=st.floats(width=32, allow_nan=False),
    ),
    hnp.arrays(np.int32, hnp.array_shapes(max_dims=2, max_side=8)),
    hnp.arrays(np.uint8, hnp.array_shapes(max_dims=2, max_side=8)),
)


@jax.jit
def _fingerprint(tree):
    return fingerprint.tree_fingerprint(tree)


@SETTINGS
@given(leaf=leaf_arrays, data=st.data())
def test_a_fingerprint_changes_when_any_one_bit_flips(leaf, data):
    tree = {"a": leaf, "b": np.arange(3, dtype=np.float32)}
    raw = np.frombuffer(leaf.tobytes(), np.uint8).copy()
    byte = data.draw(st.integers(0, raw.size - 1), label="byte")
    bit = data.draw(st.integers(0, 7), label="bit")
    raw[byte] ^= np.uint8(1 << bit)
    flipped = {"a": np.frombuffer(raw.tobytes(), leaf.dtype).reshape(leaf.shape), "b": tree["b"]}
    before, after = (
        fingerprint.to_hex(_fingerprint(tree)),
        fingerprint.to_hex(_fingerprint(flipped)),
    )
    assert before["a"] != after["a"] and before["b"] == after["b"]
    assert fingerprint.sha256_leaves(tree)["a"] != fingerprint.sha256_leaves(flipped)["a"]


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), epoch=st.integers(0, 1000), n=st.integers(0, 300))
def test_every_epoch_order_is_a_permutation(seed, epoch, n):
    order = epoch_order(jax.random.key(seed), epoch, n)
    chex.assert_shape(order, (n,))
    np.testing.assert_array_equal(np.sort(order), np.arange(n))


class _BiasFree(nn.Module):
    """A bias-free ReLU net with the models' linear layers: conv, depthwise, dense."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.Conv(4, (3, 3), feature_group_count=4, use_bias=False, name="depthwise")(x)
        x = nn.relu(nn.Conv(6, (1, 1), use_bias=False, name="conv2")(x))
        return nn.Dense(1, use_bias=False, name="dense")(jnp.mean(x, axis=(1, 2)))[:, 0]


@functools.cache
def _conservation(composite: str):
    model = _BiasFree()
    return jax.jit(
        lambda v, x: lrp.lrp(lambda v, u: model.apply(v, u), v, x, 1.0, composite=composite)
    )


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), composite=st.sampled_from(["lrp0", "epsilon"]))
def test_lrp_conserves_relevance_on_drawn_bias_free_nets(seed, composite):
    k_init, k_x = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(k_x, (2, 10, 10, 3))
    variables = _BiasFree().init(k_init, x)
    logits, relevance = _conservation(composite)(variables, x)
    sums = jnp.sum(relevance, axis=(1, 2, 3))
    chex.assert_trees_all_close(sums, logits, rtol=2e-4, atol=1e-5)


SMALL_XCEPTION = MiniXception(sizes=(4, 8), stem_features=4, dropout_rate=0.0)


@functools.cache
def _lrp0():
    return jax.jit(lambda v, x: lrp.attribute(SMALL_XCEPTION, v, x, composite="lrp0"))


@functools.cache
def _grad_x_input():
    def grad_x_input(v, x):
        return x * jax.grad(lambda x: SMALL_XCEPTION.apply(v, x, train=False).sum())(x)

    return jax.jit(grad_x_input)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1))
def test_lrp0_with_merged_batch_norms_is_gradient_times_input(seed):
    """Merging a batch norm into the layer before it changes the rule's weights, not what
    LRP-0 means: gradient x input, for any batch-norm parameters (the merged stem is the
    input layer, so its merged weights W * s and bias carry the relevance there)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.uniform(keys[0], (2, 16, 16, 3), maxval=255.0)
    variables = SMALL_XCEPTION.init(keys[1], x, train=False)
    # batch norms off their identity defaults: scales, biases, means and variances drawn
    variables = {
        "params": jax.tree_util.tree_map_with_path(
            lambda p, a: (
                a + 0.3 * jax.random.normal(keys[2], a.shape)
                if "bn" in jax.tree_util.keystr(p)
                else a
            ),
            variables["params"],
        ),
        "batch_stats": jax.tree_util.tree_map_with_path(
            lambda p, a: (
                jax.random.uniform(keys[3], a.shape, minval=0.5, maxval=2.0)
                if jax.tree_util.keystr(p).endswith("['var']")
                else 0.2 * jax.random.normal(keys[3], a.shape)
            ),
            variables["batch_stats"],
        ),
    }
    rel = _lrp0()(variables, x)
    ref = _grad_x_input()(variables, x)
    chex.assert_trees_all_close(rel, ref, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
    plan = lrp.batchnorm_plan(SMALL_XCEPTION, variables, x)
    assert ("stem", "block1/bn_a") in plan.merged and len(plan.merged) == 3

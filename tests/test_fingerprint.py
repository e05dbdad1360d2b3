"""Exact fingerprints: same bits -> same print, one flipped bit -> different."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import assert_bitwise_equal

from jaxrepro import fingerprint as fp


def test_same_under_jit_and_order_independent_of_reduction():
    x = jax.random.normal(jax.random.key(0), (257, 33))
    assert_bitwise_equal(fp.leaf_fingerprint(x), jax.jit(fp.leaf_fingerprint)(x))
    # Same values computed along a different path give the same fingerprint.
    y = jnp.asarray(np.asarray(x).copy())
    assert_bitwise_equal(fp.leaf_fingerprint(x), fp.leaf_fingerprint(y))


def test_one_ulp_changes_it():
    x = jax.random.normal(jax.random.key(1), (64,))
    y = x.at[17].set(jnp.nextafter(x[17], jnp.inf))
    assert (fp.leaf_fingerprint(x) != fp.leaf_fingerprint(y)).any()


def test_position_matters():
    x = jnp.arange(16, dtype=jnp.float32)
    assert (fp.leaf_fingerprint(x) != fp.leaf_fingerprint(x[::-1])).any()
    z = jnp.zeros(4)
    assert (fp.leaf_fingerprint(z) != fp.leaf_fingerprint(jnp.zeros(5))).any()


def test_signed_zero_differs():
    assert (fp.leaf_fingerprint(jnp.array([0.0])) != fp.leaf_fingerprint(jnp.array([-0.0]))).any()


def test_hex_names_and_sha256():
    tree = {"params": {"conv1": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}}
    hexes = fp.to_hex(fp.tree_fingerprint(tree))
    assert set(hexes) == {"params.conv1.kernel", "params.conv1.bias"}
    assert all(len(v) == 16 for v in hexes.values())
    sha = fp.sha256_leaves(tree)
    tree2 = jax.tree.map(lambda a: a.at[0].add(1), tree)
    sha2 = fp.sha256_leaves(tree2)
    assert all(sha[k] != sha2[k] for k in sha)
    assert fp.combine_hex(hexes) == fp.combine_hex(dict(reversed(list(hexes.items()))))

"""The mini Xception's fast convolutions compute what XLA's convolutions compute."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from conftest import train_cli
from jaxrepro.models import convolutions, minixception

NHWC = ("NHWC", "HWIO", "NHWC")


def _normal(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _close(a, b, tol=2e-6):
    """Elementwise |a - b| within tol of the largest |b| (sums in another order)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= tol * np.max(np.abs(b)), np.max(np.abs(a - b))


def _depthwise(conv, x, k):
    c = x.shape[-1]
    dn = lax.conv_dimension_numbers(x.shape, k.shape, NHWC)
    return conv(x, k, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=c)


def _pointwise(conv, x, k, stride, padding):
    dn = lax.conv_dimension_numbers(x.shape, k.shape, NHWC)
    return conv(x, k, (stride, stride), padding, dimension_numbers=dn)


@pytest.mark.parametrize("kernel", [3, 5, 2])
@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_depthwise_matches_xla_forward_and_backward(kernel, hw):
    x = _normal((2, *hw, 6), 0)
    k = _normal((kernel, kernel, 1, 6), 1)
    g = _normal((2, *hw, 6), 2)
    fast, back_fast = jax.vjp(lambda x, k: _depthwise(convolutions.depthwise_conv, x, k), x, k)
    want, back_want = jax.vjp(lambda x, k: _depthwise(lax.conv_general_dilated, x, k), x, k)
    _close(fast, want)
    for a, b in zip(back_fast(g), back_want(g)):
        _close(a, b)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_pointwise_matches_xla_forward_and_backward(stride, padding):
    x = _normal((2, 7, 9, 5), 3)
    k = _normal((1, 1, 5, 4), 4)
    fast, back_fast = jax.vjp(
        lambda x, k: _pointwise(convolutions.pointwise_conv, x, k, stride, padding), x, k)
    want, back_want = jax.vjp(
        lambda x, k: _pointwise(lax.conv_general_dilated, x, k, stride, padding), x, k)
    _close(fast, want)
    g = _normal(want.shape, 5)
    for a, b in zip(back_fast(g), back_want(g)):
        _close(a, b)


def test_a_flipped_kernel_would_be_caught():
    x = _normal((2, 8, 8, 6), 0)
    k = _normal((3, 3, 1, 6), 1)
    want = _depthwise(lax.conv_general_dilated, x, k)
    with pytest.raises(AssertionError):
        _close(_depthwise(convolutions.depthwise_conv, x, k[::-1, ::-1]), want)


def test_what_they_do_not_cover_is_xlas_own_bits():
    x = _normal((2, 9, 9, 4), 6)
    k = _normal((3, 3, 1, 4), 7)
    dn = lax.conv_dimension_numbers(x.shape, k.shape, NHWC)
    strided = dict(window_strides=(2, 2), padding="SAME", dimension_numbers=dn,
                   feature_group_count=4)
    chex.assert_trees_all_equal(convolutions.depthwise_conv(x, k, **strided),
                                lax.conv_general_dilated(x, k, **strided))
    k3 = _normal((3, 3, 4, 5), 8)
    dn3 = lax.conv_dimension_numbers(x.shape, k3.shape, NHWC)
    chex.assert_trees_all_equal(
        convolutions.pointwise_conv(x, k3, (1, 1), "SAME", dimension_numbers=dn3),
        lax.conv_general_dilated(x, k3, (1, 1), "SAME", dimension_numbers=dn3))


def test_mini_xception_fast_convs_keep_parameters_and_outputs():
    x = jnp.asarray(np.random.default_rng(9).integers(0, 256, (2, 32, 32, 3)), jnp.float32)
    fast = minixception.MiniXception(fast_convs=True)
    plain = fast.clone(fast_convs=False)
    variables = fast.init(jax.random.key(0), x, train=False)
    chex.assert_trees_all_equal(variables, plain.init(jax.random.key(0), x, train=False))
    _close(fast.apply(variables, x, train=False), plain.apply(variables, x, train=False),
           tol=1e-5)


def test_fast_convs_training_repeats_its_bits(tmp_path):
    short = ["--config.fast_convs=True", "--config.num_epochs=1", "--config.data.num_train=32",
             "--config.diff_probe_examples=0", "--config.probe_examples=0"]
    for name in ("a", "b"):  # two processes
        train_cli("minixception", tmp_path / name, *short)
    finals = [json.loads((tmp_path / n / "final.json").read_text()) for n in ("a", "b")]
    assert finals[0]["final_state_sha256"] == finals[1]["final_state_sha256"]
    assert (tmp_path / "a" / "steps.jsonl").read_bytes() == (tmp_path / "b" / "steps.jsonl").read_bytes()


def test_fast_convs_give_other_bits_than_xla_convs():
    # Another order of the sums: other gradients than XLA's convolutions (opt-in for that).
    x = jnp.asarray(np.random.default_rng(10).integers(0, 256, (4, 32, 32, 3)), jnp.float32)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0])
    fast = minixception.MiniXception(dropout_rate=0.0, fast_convs=True)
    plain = fast.clone(fast_convs=False)
    variables = fast.init(jax.random.key(0), x, train=False)

    def grads(model):
        def loss(p):
            z, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                               train=True, mutable=["batch_stats"])
            return jnp.mean(jax.nn.softplus(z) - y * z)
        return jax.jit(jax.grad(loss))(variables["params"])

    a, b = jax.tree.leaves(grads(fast)), jax.tree.leaves(grads(plain))
    assert any(not np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))
    for u, v in zip(a, b):
        _close(u, v, tol=5e-2)  # the same gradient up to rounding in near-cancelling sums

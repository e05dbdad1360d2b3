"""The models' fast convolutions compute what XLA's convolutions compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bitwise_equal, loss_and_grads
from jax import lax

from jaxrepro.models import convnet, minixception
from jaxrepro.models.ops import convolutions

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


def test_batch_chunk_is_the_largest_divisor_that_fits():
    mib = 2**20
    assert convolutions.batch_chunk(32, 4 * mib, budget=8 * mib) == 2  # 176 px, 32 ch
    assert convolutions.batch_chunk(32, mib, budget=8 * mib) == 8
    assert convolutions.batch_chunk(6, 3, budget=8) == 2  # 3 divides 6 but 9 > 8
    assert convolutions.batch_chunk(7, 1, budget=8) == 7
    assert convolutions.batch_chunk(32, 100 * mib, budget=8 * mib) == 1  # never 0


def test_depthwise_backward_in_chunks_matches_xla_and_repeats_op_by_op(monkeypatch):
    # The XLA form (float64, or with the kernels off): 6 images of 8x8x4 floats (1 KiB
    # each) in 2 KiB chunks: 3 chunks, summed in order.
    monkeypatch.setattr(convolutions, "NATIVE", False)
    monkeypatch.setattr(convolutions, "CHUNK_BYTES", 2048)
    x, k, g = _normal((6, 8, 8, 4), 20), _normal((3, 3, 1, 4), 21), _normal((6, 8, 8, 4), 22)

    def grads(conv):
        return jax.vjp(lambda x, k: _depthwise(conv, x, k), x, k)[1](g)

    chunked = grads(convolutions.depthwise_conv)
    for a, b in zip(chunked, grads(lax.conv_general_dilated)):
        _close(a, b)
    scans = [
        e
        for e in jax.make_jaxpr(lambda: grads(convolutions.depthwise_conv))().eqns
        if e.primitive.name == "scan"
    ]
    assert [e.params["length"] for e in scans] == [3]
    assert_bitwise_equal(jax.jit(lambda: grads(convolutions.depthwise_conv))(), chunked)
    with jax.disable_jit():
        assert_bitwise_equal(grads(convolutions.depthwise_conv), chunked)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_pointwise_matches_xla_forward_and_backward(stride, padding):
    x = _normal((2, 7, 9, 5), 3)
    k = _normal((1, 1, 5, 4), 4)
    fast, back_fast = jax.vjp(
        lambda x, k: _pointwise(convolutions.pointwise_conv, x, k, stride, padding), x, k
    )
    want, back_want = jax.vjp(
        lambda x, k: _pointwise(lax.conv_general_dilated, x, k, stride, padding), x, k
    )
    _close(fast, want)
    g = _normal(want.shape, 5)
    for a, b in zip(back_fast(g), back_want(g)):
        _close(a, b)


# The mini Xception's 1x1 convolutions at a small size: (channels in, out) of the
# separable convolutions and of the strided shortcuts.
@pytest.mark.parametrize(
    "cin, cout, stride", [(32, 32, 1), (64, 128, 1), (256, 512, 2), (3, 32, 2)]
)
def test_pointwise_keeps_xlas_forward_bits_and_its_gradients_to_rounding(cin, cout, stride):
    x = _normal((3, 9, 7, cin), 15)
    k = _normal((1, 1, cin, cout), 16)
    fast, back_fast = jax.jit(
        lambda x, k: jax.vjp(
            lambda x, k: _pointwise(convolutions.pointwise_conv, x, k, stride, "SAME"), x, k
        )
    )(x, k)
    want, back_want = jax.jit(
        lambda x, k: jax.vjp(
            lambda x, k: _pointwise(lax.conv_general_dilated, x, k, stride, "SAME"), x, k
        )
    )(x, k)
    if stride == 1:  # the same convolution; strided, the convolution of a slice
        assert_bitwise_equal(fast, want)
    _close(fast, want)
    g = _normal(want.shape, 17)
    for a, b in zip(back_fast(g), back_want(g)):
        _close(a, b)


@pytest.mark.parametrize("kernel, cin", [(3, 3), (5, 4), (1, 6)])
@pytest.mark.parametrize("padding", ["VALID", "SAME"])
def test_patch_grad_conv_keeps_xlas_forward_and_input_gradient_bits(kernel, cin, padding):
    x = _normal((3, 9, 11, cin), 11)
    k = _normal((kernel, kernel, cin, 5), 12)
    dn = lax.conv_dimension_numbers(x.shape, k.shape, NHWC)

    def conv(impl):
        return lambda x, k: impl(
            x, k, (1, 1), padding, dimension_numbers=dn, precision=lax.Precision.HIGHEST
        )

    fast, back_fast = jax.jit(lambda x, k: jax.vjp(conv(convolutions.patch_grad_conv), x, k))(x, k)
    want, back_want = jax.jit(lambda x, k: jax.vjp(conv(lax.conv_general_dilated), x, k))(x, k)
    g = _normal(want.shape, 13)
    (dx, dk), (want_dx, want_dk) = back_fast(g), back_want(g)
    assert_bitwise_equal((fast, dx), (want, want_dx))
    _close(dk, want_dk)  # one matrix product: the same sum in another order


def test_the_convnet_gradient_differs_only_in_its_conv_kernels():
    x = jnp.asarray(np.random.default_rng(14).integers(0, 256, (4, 84, 84, 3)), jnp.float32)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0])
    # The ConvNet's default is XLA's convolution now; `patch_grad_conv` is set here.
    fast = convnet.ConvNet(dropout_rate=0.0, conv=convolutions.patch_grad_conv)
    plain = fast.clone(conv=lax.conv_general_dilated)
    variables = fast.init(jax.random.key(0), x[:1], train=False)
    loss_fast, fast_grads = loss_and_grads(fast, variables, x, y)
    loss_plain, plain_grads = loss_and_grads(plain, variables, x, y)
    assert_bitwise_equal(loss_fast, loss_plain)  # the forward pass is XLA's
    for name in fast_grads:
        if name.startswith("conv"):
            assert_bitwise_equal(fast_grads[name]["bias"], plain_grads[name]["bias"])
            _close(fast_grads[name]["kernel"], plain_grads[name]["kernel"], tol=1e-5)
        else:
            assert_bitwise_equal(fast_grads[name], plain_grads[name])


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
    strided = dict(
        window_strides=(2, 2), padding="SAME", dimension_numbers=dn, feature_group_count=4
    )
    assert_bitwise_equal(
        convolutions.depthwise_conv(x, k, **strided), lax.conv_general_dilated(x, k, **strided)
    )
    k3 = _normal((3, 3, 4, 5), 8)
    dn3 = lax.conv_dimension_numbers(x.shape, k3.shape, NHWC)
    assert_bitwise_equal(
        convolutions.pointwise_conv(x, k3, (1, 1), "SAME", dimension_numbers=dn3),
        lax.conv_general_dilated(x, k3, (1, 1), "SAME", dimension_numbers=dn3),
    )
    assert_bitwise_equal(
        convolutions.patch_grad_conv(x, k3, (2, 2), "SAME", dimension_numbers=dn3),
        lax.conv_general_dilated(x, k3, (2, 2), "SAME", dimension_numbers=dn3),
    )


def test_mini_xception_fast_convs_keep_parameters_and_outputs():
    x = jnp.asarray(np.random.default_rng(9).integers(0, 256, (2, 32, 32, 3)), jnp.float32)
    fast = minixception.MiniXception(fast_convs=True)
    plain = fast.clone(fast_convs=False)
    variables = fast.init(jax.random.key(0), x, train=False)
    assert_bitwise_equal(variables, plain.init(jax.random.key(0), x, train=False))
    _close(fast.apply(variables, x, train=False), plain.apply(variables, x, train=False), tol=1e-5)


def test_fast_convs_give_other_bits_than_xla_convs():
    # Another order of the sums: other gradients than XLA's convolutions. (That the
    # fast path repeats its own bits, in another process and after a kill and resume,
    # and equals itself op by op, tests/test_train.py checks: it is the config default.)
    # 64 px: at 32 px block 5's batch norm sees 4 values per channel, and its gradient
    # turns rounding into differences of 20% (measured); at 64 px they stay below 1e-5.
    x = jnp.asarray(np.random.default_rng(10).integers(0, 256, (4, 64, 64, 3)), jnp.float32)
    y = jnp.asarray([0.0, 1.0, 1.0, 0.0])
    fast = minixception.MiniXception(dropout_rate=0.0, fast_convs=True)
    plain = fast.clone(fast_convs=False)
    variables = fast.init(jax.random.key(0), x, train=False)
    a = jax.tree.leaves(loss_and_grads(fast, variables, x, y)[1])
    b = jax.tree.leaves(loss_and_grads(plain, variables, x, y)[1])
    assert any(not np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(a, b))
    for u, v in zip(a, b):
        _close(u, v, tol=1e-4)  # the same gradient up to rounding

"""jaxrepro's own kernels (`jaxrepro/native/depthwise.cc`, `first_conv.cc`,
`pooling.cc`, `resample.cc`; the pooling kernel's bits against Flax's are checked in
test_pooling.py, the resampling's against its XLA form in test_augment.py).

Claims: the depthwise forward pass and input gradient are the XLA shifted sums' bits;
the tap gradients and the first convolution are the documented order of sums (checked
against the same order in NumPy, bit for bit), within float32 rounding of XLA's own
convolution; the first convolution's gradients are XLA's bits; every kernel gives the
same bits on one core as on all; jitted equals op by op; no compiler is an error that
says what to install; the portable mode runs none of the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, assert_bitwise_equal, loss_and_grads, tiny_config
from jax import lax

from jaxrepro import native, train
from jaxrepro.models import minixception
from jaxrepro.models.ops import convolutions, pooling, portable
from jaxrepro.train import steps

NHWC = ("NHWC", "HWIO", "NHWC")


def _inputs(shape, seed):
    """ReLU-like inputs: a third exact +0.0, a tenth -0.0, the rest normal."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    x = np.where(rng.random(shape) < 1 / 3, np.float32(0.0), x)
    return jnp.asarray(np.where(rng.random(shape) < 0.1, np.float32(-0.0), x))


def _depthwise(x, taps):
    return convolutions._depthwise_same(x, taps, True)


def _vjp(x, taps, g):
    y, back = jax.vjp(_depthwise, x, taps)
    return (y, *back(g))


def _xla_form(monkeypatch):
    """`_vjp` with the kernels switched off: the shifted sums as XLA ops."""
    monkeypatch.setattr(convolutions, "NATIVE", False)
    return jax.jit(lambda *a: _vjp(*a))


# The mini Xception's channel counts at small sizes, odd sizes, and other windows.
CASES = [
    ((2, 9, 9, 32), 3),
    ((2, 6, 7, 64), 3),
    ((1, 5, 4, 128), 3),
    ((2, 3, 3, 256), 3),
    ((1, 2, 2, 512), 3),
    ((3, 7, 9, 6), 5),
    ((2, 8, 6, 5), 2),
    ((1, 1, 1, 8), 3),
]


@pytest.mark.parametrize("shape, k", CASES)
def test_forward_and_input_gradient_are_the_xla_shifted_sums_bits(shape, k, monkeypatch):
    x, g = _inputs(shape, 0), _inputs(shape, 1)
    taps = _inputs((k, k, shape[-1]), 2)
    y, dx, _ = jax.jit(_vjp)(x, taps, g)
    want_y, want_dx, _ = _xla_form(monkeypatch)(x, taps, g)
    assert_bitwise_equal((y, dx), (want_y, want_dx))


def _tap_gradients_in_documented_order(x, g, k):
    """depthwise.cc's order in NumPy float32: per image, per row the sum over columns
    from +0, rows added from +0, images added from +0."""
    x, g = np.asarray(x), np.asarray(g)
    n, h, w, c = x.shape
    top, left = (k - 1) // 2, (k - 1) // 2
    padded = np.zeros((n, h + k - 1, w + k - 1, c), np.float32)
    padded[:, top : top + h, left : left + w] = x
    out = np.zeros((k, k, c), np.float32)
    for b in range(n):
        image = np.zeros((k, k, c), np.float32)
        for r in range(h):
            for i in range(k):
                for j in range(k):
                    row = np.zeros(c, np.float32)
                    for col in range(w):
                        row = row + padded[b, r + i, col + j] * g[b, r, col]
                    image[i, j] = image[i, j] + row
        out = out + image
    return out


@pytest.mark.parametrize("shape, k", [((3, 5, 6, 16), 3), ((2, 4, 3, 8), 5), ((2, 3, 4, 8), 2)])
def test_tap_gradients_are_summed_in_the_documented_order(shape, k):
    x, g = _inputs(shape, 3), _inputs(shape, 4)
    dtaps = jax.jit(convolutions._tap_gradients_native, static_argnums=2)(x, g, (k, k))
    assert_bitwise_equal(dtaps, _tap_gradients_in_documented_order(x, g, k))


def test_the_order_check_can_fail():
    # Summing the rows in the other direction gives other bits on these inputs.
    x, g = _inputs((2, 9, 9, 16), 3), _inputs((2, 9, 9, 16), 4)
    flipped = _tap_gradients_in_documented_order(x[:, ::-1], g[:, ::-1], 3)[::-1]
    assert not np.array_equal(flipped, np.asarray(convolutions._tap_gradients_native(x, g, (3, 3))))


@pytest.mark.parametrize("shape, k", [((4, 12, 12, 32), 3), ((2, 7, 9, 6), 5)])
def test_the_gradient_is_xlas_convolution_gradient_up_to_rounding(shape, k):
    x, g = _inputs(shape, 5), _inputs(shape, 6)
    kernel = _inputs((k, k, 1, shape[-1]), 7)
    dn = lax.conv_dimension_numbers(x.shape, kernel.shape, NHWC)

    def conv(impl):
        return lambda x, w: impl(
            x, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=shape[-1]
        )

    y, back = jax.vjp(conv(convolutions.depthwise_conv), x, kernel)
    want_y, want_back = jax.vjp(conv(lax.conv_general_dilated), x, kernel)
    for got, want in zip((y, *back(g)), (want_y, *want_back(g))):
        got, want = np.asarray(got), np.asarray(want)
        assert np.max(np.abs(got - want)) <= 2e-6 * np.max(np.abs(want))


def test_jitted_equals_op_by_op():
    x, g = _inputs((2, 9, 9, 32), 8), _inputs((2, 9, 9, 32), 9)
    taps = _inputs((3, 3, 32), 10)
    jitted = jax.jit(_vjp)(x, taps, g)
    with jax.disable_jit():
        assert_bitwise_equal(_vjp(x, taps, g), jitted)


# -- the first convolution (first_conv.cc) ----------------------------------------------


def _first_conv(x, kernel):
    return convolutions.first_conv(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC)


def _xla_conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=NHWC)


def _first_conv_in_numpy(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """The documented order: from +0.0, add each window input times its kernel row in
    (row, column, input channel) order, every product and sum rounded to float32."""
    kh, kw, ci, co = kernel.shape
    n, h, w, _ = x.shape
    acc = np.zeros((n, h - kh + 1, w - kw + 1, co), np.float32)
    for i in range(kh):
        for j in range(kw):
            for c in range(ci):
                window = x[:, i : i + h - kh + 1, j : j + w - kw + 1, c, None]
                acc = acc + window * kernel[i, j, c]  # float32 ops, one rounding each
    return acc


# The paper's first convolutions (ConvNet conv1: 3x3, mini Xception stem: 5x5) at small
# sizes; one and four input channels, 64 output channels (two passes of 32), a 1x1
# window and an output row of odd width (the kernel takes output pixels in pairs).
FIRST_CONV_CASES = [
    ((2, 12, 12, 3), (3, 3, 3, 32)),
    ((2, 11, 9, 3), (5, 5, 3, 32)),
    ((1, 7, 8, 1), (3, 3, 1, 64)),
    ((3, 6, 5, 4), (2, 3, 4, 32)),
    ((1, 4, 4, 3), (1, 1, 3, 32)),
]


@pytest.mark.parametrize("x_shape, kernel_shape", FIRST_CONV_CASES)
def test_the_first_convolution_is_the_documented_order_of_sums(x_shape, kernel_shape):
    rng = np.random.default_rng(20)
    x = rng.uniform(0.0, 1.0, x_shape).astype(np.float32)  # rescaled pixels
    x[0, 0, :2] = 0.0  # exact zeros, as in black pixels
    kernel = (rng.normal(size=kernel_shape) * 10.0 ** rng.integers(-3, 3, kernel_shape)).astype(
        np.float32
    )
    got = np.asarray(jax.jit(_first_conv)(x, kernel))
    want = _first_conv_in_numpy(x, kernel)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # Another order of the same sums gives other bits: the comparison can fail.
    reordered = _first_conv_in_numpy(x[..., ::-1], kernel[:, :, ::-1])
    if x_shape[-1] > 1:
        assert not np.array_equal(reordered.view(np.uint32), want.view(np.uint32))
    # XLA's own convolution sums in another order: equal to float32 rounding.
    xla = np.asarray(_xla_conv(x, kernel))
    assert np.max(np.abs(got - xla)) <= 1e-6 * np.max(np.abs(xla))


def test_the_first_convolutions_gradients_are_xlas():
    x, g = _inputs((2, 11, 10, 3), 21), _inputs((2, 7, 6, 32), 22)
    kernel = _inputs((5, 5, 3, 32), 23)
    _, back = jax.vjp(_first_conv, x, kernel)
    _, want_back = jax.vjp(_xla_conv, x, kernel)
    assert_bitwise_equal(jax.jit(back)(g), jax.jit(want_back)(g))


def test_the_first_convolution_jitted_equals_op_by_op():
    x, kernel = _inputs((2, 10, 10, 3), 24), _inputs((3, 3, 3, 32), 25)
    jitted = jax.jit(_first_conv)(x, kernel)
    with jax.disable_jit():
        assert_bitwise_equal(_first_conv(x, kernel), jitted)


@pytest.mark.parametrize(
    "case",
    ["stride", "same", "deep", "channels", "float64"],
)
def test_other_convolutions_fall_through_to_xla(case):
    x, kernel = _inputs((2, 9, 9, 3), 26), _inputs((3, 3, 3, 32), 27)
    strides, padding = (1, 1), "VALID"
    if case == "stride":
        strides = (2, 2)
    elif case == "same":
        padding = "SAME"
    elif case == "deep":  # more input channels than an image has
        x, kernel = _inputs((2, 9, 9, 8), 28), _inputs((3, 3, 8, 32), 29)
    elif case == "channels":  # not a multiple of the kernel's 32 output channels
        kernel = kernel[..., :24]

    def run(conv, x, kernel):
        return conv(x, kernel, strides, padding, dimension_numbers=NHWC)

    with jax.enable_x64(case == "float64"):
        if case == "float64":
            x, kernel = jnp.asarray(x, jnp.float64), jnp.asarray(kernel, jnp.float64)
        program = jax.jit(run, static_argnums=0).lower(convolutions.first_conv, x, kernel)
        assert "jaxrepro_first_conv" not in program.as_text()
        got = run(convolutions.first_conv, x, kernel)
        assert_bitwise_equal(got, run(lax.conv_general_dilated, x, kernel))
    # ... and the kernel's own case does call it (the check above can fail).
    program = jax.jit(_first_conv).lower(_inputs((2, 9, 9, 3), 26), _inputs((3, 3, 3, 32), 27))
    assert "jaxrepro_first_conv" in program.as_text()


# Every kernel: the depthwise convolution's three, the max-pool gradient's, the first
# convolution's and the augmentation's resampling.
CORE_COUNT_CHILD = """
import hashlib, sys, jax, numpy as np
from jaxrepro.models.ops import convolutions, pooling
x = jax.random.normal(jax.random.key(0), (8, 40, 40, 32))
g = jax.random.normal(jax.random.key(1), (8, 40, 40, 32))
taps = jax.random.normal(jax.random.key(2), (3, 3, 32))
y, back = jax.vjp(lambda x, t: convolutions._depthwise_same(x, t, True), x, taps)
pooled, pool_back = jax.vjp(pooling.max_pool_3x3_s2_native, jax.numpy.round(x))
kernel = jax.random.normal(jax.random.key(4), (5, 5, 3, 32))
first = convolutions.first_conv(jax.numpy.abs(x[..., :3]), kernel, (1, 1), "VALID",
                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
from jaxrepro.data import augment
images = jax.numpy.abs(x[..., :3]) * 60.0
out = [np.asarray(a) for a in (y, *back(g), *pool_back(pooled * 1e-3 + 1.0), first,
       augment.augment_batch(jax.random.key(3), images, native=True))]
print(len(jax.devices()), hashlib.sha256(b"".join(a.tobytes() for a in out)).hexdigest())
"""


def _child_digest(cpus: set[int]) -> str:
    r = subprocess.run(
        [sys.executable, "-c", CORE_COUNT_CHILD],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    return r.stdout.split()[-1]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_one_core_gives_the_bits_of_all_cores():
    everything = os.sched_getaffinity(0)
    assert _child_digest({min(everything)}) == _child_digest(everything)


def test_without_a_compiler_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(native.KernelBuildError, match="apt-get install g\\+\\+"):
        native.compiler()


def test_a_failed_build_is_an_error_with_the_compilers_message(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    with pytest.raises(native.KernelBuildError, match="failed"):
        native.build(native.compiler(), tmp_path / "lib.so")
    assert not list(tmp_path.glob("*.so"))  # nothing half-written left behind


def test_the_portable_mode_never_runs_the_kernels(monkeypatch):
    # Portable bits may depend on the config and the lock file only; the kernels are
    # built by the host's C++ compiler, which the lock file does not pin.
    def refused(*args, **kwargs):
        raise AssertionError("the portable mode called depthwise.cc")

    x, g = _inputs((2, 6, 6, 8), 11), _inputs((2, 6, 6, 8), 12)
    kernel = _inputs((3, 3, 1, 8), 13)

    def conv(impl):
        return lambda x, w: impl(
            x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=8
        )

    for name in ("_shifted_sum_native", "_tap_gradients_native"):
        monkeypatch.setattr(convolutions, name, refused)
    y, back = jax.vjp(conv(portable.conv_general_dilated), x, kernel)
    jax.block_until_ready((y, back(g)))
    with pytest.raises(AssertionError, match="depthwise.cc"):
        jax.vjp(conv(convolutions.depthwise_conv), x, kernel)


def test_the_portable_mode_takes_the_pooling_gradient_off_the_kernel(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("the portable mode called pooling.cc")

    monkeypatch.setattr(pooling, "_gradient_native", refused)
    config = {"dropout_rate": 0.0, "fast_convs": True}
    images = jnp.asarray(np.random.default_rng(5).integers(0, 256, (2, 21, 21, 3)), jnp.float32)
    labels = jnp.asarray([0.0, 1.0])

    def gradient(mode):
        model = minixception.SPEC.build({**config, "determinism": mode})
        model = model.clone(sizes=(8, 16), stem_features=8)
        variables = model.init(jax.random.key(0), images[:1], train=False)
        return jax.block_until_ready(loss_and_grads(model, variables, images, labels))

    gradient("portable")
    with pytest.raises(AssertionError, match="pooling.cc"):
        gradient("machine")


@pytest.mark.parametrize("model", ["convnet", "minixception"])
def test_the_training_step_runs_the_image_kernels_in_the_machine_mode_only(model):
    # The augmentation's kernel gives the XLA form's bits (test_augment.py), the first
    # convolution's its own; the portable mode must never call either.
    def program(mode):
        config = tiny_config(model, f"determinism={mode}")
        keys = train.stream_keys(config)
        m, tx = train.build_model(config), train.build_optimizer(config)
        state = train.init_state(m, tx, keys["init"], config.data.image_size)
        size = config.data.image_size
        images = jnp.zeros((2, size, size, 3), jnp.uint8)
        step = steps.make_train_step(m, tx, steps.augmentation(config))
        return step.trace(state, images, jnp.zeros((2,), jnp.int32), keys).lower().as_text()

    machine, portable_ = program("machine"), program("portable")
    for target in ("jaxrepro_affine_resample", "jaxrepro_first_conv"):
        assert target in machine
        assert target not in portable_

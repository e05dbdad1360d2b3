"""Tests of the Keras-style flip/rotate/zoom augmentation (jaxrepro.data.augment)."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bitwise_equal

from jaxrepro import determinism
from jaxrepro.data import augment as A

OFF = dict(flip=False, rotation=0.0, zoom=0.0)


def _images(n: int = 4, height: int = 32, width: int = 32, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (n, height, width, 3), maxval=255.0)


def _np_affine(image: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Independent float64 bilinear resampler, reflect fill (d c b a | a b c d | d c b a)."""
    h, w, _ = image.shape
    t = np.asarray(transform, np.float64)
    y, x = np.meshgrid(
        np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij"
    )
    xi, yi = t[0] * x + t[1] * y + t[2], t[3] * x + t[4] * y + t[5]

    def reflect(i, n):
        i = np.mod(i, 2 * n)
        return np.where(i >= n, 2 * n - 1 - i, i)

    x0, y0 = np.floor(xi), np.floor(yi)
    fx, fy = (xi - x0)[..., None], (yi - y0)[..., None]
    x0, y0 = x0.astype(int), y0.astype(int)
    im = np.asarray(image, np.float64)

    def px(yy, xx):
        return im[reflect(yy, h), reflect(xx, w)]

    return (
        (1 - fy) * (1 - fx) * px(y0, x0)
        + (1 - fy) * fx * px(y0, x0 + 1)
        + fy * (1 - fx) * px(y0 + 1, x0)
        + fy * fx * px(y0 + 1, x0 + 1)
    )


def _np_pipeline(image: np.ndarray, params: dict) -> np.ndarray:
    """Flip, rotate, zoom in float64 with the transforms the module computes."""
    h, w, _ = image.shape
    im = np.asarray(image, np.float64)
    if params["flip"]:
        im = im[:, ::-1]
    im = _np_affine(im, np.asarray(A.rotation_transform(params["angle"], h, w)))
    return _np_affine(im, np.asarray(A.zoom_transform(params["zoom"], h, w)))


def _batch_params(key, n, **kwargs):
    return jax.vmap(functools.partial(A.augment_params, **kwargs))(
        A.example_keys(key, jnp.arange(n))
    )


# --- keys and randomness --------------------------------------------------------------


def test_same_key_same_bits():
    images = _images()
    f = jax.jit(A.augment_batch)
    assert_bitwise_equal(f(jax.random.key(1), images), f(jax.random.key(1), images))
    assert_bitwise_equal(
        A.augment_batch(jax.random.key(1), images), A.augment_batch(jax.random.key(1), images)
    )


def test_separate_compilations_same_bits():
    images = _images()
    f = jax.jit(lambda k, x: A.augment_batch(k, x))
    g = jax.jit(lambda k, x: A.augment_batch(k, x))  # a second, separately compiled program
    assert_bitwise_equal(f(jax.random.key(3), images), g(jax.random.key(3), images))


def test_different_keys_differ():
    images = _images()
    a = A.augment_batch(jax.random.key(1), images)
    b = A.augment_batch(jax.random.key(2), images)
    assert not np.array_equal(a, b)


def test_example_keys_are_fold_in_of_position():
    key = jax.random.key(5)
    keys = A.example_keys(key, jnp.arange(4))
    for i in range(4):
        assert_bitwise_equal(
            jax.random.key_data(keys[i]), jax.random.key_data(jax.random.fold_in(key, i))
        )


def test_examples_in_a_batch_get_different_transforms():
    params = _batch_params(jax.random.key(0), 8)
    assert len(set(np.asarray(params["angle"]).tolist())) == 8
    assert len(set(np.asarray(params["zoom"]).tolist())) == 8
    # The same image at every position comes out differently at every position.
    same = jnp.broadcast_to(_images(1)[0], (8, 32, 32, 3))
    out = np.asarray(A.augment_batch(jax.random.key(0), same))
    for i in range(8):
        for j in range(i + 1, 8):
            assert not np.array_equal(out[i], out[j])


def test_batch_is_per_example_and_independent_of_batch_size():
    key, images = jax.random.key(9), _images(5)
    batch = A.augment_batch(key, images)
    one_by_one = jnp.stack(
        [A.augment_example(jax.random.fold_in(key, i), images[i]) for i in range(5)]
    )
    assert_bitwise_equal(batch, one_by_one)
    f = jax.jit(A.augment_batch)
    assert_bitwise_equal(f(key, images[:2]), f(key, images)[:2])


def test_switching_a_part_off_leaves_the_other_draws_unchanged():
    key = jax.random.key(4)
    full = A.augment_params(key)
    assert_bitwise_equal(A.augment_params(key, rotation=0.0)["zoom"], full["zoom"])
    assert_bitwise_equal(A.augment_params(key, zoom=0.0)["angle"], full["angle"])
    assert_bitwise_equal(A.augment_params(key, flip=False)["angle"], full["angle"])


def test_parameter_ranges_follow_keras():
    params = _batch_params(jax.random.key(0), 2000)
    angle, zoom, flip = (np.asarray(params[k]) for k in ("angle", "zoom", "flip"))
    limit = np.float32(0.2) * np.float32(np.pi)  # RandomRotation(0.1): +-0.1 of a turn
    assert angle.min() >= -limit and angle.max() <= limit
    assert angle.min() < -0.95 * limit and angle.max() > 0.95 * limit
    assert zoom.min() >= 0.8 and zoom.max() <= 1.2  # RandomZoom(0.2): 1 +- 0.2
    assert zoom.min() < 0.81 and zoom.max() > 1.19
    assert 0.45 < flip.mean() < 0.55
    # A positive pair means zooming out only (Keras: height_factor=(0.2, 0.3)).
    out = np.asarray(_batch_params(jax.random.key(0), 100, zoom=(0.2, 0.3))["zoom"])
    assert out.min() >= 1.2 and out.max() <= 1.3


def test_invalid_factor_raises():
    with pytest.raises(ValueError):
        A.augment_batch(jax.random.key(0), _images(1), rotation=1.5)
    with pytest.raises(ValueError):
        A.augment_batch(jax.random.key(0), _images(1), zoom=(0.1, 0.2, 0.3))


# --- each part ------------------------------------------------------------------------


def test_all_parts_off_is_the_identity_bitwise():
    images = _images()
    assert_bitwise_equal(A.augment_batch(jax.random.key(0), images, **OFF), images)
    assert_bitwise_equal(
        jax.jit(functools.partial(A.augment_batch, **OFF))(jax.random.key(0), images), images
    )


def test_zoom_zero_and_rotation_zero_are_identities():
    images = _images()
    key = jax.random.key(0)
    assert_bitwise_equal(A.augment_batch(key, images, flip=False, rotation=0.0, zoom=0.0), images)
    # With zoom off, the output is the rotation alone (no second resampling).
    rotated = A.augment_batch(key, images, flip=False, rotation=0.1, zoom=0.0)
    angles = _batch_params(key, 4, flip=False, rotation=0.1, zoom=0.0)["angle"]
    assert_bitwise_equal(
        rotated, jnp.stack([A.rotate_image(images[i], angles[i]) for i in range(4)])
    )
    # Zoom by a factor of exactly 1 resamples at the pixel centres: the identity.
    assert_bitwise_equal(A.zoom_image(images[0], jnp.float32(1.0)), images[0])


def test_flip_is_exactly_reversed_columns():
    key, images = jax.random.key(0), _images(16)
    out = np.asarray(A.augment_batch(key, images, flip=True, rotation=0.0, zoom=0.0))
    flips = np.asarray(_batch_params(key, 16)["flip"])
    assert flips.any() and not flips.all()  # this key exercises both branches
    for i in range(16):
        expected = np.asarray(images[i])[:, ::-1] if flips[i] else np.asarray(images[i])
        assert_bitwise_equal(out[i], expected)


@pytest.mark.parametrize("size", [32, 33])
def test_rotation_by_90_degrees_is_rot90_counter_clockwise(size):
    image = np.asarray(_images(1, size, size)[0])
    # cos/sin are snapped to an exact grid, so quarter turns hit pixel centres exactly.
    assert_bitwise_equal(
        A.rotate_image(jnp.asarray(image), jnp.float32(np.pi / 2)), np.rot90(image, 1)
    )
    assert_bitwise_equal(
        A.rotate_image(jnp.asarray(image), jnp.float32(-np.pi / 2)), np.rot90(image, -1)
    )
    # Through the pipeline: factor (0.25, 0.25) is a quarter turn counter-clockwise.
    out = A.augment_batch(
        jax.random.key(0), jnp.asarray(image)[None], flip=False, rotation=(0.25, 0.25), zoom=0.0
    )
    assert_bitwise_equal(out[0], np.rot90(image, 1))


def test_positive_angle_turns_counter_clockwise():
    image = np.zeros((9, 9, 3), np.float32)
    image[0, 8] = 255.0  # top-right corner
    out = np.asarray(A.rotate_image(jnp.asarray(image), jnp.float32(np.pi / 2)))
    assert out[0, 0, 0] == 255.0 and out.sum() == 3 * 255.0  # now top-left


def test_zoom_factor_below_one_zooms_in_about_the_centre():
    # W = H = 5, z = 0.5: x_in = 0.5 * x + 1, so even output columns hit 1, 2, 3 exactly.
    image = jnp.asarray(np.arange(75, dtype=np.float32).reshape(5, 5, 3))
    out = np.asarray(A.zoom_image(image, jnp.float32(0.5)))
    np.testing.assert_array_equal(out[::2, ::2], np.asarray(image)[1:4, 1:4])


def test_fill_mode_is_reflect_not_mirror():
    # One row [a b c d] = [10 20 30 40] on every row, zoomed out 3x: x_in = 3x - 3.
    # Keras reflect (d c b a | a b c d | d c b a) samples -3 -> c, 0 -> a, 3 -> d, 6 -> b.
    row = np.array([10.0, 20.0, 30.0, 40.0], np.float32)
    image = jnp.asarray(np.broadcast_to(row[None, :, None], (4, 4, 3)).copy())
    out = np.asarray(A.zoom_image(image, jnp.float32(3.0)))
    np.testing.assert_array_equal(out[:, :, 0], np.broadcast_to([30.0, 10.0, 40.0, 20.0], (4, 4)))


def test_rotated_constant_image_stays_constant():
    # Reflect fill brings no border colour in; only float32 rounding of the weights remains.
    for value in (1.0, 77.0, 255.0):
        images = jnp.full((8, 40, 40, 3), value, jnp.float32)
        out = np.asarray(
            jax.jit(functools.partial(A.augment_batch, rotation=0.5))(jax.random.key(7), images)
        )
        np.testing.assert_allclose(out, value, rtol=1e-6, atol=0)


def test_output_is_finite_and_within_pixel_range():
    images = _images(8, 48, 48).at[:, :4].set(255.0).at[:, -4:].set(0.0)
    out = np.asarray(jax.jit(A.augment_batch)(jax.random.key(0), images))
    assert np.isfinite(out).all()
    assert out.min() >= 0.0  # a convex combination of non-negative pixels
    # Weights sum to 1 up to float32 rounding, so 255 can come out an ulp or two above.
    assert out.max() <= 255.0 * (1 + 2e-7)


def test_matches_map_coordinates_reflect():
    image = _images(1, 24, 24)[0]
    transform = A.rotation_transform(jnp.float32(0.7), 24, 24)
    h, w, _ = image.shape
    y, x = np.meshgrid(
        np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"
    )
    t = np.asarray(transform)
    coords = [jnp.asarray(t[3] * x + t[4] * y + t[5]), jnp.asarray(t[0] * x + t[1] * y + t[2])]
    expected = jnp.stack(
        [
            jax.scipy.ndimage.map_coordinates(image[..., c], coords, order=1, mode="reflect")
            for c in range(3)
        ],
        axis=-1,
    )
    np.testing.assert_allclose(A.affine_transform(image, transform), expected, atol=2e-4)


def test_jitted_full_size_batch_matches_float64_reference():
    # Guards against index/weight disagreement under XLA's FMA contraction: without the
    # exact-coordinate grid, jit gave dozens of pixels off by up to ~130 at 180x180.
    # The paper's batch: 32 images of 180x180.
    key, images = jax.random.key(2), jnp.round(_images(32, 180, 180, seed=3))
    params = _batch_params(key, 32)
    expected = np.stack(
        [
            _np_pipeline(np.asarray(images[i]), {k: np.asarray(v[i]) for k, v in params.items()})
            for i in range(32)
        ]
    )
    out = np.asarray(jax.jit(A.augment_batch)(key, images))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-3)


# --- jit and no jit ---------------------------------------------------------------------


class JitVariantsTest(chex.TestCase):
    """Both variants compute the same thing; bits agree where the arithmetic is exact."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_exact_parts_agree_bitwise(self):
        images, key = _images(8), jax.random.key(0)
        flip_only = self.variant(
            functools.partial(A.augment_batch, flip=True, rotation=0.0, zoom=0.0)
        )
        expected = [
            np.asarray(images[i])[:, ::-1] if f else np.asarray(images[i])
            for i, f in enumerate(np.asarray(_batch_params(key, 8)["flip"]))
        ]
        assert_bitwise_equal(flip_only(key, images), np.stack(expected))
        quarter = self.variant(
            functools.partial(A.augment_batch, flip=False, rotation=(0.25, 0.25), zoom=0.0)
        )
        assert_bitwise_equal(quarter(key, images), np.rot90(np.asarray(images), 1, axes=(1, 2)))

    @chex.variants(with_jit=True, without_jit=True)
    def test_full_pipeline_matches_reference(self):
        key, images = jax.random.key(1), _images(4)
        params = _batch_params(key, 4)
        expected = np.stack(
            [
                _np_pipeline(
                    np.asarray(images[i]), {k: np.asarray(v[i]) for k, v in params.items()}
                )
                for i in range(4)
            ]
        )
        out = self.variant(A.augment_batch)(key, images)
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-3)


def test_jit_and_eager_agree_bitwise_under_the_avx_cap():
    # Capped at AVX (jaxrepro's XLA flags on x86-64), XLA:CPU has no FMA to contract
    # `w * pixel + acc` into under jit: the same bits as op by op. Without the cap (jax
    # 0.10.2 compiled for the host's FMA), about a third of the values differed by an
    # ulp or two; on another architecture they may, so there only closeness is asserted.
    key, images = jax.random.key(1), jnp.round(_images(8, 64, 64))
    eager = np.asarray(A.augment_batch(key, images))
    jitted = np.asarray(jax.jit(A.augment_batch)(key, images))
    if determinism.ISA_CAP and determinism.ISA_CAP[0] in os.environ.get("XLA_FLAGS", ""):
        assert_bitwise_equal(jitted, eager)
    else:
        np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-4)


# --- jaxrepro's resampling kernel (resample.cc) ---------------------------------------


def _coefficients(rng: np.random.Generator, height: int, width: int) -> list[jax.Array]:
    """Rotations and zooms, and transforms far off the image (reflected over several
    periods, negative, beyond int32, NaN and infinite)."""
    out = [
        A.affine_coefficients(A.rotation_transform(a, height, width), height, width)
        for a in rng.uniform(-np.pi, np.pi, 6).astype(np.float32)
    ]
    out += [
        A.affine_coefficients(A.zoom_transform(z, height, width), height, width)
        for z in (0.8, 1.2, 1.0, 3.5)
    ]
    for _ in range(6):
        t = rng.normal(0, 1.5, 6) * np.array([1, 1, 4 * width, 1, 1, 4 * height])
        out.append(A.affine_coefficients(np.r_[t, 0, 0].astype(np.float32), height, width))
    for k in (
        [np.nan, 0, 0, 0, 1, 0],
        [1, 0, np.inf, 0, 1, -np.inf],
        [1, 0, 3e9, 0, 1, -3e9],
        [0, 0, 2147483647.0, 0, 0, -2147483648.0],
        [2, 2, -1e6, 1, -2, 1e6],
    ):
        out.append(jnp.asarray(k, jnp.float32))
    return out


@pytest.mark.parametrize("shape", [(13, 11, 3), (8, 8, 1), (5, 17, 4)])
def test_the_kernel_resamples_with_the_bits_of_the_xla_form(shape):
    rng = np.random.default_rng(sum(shape))
    image = jnp.asarray(rng.uniform(0, 255, shape).astype(np.float32))
    kernel, xla = jax.jit(A.resample_native), jax.jit(A.resample)
    for coefficients in _coefficients(rng, *shape[:2]):
        assert_bitwise_equal(kernel(image, coefficients), xla(image, coefficients))


@pytest.mark.parametrize("size", [40, 180])
def test_the_kernel_augments_with_the_bits_of_the_xla_form(size):
    # The training step's augmentation, the paper's ranges, batched (vmap hands the
    # kernel the whole batch) and jitted as the step is, and eagerly.
    images = _images(4, size, size, seed=size)
    for seed in range(3):
        key = jax.random.key(seed)
        xla = jax.jit(A.augment_batch)(key, images)
        assert_bitwise_equal(
            jax.jit(functools.partial(A.augment_batch, native=True))(key, images), xla
        )
    assert_bitwise_equal(A.augment_batch(key, images, native=True), xla)


def test_the_kernel_is_the_cpu_code_and_other_backends_get_the_xla_form():
    f = jax.jit(functools.partial(A.augment_batch, native=True))
    lowered = {
        p: f.trace(jax.random.key(0), _images(2, 16, 16)).lower(lowering_platforms=(p,)).as_text()
        for p in ("cpu", "cuda")
    }
    assert "jaxrepro_affine_resample" in lowered["cpu"] and "gather" not in lowered["cpu"]
    assert "jaxrepro_affine_resample" not in lowered["cuda"] and "gather" in lowered["cuda"]

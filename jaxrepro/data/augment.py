"""On-device, per-example-keyed data augmentation: the paper's Keras pipeline in JAX.

The paper augments with `Sequential([RandomFlip("horizontal"), RandomRotation(0.1),
RandomZoom(0.2)])`. This module reproduces Keras 3's semantics of those layers:

- flip: left-right, when `uniform() <= 0.5` (Keras RandomFlip).
- rotation: angle uniform in [lower, upper] * 2*pi radians (factor 0.1 -> +-36 degrees),
  positive = counter-clockwise; rotation about ((W-1)/2, (H-1)/2) with the Keras
  matrix [cos, -sin, x_off; sin, cos, y_off] mapping output to input pixel coordinates.
- zoom: one factor z uniform in [1 + lower, 1 + upper] (on a 2^-15 grid) for both
  axes (Keras RandomZoom with width_factor=None keeps the aspect ratio); z > 1 zooms
  out, z < 1 zooms in; input = z * output + (size-1)/2 * (1-z) per axis.
- each of rotation and zoom resamples on its own (as the Sequential does), bilinear,
  fill mode "reflect" (`d c b a | a b c d | d c b a`, half-sample symmetric: what
  Keras's JAX backend gets from `jax.scipy.ndimage.map_coordinates(mode="reflect")`).

The resampling does the arithmetic of `jax.scipy.ndimage.map_coordinates(order=1,
mode="reflect")` channel by channel, but gathers whole RGB pixels (4 gathers per image):
about 4x faster on CPU (65 ms against 260 ms for 32 images of 180x180 on 2 cores,
jitted). The rotation and zoom coefficients are snapped to a fine grid (2^-15 at
180 px) on which all coordinate arithmetic is exact, so XLA's FMA contraction cannot
make the gather index and the bilinear weight disagree (see "exact coordinates" below).
A factor of 0 (or `flip=False`) skips that part entirely, so with all parts off the
output is the input, bit for bit.

The training step resamples with jaxrepro's kernel instead (`native=True`,
`resample_native`, `jaxrepro/native/resample.cc`): the same operations in the same
order in one pass over each image, where XLA:CPU runs the gathers element by element
and the reflection's `mod` as integer divisions: a batch of 32 images of 180x180,
flipped, rotated and zoomed, in 19-21 ms instead of 47-51 ms on 2 Zen 4 cores,
jitted. The same bits (tested); the portable mode keeps the XLA form, as it keeps
every op off the kernels, and so do other backends than the CPU.

Bits: a jitted call gives the same bits on every run. On x86-64 jaxrepro caps XLA:CPU
at AVX, which has no FMA, so eager and jitted calls give the same bits too (tested).
Without that cap (another architecture), eager and jitted calls, or this code jitted
alone and inside a larger step, can differ in the last bits of a pixel, because XLA:CPU
fuses `w * pixel + acc` into FMAs depending on the fusion.

Randomness: example i of a batch uses `fold_in(key, i)`; its flip, rotation and zoom
draws use `fold_in(example_key, FLIP_STREAM / ROTATE_STREAM / ZOOM_STREAM)`. So an
example's augmentation depends only on (batch key, position), not on the batch size
or on which other parts are switched on.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro import native as kernels

# Sub-streams of an example key. Fixed forever: renumbering changes every augmentation.
FLIP_STREAM = 0
ROTATE_STREAM = 1
ZOOM_STREAM = 2

# Zoom factors are drawn on this grid (exact in float32; see `sample_zoom`).
ZOOM_GRID = 2.0**-15

Factor = float | tuple[float, float]


def _factor_range(factor: Factor, name: str) -> tuple[float, float]:
    """Keras factor convention: a number f means [-|f|, |f|]; a pair is sorted."""
    if isinstance(factor, (tuple, list)):
        if len(factor) != 2:
            raise ValueError(f"{name} must be a number or a pair of numbers, got {factor!r}")
        lower, upper = sorted(float(f) for f in factor)
    else:
        lower, upper = -abs(float(factor)), abs(float(factor))
    if lower < -1.0 or upper > 1.0:
        raise ValueError(f"{name} must lie in [-1, 1], got {factor!r}")
    return lower, upper


def _is_off(factor_range: tuple[float, float]) -> bool:
    return factor_range == (0.0, 0.0)


# --- exact coordinates ----------------------------------------------------------------
#
# XLA:CPU contracts a multiply feeding an add into one FMA inside a fusion, and may
# compute the same elementwise value in several fusions (the gather index in one, the
# bilinear weight in another), contracted differently. For `x_in = a0*x + a1*y + a2`
# that gave index and weight from coordinates one ulp apart across an integer, and
# pixels off by up to 130 (measured: about 50 pixels per batch of 32 at 180x180 under
# jit, none in eager mode). So the linear coefficients are snapped to a grid on which
# every product `coefficient * pixel index` is exact in float32: then FMA or not, every
# fusion computes the same coordinates, and floor, weight and index always agree.
# The grid is 2^-15 at 180 px: cos and sin move by at most 2^-16 (1.5e-5; under
# 0.004 px anywhere in the image) and zoom factors are drawn on it; the offsets stay
# Keras's formulas of the snapped values. Side effect: quarter turns are exact.
# cos and sin themselves are computed once (XLA does not duplicate transcendental
# ops into several fusions), so their snapped values agree everywhere too.


def _coefficient_step(height: int, width: int) -> float:
    """Grid step making `coefficient * index` exact for |coefficient| <= 2, index < size."""
    return 2.0 ** -(23 - max(height, width).bit_length())


def _snap(value: jax.Array, step: float) -> jax.Array:
    """Nearest multiple of `step` (a power of two, so the scaling is exact)."""
    return jnp.round(value * (1.0 / step)) * step


# --- random parameters ----------------------------------------------------------------


def sample_flip(key: jax.Array) -> jax.Array:
    """Whether to flip (bool scalar): `uniform() <= 0.5`, as Keras RandomFlip."""
    return jax.random.uniform(key, (), jnp.float32) <= 0.5


def sample_angle(key: jax.Array, factor: Factor) -> jax.Array:
    """Rotation angle in radians, uniform in [lower, upper] * 2*pi (Keras RandomRotation)."""
    lower, upper = _factor_range(factor, "rotation")
    pi = np.float32(math.pi)
    return jax.random.uniform(
        key,
        (),
        jnp.float32,
        minval=np.float32(lower * 2.0) * pi,
        maxval=np.float32(upper * 2.0) * pi,
    )


def sample_zoom(key: jax.Array, factor: Factor) -> jax.Array:
    """Zoom factor, uniform in [1 + lower, 1 + upper] (Keras RandomZoom; > 1 zooms out).

    Drawn as a uniform integer times ZOOM_GRID, so the value is exact whatever XLA fuses
    (a float `u * span + lo` may be recomputed, FMA-contracted or not, per fusion).
    """
    lower, upper = _factor_range(factor, "zoom")
    k_lo, k_hi = math.ceil((1.0 + lower) / ZOOM_GRID), math.floor((1.0 + upper) / ZOOM_GRID)
    if k_hi < k_lo:  # a range narrower than the grid: its nearest grid point
        k_lo = k_hi = round((2.0 + lower + upper) / 2.0 / ZOOM_GRID)
    k = jax.random.randint(key, (), k_lo, k_hi + 1, dtype=jnp.int32)
    return k.astype(jnp.float32) * np.float32(ZOOM_GRID)


# --- transforms (Keras's 8-number projective form, output -> input coordinates) ------


def rotation_transform(angle: jax.Array, height: int, width: int) -> jax.Array:
    """Keras RandomRotation's transform [a0, a1, a2, b0, b1, b2, c0, c1] for `angle`.

    cos and sin are snapped to the exact-coordinate grid first (see above).
    """
    angle = jnp.asarray(angle, jnp.float32)
    step = _coefficient_step(height, width)
    cos, sin = _snap(jnp.cos(angle), step), _snap(jnp.sin(angle), step)
    h, w = np.float32(height), np.float32(width)
    x_offset = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
    y_offset = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
    zero = jnp.zeros((), jnp.float32)
    return jnp.stack([cos, -sin, x_offset, sin, cos, y_offset, zero, zero])


def zoom_transform(zoom: jax.Array, height: int, width: int) -> jax.Array:
    """Keras RandomZoom's transform for one zoom factor on both axes (factor snapped)."""
    z = _snap(jnp.asarray(zoom, jnp.float32), _coefficient_step(height, width))
    x_offset = ((np.float32(width) - 1.0) / 2.0) * (1.0 - z)
    y_offset = ((np.float32(height) - 1.0) / 2.0) * (1.0 - z)
    zero = jnp.zeros((), jnp.float32)
    return jnp.stack([z, zero, x_offset, zero, z, y_offset, zero, zero])


def _reflect_index(index: jax.Array, size: int) -> jax.Array:
    """Half-sample symmetric index (`d c b a | a b c d | d c b a`) into [0, size)."""
    index = jnp.mod(index, 2 * size)
    return jnp.where(index >= size, 2 * size - 1 - index, index)


def affine_coefficients(transform: jax.Array, height: int, width: int) -> jax.Array:
    """The resampling's coefficients [a0, a1, a2, b0, b1, b2] of Keras's transform
    [a0, a1, a2, b0, b1, b2, 0, 0], with a0, a1, b0, b1 snapped to the
    exact-coordinate grid (a no-op for the output of `rotation_transform` and
    `zoom_transform`)."""
    transform = jnp.asarray(transform, jnp.float32)
    step = _coefficient_step(height, width)
    a0, a1, b0, b1 = (_snap(transform[i], step) for i in (0, 1, 3, 4))
    return jnp.stack([a0, a1, transform[2], b0, b1, transform[5]])


def resample(image: jax.Array, coefficients: jax.Array) -> jax.Array:
    """Bilinear resampling of `image` [H, W, C] at x_in = a0*x + a1*y + a2,
    y_in = b0*x + b1*y + b2 (`affine_coefficients`), fill mode "reflect", as XLA ops."""
    height, width, _ = image.shape
    a0, a1, a2, b0, b1, b2 = (coefficients[i] for i in range(6))
    y, x = jnp.meshgrid(
        jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij"
    )
    x_in = a0 * x + a1 * y + a2
    y_in = b0 * x + b1 * y + b2

    def nodes(coordinate: jax.Array, size: int):
        lower = jnp.floor(coordinate)
        upper_weight = coordinate - lower
        lower_weight = 1 - upper_weight
        index = lower.astype(jnp.int32)
        return (
            (_reflect_index(index, size), lower_weight),
            (_reflect_index(index + 1, size), upper_weight),
        )

    flat = image.reshape(height * width, -1)
    out = None
    for iy, wy in nodes(y_in, height):
        for ix, wx in nodes(x_in, width):
            # Indices are in range by construction (reflected), so no clamping.
            pixels = (
                flat.at[(iy * width + ix).reshape(-1)]
                .get(mode="promise_in_bounds", wrap_negative_indices=False)
                .reshape(image.shape)
            )
            term = (wy * wx)[..., None] * pixels
            out = term if out is None else out + term
    return out.astype(image.dtype)


def resample_native(image: jax.Array, coefficients: jax.Array) -> jax.Array:
    """`resample` of a float32 image [H, W, C] by jaxrepro's kernel (`resample.cc`,
    built by `jaxrepro.native`): the same operations in the same order, so
    the same bits, in one pass instead of gathers and integer divisions
    (`docs/results/speed/resample-kernel/`). On other backends than the CPU, the XLA
    form. Not differentiable: the training step augments data, never parameters."""

    def kernel(image, coefficients):
        kernels.library()
        call = jax.ffi.ffi_call(
            "jaxrepro_affine_resample",
            jax.ShapeDtypeStruct(image.shape, jnp.float32),
            vmap_method="broadcast_all",
        )
        return call(image, coefficients)

    # The kernel is an XLA:CPU custom call; other backends run the XLA form.
    return lax.platform_dependent(image, coefficients, cpu=kernel, default=resample)


def affine_transform(image: jax.Array, transform: jax.Array, *, native: bool = False) -> jax.Array:
    """Resample `image` [H, W, C] at (x_in, y_in) = transform(x, y) of each output pixel.

    Bilinear, fill mode "reflect". `transform` is Keras's [a0, a1, a2, b0, b1, b2, 0, 0]:
    x_in = a0*x + a1*y + a2, y_in = b0*x + b1*y + b2 in pixel coordinates (x = column,
    y = row); a0, a1, b0, b1 are snapped to the exact-coordinate grid. The arithmetic is
    that of `jax.scipy.ndimage.map_coordinates(channel, [y_in, x_in], order=1,
    mode="reflect")` on each channel (same weights, products and summation order), with
    whole RGB pixels gathered at once (about 4x faster on CPU). `native=True` runs a
    float32 image through jaxrepro's kernel instead (`resample_native`, the same bits).
    """
    height, width, _ = image.shape
    coefficients = affine_coefficients(transform, height, width)
    if native and image.dtype == jnp.float32:
        return resample_native(image, coefficients)
    return resample(image, coefficients)


# --- the pipeline ---------------------------------------------------------------------


def flip_horizontal(image: jax.Array) -> jax.Array:
    """Left-right flip of one image [H, W, C]."""
    return image[:, ::-1]


def rotate_image(image: jax.Array, angle: jax.Array, *, native: bool = False) -> jax.Array:
    """Rotate one image [H, W, C] by `angle` radians, counter-clockwise, as Keras does."""
    height, width, _ = image.shape
    return affine_transform(image, rotation_transform(angle, height, width), native=native)


def zoom_image(image: jax.Array, factor: jax.Array, *, native: bool = False) -> jax.Array:
    """Zoom one image [H, W, C] by `factor` (> 1 out, < 1 in), as Keras RandomZoom does."""
    height, width, _ = image.shape
    return affine_transform(image, zoom_transform(factor, height, width), native=native)


def augment_params(
    key: jax.Array, *, flip: bool = True, rotation: Factor = 0.1, zoom: Factor = 0.2
) -> dict[str, jax.Array]:
    """The random draws of one example: {'flip': bool, 'angle': radians, 'zoom': factor}.

    Parts switched off get their neutral value (False, 0, 1) and are skipped by
    `augment_example`; drawing them or not never changes the other parts.
    """
    rotation_range, zoom_range = _factor_range(rotation, "rotation"), _factor_range(zoom, "zoom")
    return {
        "flip": sample_flip(jax.random.fold_in(key, FLIP_STREAM)) if flip else jnp.zeros((), bool),
        "angle": sample_angle(jax.random.fold_in(key, ROTATE_STREAM), rotation_range)
        if not _is_off(rotation_range)
        else jnp.zeros((), jnp.float32),
        "zoom": sample_zoom(jax.random.fold_in(key, ZOOM_STREAM), zoom_range)
        if not _is_off(zoom_range)
        else jnp.ones((), jnp.float32),
    }


def augment_example(
    key: jax.Array,
    image: jax.Array,
    *,
    flip: bool = True,
    rotation: Factor = 0.1,
    zoom: Factor = 0.2,
    native: bool = False,
) -> jax.Array:
    """Flip, rotate, zoom one float image [H, W, C] (0..255) with the example's key.

    `rotation` and `zoom` are Keras factors (a number f means [-f, f]; or a
    (lower, upper) pair); 0 turns that part off without resampling. `native`: resample
    with jaxrepro's kernel (`resample_native`, the same bits, not differentiable).
    """
    image = jnp.asarray(image, jnp.float32)
    params = augment_params(key, flip=flip, rotation=rotation, zoom=zoom)
    if flip:
        image = jnp.where(params["flip"], flip_horizontal(image), image)
    if not _is_off(_factor_range(rotation, "rotation")):
        image = rotate_image(image, params["angle"], native=native)
    if not _is_off(_factor_range(zoom, "zoom")):
        image = zoom_image(image, params["zoom"], native=native)
    return image


def example_keys(key: jax.Array, positions: jax.Array) -> jax.Array:
    """Per-example keys `fold_in(key, i)` for the batch positions i (an int array)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(positions, jnp.uint32))


def augment_batch(
    key: jax.Array,
    images: jax.Array,
    *,
    flip: bool = True,
    rotation: Factor = 0.1,
    zoom: Factor = 0.2,
    positions: jax.Array | None = None,
    native: bool = False,
) -> jax.Array:
    """Augment a batch [N, H, W, C] of float pixels (0..255) with the batch's key.

    The example at batch position i (`positions`, default 0..N-1: a part of a batch
    passes its own positions) is augmented with `fold_in(key, i)`, so results depend
    neither on the batch size nor on how a batch is split. Jittable; `flip`,
    `rotation`, `zoom` and `native` (see `augment_example`) are static Python values.
    """
    images = jnp.asarray(images, jnp.float32)
    if positions is None:
        positions = jnp.arange(images.shape[0], dtype=jnp.uint32)
    keys = example_keys(key, positions)
    return jax.vmap(
        lambda k, im: augment_example(k, im, flip=flip, rotation=rotation, zoom=zoom, native=native)
    )(keys, images)

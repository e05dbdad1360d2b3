"""LIME (jaxrepro.explain.lime) against the `lime` package itself, and its bits."""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import lime.lime_image
import numpy as np
import pytest
import sklearn.linear_model
import sklearn.metrics

from jaxrepro.explain import lime as jlime

TESTS = Path(__file__).resolve().parent
SIZE = 64
SCALE = 300.0  # logit scale: the perturbed probabilities span about 0.49..0.64
NUM_SAMPLES = 230  # not a multiple of the batch size (50): the last batch is padded


class TinyNet(nn.Module):
    """conv 3x3 -> relu -> mean pool -> dense: `classes` logits, or [N] if `flat`."""

    classes: int = 1
    flat: bool = False

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x / 255.0))
        logits = nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2))) * SCALE
        return logits[:, 0] if self.flat else logits


def tiled_image(variant: int) -> np.ndarray:
    """A 64x64 picture of 16-pixel tiles of random colours with a striped texture, so that
    quickshift finds about a dozen segments and a segment's mean colour is not the segment."""
    rng = np.random.default_rng(variant)
    tiles = rng.integers(40, 216, (SIZE // 16, SIZE // 16, 3))
    image = np.repeat(np.repeat(tiles, 16, 0), 16, 1).astype(np.float64)
    stripes = 20 * np.sin(0.8 * np.arange(SIZE))[None, :, None] * np.array([1.0, -1.0, 0.5])
    return np.clip(image + stripes, 0, 255).astype(np.float32)


IMAGES = np.stack([tiled_image(2), tiled_image(0)])  # 12 and 11 segments


def centred(model: nn.Module, offsets) -> dict:
    """`model`'s variables (key 0) with the dense bias moved so that its logits on
    IMAGES[0] are `offsets` (a probability near 0.5, not saturated)."""
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
    logits = jax.jit(model.apply)(variables, IMAGES[:1]).reshape(-1)
    params = dict(variables["params"])
    dense = dict(params["Dense_0"])
    dense["bias"] = dense["bias"] + (jnp.asarray(offsets, jnp.float32) - logits) / SCALE
    params["Dense_0"] = dense
    return {"params": params}


@functools.cache
def binary_model() -> tuple[nn.Module, dict]:
    return TinyNet(), centred(TinyNet(), [0.0])


def reference_map(seed: int = 0) -> np.ndarray:
    """The map that the cross-process test computes in both processes."""
    model, variables = binary_model()
    return np.asarray(jlime.lime(model, variables, IMAGES, num_samples=NUM_SAMPLES, seed=seed))


@pytest.fixture(scope="module")
def binary():
    return binary_model()


class GivenRows(np.random.RandomState):
    """A RandomState whose `randint` is lime_image.data_labels' draw of the rows: ours."""

    def __init__(self, rows: np.ndarray):
        super().__init__(0)
        self.rows = rows

    def randint(self, low, high=None, size=None, dtype=int):
        assert (low, high, size) == (0, 2, self.rows.size), "an unexpected draw from lime"
        return self.rows.reshape(-1).astype(np.int64)


def lime_reference(model, variables, image, rows, num_features, batch_size=50):
    """lime's own explanation of `image` (label 1 of [1-p, p]) on our segmentation and our
    rows, and the probabilities its classifier_fn returned, in order."""
    probability = jax.jit(lambda x: jax.nn.sigmoid(model.apply(variables, x)[:, 0]))
    seen = []

    def classifier_fn(images):
        # lime's last batch is short; padded to batch_size, as ours, the model runs on
        # batches of one shape (another batch size changes a probability's last bits).
        n = len(images)
        batch = np.concatenate([images, np.repeat(images[:1], batch_size - n, axis=0)])
        p = np.asarray(probability(jnp.asarray(batch, jnp.float32)), np.float64)[:n]
        seen.append(p)
        return np.stack([1.0 - p, p], axis=1)

    explainer = lime.lime_image.LimeImageExplainer(kernel_width=0.25, random_state=GivenRows(rows))
    # lime takes the mean colour of a float32 image in float32 (np.mean, pairwise), we in
    # float64 rounded once; given float64 pixels (the same values) lime's mean is ours
    # before the classifier rounds it to float32.
    explanation = explainer.explain_instance(
        image.astype(np.float64),
        classifier_fn,
        labels=(1,),
        top_labels=None,
        hide_color=None,
        num_features=100000 if num_features is None else num_features,
        num_samples=rows.shape[0],
        batch_size=batch_size,
        segmentation_fn=jlime.segment,
        random_seed=0,
    )
    return explanation, np.concatenate(seen)


# Measured here (x86-64, 2 cores), on both test images: lime's probabilities are bitwise
# ours; the selected features are the same; the coefficients differ by at most 1.5e-15
# of the largest one (5e-14 elementwise) for all three selections (4e-16 on IMAGES[0]);
# intercept, R^2 and local prediction are equal or differ by 1e-16. With bitwise-equal
# probabilities only the ridge solvers' rounding is left: 1e-12. Two compiled programs
# run the model, though, so its probabilities may differ by rounding elsewhere (rtol
# 1e-6 allowed), which moves the coefficients by up to ~1e-5 of the largest.
@pytest.mark.parametrize(
    "num_features, selection",
    [(None, "all, by highest weights"), (3, "forward selection"), (7, "highest weights")],
)
def test_matches_the_lime_package_on_the_same_rows(binary, num_features, selection):
    model, variables = binary
    ours = jlime.explain_image(
        model, variables, IMAGES[0], num_samples=NUM_SAMPLES, num_features=num_features
    )
    k = ours.rows.shape[1]
    assert k > 7, "the test image must have more segments than the largest selection"
    theirs, probabilities = lime_reference(model, variables, IMAGES[0], ours.rows, num_features)
    np.testing.assert_array_equal(theirs.segments, ours.segments)
    np.testing.assert_allclose(probabilities, ours.labels, rtol=1e-6, atol=0)
    assert np.ptp(ours.labels) > 0.05, "the model must respond to the perturbations"

    weights = dict(theirs.local_exp[1])
    expected_count = k if num_features is None else num_features
    assert sorted(weights) == sorted(ours.features.tolist()), selection
    assert len(ours.features) == expected_count
    if num_features == 3:  # forward selection: the same order too
        assert [f for f, _ in theirs.local_exp[1]] == sorted(
            ours.features.tolist(), key=lambda f: -abs(ours.coefficients[f])
        )
    expected = np.zeros(k)
    expected[list(weights)] = list(weights.values())
    scale = np.abs(expected).max()
    tolerance = 1e-12 if np.array_equal(probabilities, ours.labels) else 1e-5
    np.testing.assert_allclose(ours.coefficients, expected, rtol=0, atol=tolerance * scale)
    assert np.all(ours.coefficients[np.setdiff1d(np.arange(k), ours.features)] == 0)
    np.testing.assert_allclose(ours.intercept, theirs.intercept[1], rtol=tolerance)
    np.testing.assert_allclose(ours.score, theirs.score, rtol=tolerance)
    np.testing.assert_allclose(ours.local_prediction, theirs.local_pred[0], rtol=tolerance)
    np.testing.assert_array_equal(ours.heatmap, ours.coefficients.astype(np.float32)[ours.segments])


def test_kernel_weights_are_sklearn_cosine_distances_through_lime_kernel():
    rows = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 1, 1, 0]])
    distances = sklearn.metrics.pairwise_distances(rows, rows[:1], metric="cosine").ravel()
    expected = np.sqrt(np.exp(-(distances**2) / 0.25**2))
    np.testing.assert_allclose(jlime.kernel_weights(rows), expected, rtol=1e-14, atol=0)
    assert jlime.kernel_weights(rows)[0] == 1.0


@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0])
def test_weighted_ridge_and_r2_are_sklearns(alpha):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, (120, 5)).astype(np.float64)
    y = x @ rng.normal(size=5) + 0.1 * rng.normal(size=120)
    w = rng.uniform(0.1, 1.0, 120)
    reference = sklearn.linear_model.Ridge(alpha=alpha, fit_intercept=True).fit(x, y, w)
    coef, intercept = jlime.weighted_ridge(x, y, w, alpha)
    np.testing.assert_allclose(coef, reference.coef_, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(intercept, reference.intercept_, rtol=1e-12)
    np.testing.assert_allclose(
        jlime.weighted_r2(x, y, w, coef, intercept), reference.score(x, y, w), rtol=1e-12
    )


def test_rows_are_bernoulli_from_the_jax_key_with_row_zero_all_ones():
    rows = jlime.perturbation_rows(NUM_SAMPLES, 9, seed=3)
    assert rows.shape == (NUM_SAMPLES, 9) and rows.dtype == np.uint8 and np.all(rows[0] == 1)
    for j in (0, 8):
        key = jax.random.fold_in(jax.random.key(3), j)
        drawn = jax.random.bernoulli(key, 0.5, (NUM_SAMPLES,))
        np.testing.assert_array_equal(rows[1:, j], drawn[1:])
    assert 0.43 < rows[1:].mean() < 0.57
    # a segment's column does not depend on how many segments there are
    np.testing.assert_array_equal(jlime.perturbation_rows(NUM_SAMPLES, 70, seed=3)[:, :9], rows)
    assert not np.array_equal(rows, jlime.perturbation_rows(NUM_SAMPLES, 9, seed=4))


def test_same_bits_in_a_fresh_process_and_another_seed_differs():
    script = (
        "import hashlib, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import test_lime\n"
        "print(hashlib.sha256(test_lime.reference_map(seed=0).tobytes()).hexdigest())\n"
    )
    # started first, so that it runs while this process computes its own map
    fresh = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    here = reference_map(seed=0)
    stdout, stderr = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, stderr[-3000:]
    assert stdout.split()[-1] == hashlib.sha256(here.tobytes()).hexdigest()
    assert here.shape == (2, SIZE, SIZE) and here.dtype == np.float32
    assert np.abs(here).max() > 0
    other = reference_map(seed=1)
    assert not np.array_equal(here, other)


def test_an_image_map_does_not_depend_on_the_batch(binary):
    model, variables = binary
    pair = np.asarray(jlime.lime(model, variables, IMAGES, num_samples=NUM_SAMPLES))
    alone = np.asarray(jlime.lime(model, variables, IMAGES[1:], num_samples=NUM_SAMPLES))
    np.testing.assert_array_equal(pair[1], alone[0])
    assert not np.array_equal(pair[0], pair[1])


def test_batch_size_changes_no_more_than_rounding(binary):
    """Another batch size is another compiled model: the probabilities move by float32
    rounding, amplified by the logit scale (measured: 9e-6 relative at most), not more."""
    model, variables = binary
    big = jlime.explain_image(model, variables, IMAGES[0], num_samples=NUM_SAMPLES)
    small = jlime.explain_image(model, variables, IMAGES[0], num_samples=NUM_SAMPLES, batch_size=7)
    np.testing.assert_array_equal(small.rows, big.rows)
    np.testing.assert_allclose(small.labels, big.labels, rtol=5e-5, atol=0)


def test_flat_and_one_column_logits_give_the_same_map(binary):
    model, variables = binary
    column = np.asarray(jlime.lime(model, variables, IMAGES[:1], num_samples=NUM_SAMPLES))
    flat = np.asarray(
        jlime.lime(TinyNet(flat=True), variables, IMAGES[:1], num_samples=NUM_SAMPLES)
    )
    np.testing.assert_array_equal(flat, column)


@pytest.mark.parametrize("num_features", [None, 3])
def test_sign_minus_one_explains_the_other_class(binary, num_features):
    """sigmoid(-z) = 1 - sigmoid(z) and a ridge fit is linear in y with an intercept: the
    fit of 1 - y is (-coefficients, 1 - intercept), on the same rows and kernel weights,
    and forward selection's R^2 is the same for y and 1 - y. In float32 sigmoid(-z) and
    1 - sigmoid(z) differ by rounding (~6e-8), so the negation holds to about that."""
    model, variables = binary
    options = {"num_samples": NUM_SAMPLES, "num_features": num_features}
    dog = jlime.explain_image(model, variables, IMAGES[0], sign=1.0, **options)
    cat = jlime.explain_image(model, variables, IMAGES[0], sign=-1.0, **options)
    np.testing.assert_allclose(cat.labels, 1.0 - dog.labels, rtol=0, atol=2e-7)
    np.testing.assert_array_equal(cat.weights, dog.weights)
    assert sorted(cat.features) == sorted(dog.features)
    scale = np.abs(dog.coefficients).max()
    assert scale > 1e-3
    np.testing.assert_allclose(cat.coefficients, -dog.coefficients, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(cat.intercept, 1.0 - dog.intercept, rtol=0, atol=1e-6)
    # an [N] sign explains each image with its own sign
    both = np.asarray(
        jlime.lime(model, variables, IMAGES[[0, 0]], sign=np.array([1.0, -1.0]), **options)
    )
    np.testing.assert_array_equal(both[0], dog.heatmap)
    np.testing.assert_array_equal(both[1], cat.heatmap)


def test_a_three_class_head_explains_the_target_class():
    model = TinyNet(classes=3)
    # class 0 is predicted on the image; about a quarter of the perturbed images predict
    # class 1 (a target taken per row, not from the image, would change the map)
    variables = centred(model, [0.15, 0.0, -1.0])
    image = IMAGES[0]
    probabilities = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, image[None])[0]))
    fits = [
        jlime.explain_image(model, variables, image, target=t, num_samples=NUM_SAMPLES)
        for t in range(3)
    ]
    for t, fit in enumerate(fits):
        # a batch of one against a batch of 50: rounding (measured 1.1e-6 relative)
        np.testing.assert_allclose(fit.labels[0], probabilities[t], rtol=1e-5)
    # the probabilities sum to 1 and every fit is linear in y: the coefficients sum to 0
    total = sum(fit.coefficients for fit in fits)
    scale = max(np.abs(fit.coefficients).max() for fit in fits)
    np.testing.assert_allclose(total, 0.0, rtol=0, atol=1e-5 * scale)
    assert not np.allclose(fits[0].coefficients, fits[1].coefficients)
    predicted = np.asarray(jlime.lime(model, variables, image[None], num_samples=NUM_SAMPLES))
    np.testing.assert_array_equal(predicted[0], fits[0].heatmap)
    targeted = np.asarray(
        jlime.lime(model, variables, image[None], target=2, num_samples=NUM_SAMPLES)
    )
    np.testing.assert_array_equal(targeted[0], fits[2].heatmap)


@pytest.mark.parametrize(
    "images, options, message",
    [
        (IMAGES[0], {}, r"images \[N, H, W, 3\]"),
        (np.zeros((1, 8, 8, 4), np.float32), {}, r"images \[N, H, W, 3\]"),
        (IMAGES[:1], {"num_samples": 1}, "num_samples must be at least 2"),
        (IMAGES[:1], {"batch_size": 0}, "batch_size must be at least 1"),
        (IMAGES[:1], {"num_features": 0}, "num_features must be at least 1"),
    ],
)
def test_bad_inputs_are_value_errors_that_say_what_is_wrong(binary, images, options, message):
    model, variables = binary
    with pytest.raises(ValueError, match=message):
        jlime.lime(model, variables, images, **options)


def test_segment_labels_are_consecutive_and_reject_a_non_rgb_image():
    segments = jlime.segment(IMAGES[0])
    assert segments.dtype == np.int32 and segments.shape == (SIZE, SIZE)
    np.testing.assert_array_equal(np.unique(segments), np.arange(segments.max() + 1))
    with pytest.raises(ValueError, match=r"one image \[H, W, 3\]"):
        jlime.segment(IMAGES[0, ..., :2])

"""LIME for images (Ribeiro et al. 2016), as the `lime` package 0.2.0.1 defines it.

Follows `lime_image.LimeImageExplainer.explain_instance` and `lime_base.LimeBase`
with their defaults, for one label:

1. Superpixels: `skimage.segmentation.quickshift(kernel_size=4, max_dist=200, ratio=0.2)`
   (`segment`). lime passes the image as it is given; the models here take pixels
   0..255, so the image is segmented as pixels / 255 in float64, the [0, 1] RGB image
   that quickshift's `rgb2lab` expects. lime also passes `random_seed`, which
   scikit-image 0.26 names `rng`, so lime's wrapper drops it and quickshift breaks its
   ties with its default `rng=42`; `segment` passes `rng=42` explicitly.
2. Perturbations (`data_labels`): `num_samples` rows of 0/1 over the K segments, row 0
   all ones (the image itself), the others Bernoulli(0.5). A segment that is off takes
   its mean colour per channel (lime's `hide_color=None`, the "fudged image"; here the
   mean is summed in float64 and rounded once to the pixels' dtype).
3. Labels: the model's probability of the explained class on each perturbed image,
   `heads.class_probability`: sigmoid(sign * logit) for a one-logit head (lime's
   column `label` of [1 - p, p]), the softmax probability of class `target` (default:
   the class the model predicts for the image itself, row 0) for a C-class head.
4. Weights: the cosine distance d of each row to row 0 (sklearn's `pairwise_distances`,
   metric "cosine") through the kernel sqrt(exp(-d^2 / 0.25^2)) (kernel_width 0.25).
5. Features, as `feature_selection="auto"`: `forward_selection` (weighted least squares,
   Ridge alpha=0, adding the feature with the best weighted R^2, first one on a tie)
   if num_features <= 6, else `highest_weights` (the largest |coefficients| of a
   weighted Ridge alpha=0.01 on all segments). `num_features=None` is lime_image's
   default 100000: every segment, ordered by `highest_weights`.
6. The explanation: a weighted Ridge(alpha=1, fit_intercept=True) on the selected
   features; the others get 0. Each pixel of the heatmap gets its segment's
   coefficient (signed: positive supports the explained class).

What differs: the randomness. lime draws the rows from a numpy `RandomState`; here
segment j's column is `jax.random.bernoulli(fold_in(jax.random.key(seed), j), 0.5,
(num_samples,))` (threefry, an explicit key), the same key for every image, so an
image's map depends on the image, the model and the options only, never on the other
images given with it or their order. The ridge fits are written out in float64 numpy
(sklearn's closed form with sample weights: weighted centring, then
(Xc^T W Xc + alpha I) c = Xc^T W yc), since scikit-learn is only a test dependency;
`tests/test_lime.py` checks them against lime itself.

Bits: the perturbed images are built from the rows, the segment map and the mean
colours, and the model is evaluated on them, under one `jax.jit`
(`perturbed_probabilities`, `lax.map` over batches of `batch_size`; the last batch is
padded with the image itself and the segment count to a multiple of SEGMENT_BUCKET, so
that few shapes compile). The same inputs give the same bits in every process on a
machine, and so does the rest (quickshift, numpy). Another `batch_size` is another
compiled model and may change the probabilities' last bits. Not claimed: the same bits
on other kinds of CPU for the segmentation (scikit-image's compiled code) and for the
float64 solves (numpy's BLAS/LAPACK, which pick their kernels for the CPU they run on).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from skimage.segmentation import quickshift

from jaxrepro.explain import heads

KERNEL_WIDTH = 0.25
QUICKSHIFT = {"kernel_size": 4, "max_dist": 200, "ratio": 0.2, "rng": 42}
FORWARD_SELECTION_MAX = 6  # lime's "auto": forward selection up to this many features
SELECTION_ALPHA = 0.01  # highest_weights' ridge
EXPLANATION_ALPHA = 1.0  # the explanation's ridge
SEGMENT_BUCKET = 64  # the segment count is padded to a multiple of this for the jit


def segment(pixels: Any) -> np.ndarray:
    """lime_image's quickshift superpixels of one image [H, W, 3] (pixels 0..255): int32
    [H, W] with labels 0..K-1 (the column of each segment in the perturbation rows)."""
    image = np.asarray(pixels, np.float64) / 255.0
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one image [H, W, 3], got shape {image.shape}")
    segments = quickshift(image, **QUICKSHIFT)
    # quickshift's labels are 0..K-1 already; relabelling makes it a guarantee.
    _, labels = np.unique(segments, return_inverse=True)
    return labels.reshape(segments.shape).astype(np.int32)


def _bucket(num_segments: int) -> int:
    """`num_segments` rounded up to a multiple of SEGMENT_BUCKET (the jitted column count)."""
    return -(-num_segments // SEGMENT_BUCKET) * SEGMENT_BUCKET


def perturbation_rows(num_samples: int, num_segments: int, seed: int = 0) -> np.ndarray:
    """lime_image's perturbations, uint8 [num_samples, num_segments]: row 0 all ones, the
    others Bernoulli(0.5). Column j is drawn from `fold_in(jax.random.key(seed), j)`, so a
    segment's column does not depend on how many segments the image has (and the draw
    compiles once per SEGMENT_BUCKET columns, not once per segment count)."""
    drawn = _bernoulli_columns(jax.random.key(seed), num_samples, _bucket(num_segments))
    rows = np.array(drawn[:, :num_segments], np.uint8)
    rows[0] = 1
    return rows


@functools.partial(jax.jit, static_argnames=("num_samples", "num_columns"))
def _bernoulli_columns(key: jax.Array, num_samples: int, num_columns: int) -> jax.Array:
    """bool [num_samples, num_columns]: column j is bernoulli(fold_in(key, j), 0.5)."""
    keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_columns))
    return jax.vmap(lambda k: jax.random.bernoulli(k, 0.5, (num_samples,)))(keys).T


def mean_colours(pixels: Any, segments: np.ndarray) -> np.ndarray:
    """Each segment's mean colour per channel, [K, 3] in the pixels' dtype (lime's
    `hide_color=None`): summed in float64 (`np.bincount`, in pixel order), rounded once."""
    image = np.asarray(pixels)
    labels = np.asarray(segments).reshape(-1)
    k = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    flat = image.reshape(-1, image.shape[-1]).astype(np.float64)
    sums = np.stack([np.bincount(labels, c, minlength=k) for c in flat.T], axis=1)
    return (sums / counts[:, None]).astype(image.dtype)


@functools.partial(jax.jit, static_argnames=("model", "batch_size"))
def perturbed_probabilities(
    model: nn.Module,
    variables: Any,
    image: jax.Array,
    segments: jax.Array,
    colours: jax.Array,
    rows: jax.Array,
    sign: jax.Array,
    target: jax.Array | None = None,
    *,
    batch_size: int,
) -> jax.Array:
    """The explained class's probability on each perturbed image, [S].

    `image` [H, W, 3]; `segments` int32 [H, W] with labels below K; `colours` [K, 3]
    (`mean_colours`); `rows` bool [S, K] with S a multiple of `batch_size` (a row says
    which segments keep their pixels; the others take their colour). `target` None: the
    class predicted on row 0, which must be the image itself (all ones).
    """
    num_segments = rows.shape[1]
    fudged = colours[segments]  # [H, W, 3]

    def batch_logits(batch_rows: jax.Array) -> jax.Array:
        keep = batch_rows[:, segments]  # [B, H, W]
        return heads.inference_apply(model, variables, jnp.where(keep[..., None], image, fudged))

    logits = jax.lax.map(batch_logits, rows.reshape(-1, batch_size, num_segments))
    logits = logits.reshape(rows.shape[0], *logits.shape[2:])
    n = logits.shape[0]
    if target is None and logits.ndim == 2 and logits.shape[1] > 1:
        target = jnp.argmax(logits[0])
    targets = None if target is None else jnp.broadcast_to(target, (n,))
    return heads.class_probability(logits, jnp.broadcast_to(sign, (n,)), targets)


def kernel_weights(rows: np.ndarray, kernel_width: float = KERNEL_WIDTH) -> np.ndarray:
    """lime's sample weights, float64 [S]: sqrt(exp(-d^2 / width^2)), d the cosine
    distance of each row to row 0 (as sklearn computes it: rows scaled to unit norm, an
    all-zero row left zero, 1 - their dot product, clipped to [0, 2])."""
    data = np.asarray(rows, np.float64)
    norms = np.sqrt(np.sum(data * data, axis=1))
    unit = data / np.where(norms == 0, 1.0, norms)[:, None]
    distances = np.clip(1.0 - np.sum(unit * unit[0], axis=1), 0.0, 2.0)
    return np.sqrt(np.exp(-(distances**2) / kernel_width**2))


def weighted_ridge(
    data: np.ndarray, labels: np.ndarray, weights: np.ndarray, alpha: float
) -> tuple[np.ndarray, float]:
    """(coefficients [F], intercept) of sklearn's `Ridge(alpha, fit_intercept=True)`
    fitted with `sample_weight=weights`, in float64: weighted centring of X and y, then
    (Xc^T W Xc + alpha I) c = Xc^T W yc; a singular system (alpha 0) by least squares."""
    x = np.asarray(data, np.float64)
    y = np.asarray(labels, np.float64)
    w = np.asarray(weights, np.float64)
    x_offset = np.average(x, axis=0, weights=w)
    y_offset = np.average(y, weights=w)
    root = np.sqrt(w)
    xs = (x - x_offset) * root[:, None]
    ys = (y - y_offset) * root
    gram = xs.T @ xs + alpha * np.eye(x.shape[1])
    try:
        coef = np.linalg.solve(gram, xs.T @ ys)
    except np.linalg.LinAlgError:
        coef = np.linalg.lstsq(xs, ys, rcond=None)[0]
    return coef, float(y_offset - x_offset @ coef)


def weighted_r2(
    data: np.ndarray, labels: np.ndarray, weights: np.ndarray, coef: np.ndarray, intercept: float
) -> float:
    """sklearn's weighted R^2 (`Ridge.score` with `sample_weight`) of a linear fit."""
    y = np.asarray(labels, np.float64)
    residual = np.sum(weights * (y - (data @ coef + intercept)) ** 2)
    total = np.sum(weights * (y - np.average(y, weights=weights)) ** 2)
    if total == 0:
        return 1.0 if residual == 0 else 0.0
    return float(1.0 - residual / total)


def forward_selection(
    data: np.ndarray, labels: np.ndarray, weights: np.ndarray, num_features: int
) -> np.ndarray:
    """lime_base's forward selection: add, one at a time, the feature whose weighted least
    squares fit (Ridge alpha=0) with those chosen has the best weighted R^2."""
    used: list[int] = []
    for _ in range(min(num_features, data.shape[1])):
        best, best_score = 0, -100000000.0
        for feature in range(data.shape[1]):
            if feature in used:
                continue
            columns = data[:, used + [feature]]
            coef, intercept = weighted_ridge(columns, labels, weights, 0.0)
            score = weighted_r2(columns, labels, weights, coef, intercept)
            if score > best_score:
                best, best_score = feature, score
        used.append(best)
    return np.array(used, np.int64)


def highest_weights(
    data: np.ndarray, labels: np.ndarray, weights: np.ndarray, num_features: int
) -> np.ndarray:
    """lime_base's highest weights: the features of the largest |coefficient x row 0| of a
    weighted Ridge(alpha=0.01) on all features, largest first (a stable sort)."""
    coef, _ = weighted_ridge(data, labels, weights, SELECTION_ALPHA)
    order = np.argsort(-np.abs(coef * data[0]), kind="stable")
    return order[:num_features].astype(np.int64)


def select_features(
    data: np.ndarray, labels: np.ndarray, weights: np.ndarray, num_features: int | None
) -> np.ndarray:
    """lime_base's "auto": forward selection up to 6 features, highest weights above;
    None: every feature, ordered by highest weights."""
    if num_features is not None and num_features <= FORWARD_SELECTION_MAX:
        return forward_selection(data, labels, weights, num_features)
    return highest_weights(
        data, labels, weights, data.shape[1] if num_features is None else num_features
    )


@dataclasses.dataclass(frozen=True)
class Explanation:
    """One image's LIME explanation: the segmentation, the neighbourhood and the local fit."""

    segments: np.ndarray  # int32 [H, W], labels 0..K-1
    rows: np.ndarray  # uint8 [S, K], row 0 all ones
    labels: np.ndarray  # float64 [S], the explained class's probability per row
    weights: np.ndarray  # float64 [S], the kernel weights
    features: np.ndarray  # int64 [F], the selected segments in selection order
    coefficients: np.ndarray  # float64 [K], 0 for segments not selected
    intercept: float
    score: float  # weighted R^2 of the local fit on the neighbourhood
    local_prediction: float  # the local fit at row 0 (the image itself)

    @property
    def heatmap(self) -> np.ndarray:
        """float32 [H, W]: each pixel's segment coefficient."""
        return self.coefficients.astype(np.float32)[self.segments]


def _check_options(num_samples: int, batch_size: int, num_features: int | None) -> None:
    if num_samples < 2:
        raise ValueError(
            f"num_samples must be at least 2 (the image and one perturbation), got {num_samples}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_features is not None and num_features < 1:
        raise ValueError(
            f"num_features must be at least 1 or None (all segments), got {num_features}"
        )


def _padded(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """`rows` as bool, padded with all-ones rows to whole batches and with columns to a
    multiple of SEGMENT_BUCKET (so few segment counts compile; no pixel reads a padded
    column, and padded rows are dropped)."""
    n, k = rows.shape
    padded = np.ones((-(-n // batch_size) * batch_size, _bucket(k)), bool)
    padded[:n, :k] = rows.astype(bool)
    return padded


def _padded_colours(colours: np.ndarray) -> np.ndarray:
    """`colours` [K, 3] with zero rows to the padded segment count of `_padded`."""
    k = colours.shape[0]
    padded = np.zeros((_bucket(k), colours.shape[1]), colours.dtype)
    padded[:k] = colours
    return padded


def explain_image(
    model: nn.Module,
    variables: Any,
    image: Any,
    *,
    sign: Any = 1.0,
    target: Any = None,
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 50,
    num_features: int | None = None,
) -> Explanation:
    """LIME's explanation of one image [H, W, 3] (pixels 0..255); see the module doc.

    `sign` (+-1) and `target` (a class index or None) as `heads.class_probability`
    takes them; `target` None on a C-class head explains the predicted class.
    """
    _check_options(num_samples, batch_size, num_features)
    image = heads.as_input(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected one image [H, W, 3], got shape {image.shape}")
    segments = segment(image)
    rows = perturbation_rows(num_samples, int(segments.max()) + 1, seed)
    probabilities = perturbed_probabilities(
        model,
        variables,
        image,
        jnp.asarray(segments),
        jnp.asarray(_padded_colours(mean_colours(image, segments))),
        jnp.asarray(_padded(rows, batch_size)),
        jnp.asarray(sign, image.dtype),
        None if target is None else jnp.asarray(target, jnp.int32),
        batch_size=batch_size,
    )
    labels = np.asarray(probabilities, np.float64)[:num_samples]
    data = rows.astype(np.float64)
    weights = kernel_weights(rows)
    features = select_features(data, labels, weights, num_features)
    chosen = data[:, features]
    coef, intercept = weighted_ridge(chosen, labels, weights, EXPLANATION_ALPHA)
    coefficients = np.zeros(rows.shape[1], np.float64)
    coefficients[features] = coef
    return Explanation(
        segments=segments,
        rows=rows,
        labels=labels,
        weights=weights,
        features=features,
        coefficients=coefficients,
        intercept=intercept,
        score=weighted_r2(chosen, labels, weights, coef, intercept),
        local_prediction=float(chosen[0] @ coef + intercept),
    )


def lime(
    model: nn.Module,
    variables: Any,
    images: Any,
    *,
    sign: Any = 1.0,
    target: Any = None,
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 50,
    num_features: int | None = None,
) -> jax.Array:
    """LIME heatmaps [N, H, W] of images [N, H, W, 3] (pixels 0..255), in the images'
    float dtype: each pixel gets its superpixel's coefficient in the local linear fit
    (signed). Every image is explained on its own, with the same key; `sign` and
    `target` may be [N] arrays."""
    _check_options(num_samples, batch_size, num_features)
    images = heads.as_input(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
    n = images.shape[0]
    signs = np.asarray(heads.signs(sign, n, images.dtype))
    targets = heads.targets(target, n)
    explanations = [
        explain_image(
            model,
            variables,
            images[i],
            sign=signs[i],
            target=None if targets is None else int(targets[i]),
            num_samples=num_samples,
            seed=seed,
            batch_size=batch_size,
            num_features=num_features,
        )
        for i in range(n)
    ]
    maps = [e.coefficients[e.segments] for e in explanations]  # float64, cast once below
    stacked = np.stack(maps) if maps else np.zeros(images.shape[:3])
    return jnp.asarray(stacked.astype(images.dtype))

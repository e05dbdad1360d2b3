"""The checks XAI users run on explanations, bit for bit: faithfulness, randomisation, Lipschitz.

Three of the most used families of Quantus (Hedström et al. 2023), for any Flax model
whose head `jaxrepro.explain.heads` understands, with methods called only through
`jaxrepro.explain.explain`:

* `region_perturbation` (faithfulness; Samek et al. 2017, "Evaluating the visualization
  of what a deep neural network has learned", Quantus `RegionPerturbation`): remove the
  image's non-overlapping patches most relevant first (MoRF) and follow the explained
  score; `patch_size=1` is pixel flipping (Bach et al. 2015). The curve of a random
  patch order from an explicit key is the reference: a faithful map makes the score
  fall faster, a lower area under the MoRF curve (AOPC, Samek et al., is the same
  comparison written as the mean drop).
* `model_parameter_randomisation` (Adebayo et al. 2018, "Sanity checks for saliency
  maps", cascading): randomise the layers top first, cumulatively, and compare each
  map with the original (Spearman rank correlation of the signed map and of |map|,
  SSIM). A map that stays similar does not depend on what the model learned.
* `local_lipschitz_estimate` (Alvarez-Melis & Jaakkola 2018, "On the robustness of
  interpretability methods", Quantus `LocalLipschitzEstimate`): the largest ratio of
  the change of the map to the change of the input over noisy copies of the input.

Bits: the model-sized work (the perturbed forward passes, `model.init`) is jitted with
the model static, every method runs through its own jitted function on a batch of one
image (as `robustness.protocol` does, so a map never depends on the other images),
randomness comes only from explicit `jax.random` keys (threefry: the same bits on every
machine), and orders, norms, correlations and SSIM are host-side NumPy/SciPy/scikit-image
in float64. No wall clock, no global RNG: the same inputs give the same floats in every
process.

The explained score is the methods': `sign * logit` of a one-logit head (`heads.score`);
for a C-class head the class is `target`, by default the class the model predicts for
the unperturbed image, kept for every perturbed or noisy copy of it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from scipy.stats import rankdata
from skimage.metrics import structural_similarity

from jaxrepro.explain import UNSIGNED, explain, heads

BASELINES = ("mean", "black", "uniform")
PIXEL_RANGE = 255.0  # sigma 1 = the whole pixel range (as `robustness` defines sigma)

__all__ = [
    "BASELINES",
    "Faithfulness",
    "Lipschitz",
    "PerturbationCurve",
    "Randomisation",
    "cascading_randomisation",
    "curve_auc",
    "explain_one_by_one",
    "explained_class",
    "init_variables",
    "local_lipschitz_estimate",
    "lipschitz_noise",
    "model_parameter_randomisation",
    "parameterised_layers",
    "patch_ids",
    "patch_order",
    "patch_relevance",
    "perturbation_curve",
    "random_patch_order",
    "region_perturbation",
    "removal_counts",
    "spearman",
    "ssim",
]


# ---------------------------------------------------------------------- shared


@functools.partial(jax.jit, static_argnames=("model",))
def _logits(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    return heads.inference_apply(model, variables, images)


def explained_class(
    model: nn.Module, variables: Any, images: jax.Array, target: Any = None
) -> np.ndarray | None:
    """The class each image's score is of: None for a one-logit head (the sign says it),
    else `target` or the arg-max of the unperturbed image's logits, int32 [N]."""
    logits = _logits(model, variables, heads.as_input(images))
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return None
    if target is not None:
        return np.asarray(heads.targets(target, logits.shape[0]))
    return np.asarray(jnp.argmax(logits, axis=-1), np.int32)


def _class_options(target: np.ndarray | None, index: int) -> dict[str, Any]:
    return {} if target is None else {"target": target[index : index + 1]}


def explain_one_by_one(
    method: str,
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    sign: Any = 1.0,
    target: np.ndarray | None = None,
    options: dict | None = None,
) -> np.ndarray:
    """Heatmaps [N, H, W] of `method`, each image explained in a batch of one (so its map
    does not depend on the others), with its own sign (and class of a C-class head)."""
    images = heads.as_input(images)
    signs = np.asarray(heads.signs(sign, images.shape[0], images.dtype))
    return np.stack(
        [
            np.asarray(
                explain(
                    method,
                    model,
                    variables,
                    images[i : i + 1],
                    sign=signs[i : i + 1],
                    **_class_options(target, i),
                    **(options or {}),
                )
            )[0]
            for i in range(images.shape[0])
        ]
    )


def _max_magnitude(heatmap: np.ndarray) -> float:
    """The largest |value| of a map, 1 for an all-zero map (the thesis's RMSE scale)."""
    return float(np.max(np.abs(np.asarray(heatmap, np.float64)))) or 1.0


# ---------------------------------------------------------------- faithfulness


def patch_ids(height: int, width: int, patch_size: int) -> np.ndarray:
    """int32 [H, W]: the index of each pixel's patch on a grid of `patch_size` squares,
    row-major; edge patches are smaller when the size does not divide the image."""
    if patch_size < 1:
        raise ValueError(f"patch_size must be at least 1, got {patch_size}")
    columns = -(-width // patch_size)
    rows = np.arange(height)[:, None] // patch_size
    cols = np.arange(width)[None, :] // patch_size
    return (rows * columns + cols).astype(np.int32)


def patch_relevance(heatmaps: np.ndarray, patch_size: int) -> np.ndarray:
    """float64 [N, P]: the summed relevance of each patch (host-side, fixed order)."""
    heat = np.asarray(heatmaps, np.float64)
    ids = patch_ids(heat.shape[1], heat.shape[2], patch_size).ravel()
    count = int(ids.max()) + 1
    return np.stack([np.bincount(ids, weights=h.ravel(), minlength=count) for h in heat])


def patch_order(heatmaps: np.ndarray, patch_size: int, order: str = "morf") -> np.ndarray:
    """int32 [N, P]: the patches in the order they are removed.

    "morf": most relevant (largest summed relevance) first; "lerf": least relevant first.
    Ties go to the lower patch index in both, so the order is exact.
    """
    relevance = patch_relevance(heatmaps, patch_size)
    if order == "morf":
        keys = -relevance
    elif order == "lerf":
        keys = relevance
    else:
        raise ValueError(f"unknown order {order!r}; valid orders: ['morf', 'lerf']")
    return np.argsort(keys, axis=1, kind="stable").astype(np.int32)


def random_patch_order(key: jax.Array, n: int, num_patches: int) -> np.ndarray:
    """int32 [n, P]: a random order of the patches of image i, from `fold_in(key, i)`
    (so image i's order does not depend on how many images come with it)."""
    return np.stack(
        [
            np.asarray(jax.random.permutation(jax.random.fold_in(key, i), num_patches), np.int32)
            for i in range(n)
        ]
    )


@functools.partial(jax.jit, static_argnames=("model",))
def _perturbed_scores(
    model: nn.Module,
    variables: Any,
    image: jax.Array,
    rank_map: jax.Array,
    counts: jax.Array,
    fill: jax.Array,
    sign: jax.Array,
    target: jax.Array | None,
) -> jax.Array:
    """Scores [B] of `image` [H, W, C] with the first counts[b] patches of its order
    (`rank_map` [H, W]: each pixel's patch's position in the order) set to `fill`."""
    removed = rank_map[None] < counts[:, None, None]
    batch = jnp.where(removed[..., None], fill[None], image[None])
    b = counts.shape[0]
    logits = heads.inference_apply(model, variables, batch)
    cls = None if target is None else jnp.broadcast_to(target, (b,))
    return heads.score(logits, jnp.broadcast_to(sign, (b,)), cls)


def _fill(images: jax.Array, baseline: str, key: jax.Array | None) -> jax.Array:
    """What removed pixels become, [N, H, W, C]."""
    if baseline == "mean":  # the image's mean colour
        return jnp.broadcast_to(jnp.mean(images, axis=(1, 2), keepdims=True), images.shape)
    if baseline == "black":
        return jnp.zeros_like(images)
    if baseline == "uniform":  # uniform 0..255 noise, image i from fold_in(key, i)
        if key is None:
            raise ValueError("baseline 'uniform' needs an explicit key (baseline_key)")
        return jnp.stack(
            [
                jax.random.uniform(
                    jax.random.fold_in(key, i), images.shape[1:], images.dtype, 0.0, PIXEL_RANGE
                )
                for i in range(images.shape[0])
            ]
        )
    raise ValueError(f"unknown baseline {baseline!r}; valid baselines: {list(BASELINES)}")


def removal_counts(num_patches: int, steps: int | None = None) -> np.ndarray:
    """int [S + 1]: patches removed at each point of a curve: 0, ..., P (every patch when
    `steps` is None; else `steps` equal parts, floor(k P / steps))."""
    if steps is None:
        return np.arange(num_patches + 1)
    if not 1 <= steps <= num_patches:
        raise ValueError(f"steps must be in 1..{num_patches} (the patches), got {steps}")
    return np.array([k * num_patches // steps for k in range(steps + 1)])


def curve_auc(fractions: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """float64 [N]: trapezoid area under scores [N, S + 1] over `fractions` in [0, 1]."""
    x = np.asarray(fractions, np.float64)
    y = np.asarray(scores, np.float64)
    return np.sum(np.diff(x) * (y[:, 1:] + y[:, :-1]) / 2.0, axis=1)


@dataclass(frozen=True)
class PerturbationCurve:
    """The explained score as patches are removed in `orders`."""

    fractions: np.ndarray  # float64 [S + 1]: the fraction of the patches removed, 0 .. 1
    removed: np.ndarray  # int [S + 1]: how many patches
    scores: np.ndarray  # [N, S + 1] in the images' dtype: scores[:, 0] is the unperturbed
    auc: np.ndarray  # float64 [N]: trapezoid area over the fractions


def perturbation_curve(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    orders: np.ndarray,
    *,
    sign: Any = 1.0,
    target: Any = None,
    patch_size: int = 8,
    baseline: str = "mean",
    baseline_key: jax.Array | None = None,
    steps: int | None = None,
    batch_size: int = 32,
) -> PerturbationCurve:
    """The score of images [N, H, W, C] as their patches are replaced by the baseline in
    `orders` [N, P] (Samek et al. 2017's region perturbation), cumulatively.

    Each point is one forward pass (jitted, `batch_size` perturbed copies of one image
    at a time, or all points if fewer; the last batch padded with its final copy, so
    every call has one shape).
    """
    images = heads.as_input(images)
    n, height, width = images.shape[:3]
    ids = patch_ids(height, width, patch_size)
    orders = np.asarray(orders)
    num_patches = int(ids.max()) + 1
    if orders.shape != (n, num_patches):
        raise ValueError(
            f"orders must be [{n}, {num_patches}] (images x patches), got {orders.shape}"
        )
    if not np.array_equal(
        np.sort(orders, axis=1), np.broadcast_to(np.arange(num_patches), (n, num_patches))
    ):
        raise ValueError("each row of orders must be a permutation of the patch indices")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    counts = removal_counts(num_patches, steps)
    chunk = min(batch_size, len(counts))
    padded = np.concatenate([counts, np.full((-len(counts)) % chunk, counts[-1])])
    signs = heads.signs(sign, n, images.dtype)
    cls = explained_class(model, variables, images, target)
    fills = _fill(images, baseline, baseline_key)
    scores = []
    for i in range(n):
        rank = np.empty(num_patches, np.int32)
        rank[orders[i]] = np.arange(num_patches, dtype=np.int32)
        rank_map = jnp.asarray(rank[ids])
        parts = [
            np.asarray(
                _perturbed_scores(
                    model,
                    variables,
                    images[i],
                    rank_map,
                    jnp.asarray(padded[start : start + chunk], jnp.int32),
                    fills[i],
                    signs[i],
                    None if cls is None else jnp.asarray(cls[i]),
                )
            )
            for start in range(0, len(padded), chunk)
        ]
        scores.append(np.concatenate(parts)[: len(counts)])
    scores = np.stack(scores)
    fractions = counts / np.float64(num_patches)
    return PerturbationCurve(fractions, counts, scores, curve_auc(fractions, scores))


@dataclass(frozen=True)
class Faithfulness:
    """Region perturbation of one set of maps: MoRF and the random reference."""

    morf: PerturbationCurve
    random: PerturbationCurve
    patch_size: int
    baseline: str


def region_perturbation(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    heatmaps: np.ndarray,
    *,
    key: jax.Array,
    sign: Any = 1.0,
    target: Any = None,
    patch_size: int = 8,
    baseline: str = "mean",
    baseline_key: jax.Array | None = None,
    steps: int | None = None,
    batch_size: int = 32,
) -> Faithfulness:
    """Region perturbation / pixel flipping (Samek et al. 2017; Quantus `RegionPerturbation`).

    The patches of `patch_size` (1: pixel flipping) are ordered by their summed relevance
    in `heatmaps` [N, H, W], most relevant first, ties by patch index, and replaced one
    after the other by the baseline: "mean" (the image's mean colour, default), "black"
    (0) or "uniform" (0..255 noise from `baseline_key`). After each step the explained
    score (`sign * logit`) is recorded; `key` gives the random order of the reference
    curve (image i: `fold_in(key, i)`). Lower MoRF AUC than the random one: the map
    ranks the regions the score depends on first.
    """
    images = heads.as_input(images)
    heat = np.asarray(heatmaps)
    if heat.shape != images.shape[:3]:
        raise ValueError(f"heatmaps {heat.shape} do not match images {images.shape[:3]}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid baselines: {list(BASELINES)}")
    common = dict(
        sign=sign,
        target=target,
        patch_size=patch_size,
        baseline=baseline,
        baseline_key=baseline_key,
        steps=steps,
        batch_size=batch_size,
    )
    morf = patch_order(heat, patch_size, "morf")
    shuffled = random_patch_order(key, heat.shape[0], morf.shape[1])
    return Faithfulness(
        morf=perturbation_curve(model, variables, images, morf, **common),
        random=perturbation_curve(model, variables, images, shuffled, **common),
        patch_size=patch_size,
        baseline=baseline,
    )


# --------------------------------------------------------------- randomisation


def parameterised_layers(model: nn.Module, variables: Any, images: jax.Array) -> list[str]:
    """The module paths ('conv1', 'block2/sepconv_a/depthwise') of the layers that own
    parameters, in the order the forward pass (inference mode) calls them.

    For the paper's models this is `jaxrepro.train.probe.call_order(...)["layers"]`;
    here any module that owns a parameter counts, and a model need not take `train`.
    """
    owners = {key[:-1] for key in traverse_util.flatten_dict(dict(variables["params"]))}
    called: list[tuple[str, ...]] = []

    def record(next_fun, args, kwargs, context):
        path = tuple(context.module.path)
        if context.method_name == "__call__" and path in owners and path not in called:
            called.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(
            lambda v, x: heads.inference_apply(model, v, x), variables, heads.as_input(images)
        )
    rest = sorted(owners - set(called))  # owners no __call__ reached (setup-only use)
    return ["/".join(p) for p in called + rest]


@functools.partial(jax.jit, static_argnames=("model",))
def init_variables(model: nn.Module, key: jax.Array, images: jax.Array) -> Any:
    """`model.init(key, images)` in inference mode, jitted (one compilation per model and
    shape serves every key: compiling the initialisers' random draws is the slow part)."""
    return model.init(key, images, **heads.inference_kwargs(model))


def cascading_randomisation(
    model: nn.Module, variables: Any, images: jax.Array, *, seed: int = 0
) -> list[tuple[str, Any]]:
    """[(layer, variables)] for k = 1..L: the top k parameterised layers (reverse call
    order) with the parameters `model.init(jax.random.key(seed), ...)` gives them, the
    others as in `variables` (Adebayo et al.'s cascading randomisation).

    Only `params` change: the batch statistics of a randomised batch norm are kept (its
    scale and bias are re-initialised, its running mean and variance stay the trained
    ones). `seed` should not be the one `variables` were initialised from.
    """
    images = heads.as_input(images)
    layers = parameterised_layers(model, variables, images)
    fresh = traverse_util.flatten_dict(
        dict(init_variables(model, jax.random.key(seed), images[:1])["params"])
    )
    current = traverse_util.flatten_dict(dict(variables["params"]))
    out = []
    for layer in reversed(layers):
        owner = tuple(layer.split("/"))
        current = {k: (_like(fresh[k], v) if k[:-1] == owner else v) for k, v in current.items()}
        out.append((layer, {**dict(variables), "params": traverse_util.unflatten_dict(current)}))
    return out


def _like(fresh: jax.Array, trained: jax.Array) -> jax.Array:
    """A re-initialised parameter in the trained one's dtype (shapes must agree)."""
    if fresh.shape != trained.shape:
        raise ValueError(f"init gives shape {fresh.shape} for a parameter of {trained.shape}")
    return jnp.asarray(fresh, trained.dtype)


def _norm(x: np.ndarray) -> float:
    """Euclidean norm in float64 by NumPy's own summation (no BLAS: the same bits on
    every CPU NumPy runs on)."""
    x = np.asarray(x, np.float64).ravel()
    return math.sqrt(float(np.sum(x * x)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (average ranks for ties), float64; NaN when
    either map is constant (no ranking to compare). Identical maps give exactly 1."""
    ra = rankdata(np.asarray(a, np.float64).ravel())
    rb = rankdata(np.asarray(b, np.float64).ravel())
    da, db = ra - ra.mean(), rb - rb.mean()
    saa, sbb = float(np.sum(da * da)), float(np.sum(db * db))
    if saa == 0.0 or sbb == 0.0:
        return math.nan
    return float(np.clip(float(np.sum(da * db)) / math.sqrt(saa * sbb), -1.0, 1.0))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """SSIM (scikit-image, 7x7 uniform window or the largest odd one that fits) with a
    fixed `data_range`, float64; identical maps give exactly 1."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    win = min(7, min(a.shape) - (1 - min(a.shape) % 2))
    if win < 3:
        raise ValueError(f"maps of shape {a.shape} are too small for SSIM (3x3 at least)")
    return float(structural_similarity(a, b, data_range=data_range, win_size=win))


@dataclass(frozen=True)
class Randomisation:
    """Similarity of each map with the original as layers are randomised, top first.

    Step 0 is the model as given; step k has layers[:k] randomised. Maps are divided by
    the original map's largest magnitude before SSIM, whose data range is fixed: 2 for a
    signed method (the original then lies in [-1, 1]), 1 for Grad-CAM ([0, 1]).
    """

    method: str
    layers: tuple[str, ...]  # the layer randomised at steps 1..L, top first
    spearman: np.ndarray  # float64 [L + 1, N]: of the signed maps
    spearman_abs: np.ndarray  # float64 [L + 1, N]: of |map|
    ssim: np.ndarray  # float64 [L + 1, N]
    maps: np.ndarray | None  # [L + 1, N, H, W] with keep_maps: the maps (step 0: original)


def model_parameter_randomisation(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    method: str,
    *,
    sign: Any = 1.0,
    target: Any = None,
    seed: int = 0,
    options: dict | None = None,
    randomised: Sequence[tuple[str, Any]] | None = None,
    keep_maps: bool = False,
) -> Randomisation:
    """Adebayo et al. 2018's cascading model-parameter randomisation check (Quantus
    `ModelParameterRandomisation`, layer order top-down) for one method.

    Each step's map explains the same score (sign, class) as the original, each image in
    a batch of one; `randomised` is `cascading_randomisation(...)` if already computed
    (several methods share it); `keep_maps` keeps every step's maps in the result.
    """
    images = heads.as_input(images)
    if randomised is None:
        randomised = cascading_randomisation(model, variables, images, seed=seed)
    cls = explained_class(model, variables, images, target)
    data_range = 1.0 if method in UNSIGNED else 2.0
    steps = [variables] + [v for _, v in randomised]
    rho, rho_abs, sim = (np.empty((len(steps), images.shape[0])) for _ in range(3))
    kept = []
    for k, step_variables in enumerate(steps):
        maps = explain_one_by_one(
            method, model, step_variables, images, sign=sign, target=cls, options=options
        )
        if k == 0:
            originals = maps.astype(np.float64)
            scales = [_max_magnitude(m) for m in originals]
        for i, (original, scale) in enumerate(zip(originals, scales)):
            heat = maps[i].astype(np.float64)
            rho[k, i] = spearman(original, heat)
            rho_abs[k, i] = spearman(np.abs(original), np.abs(heat))
            sim[k, i] = ssim(original / scale, heat / scale, data_range)
        if keep_maps:
            kept.append(maps)
    return Randomisation(
        method=method,
        layers=tuple(layer for layer, _ in randomised),
        spearman=rho,
        spearman_abs=rho_abs,
        ssim=sim,
        maps=np.stack(kept) if keep_maps else None,
    )


# ------------------------------------------------------------------- Lipschitz


def lipschitz_noise(
    key: jax.Array, index: int, sample: int, shape: tuple[int, ...], dtype: Any
) -> jax.Array:
    """The standard normal draw z of image `index`, sample `sample`:
    `normal(fold_in(fold_in(key, index), sample))`."""
    k = jax.random.fold_in(jax.random.fold_in(key, index), sample)
    return jax.random.normal(k, shape, dtype)


@dataclass(frozen=True)
class Lipschitz:
    """Local Lipschitz estimates of one method on images [N]."""

    method: str
    estimate: np.ndarray  # float64 [N]: max_s ||e(x) - e(x'_s)||_2 / ||x - x'_s||_2
    scaled: np.ndarray  # float64 [N]: the same with both maps divided by max |e(x)|
    ratios: np.ndarray  # float64 [N, S]: every sample's ratio (unscaled)
    sigma: float
    samples: int


def local_lipschitz_estimate(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    method: str,
    *,
    key: jax.Array,
    sign: Any = 1.0,
    target: Any = None,
    num_samples: int = 10,
    sigma: float = 0.1,
    options: dict | None = None,
) -> Lipschitz:
    """Local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018; Quantus
    `LocalLipschitzEstimate`): max over `num_samples` noisy inputs
    x' = x + 255 sigma z (z standard normal, `lipschitz_noise(key, i, s)`; sigma in units
    of the [0, 1] pixel range, as `robustness` defines it; not clipped) of
    ||e(x) - e(x')||_2 / ||x - x'||_2, e(x') explaining the same class as e(x).

    ||x - x'|| is measured in the [0, 1] pixel range (the unit of sigma), so at sigma 0.1
    the denominator is about 0.1 sqrt(H W C). Why next to the thesis's RMSE: the RMSE
    of two maps grows with the size of the perturbation, so its curves compare methods
    only at one sigma; the ratio normalises by how much the input changed, a local
    sensitivity that reads the same at any small sigma, and its max over samples is the
    worst direction found, not one direction. `scaled` divides both maps by the largest
    magnitude of e(x), as the RMSE does, so methods of different units compare.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    images = heads.as_input(images)
    n = images.shape[0]
    signs = np.asarray(heads.signs(sign, n, images.dtype))
    cls = explained_class(model, variables, images, target)
    reference = explain_one_by_one(
        method, model, variables, images, sign=signs, target=cls, options=options
    )
    scale = jnp.asarray(sigma * PIXEL_RANGE, images.dtype)
    ratios = np.empty((n, num_samples))
    scaled = np.empty((n, num_samples))
    for i in range(n):
        ref = reference[i].astype(np.float64)
        top = _max_magnitude(ref)
        for s in range(num_samples):
            z = lipschitz_noise(key, i, s, images.shape[1:], images.dtype)
            noisy = images[i] + scale * z
            heat = explain_one_by_one(
                method,
                model,
                variables,
                noisy[None],
                sign=signs[i : i + 1],
                target=None if cls is None else cls[i : i + 1],
                options=options,
            )[0].astype(np.float64)
            step = (
                _norm(np.asarray(noisy, np.float64) - np.asarray(images[i], np.float64))
                / PIXEL_RANGE
            )
            change = _norm(heat - ref)
            ratios[i, s] = change / step
            scaled[i, s] = change / top / step
    return Lipschitz(
        method=method,
        estimate=ratios.max(axis=1),
        scaled=scaled.max(axis=1),
        ratios=ratios,
        sigma=float(sigma),
        samples=num_samples,
    )

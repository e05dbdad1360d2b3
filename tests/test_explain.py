"""Tests of the explanation methods (jaxrepro.explain), their CLI and the robustness protocol."""

import jaxrepro  # noqa: F401  (sets XLA flags and jax config before jax starts)

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import models
from jaxrepro.explain import METHODS, explain
from jaxrepro.explain import gradcam as gc
from jaxrepro.explain import ig

# Narrow models at sizes where the last conv map is 3x3 (at the CLI's 80 px the
# ConvNet's is 1x1, which would make every Grad-CAM map constant).
TINY_MODELS = {
    "convnet": (lambda: models.ConvNet(filters=(4, 4, 8, 8, 8)), 112),
    "minixception": (lambda: models.MiniXception(sizes=(4, 4, 8, 8, 8), stem_features=4), 96),
}
# Methods that do not need the LRP module (merged separately).
LOCAL_METHODS = ["gradcam", "guided-backprop", "guided-gradcam", "ig"]


@functools.lru_cache(maxsize=None)
def _jitted(name: str):
    """(model, jitted apply) of a narrow model (compiled once per session)."""
    model = TINY_MODELS[name][0]()
    return model, jax.jit(functools.partial(model.apply, train=False))


def _random_leaf(path, shape, rng) -> np.ndarray:
    """Glorot-uniform kernels, small random biases, BN at its initial values."""
    leaf = jax.tree_util.keystr(path)
    if "scale" in leaf or "'var'" in leaf:
        return np.ones(shape, np.float32)
    if "'mean'" in leaf or ("bn_" in leaf and "bias" in leaf):
        return np.zeros(shape, np.float32)
    if "kernel" in leaf:
        limit = np.sqrt(6.0 / (np.prod(shape[:-1]) + shape[-1]))
        return rng.uniform(-limit, limit, shape).astype(np.float32)
    return rng.uniform(-0.1, 0.1, shape).astype(np.float32)


# Seeds whose random weights give a Grad-CAM map with both signs on every image (so
# explaining "dog" and "cat" each highlights something); checked in the sign test.
SEEDS = {"convnet": 1, "minixception": 2}


@functools.lru_cache(maxsize=None)
def tiny(name: str, seed: int | None = None):
    """(model, variables, images [2, S, S, 3] in 0..255) of a narrow random model.

    Weights from an explicit NumPy generator (compiling `init` costs ~5 s a model).
    """
    model, _ = _jitted(name)
    size = TINY_MODELS[name][1]
    rng = np.random.default_rng(SEEDS[name] if seed is None else seed)
    images = jnp.asarray(rng.uniform(0.0, 255.0, (2, size, size, 3)).astype(np.float32))
    shapes = jax.eval_shape(functools.partial(model.init, train=False),
                            jax.random.key(0), images[:1])
    variables = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(_random_leaf(p, s.shape, rng)), shapes)
    return model, variables, images


def logits_of(name, variables, images):
    return _jitted(name)[1](variables, images)


def head_reference(name: str, model, variables, images, sign):
    """A and d(sign*logit)/dA by splitting the model by hand at its last conv."""
    _, state = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))(
        variables, images)
    act = models.flat_intermediates(state["intermediates"])[model.LAST_CONV]
    dense = variables["params"]["dense"]

    def head(a):  # the layers after the last conv, written out
        features = a.reshape(a.shape[0], -1) if name == "convnet" else jnp.mean(a, axis=(1, 2))
        return (features @ dense["kernel"] + dense["bias"])[:, 0]

    logits = jax.jit(head)(act)
    np.testing.assert_allclose(logits, logits_of(name, variables, images), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(jnp.asarray(sign) * head(a))))(act)
    return act, grad


# --------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradcam_matches_hand_written_reference(name, sign):
    model, variables, images = tiny(name)
    act, grad = head_reference(name, model, variables, images, sign)
    assert act.shape[1:3] == (3, 3)
    got_act, got_grad, _ = gc.last_conv_gradient(model, variables, images, sign=sign)
    np.testing.assert_array_equal(got_act, act)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-7)

    weights = grad.mean(axis=(1, 2))                                   # alpha_k
    raw = np.maximum(np.einsum("nhwc,nc->nhw", act, weights), 0.0)     # ReLU(sum alpha A)
    top = raw.max(axis=(1, 2), keepdims=True)
    low = np.where(top > 0, raw / np.where(top > 0, top, 1), 0)
    expected = jax.image.resize(low, (2, *images.shape[1:3]), method="linear")
    heat = gc.gradcam(model, variables, images, sign=sign)
    assert heat.shape == (2, *images.shape[1:3]) and heat.dtype == jnp.float32
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_gradcam_sign_flips_which_channels_count(name):
    model, variables, images = tiny(name)
    act, g_dog, _ = gc.last_conv_gradient(model, variables, images, sign=1.0)
    _, g_cat, _ = gc.last_conv_gradient(model, variables, images, sign=-1.0)
    np.testing.assert_array_equal(g_cat, -g_dog)
    dog, cat = gc.cam(act, g_dog), gc.cam(act, g_cat)
    # ReLU(s) and ReLU(-s): both non-empty here, never positive at the same place.
    assert np.all(np.asarray(dog).max(axis=(1, 2)) > 0)
    assert np.all(np.asarray(cat).max(axis=(1, 2)) > 0)
    assert not np.any((np.asarray(dog) > 0) & (np.asarray(cat) > 0))
    heat_dog = gc.gradcam(model, variables, images, sign=1.0)
    heat_cat = gc.gradcam(model, variables, images, sign=-1.0)
    assert np.abs(np.asarray(heat_dog) - np.asarray(heat_cat)).max() > 0.1
    # A per-image sign explains each image's own class.
    mixed = gc.gradcam(model, variables, images, sign=jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(mixed[0], heat_dog[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], heat_cat[1], atol=1e-6)


def test_gradcam_all_zero_map_stays_zero_and_max_is_one():
    maps = jnp.array([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [1.0, 0.5]]])
    out = np.asarray(gc.normalise_max(maps))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1], [[0.0, 1.0], [0.5, 0.25]])


def test_gradcam_rejects_an_unknown_model():
    with pytest.raises(ValueError, match="known models"):
        gc.cut_of(models.SeparableConv(4))


# --------------------------------------------------------------- guided backprop


def test_guided_relu_backward_zeroes_negative_gradients_and_inputs():
    x = jnp.array([-1.0, 2.0, 3.0, -4.0, 5.0])
    upstream = jnp.array([5.0, -6.0, 7.0, 8.0, 0.0])
    y, vjp = jax.vjp(gc.guided_relu, x)
    np.testing.assert_array_equal(y, [0.0, 2.0, 3.0, 0.0, 5.0])
    np.testing.assert_array_equal(vjp(upstream)[0], [0.0, 0.0, 7.0, 0.0, 0.0])
    # the plain ReLU passes the negative gradient at a positive input
    np.testing.assert_array_equal(jax.vjp(jax.nn.relu, x)[1](upstream)[0],
                                  [0.0, -6.0, 7.0, 0.0, 0.0])


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_guided_backprop_is_not_the_plain_gradient(name):
    model, variables, images = tiny(name)
    guided = gc.guided_backprop_attribution(model, variables, images)
    plain = jax.jit(jax.grad(lambda x: jnp.sum(logits_of(name, variables, x))))(images)
    assert guided.shape == images.shape
    assert np.abs(np.asarray(guided)).max() > 0
    assert not np.allclose(guided, plain)
    np.testing.assert_allclose(gc.guided_backprop(model, variables, images),
                               np.asarray(guided).sum(-1), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_guided_gradcam_is_guided_backprop_times_gradcam(name):
    model, variables, images = tiny(name)
    sign = jnp.array([1.0, -1.0])
    product = (np.asarray(gc.guided_backprop(model, variables, images, sign=sign))
               * np.asarray(gc.gradcam(model, variables, images, sign=sign)))
    got = gc.guided_gradcam(model, variables, images, sign=sign)
    np.testing.assert_allclose(got, product, rtol=1e-6, atol=1e-12)
    assert np.abs(product).max() > 0


# ---------------------------------------------------------- integrated gradients


def _analytic(x):
    """A smooth non-linear function, one value per example."""
    flat = x.reshape(x.shape[0], -1)
    return jnp.sum(jnp.sin(flat) ** 2 + 0.1 * flat ** 3 + flat[:, :1] * flat, axis=1)


@pytest.mark.parametrize("rule", ig.RULES)
def test_ig_completeness_on_an_analytic_function(rule):
    x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 3), minval=-1.0, maxval=1.0)
    baseline = jnp.full_like(x, 0.25)
    gap = np.asarray(_analytic(x) - _analytic(baseline))
    errors = []
    for steps in (4, 16, 64):
        attr = ig.integrated_gradients_fn(_analytic, x, baseline, steps=steps, rule=rule)
        errors.append(np.abs(np.asarray(attr.sum(axis=(1, 2, 3))) - gap).max())
    assert errors[2] < 2e-3 * np.abs(gap).max()
    assert errors[0] > errors[1] > errors[2]          # O(1/steps^2): about 16x per step
    assert errors[0] / errors[2] > 100


def test_ig_is_exact_for_a_linear_function():
    w = jax.random.normal(jax.random.key(1), (2 * 3 * 3,))
    f = lambda x: x.reshape(x.shape[0], -1) @ w  # noqa: E731
    x = jax.random.normal(jax.random.key(2), (2, 2, 3, 3))
    attr = ig.integrated_gradients_fn(f, x, steps=3)
    np.testing.assert_allclose(attr, x * w.reshape(2, 3, 3), rtol=1e-5, atol=1e-6)


def test_ig_quadrature_weights():
    a, w = ig.quadrature(4, "trapezoid")
    np.testing.assert_array_equal(a, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_array_equal(w, [0.125, 0.25, 0.25, 0.25, 0.125])
    a, w = ig.quadrature(2, "midpoint")
    np.testing.assert_array_equal(a, [0.25, 0.75])
    np.testing.assert_array_equal(w, [0.5, 0.5])
    with pytest.raises(ValueError):
        ig.quadrature(0)


def test_ig_completeness_error_on_the_convnet_shrinks_with_steps():
    model, variables, images = tiny("convnet")
    sign = jnp.array([1.0, -1.0])
    gap = sign * (logits_of("convnet", variables, images)
                  - logits_of("convnet", variables, jnp.zeros_like(images)))
    errors = [np.abs(np.asarray(ig.integrated_gradients(model, variables, images, sign=sign,
                                                        steps=steps).sum(axis=(1, 2)) - gap))
              for steps in (2, 16, 128)]
    assert np.all(errors[0] > errors[1]) and np.all(errors[1] > errors[2])
    assert np.all(errors[2] < 0.02 * np.abs(np.asarray(gap)))


def test_ig_chunking_does_not_change_what_is_integrated():
    model, variables, images = tiny("convnet")
    a = ig.integrated_gradients(model, variables, images, steps=6, chunk=7)
    b = ig.integrated_gradients(model, variables, images, steps=6, chunk=2)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- bits


@pytest.mark.parametrize("method", LOCAL_METHODS)
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_each_method_gives_the_same_bits_twice(method, name):
    model, variables, images = tiny(name)
    options = {"steps": 4} if method == "ig" else {}
    first = explain(method, model, variables, images, sign=-1.0, **options)
    again = explain(method, model, variables, jnp.array(np.asarray(images)), sign=-1.0,
                    **options)
    assert first.shape == images.shape[:3] and first.dtype == jnp.float32
    assert np.abs(np.asarray(first)).max() > 0
    chex.assert_trees_all_equal(first, again)


def test_registry_names_every_method():
    assert sorted(METHODS) == sorted([*LOCAL_METHODS, "lrp"])
    with pytest.raises(ValueError, match="valid methods"):
        explain("saliency", *tiny("convnet"))

"""Explanations of a user's own Flax model, with nothing registered.

The model is the issue's example (conv -> BN, conv -> BN -> relu -> pool, dense -> BN):
LRP must equal LRP of the same model with every batch norm folded into the layer before
it by hand, for every named composite, in float32 and float64; every method must take
[N] and [N, 1] heads and float64 inputs, and a multi-class head by class index.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bitwise_equal

from jaxrepro import explain
from jaxrepro.explain import gradcam as gc
from jaxrepro.explain import heads
from jaxrepro.explain import lrp as L

SIZE = 12


class UserNet(nn.Module):
    """A user's model: no spec, no `activation` field, no `train` argument."""

    classes: int = 1  # 1: an [N, 1] head; 0: an [N] head; C > 1: C logits
    barrier: bool = False  # a no-op between conv1 and bn1, so bn1 cannot merge

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(6, (3, 3), name="conv1")(x)
        if self.barrier:
            x = x * 1.0
        x = nn.BatchNorm(use_running_average=True, name="bn1")(x)  # conv -> BN
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), name="conv2")(x)
        x = nn.BatchNorm(use_running_average=True, use_scale=False, name="bn2")(x)
        x = nn.relu(x)  # conv -> BN -> relu -> pool
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(10, name="dense1")(x)
        x = nn.BatchNorm(use_running_average=True, name="bn3")(x)  # dense -> BN
        x = nn.relu(x)
        x = nn.Dense(max(self.classes, 1), name="head")(x)
        return x[:, 0] if self.classes == 0 else x


class FoldedNet(nn.Module):
    """UserNet with each batch norm folded into the layer before it (by hand below)."""

    classes: int = 1

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(10, name="dense1")(x))
        x = nn.Dense(max(self.classes, 1), name="head")(x)
        return x[:, 0] if self.classes == 0 else x


def _variables(model, dtype):
    """Variables with batch-norm statistics and affine parameters far from their init."""
    x = jnp.zeros((1, SIZE, SIZE, 3), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(3)

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        if "bn" in name and name.endswith("['var']"):
            return rng.uniform(0.3, 2.5, a.shape)
        if "bn" in name and name.endswith("['scale']"):
            return rng.uniform(-1.5, 2.0, a.shape)
        if name.endswith(("['mean']", "['bias']")):
            return 0.3 * rng.normal(size=a.shape)
        return np.asarray(a, np.float64)

    tree = jax.tree_util.tree_map_with_path(leaf, jax.tree.map(np.asarray, variables))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)


def _fold_by_hand(variables):
    """FoldedNet's params from UserNet's: W' = W * s, b' = b * s + t, in float64 numpy."""
    params, stats = variables["params"], variables["batch_stats"]
    out = {"head": dict(params["head"])}
    for layer, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("dense1", "bn3")):
        w, b = np.asarray(params[layer]["kernel"]), np.asarray(params[layer]["bias"])
        dtype = w.dtype
        s = 1.0 / np.sqrt(np.asarray(stats[bn]["var"], np.float64) + 1e-5)
        if "scale" in params[bn]:
            s = s * np.asarray(params[bn]["scale"], np.float64)
        t = np.asarray(params[bn]["bias"], np.float64) - np.asarray(stats[bn]["mean"]) * s
        out[layer] = {
            "kernel": jnp.asarray(w.astype(np.float64) * s, dtype),
            "bias": jnp.asarray(b.astype(np.float64) * s + t, dtype),
        }
    return {"params": out}


def _images(dtype, n=2):
    rng = np.random.default_rng(5)
    return jnp.asarray(rng.uniform(0.0, 1.0, (n, SIZE, SIZE, 3)), dtype)


@functools.cache
def _jitted(model, composite):
    return jax.jit(lambda v, x: L.attribute(model, v, x, composite=composite))


@pytest.mark.parametrize("composite", sorted(L.COMPOSITES))
def test_lrp_merges_batch_norms_as_folding_by_hand_float32(composite):
    model, folded_model = UserNet(), FoldedNet()
    variables = _variables(model, jnp.float32)
    images = _images(jnp.float32)
    rel = _jitted(model, composite)(variables, images)
    ref = _jitted(folded_model, composite)(_fold_by_hand(variables), images)
    assert rel.dtype == jnp.float32 and float(jnp.abs(ref).max()) > 0
    # Measured: 1.7e-7 (lrp0) to 5.4e-7 of the largest relevance, 4.4e-6 for epsilon (its
    # 1e-6 stabiliser amplifies rounding where z is near 0). With bn1 unmerged, the maps
    # move by 0.95 to 2.0 of it (the composites below), 0.002 (epsilon), 0 (lrp0).
    np.testing.assert_allclose(rel, ref, rtol=0, atol=1e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("composite", ["epsilon-plus-flat", "epsilon-gamma-box", "alpha2-beta1"])
def test_without_merging_the_maps_would_differ(composite):
    """The check above can fail: with a no-op between conv1 and bn1, bn1 is not merged
    (and named in the warning) and gets its own rule, and the map moves by far more."""
    model = UserNet(barrier=True)
    variables = _variables(model, jnp.float32)
    images = _images(jnp.float32)
    with pytest.warns(UserWarning, match="bn1"):
        plan = L.batchnorm_plan(model, variables, images)
        unmerged = L.attribute(model, variables, images, composite=composite)
    assert plan.unmerged == ("bn1",)
    assert plan.merged == (("conv2", "bn2"), ("dense1", "bn3"))
    merged = _jitted(UserNet(), composite)(variables, images)
    gap = float(jnp.abs(unmerged - merged).max() / jnp.abs(merged).max())
    assert gap > 1e-2, gap


def test_lrp_merges_batch_norms_as_folding_by_hand_float64():
    """Float64: the merge is exact to float64 rounding (measured: at most 7.4e-15 of the
    largest relevance, epsilon; 4e-16 to 8e-16 for the others). Run op by op: XLA takes
    7 to 29 s to compile each float64 LRP pass of this model, the eager ops a few ms."""
    with jax.enable_x64(True), jax.disable_jit():
        model, folded_model = UserNet(), FoldedNet()
        variables = _variables(model, jnp.float64)
        images = _images(jnp.float64)
        assert L.batchnorm_plan(model, variables, images).merged == (
            ("conv1", "bn1"),
            ("conv2", "bn2"),
            ("dense1", "bn3"),
        )
        for composite in sorted(L.COMPOSITES):
            rel = L.attribute(model, variables, images, composite=composite)
            ref = L.attribute(folded_model, _fold_by_hand(variables), images, composite=composite)
            assert rel.dtype == jnp.float64
            np.testing.assert_allclose(
                rel, ref, rtol=0, atol=1e-12 * float(jnp.abs(ref).max()), err_msg=composite
            )


@pytest.mark.parametrize("method", sorted(explain.METHODS))
def test_every_method_takes_n_and_n1_heads_alike(method):
    images = _images(jnp.float32)
    variables = _variables(UserNet(classes=1), jnp.float32)
    flat = explain.explain(method, UserNet(classes=0), variables, images, sign=-1.0, steps=4)
    column = explain.explain(method, UserNet(classes=1), variables, images, sign=-1.0, steps=4)
    assert flat.shape == images.shape[:3]
    assert_bitwise_equal(flat, column)
    assert float(jnp.abs(flat).max()) > 0


@pytest.mark.parametrize("method", sorted(explain.METHODS))
def test_every_method_runs_in_float64(method):
    with jax.enable_x64(True):
        model = UserNet()
        variables = _variables(model, jnp.float64)
        images = _images(jnp.float64, n=1)
        # jitted, as users call them; LRP with its cheapest composite to compile in float64
        heat = explain.explain(method, model, variables, images, steps=4, composite="epsilon")
        assert heat.dtype == jnp.float64 and heat.shape == images.shape[:3]
        assert np.all(np.isfinite(heat)) and float(jnp.abs(heat).max()) > 0


def _bias_free(variables):
    return jax.tree_util.tree_map_with_path(
        lambda p, a: (
            jnp.zeros_like(a) if jax.tree_util.keystr(p).endswith(("['bias']", "['mean']")) else a
        ),
        variables,
    )


def test_lrp0_conserves_to_float64_rounding():
    """Float64 end to end: on the bias-free model LRP-0 gives all of the logit to the
    input, to float64 rounding (float32 would leave about 1e-7)."""
    with jax.enable_x64(True), jax.disable_jit():
        model = UserNet(classes=0)
        variables = _bias_free(_variables(model, jnp.float64))
        images = _images(jnp.float64)
        rel = L.attribute(model, variables, images, composite="lrp0")
        logits = model.apply(variables, images)
        np.testing.assert_allclose(rel.sum(axis=(1, 2, 3)), logits, rtol=1e-12)


def test_multi_class_head_explains_the_class_asked_for():
    model = UserNet(classes=3)
    variables = _variables(model, jnp.float32)
    images = _images(jnp.float32)
    logits = model.apply(variables, images)
    predicted = jnp.argmax(logits, axis=-1)
    for method in sorted(explain.METHODS):
        default = explain.explain(method, model, variables, images, steps=4)
        asked = explain.explain(method, model, variables, images, target=predicted, steps=4)
        assert_bitwise_equal(default, asked)
        if method == "guided-gradcam":  # a product with Grad-CAM, which is all zero here
            continue
        other = explain.explain(
            method, model, variables, images, target=(predicted + 1) % 3, steps=4
        )
        assert not np.array_equal(np.asarray(other), np.asarray(default)), method


def test_multi_class_lrp_relevance_sums_to_the_chosen_logit():
    """LRP-0 conserves the chosen logit minus what the biases absorb; with the biases of
    a bias-free variant of the model it is exactly the chosen class's logit."""
    model = UserNet(classes=3)
    variables = _variables(model, jnp.float32)
    zero_bias = jax.tree_util.tree_map_with_path(
        lambda p, a: (
            jnp.zeros_like(a) if jax.tree_util.keystr(p).endswith(("['bias']", "['mean']")) else a
        ),
        variables,
    )
    images = _images(jnp.float32)
    logits = model.apply(zero_bias, images)
    for k in range(3):
        rel = L.attribute(model, zero_bias, images, target=k, composite="lrp0")
        np.testing.assert_allclose(rel.sum(axis=(1, 2, 3)), logits[:, k], rtol=1e-4)


def test_gradcam_layer_default_and_by_name():
    model = UserNet()
    variables = _variables(model, jnp.float32)
    images = _images(jnp.float32)
    assert gc.conv_like_layers(model, variables, images) == ["conv1", "bn1", "conv2", "bn2"]
    assert gc.gradcam_layer(model, variables, images) == "bn2"
    default = gc.gradcam(model, variables, images)
    named = gc.gradcam(model, variables, images, layer="bn2")
    assert_bitwise_equal(default, named)
    early = gc.gradcam(model, variables, images, layer="conv1")
    assert not np.array_equal(np.asarray(early), np.asarray(default))
    with pytest.raises(gc.LayerError, match="candidates.*conv1, bn1, conv2, bn2"):
        gc.gradcam(model, variables, images, layer="conv9")


def test_gradcam_at_a_module_output_is_the_keras_recipe():
    """Grad-CAM at `bn2` by hand: A is bn2's output, its gradient by jax.grad through the
    rest of the model, written out layer by layer for this model."""
    model = UserNet(classes=0)
    variables = _variables(model, jnp.float32)
    images = _images(jnp.float32, n=1)
    p, st = variables["params"], variables["batch_stats"]

    def conv(name, x):
        return nn.Conv(p[name]["kernel"].shape[-1], (3, 3)).apply({"params": p[name]}, x)

    def dense(name, x):
        return nn.Dense(p[name]["kernel"].shape[-1]).apply({"params": p[name]}, x)

    def bn(name, x):
        norm = nn.BatchNorm(use_running_average=True, use_scale="scale" in p[name])
        return norm.apply({"params": p[name], "batch_stats": st[name]}, x)

    def rest(a):
        x = nn.max_pool(nn.relu(a), (2, 2), (2, 2)).reshape((1, -1))
        return dense("head", nn.relu(bn("bn3", dense("dense1", x))))[:, 0].sum()

    a = bn("bn2", conv("conv2", nn.relu(bn("bn1", conv("conv1", images)))))
    weights = jax.grad(rest)(a).mean(axis=(1, 2))
    cam = nn.relu(jnp.einsum("nhwc,nc->nhw", a, weights))
    expected = jax.image.resize(cam / cam.max(), (1, SIZE, SIZE), "linear")
    got = gc.gradcam(model, variables, images)
    assert float(cam.max()) > 0
    np.testing.assert_allclose(got, np.clip(expected, 0, 1), atol=1e-5)


def test_guided_backprop_guides_the_relus_of_a_model_without_activation_field():
    model = UserNet(classes=0)
    variables = _variables(model, jnp.float32)
    images = _images(jnp.float32)
    guided = gc.guided_backprop_attribution(model, variables, images)
    plain = jax.grad(lambda x: model.apply(variables, x).sum())(images)
    assert not np.allclose(guided, plain)  # the ReLUs were swapped
    assert nn.relu is jax.nn.relu  # and put back


def test_guided_backprop_refuses_a_model_without_relu():
    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x.reshape((x.shape[0], -1)))

    model = Linear()
    images = _images(jnp.float32)
    variables = model.init(jax.random.key(0), images)
    with pytest.raises(ValueError, match="no ReLU"):
        gc.guided_backprop(model, variables, images)


def test_inference_keywords_follow_the_call_signature():
    class WithTrain(nn.Module):
        def __call__(self, x, train: bool = True):
            return x

    class WithDeterministic(nn.Module):
        def __call__(self, x, deterministic: bool = False):
            return x

    assert heads.inference_kwargs(WithTrain()) == {"train": False}
    assert heads.inference_kwargs(WithDeterministic()) == {"deterministic": True}
    assert heads.inference_kwargs(UserNet()) == {}

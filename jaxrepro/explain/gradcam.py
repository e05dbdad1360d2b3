"""Grad-CAM, Guided Backprop and Guided Grad-CAM for the project's Flax models.

Grad-CAM (Selvaraju et al.; the keras.io example; Heggen's thesis, section 3.2.2):
the gradient of the explained score w.r.t. the last convolutional activation A (the
model spec's `gradcam` layer, `jaxrepro.models.spec`), averaged over space, weights the
channels of A; the weighted sum,
through a ReLU, normalised by its maximum (an all-zero map stays zero) and upsampled
bilinearly to the input size, is the heatmap, in [0, 1].

The explained score is `sign * logit`: the models' head is one logit (> 0: "dog"), so
`sign=+1` explains "dog" and `sign=-1` explains "cat"; flipping the sign flips the
channel weights, so the two maps have disjoint support before upsampling.

How the gradient w.r.t. A is taken: the model is not split by hand. While the model
runs, a Flax method interceptor (`nn.intercept_methods`) adds a zero perturbation
`delta` at the point where A flows on (the spec's `GradcamLayer`), and `jax.grad` w.r.t. `delta` is
the gradient w.r.t. A; A itself is read from the sown `intermediates`. This is what
Flax's `Module.perturb` does, without having to add a `perturb` call to the models.

Guided Backprop (Springenberg et al.): the gradient of the score w.r.t. the input
pixels, where every ReLU passes back only positive gradients at positive inputs
(`guided_relu`, swapped in by `model.clone(activation=guided_relu)`). Guided Grad-CAM
multiplies it with the upsampled Grad-CAM map. Both are summed over the colour
channels for the [N, H, W] heatmap (a per-pixel factor commutes with that sum).

The model-sized work (`last_conv_gradient`, `guided_backprop_attribution`) is jitted
with the model as a static argument, and the rest composed from small jitted or
elementwise steps, so each model compiles once per shape; same inputs, same bits.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrepro import models
from jaxrepro.models.spec import GradcamLayer


def gradcam_layer(model: nn.Module) -> GradcamLayer:
    """Where `model`'s Grad-CAM activation flows on (a ValueError for an unregistered model)."""
    spec = models.spec_of(model)
    if spec is None:
        raise ValueError(
            f"Grad-CAM does not know {type(model).__name__}'s last conv "
            f"activation; registered models: {sorted(models.SPECS)}"
        )
    return spec.gradcam


def _signs(sign: Any, n: int) -> jax.Array:
    """`sign` (a number or [N] array of +-1) as float32 [N]."""
    return jnp.broadcast_to(jnp.asarray(sign, jnp.float32), (n,))


def signs_first(jitted):
    """Call `jitted` with `sign` as a float32 [N] array, whatever form it was given in.

    So a float sign and an array sign share one compilation.
    """

    @functools.wraps(jitted)
    def call(model, variables, images, *, sign: Any = 1.0, **options):
        images = jnp.asarray(images, jnp.float32)
        return jitted(model, variables, images, sign=_signs(sign, images.shape[0]), **options)

    return call


def _apply_perturbed(
    model: nn.Module, variables: Any, images: jax.Array, delta: jax.Array | None
) -> tuple[jax.Array, dict]:
    """Logits and sown intermediates, with `delta` added to A at the model's cut."""
    cut = gradcam_layer(model)
    hits = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            delta is None
            or context.method_name != "__call__"
            or module.scope is None
            or tuple(module.scope.path) != (cut.module,)
        ):
            return next_fun(*args, **kwargs)
        hits.append(cut)
        if cut.where == "input":
            x = args[0]
            return next_fun(x + delta.reshape(x.shape), *args[1:], **kwargs)
        return next_fun(*args, **kwargs) + delta

    with nn.intercept_methods(interceptor):
        logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    if delta is not None and len(hits) != 1:  # else the gradient would be silently 0
        raise ValueError(
            f"{type(model).__name__}: the Grad-CAM layer {cut} was met "
            f"{len(hits)} times, not once; correct the model's spec"
        )
    return logits, models.flat_intermediates(state["intermediates"])


@signs_first
@functools.partial(jax.jit, static_argnames=("model",))
def last_conv_gradient(
    model: nn.Module, variables: Any, images: jax.Array, *, sign: Any = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A, d(sign*logit)/dA, logits) for images [N, H, W, 3]; A is [N, h, w, c]."""
    images = jnp.asarray(images, jnp.float32)
    signs = _signs(sign, images.shape[0])
    name = gradcam_layer(model).activation
    shape = jax.eval_shape(lambda: _apply_perturbed(model, variables, images, None))[1]
    delta0 = jnp.zeros(shape[name].shape, jnp.float32)

    def score(delta):
        logits, acts = _apply_perturbed(model, variables, images, delta)
        return jnp.sum(signs * logits), (acts[name], logits)

    grad, (activation, logits) = jax.grad(score, has_aux=True)(delta0)
    return activation, grad, logits


def cam(activation: jax.Array, gradient: jax.Array) -> jax.Array:
    """ReLU(sum_k alpha_k A^k), alpha_k = spatial mean of the gradient: [N, h, w].

    Unnormalised, at the resolution of A (the thesis's equation for L_Grad-CAM).
    """
    weights = jnp.mean(gradient, axis=(1, 2))  # [N, c]
    return nn.relu(jnp.einsum("nhwc,nc->nhw", activation, weights))


def normalise_max(maps: jax.Array) -> jax.Array:
    """Each map divided by its maximum; a map with no positive value becomes all zero."""
    top = jnp.max(maps, axis=(1, 2), keepdims=True)
    return jnp.where(top > 0, maps / jnp.where(top > 0, top, 1.0), 0.0)


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of maps [N, h, w] to [N, *size] (jax.image.resize, 'linear')."""
    n = maps.shape[0]
    return jax.image.resize(maps, (n, *size), method="linear")


@functools.partial(jax.jit, static_argnames=("size",))
def heatmap_from(activation: jax.Array, gradient: jax.Array, size: tuple[int, int]) -> jax.Array:
    """The Grad-CAM heatmap [N, *size] in [0, 1] of A and dScore/dA."""
    maps = normalise_max(cam(activation, gradient))
    # Bilinear weights are convex, but their rounding may overshoot 1 by an ulp.
    return jnp.clip(upsample(maps, size), 0.0, 1.0)


def gradcam(model: nn.Module, variables: Any, images: jax.Array, *, sign: Any = 1.0) -> jax.Array:
    """Grad-CAM heatmaps [N, H, W] in [0, 1] at the input size, explaining sign*logit."""
    activation, gradient, _ = last_conv_gradient(model, variables, images, sign=sign)
    return heatmap_from(activation, gradient, tuple(jnp.shape(images)[1:3]))


# --------------------------------------------------------------- guided backprop


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass keeps only positive gradients at positive inputs."""
    return nn.relu(x)


def _guided_relu_fwd(x):
    return nn.relu(x), x


def _guided_relu_bwd(x, g):
    return (jnp.where((g > 0) & (x > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


@signs_first
@functools.partial(jax.jit, static_argnames=("model",))
def guided_backprop_attribution(
    model: nn.Module, variables: Any, images: jax.Array, *, sign: Any = 1.0
) -> jax.Array:
    """Guided gradient of sign*logit w.r.t. the input pixels (0..255): [N, H, W, 3]."""
    images = jnp.asarray(images, jnp.float32)
    signs = _signs(sign, images.shape[0])
    guided = model.clone(activation=guided_relu)

    def score(x):
        return jnp.sum(signs * guided.apply(variables, x, train=False))

    return jax.grad(score)(images)


@jax.jit
def _channel_sum(attribution: jax.Array) -> jax.Array:
    return jnp.sum(attribution, axis=-1)


def guided_backprop(
    model: nn.Module, variables: Any, images: jax.Array, *, sign: Any = 1.0
) -> jax.Array:
    """Guided Backprop heatmap [N, H, W]: the guided gradient summed over channels."""
    return _channel_sum(guided_backprop_attribution(model, variables, images, sign=sign))


def guided_gradcam(
    model: nn.Module, variables: Any, images: jax.Array, *, sign: Any = 1.0
) -> jax.Array:
    """Guided Grad-CAM heatmap [N, H, W]: Guided Backprop times the upsampled Grad-CAM."""
    return guided_backprop(model, variables, images, sign=sign) * gradcam(
        model, variables, images, sign=sign
    )

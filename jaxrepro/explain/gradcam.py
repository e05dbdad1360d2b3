"""Grad-CAM, Guided Backprop and Guided Grad-CAM for any Flax Linen model.

Grad-CAM (Selvaraju et al.; the keras.io example; Heggen's thesis, section 3.2.2):
the gradient of the explained score w.r.t. a convolutional activation A, averaged over
space, weights the channels of A; the weighted sum, through a ReLU, normalised by its
maximum (an all-zero map stays zero) and upsampled bilinearly to the input size, is the
heatmap, in [0, 1].

Which A (`gradcam_layer`): for the paper's models, the layer their spec names
(`jaxrepro.models`); for any other model, the last conv-like layer in call order (the
last submodule whose call returns an [N, h, w, c] array; a block comes after the
convolutions inside it), or the module path given as `layer=`; a path the model does
not have is an error listing the candidates. Flax activations are functions, not
modules, so a module path means that module's output: name a block (or a module that
applies its own activation) to take A after its ReLU, as pytorch-grad-cam users name
`layer4[-1]`.

The explained score is `jaxrepro.explain.heads.score`: `sign * logit` for a one-logit
head ([N] or [N, 1]; the paper's models: `sign=+1` explains "dog", `-1` "cat"; flipping
the sign flips the channel weights, so the two maps have disjoint support before
upsampling), or the logit of class `target` of a multi-class head (default: the
predicted class).

How the gradient w.r.t. A is taken: the model is not split by hand. While the model
runs, a Flax method interceptor (`nn.intercept_methods`) adds a zero perturbation
`delta` where A flows on, and `jax.grad` w.r.t. `delta` is the gradient w.r.t. A. This
is what Flax's `Module.perturb` does, without having to add a `perturb` call to the
model.

Guided Backprop (Springenberg et al.): the gradient of the score w.r.t. the input,
where every ReLU passes back only positive gradients at positive inputs (`guided_relu`:
swapped in by `model.clone(activation=guided_relu)` where the model has an `activation`
field, else for `flax.linen.relu` / `jax.nn.relu` while the model is traced). Guided
Grad-CAM multiplies it with the upsampled Grad-CAM map. Both are summed over the colour
channels for the [N, H, W] heatmap (a per-pixel factor commutes with that sum).

Dtypes follow the input: float64 images (with `jax_enable_x64`) give float64 maps.
The model-sized work (`last_conv_gradient`, `guided_backprop_attribution`) is jitted
with the model as a static argument, and the rest composed from small jitted or
elementwise steps, so each model compiles once per shape; same inputs, same bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrepro import models
from jaxrepro.errors import UserError
from jaxrepro.explain import heads
from jaxrepro.models.spec import GradcamLayer


class LayerError(UserError, ValueError):
    """A Grad-CAM layer that the model does not have; the message lists the candidates."""


def conv_like_layers(model: nn.Module, variables: Any, images: jax.Array) -> list[str]:
    """Module paths whose call returns a 4-D [N, h, w, c] array, in the order the calls
    return (a block after the convolutions inside it): Grad-CAM's candidate layers.

    Found by tracing `model` on `images` (shapes only).
    """
    found: list[str] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and module.scope is not None and module.path:
            path = "/".join(module.path)
            if getattr(out, "ndim", None) == 4 and path not in found:
                found.append(path)
        return out

    def forward(v, x):
        with nn.intercept_methods(record):
            return heads.inference_apply(model, v, x)

    jax.eval_shape(forward, variables, heads.as_input(images))
    return found


def gradcam_layer(
    model: nn.Module,
    variables: Any = None,
    images: jax.Array | None = None,
    layer: str | None = None,
) -> GradcamLayer | str:
    """Where Grad-CAM's activation A is taken.

    `layer=None`: the model spec's layer for the registered models (`jaxrepro.models`: a
    `GradcamLayer` for the paper's two, a module path for the ImageNet networks), else
    the last conv-like layer in call order (`conv_like_layers`; needs `variables` and
    `images`). `layer` a module path ('block3', 'features/conv4'): that module's output.
    The spec's activation name ('conv5_out') also selects the spec's layer. A path the
    model does not have raises `LayerError` listing the candidates.
    """
    spec = models.spec_of(model)
    if spec is not None:
        own = spec.gradcam.activation if isinstance(spec.gradcam, GradcamLayer) else spec.gradcam
        if layer in (None, own):
            return spec.gradcam
    if variables is None or images is None:
        raise ValueError(
            f"{type(model).__name__} has no model spec: finding its Grad-CAM layer "
            "needs the variables and images to trace it"
        )
    candidates = conv_like_layers(model, variables, images)
    if layer is None:
        if not candidates:
            raise LayerError(
                f"{type(model).__name__}: no submodule returns a 4-D [N, h, w, c] "
                "activation, so there is no conv-like layer for Grad-CAM"
            )
        return candidates[-1]
    if layer not in candidates:
        raise LayerError(
            f"{type(model).__name__} has no conv-like layer {layer!r}; candidates "
            f"(module paths, in call order): {', '.join(candidates) or 'none'}"
        )
    return layer


def signs_first(jitted):
    """Call `jitted` with `sign` as an [N] array of the images' dtype and `target` as
    int32 [N] or None, whatever form they were given in.

    So a float sign and an array sign share one compilation.
    """

    @functools.wraps(jitted)
    def call(model, variables, images, *, sign: Any = 1.0, target: Any = None, **options):
        images = heads.as_input(images)
        n = images.shape[0]
        return jitted(
            model,
            variables,
            images,
            sign=heads.signs(sign, n, images.dtype),
            target=heads.targets(target, n),
            **options,
        )

    return call


def _at(module: nn.Module, path: str | tuple[str, ...]) -> bool:
    target = tuple(path.split("/")) if isinstance(path, str) else path
    return module.scope is not None and tuple(module.scope.path) == target


def _apply_perturbed(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    delta: jax.Array | None,
    cut: GradcamLayer | str,
) -> tuple[jax.Array, dict]:
    """Logits and the activations by name, with `delta` added to A at the cut.

    A spec's cut reads A from the sown `intermediates`; a module path's cut is that
    module's output, returned under its path.
    """
    hits = []
    taken: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(cut, str):
            if not _at(module, cut):
                return next_fun(*args, **kwargs)
            hits.append(cut)
            out = next_fun(*args, **kwargs)
            taken[cut] = out
            return out if delta is None else out + delta
        if delta is None or not _at(module, (cut.module,)):
            return next_fun(*args, **kwargs)
        hits.append(cut)
        if cut.where == "input":
            x = args[0]
            return next_fun(x + delta.reshape(x.shape), *args[1:], **kwargs)
        return next_fun(*args, **kwargs) + delta

    with nn.intercept_methods(interceptor):
        logits, state = heads.inference_apply(model, variables, images, mutable=["intermediates"])
    if (delta is not None or isinstance(cut, str)) and len(hits) != 1:
        # else the gradient would be silently 0 (or summed over several calls)
        raise LayerError(
            f"{type(model).__name__}: the Grad-CAM layer {cut} was met "
            f"{len(hits)} times, not once; choose another layer"
        )
    acts = models.flat_intermediates(flax.core.unfreeze(state).get("intermediates", {}))
    return logits, {**acts, **taken}


@signs_first
@functools.partial(jax.jit, static_argnames=("model", "layer"))
def last_conv_gradient(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    sign: Any = 1.0,
    target: Any = None,
    layer: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A, dScore/dA, logits) for images [N, H, W, C]; A is [N, h, w, c].

    The score is `heads.score` (`sign * logit`, or the logit of class `target`).
    """
    cut = gradcam_layer(model, variables, images, layer)
    name = cut.activation if isinstance(cut, GradcamLayer) else cut
    shape = jax.eval_shape(lambda: _apply_perturbed(model, variables, images, None, cut))[1]
    delta0 = jnp.zeros(shape[name].shape, shape[name].dtype)

    def score(delta):
        logits, acts = _apply_perturbed(model, variables, images, delta, cut)
        return jnp.sum(heads.score(logits, sign, target)), (acts[name], logits)

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


def gradcam(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    sign: Any = 1.0,
    target: Any = None,
    layer: str | None = None,
) -> jax.Array:
    """Grad-CAM heatmaps [N, H, W] in [0, 1] at the input size, explaining the score
    (`heads.score`) at `layer` (`gradcam_layer`)."""
    activation, gradient, _ = last_conv_gradient(
        model, variables, images, sign=sign, target=target, layer=layer
    )
    return heatmap_from(activation, gradient, tuple(jnp.shape(images)[1:3]))


# --------------------------------------------------------------- guided backprop


_RELU = jax.nn.relu  # the real one, also while `_guided_relus` has swapped it


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass keeps only positive gradients at positive inputs."""
    return _RELU(x)


def _guided_relu_fwd(x):
    return _RELU(x), x


def _guided_relu_bwd(x, g):
    return (jnp.where((g > 0) & (x > 0), g, jnp.zeros_like(g)),)


guided_relu.defvjp(_guided_relu_fwd, _guided_relu_bwd)


_RELU_LOCK = threading.Lock()


@contextlib.contextmanager
def _guided_relus(model: nn.Module):
    """`model` with its ReLUs guided, and a context to trace it in.

    A model with an `activation` field (the paper's models) gets `guided_relu` there. Any
    other model is traced with `flax.linen.relu` and `jax.nn.relu` swapped for
    `guided_relu`, which is how Flax code calls ReLU (`nn.relu(x)`); a model that calls
    none of them raises, rather than returning the plain gradient.
    """
    if "activation" in {f.name for f in dataclasses.fields(model)}:
        yield model.clone(activation=guided_relu)
        return
    calls = []

    def counted(x):
        calls.append(1)
        return guided_relu(x)

    owners = (nn, flax.linen.activation, jax.nn)
    with _RELU_LOCK:
        saved = [owner.relu for owner in owners]
        for owner in owners:
            owner.relu = counted
        try:
            yield model
        finally:
            for owner, relu in zip(owners, saved):
                owner.relu = relu
    if not calls:
        raise ValueError(
            f"guided backprop: {type(model).__name__} called no ReLU through "
            "flax.linen.relu or jax.nn.relu and has no `activation` field, so there is "
            "no ReLU to guide"
        )


@signs_first
@functools.partial(jax.jit, static_argnames=("model",))
def guided_backprop_attribution(
    model: nn.Module, variables: Any, images: jax.Array, *, sign: Any = 1.0, target: Any = None
) -> jax.Array:
    """Guided gradient of the score (`heads.score`) w.r.t. the input: [N, H, W, C]."""

    def score(x):
        with _guided_relus(model) as guided:
            logits = heads.inference_apply(guided, variables, x)
        return jnp.sum(heads.score(logits, sign, target))

    return jax.grad(score)(images)


@jax.jit
def _channel_sum(attribution: jax.Array) -> jax.Array:
    return jnp.sum(attribution, axis=-1)


def guided_backprop(
    model: nn.Module, variables: Any, images: jax.Array, *, sign: Any = 1.0, target: Any = None
) -> jax.Array:
    """Guided Backprop heatmap [N, H, W]: the guided gradient summed over channels."""
    return _channel_sum(
        guided_backprop_attribution(model, variables, images, sign=sign, target=target)
    )


def guided_gradcam(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    *,
    sign: Any = 1.0,
    target: Any = None,
    layer: str | None = None,
) -> jax.Array:
    """Guided Grad-CAM heatmap [N, H, W]: Guided Backprop times the upsampled Grad-CAM."""
    return guided_backprop(model, variables, images, sign=sign, target=target) * gradcam(
        model, variables, images, sign=sign, target=target, layer=layer
    )

"""Keras layers the Keras-twin models are built from (the pretrained networks, the mini
Xception's batch norms), as Flax modules.

`preprocess_tf` is Keras's `preprocess_input` in "tf" mode (Xception, Inception V3).
`Activation` gives an activation a module path, so that the output of a Keras
`Activation` layer (or of a Conv2D with `activation="relu"`) can be named as Grad-CAM's
layer and found by the Flax method interceptors the explanations use. `batch_norm` is
Keras's `BatchNormalization` with its defaults (momentum 0.99, epsilon 1e-3; Flax's
epsilon default is 1e-5).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3


class Activation(nn.Module):
    """`fn(x)` as a module of its own (Keras `Activation(name=...)`)."""

    fn: Callable[[jax.Array], jax.Array] = nn.relu

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


def no_sown_activations(model: nn.Module) -> dict[str, str]:
    """`ModelSpec.keras_layers` of a network that sows nothing (the pretrained ones)."""
    del model
    return {}


def batch_norm(train: bool, name: str, use_scale: bool = True) -> nn.BatchNorm:
    """Keras `BatchNormalization(name=name, scale=use_scale)` with the Keras defaults;
    `train` uses batch statistics (pass `mutable=['batch_stats']`)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        use_scale=use_scale,
        use_fast_variance=False,
        name=name,
    )


def preprocess_tf(x: jax.Array) -> jax.Array:
    """Keras `preprocess_input` in "tf" mode: float32 `x /= 127.5; x -= 1.0`, Keras's bits.

    XLA's simplifier turns a division by a (broadcast) scalar into a multiplication by
    its rounded reciprocal, which is off by an ulp for about 40% of the pixel values. A
    divisor computed from `x` itself (`x * 0 + 127.5`, so batched wherever `x` is, under
    `vmap` too) behind an optimization barrier keeps the true division.
    """
    x = jnp.asarray(x, jnp.float32)
    divisor = lax.optimization_barrier(x * jnp.float32(0.0) + jnp.float32(127.5))
    return x / divisor - jnp.float32(1.0)

"""The paper's ConvNet (Leventi-Peetz & Östreich, Listing 3) as a Flax Linen module.

Layer for layer the Keras model: Rescaling(1/255), five 3x3 VALID ReLU convolutions
(32, 64, 128, 256, 256 filters) with 2x2 max pooling between them, Flatten,
Dropout(0.5), Dense(1). The sigmoid of the Keras head is left to the loss, so the
module returns the logit, which is also what the explanation tools explain.
991,041 trainable parameters at 180x180x3, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models.ops import convolutions
from jaxrepro.models.ops.pooling import max_pool_2x2
from jaxrepro.models.spec import DecisionPoints, GradcamLayer, ModelSpec, PoolPoint

# Keras `Rescaling(1./255)` multiplies by the float32 scale (it does not divide).
RESCALE = 1.0 / 255.0

# Keras defaults: glorot_uniform kernels, zero biases.
KERNEL_INIT = nn.initializers.xavier_uniform()
BIAS_INIT = nn.initializers.zeros


def rescale(x: jax.Array) -> jax.Array:
    """Keras `Rescaling(1./255)`: pixels 0..255 -> 0..1 by a float32 multiply."""
    return x * jnp.asarray(RESCALE, jnp.float32)


class ConvNet(nn.Module):
    """Keras ConvNet of Listing 3; input NHWC float32 pixels 0..255, output logits [N].

    Parameter names: `conv1`..`conv5`, `dense` (each with `kernel`, `bias`).
    With `mutable=['intermediates']`, `apply` also returns the activations listed
    in `INTERMEDIATES` (each sown as a 1-tuple): `convK_out` is the ReLU output of
    `convK` (Keras's Conv2D(activation="relu") output), `poolK_out` the pooled map.
    """

    dropout_rate: float = 0.5
    filters: tuple[int, ...] = (32, 64, 128, 256, 256)
    # The ReLU of every convolution; explanation methods swap in one with another
    # backward pass (guided backprop) via `model.clone(activation=...)`.
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    # 2x2 max pooling; `max_pool_2x2` is `nn.max_pool` with a cheaper backward pass that
    # gives the same bits (see `jaxrepro.models.ops.pooling`).
    pool: Callable[[jax.Array], jax.Array] = max_pool_2x2
    # Every convolution's implementation (`lax.conv_general_dilated`'s signature), if
    # given (the portable mode's, `jaxrepro.models.ops.portable`); None: conv1 by
    # `first_conv`, the others XLA's own, the fastest for 3x3 kernels over 32 or more
    # channels with convolutions outside YNNPACK (`jaxrepro.determinism`).
    conv: Callable[..., jax.Array] | None = None
    # conv1's convolution when `conv` is None: jaxrepro's kernel for an image's few
    # channels (`convolutions.first_conv`, other bits than XLA's); None: XLA's own.
    first_conv: Callable[..., jax.Array] | None = convolutions.first_conv
    # The dense layer's product (`lax.dot_general`'s signature); the portable mode's is
    # `jaxrepro.models.ops.portable.dot_general`.
    dot: Callable[..., jax.Array] = lax.dot_general

    INTERMEDIATES: ClassVar[tuple[str, ...]] = (
        "conv1_out",
        "pool1_out",
        "conv2_out",
        "pool2_out",
        "conv3_out",
        "pool3_out",
        "conv4_out",
        "pool4_out",
        "conv5_out",
    )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits [N] of images [N, H, W, 3]; `train` turns dropout on."""
        x = rescale(jnp.asarray(x, jnp.float32))
        n_conv = len(self.filters)
        for i, features in enumerate(self.filters, start=1):
            x = nn.Conv(
                features,
                (3, 3),
                padding="VALID",
                kernel_init=KERNEL_INIT,
                bias_init=BIAS_INIT,
                name=f"conv{i}",
                conv_general_dilated=self.conv or (self.first_conv if i == 1 else None),
            )(x)
            x = self.activation(x)
            self.sow("intermediates", f"conv{i}_out", x)
            if i < n_conv:
                x = self.pool(x)
                self.sow("intermediates", f"pool{i}_out", x)
        x = x.reshape((x.shape[0], -1))  # Keras Flatten, channels_last (H, W, C) order
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        x = nn.Dense(
            1, kernel_init=KERNEL_INIT, bias_init=BIAS_INIT, name="dense", dot_general=self.dot
        )(x)
        return x[:, 0]


def keras_layers(model: ConvNet) -> dict[str, str]:
    """Sown activation -> Keras layer of the twin (`Conv2D(activation="relu")` outputs
    the ReLU), in forward order."""
    out = {}
    for i in range(1, len(model.filters) + 1):
        out[f"conv{i}_out"] = f"conv{i}"
        if i < len(model.filters):
            out[f"pool{i}_out"] = f"pool{i}"
    return out


def decision_points(model: ConvNet) -> DecisionPoints:
    """Each convolution's ReLU, and the 2x2 pool of every convolution but the last."""
    n = len(model.filters)
    return DecisionPoints(
        relus=tuple(f"conv{i}_out" for i in range(1, n + 1)),
        pools=tuple(PoolPoint(f"conv{i}_out", (2, 2), (2, 2), "VALID") for i in range(1, n)),
    )


# Grad-CAM's A is conv5's ReLU output; it flows on flattened into the dropout (the
# identity at inference). No batch norm. The five VALID 3x3
# convolutions and four 2x2 pools need at least 78 px.
SPEC = ModelSpec(
    name="convnet",
    module=ConvNet,
    min_image_size=78,
    gradcam=GradcamLayer("conv5_out", module="dropout", where="input"),
    keras_gradcam_layer="conv5",
    keras_layers=keras_layers,
    decision_points=decision_points,
)

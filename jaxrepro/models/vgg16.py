"""VGG16 (Simonyan & Zisserman, ICLR 2015) as a Flax Linen twin of `keras.applications.VGG16`.

Layer for layer `keras/src/applications/vgg16.py` (Keras 3.15.1) with `include_top=True`:
five blocks of 3x3 SAME convolutions with ReLU (64, 64 | 128, 128 | 256 x 3 | 512 x 3 |
512 x 3 filters), each block ending in 2x2 max pooling with stride 2, then Flatten
(channels-last, as Keras), Dense fc1 (4096, ReLU), fc2 (4096, ReLU) and `predictions`
(num_classes). The module applies Keras's `vgg16.preprocess_input` ("caffe" mode) itself
and returns the logits of `predictions`, i.e. what `keras.applications.VGG16(weights=None,
classifier_activation=None)` outputs for `preprocess_input(images)`.

Module names are the Keras layer names (`block1_conv1` .. `block5_conv3`, `fc1`, `fc2`,
`predictions`); the ReLU of a Keras `Conv2D(activation="relu")` or `Dense(activation=
"relu")` is a module of its own, `<layer>_relu`, so that the Keras layer's (post-ReLU)
output has a module path. At 224x224x3: 138,357,544 parameters, all trainable (no batch
norm), as Keras reports. At another size the fc1 kernel is (H/32 * W/32 * 512) x 4096,
as in Keras. No difference from Keras that changes a computation.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models import layers
from jaxrepro.models.convnet import BIAS_INIT, KERNEL_INIT
from jaxrepro.models.ops.pooling import max_pool_2x2
from jaxrepro.models.spec import ModelSpec

# Keras `imagenet_utils.preprocess_input(mode="caffe")`: the BGR channel means.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# (block, number of convolutions, filters), as in Keras.
BLOCKS: tuple[tuple[int, int, int], ...] = (
    (1, 2, 64),
    (2, 2, 128),
    (3, 3, 256),
    (4, 3, 512),
    (5, 3, 512),
)
DENSE = ("fc1", "fc2")


def preprocess(x: jax.Array) -> jax.Array:
    """Keras `vgg16.preprocess_input` of float32 RGB pixels 0..255 (NHWC).

    RGB -> BGR, then each channel minus its float32 ImageNet mean, no scaling: Keras's
    numpy path (`x[..., c] -= mean[c]`) and tensor path (`x += -mean`) both compute
    `x - float32(mean[c])` in float32, as here.
    """
    x = jnp.asarray(x, jnp.float32)[..., ::-1]
    return x - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)


def conv_names() -> list[str]:
    """The Keras names of the 13 convolutions, in forward order."""
    return [f"block{b}_conv{i}" for b, n, _ in BLOCKS for i in range(1, n + 1)]


class VGG16(nn.Module):
    """Keras VGG16 with its top; input NHWC float32 RGB pixels 0..255 (at least 32 px),
    output logits [N, num_classes].

    Parameter names: `block{b}_conv{i}`, `fc1`, `fc2`, `predictions` (each `kernel`,
    `bias`); ReLU modules `block{b}_conv{i}_relu`, `fc1_relu`, `fc2_relu`. No batch norm
    and no dropout, so `train` changes nothing (kept for the common signature).
    """

    num_classes: int = 1000
    # Every ReLU of the network; guided backprop swaps it via `model.clone(activation=...)`.
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    # Every convolution's implementation (`lax.conv_general_dilated`'s signature); None:
    # Flax's default, XLA's convolution. The portable mode passes its own.
    conv: Callable[..., jax.Array] | None = None
    # Every dense layer's product (`lax.dot_general`'s signature).
    dot: Callable[..., jax.Array] = lax.dot_general

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits [N, num_classes] of RGB images [N, H, W, 3] with pixels 0..255."""
        del train  # no batch norm, no dropout
        x = preprocess(x)
        for block, count, filters in BLOCKS:
            for i in range(1, count + 1):
                name = f"block{block}_conv{i}"
                x = nn.Conv(
                    filters,
                    (3, 3),
                    padding="SAME",
                    kernel_init=KERNEL_INIT,
                    bias_init=BIAS_INIT,
                    conv_general_dilated=self.conv,
                    name=name,
                )(x)
                x = layers.Activation(self.activation, name=f"{name}_relu")(x)
            x = max_pool_2x2(x)  # Keras block{b}_pool
        x = x.reshape((x.shape[0], -1))  # Keras Flatten: channels-last (H, W, C) order
        for name in DENSE:
            x = nn.Dense(
                4096,
                kernel_init=KERNEL_INIT,
                bias_init=BIAS_INIT,
                dot_general=self.dot,
                name=name,
            )(x)
            x = layers.Activation(self.activation, name=f"{name}_relu")(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=KERNEL_INIT,
            bias_init=BIAS_INIT,
            dot_general=self.dot,
            name="predictions",
        )(x)


def keras_weight_order(model: VGG16) -> list[str]:
    """Flax module path of each Keras layer with weights, in `keras_model.layers` order:
    the 13 convolutions, then fc1, fc2, predictions (16 layers)."""
    del model
    return [*conv_names(), *DENSE, "predictions"]


# Grad-CAM's A (keras.io's example): block5_conv3's output, which is post-ReLU in Keras.
# The VGG-16 composite of Heggen's thesis (after Montavon et al. 2019, "Layer-wise
# relevance propagation: an overview"): z^B at the first layer, gamma for the lower
# convolutions (blocks 1-3), epsilon for the middle and upper ones (blocks 4-5), LRP-0
# for the dense head. The first layer sees the caffe-preprocessed image, whose channels
# lie in [-mean_c, 255 - mean_c]; z^B takes one box for all channels, the smallest that
# holds them all: [-123.68, 255 - 103.939].
LRP_COMPOSITE = (
    "input=zb:-123.68:151.061,block[1-3]_*=gamma:0.25,block[4-5]_*=epsilon:0.25,dense=lrp0"
)

SPEC = ModelSpec(
    name="vgg16",
    module=VGG16,
    min_image_size=32,
    gradcam="block5_conv3_relu",
    keras_gradcam_layer="block5_conv3",
    keras_layers=layers.no_sown_activations,
    keras_application="VGG16",
    image_size=224,
    keras_weight_order=keras_weight_order,
    lrp_composite=LRP_COMPOSITE,
)

"""Xception (Chollet, CVPR 2017), the ImageNet network of `keras.applications.Xception`.

A Flax Linen twin of `keras/src/applications/xception.py` (Keras 3.15.1), layer for
layer: the entry flow (two 3x3 VALID convolutions, then blocks 2 to 4, each two
SeparableConv2D with batch norm, a 3x3 stride-2 SAME max pooling and a strided 1x1
convolution with batch norm on the shortcut), the middle flow (blocks 5 to 12, three
ReLU, SeparableConv2D, batch norm each, identity shortcut), the exit flow (block 13 with
a strided shortcut, block 14's two separable convolutions with ReLU), global average
pooling and the 1000-class `predictions` Dense. Module names are the Keras layer names;
Keras leaves each shortcut's Conv2D and BatchNormalization unnamed (numbered per process
as 'conv2d', 'batch_normalization', ...), here they are `block{i}_residual` and
`block{i}_residual_bn`. The SeparableConv2D layers have no bias
(`jaxrepro.models.minixception.SeparableConv`); batch norm has the Keras defaults
(`jaxrepro.models.layers.batch_norm`).

The input is NHWC float32 RGB pixels 0..255, at least 71 px (Keras's `min_size`; 299
is the size the ImageNet weights were trained at); the model applies Keras's
`xception.preprocess_input` ('tf' mode: x / 127.5 - 1) itself and returns the logits,
the `predictions` output before its softmax. At 299x299x3 it has 22,855,952 trainable
parameters and 22,910,480 in all with the batch-norm running statistics, as Keras's
`count_params` reports. No difference from Keras changes a computation.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models.convnet import BIAS_INIT, KERNEL_INIT
from jaxrepro.models.layers import Activation, batch_norm, no_sown_activations, preprocess_tf
from jaxrepro.models.minixception import SeparableConv
from jaxrepro.models.ops.pooling import max_pool_3x3_s2
from jaxrepro.models.spec import ModelSpec

# Entry-flow blocks with a strided shortcut: (block, features of sepconv1, of sepconv2).
ENTRY = ((2, 128, 128), (3, 256, 256), (4, 728, 728))
MIDDLE = range(5, 13)  # blocks 5..12: three separable convolutions, identity shortcut
MIDDLE_FEATURES = 728


def preprocess(x: jax.Array) -> jax.Array:
    """Keras `xception.preprocess_input` ("tf" mode, `layers.preprocess_tf`)."""
    return preprocess_tf(x)


class Xception(nn.Module):
    """Keras Xception; input NHWC float32 pixels 0..255 (>= 71 px), output logits [N, classes].

    Parameter names are the Keras layer names ('block1_conv1', 'block1_conv1_bn',
    'block2_sepconv1' with `depthwise` and `pointwise`, ..., 'predictions'), the shortcut
    convolutions `block{i}_residual` / `block{i}_residual_bn`; batch-norm running averages
    live in `batch_stats`. `train=True` uses batch statistics (pass
    `mutable=['batch_stats']`).
    """

    num_classes: int = 1000
    # Every ReLU of the network; explanation methods swap in one with another backward
    # pass (guided backprop) via `model.clone(activation=...)`.
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    # Every convolution's implementation (`nn.Conv(conv_general_dilated=...)`), if given
    # (the portable mode's, `jaxrepro.models.ops.portable`); None: XLA's.
    conv: Callable[..., jax.Array] | None = None
    # The dense layer's product (`lax.dot_general`'s signature).
    dot: Callable[..., jax.Array] = lax.dot_general

    def _conv(self, features: int, kernel: int, strides: int, padding: str, name: str) -> nn.Conv:
        """Keras `Conv2D(features, kernel, strides, padding, use_bias=False, name=name)`."""
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=padding,
            use_bias=False,
            kernel_init=KERNEL_INIT,
            name=name,
            conv_general_dilated=self.conv,
        )

    def _sepconv_bn(self, x: jax.Array, features: int, name: str, train: bool) -> jax.Array:
        """Keras `SeparableConv2D(features, 3, padding="same", use_bias=False, name=name)`
        then `BatchNormalization(name=name + "_bn")`."""
        x = SeparableConv(features, fast_convs=False, conv=self.conv, name=name)(x)
        return batch_norm(train, f"{name}_bn")(x)

    def _relu(self, x: jax.Array, name: str) -> jax.Array:
        """Keras `Activation("relu", name=name)`."""
        return Activation(self.activation, name=name)(x)

    def _residual(self, x: jax.Array, features: int, block: int, train: bool) -> jax.Array:
        """The strided shortcut: unnamed Keras 1x1 stride-2 SAME Conv2D and BatchNormalization."""
        x = self._conv(features, 1, 2, "SAME", f"block{block}_residual")(x)
        return batch_norm(train, f"block{block}_residual_bn")(x)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits [N, num_classes] of images [N, H, W, 3] (pixels 0..255)."""
        x = preprocess(x)
        # Entry flow.
        x = self._conv(32, 3, 2, "VALID", "block1_conv1")(x)
        x = self._relu(batch_norm(train, "block1_conv1_bn")(x), "block1_conv1_act")
        x = self._conv(64, 3, 1, "VALID", "block1_conv2")(x)
        x = self._relu(batch_norm(train, "block1_conv2_bn")(x), "block1_conv2_act")
        for block, features1, features2 in ENTRY:
            prefix = f"block{block}"
            residual = self._residual(x, features2, block, train)
            if block != 2:  # block 2 follows block1_conv2_act directly
                x = self._relu(x, f"{prefix}_sepconv1_act")
            x = self._sepconv_bn(x, features1, f"{prefix}_sepconv1", train)
            x = self._relu(x, f"{prefix}_sepconv2_act")
            x = self._sepconv_bn(x, features2, f"{prefix}_sepconv2", train)
            x = max_pool_3x3_s2(x)  # f"{prefix}_pool"
            x = x + residual  # keras.layers.add([x, residual])
        # Middle flow.
        for block in MIDDLE:
            prefix = f"block{block}"
            residual = x
            for k in (1, 2, 3):
                x = self._relu(x, f"{prefix}_sepconv{k}_act")
                x = self._sepconv_bn(x, MIDDLE_FEATURES, f"{prefix}_sepconv{k}", train)
            x = x + residual
        # Exit flow.
        residual = self._residual(x, 1024, 13, train)
        x = self._relu(x, "block13_sepconv1_act")
        x = self._sepconv_bn(x, 728, "block13_sepconv1", train)
        x = self._relu(x, "block13_sepconv2_act")
        x = self._sepconv_bn(x, 1024, "block13_sepconv2", train)
        x = max_pool_3x3_s2(x)  # block13_pool
        x = x + residual
        x = self._sepconv_bn(x, 1536, "block14_sepconv1", train)
        x = self._relu(x, "block14_sepconv1_act")
        x = self._sepconv_bn(x, 2048, "block14_sepconv2", train)
        x = self._relu(x, "block14_sepconv2_act")  # Grad-CAM's layer
        x = jnp.mean(x, axis=(1, 2))  # GlobalAveragePooling2D, 'avg_pool'
        return nn.Dense(
            self.num_classes,
            kernel_init=KERNEL_INIT,
            bias_init=BIAS_INIT,
            name="predictions",
            dot_general=self.dot,
        )(x)


def keras_weight_order(model: Xception) -> list[str]:
    """Flax module path of each Keras layer with weights, in `keras_model.layers` order
    (81 layers; each shortcut's Conv2D and BatchNormalization come after the block's
    sepconv2_bn, as Keras lists them)."""
    del model  # the order does not depend on the fields
    order = ["block1_conv1", "block1_conv1_bn", "block1_conv2", "block1_conv2_bn"]
    for block, _, _ in ENTRY:
        order += [f"block{block}_sepconv{k}{s}" for k in (1, 2) for s in ("", "_bn")]
        order += [f"block{block}_residual", f"block{block}_residual_bn"]
    for block in MIDDLE:
        order += [f"block{block}_sepconv{k}{s}" for k in (1, 2, 3) for s in ("", "_bn")]
    order += [f"block13_sepconv{k}{s}" for k in (1, 2) for s in ("", "_bn")]
    order += ["block13_residual", "block13_residual_bn"]
    order += [f"block14_sepconv{k}{s}" for k in (1, 2) for s in ("", "_bn")]
    return [*order, "predictions"]


# LRP as the thesis composes it for VGG-16 (`vgg16.LRP_COMPOSITE`), on Xception's flows:
# z^B at the first layer, whose input lies in [-1, 1] after the "tf" preprocessing;
# gamma for the entry flow (blocks 1-4), epsilon for the middle and exit flows, LRP-0
# for the dense head. Every batch norm follows a conv and is merged into it.
LRP_COMPOSITE = (
    "input=zb:-1:1,block[1-4]_*=gamma:0.25,block*=epsilon:0.25,dense=lrp0,bn=epsilon:0.25"
)

# Grad-CAM's A is block14_sepconv2_act's output (after the last ReLU, before the global
# average pooling), the layer keras.io's Grad-CAM example takes.
SPEC = ModelSpec(
    name="xception",
    module=Xception,
    min_image_size=71,
    gradcam="block14_sepconv2_act",
    keras_gradcam_layer="block14_sepconv2_act",
    keras_layers=no_sown_activations,
    keras_application="Xception",
    image_size=299,
    keras_weight_order=keras_weight_order,
    lrp_composite=LRP_COMPOSITE,
)

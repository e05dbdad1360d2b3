"""Inception v3 (Szegedy et al., CVPR 2016): the network of `keras.applications.InceptionV3`.

A Flax Linen twin of `keras/src/applications/inception_v3.py` (Keras 3.15.1), layer for
layer. Every convolution is Keras's `conv2d_bn`: a Conv2D without bias, a
BatchNormalization without scale (`scale=False`: beta, moving mean and variance only)
and a ReLU, here `ConvBN` with its `conv`, `bn` and `act`. The stem is five of them
(`conv1`..`conv5`) with two 3x3 stride-2 VALID max poolings; then the eleven mixed
blocks `mixed0`..`mixed10`, each a `Mixed` module whose output is the Keras
concatenation of the same name, its branches in Keras's channel order: mixed0..2 (35x35,
1x1 / 5x5 / double 3x3 / 3x3 average pooling), mixed3 (stride-2 reduction with max
pooling), mixed4..7 (17x17, factorised 7x7), mixed8 (reduction to 8x8), mixed9..10
(8x8, whose 3x3 branches end in nested concatenations: Keras's `mixed9_0` in mixed9,
`mixed9_1` in mixed10, and an unnamed `concatenate`, here `branch3x3dbl_concat`); then
global average pooling and the 1000-class `predictions` Dense.

Keras leaves all but the mixed blocks and `predictions` unnamed (it numbers them per
process: 'conv2d_17', 'batch_normalization_17', 'activation_17'); the branch modules
here carry the Keras source's variable names ('branch1x1', 'branch5x5_1', ...,
'branch_pool' for the 1x1 convolution after the average pooling; in mixed9 and mixed10,
where Keras reuses `branch3x3dbl` for two layers, the double-3x3 branch is numbered
`branch3x3dbl_1` (1x1), `_2` (3x3), then `_3a` (1x3) and `_3b` (3x1)). Each block is
written as a table of its operations (`BLOCKS`), which builds the Flax modules and
also gives the order Keras lists the layers in (`keras_weight_order`): Keras sorts
`model.layers` by depth from the output, not by creation, so the branches interleave.

The 3x3 stride-1 SAME average pooling divides by the number of real (unpadded)
elements, like TensorFlow's (`nn.avg_pool(count_include_pad=False)`). Batch norm has
the Keras defaults (`jaxrepro.models.layers.batch_norm`, epsilon 1e-3).

The input is NHWC float32 RGB pixels 0..255, at least 75 px (Keras's `min_size`; 299
is the size the ImageNet weights were trained at); the model applies Keras's
`inception_v3.preprocess_input` ('tf' mode: x / 127.5 - 1) itself and returns the
logits, the `predictions` output before its softmax. At 299x299x3 it has 23,817,352
trainable parameters and 23,851,784 in all with the batch-norm running statistics, as
Keras's `count_params` reports (94 convolutions, 94 batch norms, one Dense: 189 Keras
layers with weights). No difference from Keras changes a computation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models.convnet import BIAS_INIT, KERNEL_INIT
from jaxrepro.models.layers import Activation, batch_norm, no_sown_activations, preprocess_tf
from jaxrepro.models.spec import ModelSpec

# One operation of a mixed block: (name, input names, op). `op` is ("conv", filters,
# (rows, cols), stride, padding) for a `conv2d_bn`, ("avg",) for the 3x3 stride-1 SAME
# average pooling, ("max",) for the 3x3 stride-2 VALID max pooling, ("concat",) for a
# channel concatenation of the inputs in order. INPUT names the block's input; the
# block's last operation is its output.
Op = tuple[str, tuple[str, ...], tuple]
INPUT = "input"


def _conv(
    name: str, src: str, filters: int, rows: int, cols: int, strides: int = 1, padding: str = "SAME"
) -> Op:
    """Keras `conv2d_bn(src, filters, rows, cols, strides=..., padding=...)`."""
    return (name, (src,), ("conv", filters, (rows, cols), strides, padding))


def _block_a(pool_filters: int) -> tuple[Op, ...]:
    """mixed0..mixed2 (35x35): 1x1, 5x5, double 3x3 and average-pooling branches."""
    return (
        _conv("branch1x1", INPUT, 64, 1, 1),
        _conv("branch5x5_1", INPUT, 48, 1, 1),
        _conv("branch5x5_2", "branch5x5_1", 64, 5, 5),
        _conv("branch3x3dbl_1", INPUT, 64, 1, 1),
        _conv("branch3x3dbl_2", "branch3x3dbl_1", 96, 3, 3),
        _conv("branch3x3dbl_3", "branch3x3dbl_2", 96, 3, 3),
        ("avg_pool", (INPUT,), ("avg",)),
        _conv("branch_pool", "avg_pool", pool_filters, 1, 1),
        ("concat", ("branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"), ("concat",)),
    )


def _block_b() -> tuple[Op, ...]:
    """mixed3: the 35x35 -> 17x17 reduction."""
    return (
        _conv("branch3x3", INPUT, 384, 3, 3, strides=2, padding="VALID"),
        _conv("branch3x3dbl_1", INPUT, 64, 1, 1),
        _conv("branch3x3dbl_2", "branch3x3dbl_1", 96, 3, 3),
        _conv("branch3x3dbl_3", "branch3x3dbl_2", 96, 3, 3, strides=2, padding="VALID"),
        ("max_pool", (INPUT,), ("max",)),
        ("concat", ("branch3x3", "branch3x3dbl_3", "max_pool"), ("concat",)),
    )


def _block_c(c7: int) -> tuple[Op, ...]:
    """mixed4..mixed7 (17x17): 1x1, factorised 7x7, double 7x7 and pooling branches."""
    return (
        _conv("branch1x1", INPUT, 192, 1, 1),
        _conv("branch7x7_1", INPUT, c7, 1, 1),
        _conv("branch7x7_2", "branch7x7_1", c7, 1, 7),
        _conv("branch7x7_3", "branch7x7_2", 192, 7, 1),
        _conv("branch7x7dbl_1", INPUT, c7, 1, 1),
        _conv("branch7x7dbl_2", "branch7x7dbl_1", c7, 7, 1),
        _conv("branch7x7dbl_3", "branch7x7dbl_2", c7, 1, 7),
        _conv("branch7x7dbl_4", "branch7x7dbl_3", c7, 7, 1),
        _conv("branch7x7dbl_5", "branch7x7dbl_4", 192, 1, 7),
        ("avg_pool", (INPUT,), ("avg",)),
        _conv("branch_pool", "avg_pool", 192, 1, 1),
        ("concat", ("branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"), ("concat",)),
    )


def _block_d() -> tuple[Op, ...]:
    """mixed8: the 17x17 -> 8x8 reduction."""
    return (
        _conv("branch3x3_1", INPUT, 192, 1, 1),
        _conv("branch3x3_2", "branch3x3_1", 320, 3, 3, strides=2, padding="VALID"),
        _conv("branch7x7x3_1", INPUT, 192, 1, 1),
        _conv("branch7x7x3_2", "branch7x7x3_1", 192, 1, 7),
        _conv("branch7x7x3_3", "branch7x7x3_2", 192, 7, 1),
        _conv("branch7x7x3_4", "branch7x7x3_3", 192, 3, 3, strides=2, padding="VALID"),
        ("max_pool", (INPUT,), ("max",)),
        ("concat", ("branch3x3_2", "branch7x7x3_4", "max_pool"), ("concat",)),
    )


def _block_e(i: int) -> tuple[Op, ...]:
    """mixed9 (i=0) and mixed10 (i=1) (8x8): the 3x3 branches split into 1x3 and 3x1,
    concatenated (Keras `mixed9_{i}` and an unnamed `concatenate`)."""
    return (
        _conv("branch1x1", INPUT, 320, 1, 1),
        _conv("branch3x3", INPUT, 384, 1, 1),
        _conv("branch3x3_1", "branch3x3", 384, 1, 3),
        _conv("branch3x3_2", "branch3x3", 384, 3, 1),
        (f"mixed9_{i}", ("branch3x3_1", "branch3x3_2"), ("concat",)),
        _conv("branch3x3dbl_1", INPUT, 448, 1, 1),
        _conv("branch3x3dbl_2", "branch3x3dbl_1", 384, 3, 3),
        _conv("branch3x3dbl_3a", "branch3x3dbl_2", 384, 1, 3),
        _conv("branch3x3dbl_3b", "branch3x3dbl_2", 384, 3, 1),
        ("branch3x3dbl_concat", ("branch3x3dbl_3a", "branch3x3dbl_3b"), ("concat",)),
        ("avg_pool", (INPUT,), ("avg",)),
        _conv("branch_pool", "avg_pool", 192, 1, 1),
        ("concat", ("branch1x1", f"mixed9_{i}", "branch3x3dbl_concat", "branch_pool"), ("concat",)),
    )


# The mixed blocks in order, named as Keras names their concatenations.
BLOCKS: tuple[tuple[str, tuple[Op, ...]], ...] = (
    ("mixed0", _block_a(32)),
    ("mixed1", _block_a(64)),
    ("mixed2", _block_a(64)),
    ("mixed3", _block_b()),
    ("mixed4", _block_c(128)),
    ("mixed5", _block_c(160)),
    ("mixed6", _block_c(160)),
    ("mixed7", _block_c(192)),
    ("mixed8", _block_d()),
    ("mixed9", _block_e(0)),
    ("mixed10", _block_e(1)),
)

# The stem's conv2d_bn: (name, filters, kernel, stride, padding); a max pooling follows
# conv3 and conv5.
STEM = (
    ("conv1", 32, 3, 2, "VALID"),
    ("conv2", 32, 3, 1, "VALID"),
    ("conv3", 64, 3, 1, "SAME"),
    ("conv4", 80, 1, 1, "VALID"),
    ("conv5", 192, 3, 1, "VALID"),
)


def preprocess(x: jax.Array) -> jax.Array:
    """Keras `inception_v3.preprocess_input` ("tf" mode, `layers.preprocess_tf`)."""
    return preprocess_tf(x)


def max_pool_3x3_s2_valid(x: jax.Array) -> jax.Array:
    """Keras `MaxPooling2D((3, 3), strides=(2, 2))` (VALID padding)."""
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


def avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """Keras `AveragePooling2D((3, 3), strides=(1, 1), padding="same")`: like TensorFlow's,
    each window's sum is divided by the number of its unpadded elements."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


class ConvBN(nn.Module):
    """Keras `conv2d_bn`: Conv2D (no bias), BatchNormalization(scale=False), ReLU."""

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: str = "SAME"
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    conv: Callable[..., jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """ReLU(BN(conv(x))), the output of the Keras `Activation` layer."""
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.strides, self.strides),
            padding=self.padding,
            use_bias=False,
            kernel_init=KERNEL_INIT,
            name="conv",
            conv_general_dilated=self.conv,
        )(x)
        x = batch_norm(train, "bn", use_scale=False)(x)
        return Activation(self.activation, name="act")(x)


class Mixed(nn.Module):
    """One mixed block run from its table of operations (`BLOCKS`); each `conv2d_bn` is a
    `ConvBN` submodule named as the operation. Returns the block's concatenation."""

    ops: tuple[Op, ...]
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    conv: Callable[..., jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """The block output [N, H', W', C'] of its input [N, H, W, C]."""
        values = {INPUT: x}
        for name, inputs, op in self.ops:
            args = [values[i] for i in inputs]
            if op[0] == "conv":
                _, filters, kernel, stride, padding = op
                out = ConvBN(
                    filters,
                    kernel,
                    strides=stride,
                    padding=padding,
                    activation=self.activation,
                    conv=self.conv,
                    name=name,
                )(args[0], train=train)
            elif op[0] == "avg":
                out = avg_pool_3x3_same(args[0])
            elif op[0] == "max":
                out = max_pool_3x3_s2_valid(args[0])
            elif op[0] == "concat":
                out = jnp.concatenate(args, axis=-1)
            else:
                raise ValueError(f"{name}: unknown operation {op!r}")
            values[name] = out
        return values[self.ops[-1][0]]


class InceptionV3(nn.Module):
    """Keras InceptionV3; input NHWC float32 pixels 0..255 (>= 75 px), output logits
    [N, num_classes].

    Parameter names: `conv1`..`conv5` (the stem), `mixed0`..`mixed10` (each branch a
    `ConvBN` with `conv` and `bn`), `predictions`; batch-norm running averages live in
    `batch_stats`. `train=True` uses batch statistics (pass `mutable=['batch_stats']`).
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

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits [N, num_classes] of images [N, H, W, 3] (pixels 0..255)."""
        x = preprocess(x)
        for name, filters, kernel, stride, padding in STEM:
            x = ConvBN(
                filters,
                (kernel, kernel),
                strides=stride,
                padding=padding,
                activation=self.activation,
                conv=self.conv,
                name=name,
            )(x, train=train)
            if name in ("conv3", "conv5"):
                x = max_pool_3x3_s2_valid(x)
        for name, ops in BLOCKS:
            x = Mixed(ops, activation=self.activation, conv=self.conv, name=name)(x, train=train)
        x = jnp.mean(x, axis=(1, 2))  # GlobalAveragePooling2D, 'avg_pool'
        return nn.Dense(
            self.num_classes,
            kernel_init=KERNEL_INIT,
            bias_init=BIAS_INIT,
            name="predictions",
            dot_general=self.dot,
        )(x)


def _keras_block_order(ops: tuple[Op, ...]) -> list[tuple[str, str]]:
    """(operation, 'conv' | 'bn') of a block's weighted Keras layers in `model.layers` order.

    Keras (`keras.src.ops.function.map_graph`) sorts layers by depth, the longest path to
    the model output, deepest first, and breaks ties by the pre-order of a depth-first
    walk from the output that visits each layer's inputs in order. Every path out of a
    block passes its concatenation, so each block's layers are contiguous and both keys
    can be taken within the block: each `conv2d_bn` is its three Keras layers in a chain.
    """
    inputs: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
    last = {INPUT: (INPUT, "")}  # the Keras layer whose output an operation's name means
    for name, srcs, op in ops:
        feeds = tuple(last[s] for s in srcs)
        if op[0] == "conv":
            inputs[(name, "conv")] = feeds
            inputs[(name, "bn")] = ((name, "conv"),)
            inputs[(name, "act")] = ((name, "bn"),)
            last[name] = (name, "act")
        else:
            inputs[(name, "")] = feeds
            last[name] = (name, "")
    consumers: dict[tuple[str, str], list[tuple[str, str]]] = {layer: [] for layer in inputs}
    for layer, srcs in inputs.items():
        for src in srcs:
            if src in consumers:
                consumers[src].append(layer)

    @functools.cache
    def depth(layer: tuple[str, str]) -> int:
        return max((depth(c) + 1 for c in consumers[layer]), default=0)

    preorder: dict[tuple[str, str], int] = {}

    def walk(layer: tuple[str, str]) -> None:
        if layer in preorder or layer not in inputs:  # seen, or the block input
            return
        preorder[layer] = len(preorder)
        for src in inputs[layer]:
            walk(src)

    walk(last[ops[-1][0]])
    ordered = sorted(inputs, key=lambda layer: (-depth(layer), preorder[layer]))
    return [layer for layer in ordered if layer[1] in ("conv", "bn")]


def keras_weight_order(model: InceptionV3) -> list[str]:
    """Flax module path of each Keras layer with weights, in `keras_model.layers` order
    (189 layers: each stem conv2d_bn's Conv2D then BatchNormalization, the mixed blocks'
    layers interleaved by depth as Keras sorts them, then `predictions`)."""
    del model  # the order does not depend on the fields
    order = [f"{name}/{part}" for name, *_ in STEM for part in ("conv", "bn")]
    for block, ops in BLOCKS:
        order += [f"{block}/{name}/{part}" for name, part in _keras_block_order(ops)]
    return [*order, "predictions"]


# Grad-CAM's A is mixed10's output (the last concatenation, before the global average
# pooling), the layer keras.io's Grad-CAM example takes.
# LRP as the thesis composes it for VGG-16 (`vgg16.LRP_COMPOSITE`): z^B at the first
# layer, whose input lies in [-1, 1] after the "tf" preprocessing; gamma for the stem and
# the first three mixed blocks, epsilon for the others, LRP-0 for the dense head. Every
# batch norm follows a conv and is merged into it.
LRP_COMPOSITE = (
    "input=zb:-1:1,conv[1-5]=gamma:0.25,mixed[0-2]=gamma:0.25,mixed*=epsilon:0.25,"
    "dense=lrp0,bn=epsilon:0.25"
)

SPEC = ModelSpec(
    name="inception_v3",
    module=InceptionV3,
    min_image_size=75,
    gradcam="mixed10",
    keras_gradcam_layer="mixed10",
    keras_layers=no_sown_activations,
    keras_application="InceptionV3",
    image_size=299,
    keras_weight_order=keras_weight_order,
    lrp_composite=LRP_COMPOSITE,
)

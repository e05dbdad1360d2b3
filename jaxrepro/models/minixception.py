"""The paper's mini Xception (Leventi-Peetz & Östreich, Listing 6) as a Flax Linen module.

Rescaling(1/255), a 5x5 VALID stem convolution, five residual blocks
(BN, ReLU, SeparableConv, BN, ReLU, SeparableConv, MaxPool 3/2 SAME, plus a strided
1x1 convolution of the block input), global average pooling, Dropout(0.5), Dense(1).
Batch norm uses the Keras defaults (momentum 0.99, epsilon 1e-3). Returns the logit;
the sigmoid of the Keras head is left to the loss. 718,849 trainable parameters and
721,857 in all (with the batch-norm running statistics) at 180x180x3, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models.convnet import BIAS_INIT, KERNEL_INIT, rescale
from jaxrepro.models.layers import batch_norm
from jaxrepro.models.ops import convolutions
from jaxrepro.models.ops.pooling import max_pool_3x3_s2, max_pool_3x3_s2_native
from jaxrepro.models.spec import DecisionPoints, GradcamLayer, ModelSpec, PoolPoint


class SeparableConv(nn.Module):
    """Keras SeparableConv2D without bias: depthwise 3x3 (multiplier 1), then pointwise 1x1.

    Flax stores the depthwise kernel as [kh, kw, 1, C] (Keras: [kh, kw, C, 1]); the
    Glorot limit is the same either way, since fan_in + fan_out does not change.
    """

    features: int
    kernel_size: int = 3
    # True: depthwise as shifted multiply-adds, 1x1 with the kernel gradient as a matrix
    # product (`jaxrepro.models.ops.convolutions`, several times faster on CPU, other bits);
    # False: XLA convolutions (`lax.conv_general_dilated`).
    fast_convs: bool = False
    # Every convolution's implementation, if given (the portable mode's), whatever
    # `fast_convs` says.
    conv: Callable[..., jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Depthwise then pointwise convolution, SAME padding, stride 1."""
        channels = x.shape[-1]
        k = self.kernel_size
        x = nn.Conv(
            channels,
            (k, k),
            padding="SAME",
            feature_group_count=channels,
            use_bias=False,
            kernel_init=KERNEL_INIT,
            name="depthwise",
            conv_general_dilated=_impl(self, convolutions.depthwise_conv),
        )(x)
        return nn.Conv(
            self.features,
            (1, 1),
            padding="VALID",
            use_bias=False,
            kernel_init=KERNEL_INIT,
            name="pointwise",
            conv_general_dilated=_impl(self, convolutions.pointwise_conv),
        )(x)


def _impl(module: nn.Module, fast: Callable[..., jax.Array]) -> Callable[..., jax.Array] | None:
    """The convolution for `nn.Conv(conv_general_dilated=...)`: the module's `conv` if
    set, else `fast` if its `fast_convs`, else None (Flax's own, XLA's convolution)."""
    if module.conv is not None:
        return module.conv
    return fast if module.fast_convs else None


class XceptionBlock(nn.Module):
    """One residual block of Listing 6; halves the spatial size.

    Parameter names: `bn_a`, `sepconv_a` (`depthwise`, `pointwise`), `bn_b`,
    `sepconv_b`, `residual`. Sown in its own 'intermediates' scope: `act_a`, `act_b`
    (ReLU outputs), `sepconv_a_out`, `sepconv_b_out`, `pool_out`, `residual_out`.
    """

    features: int
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    fast_convs: bool = False
    pool: Callable[[jax.Array], jax.Array] = max_pool_3x3_s2_native
    conv: Callable[..., jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Block output: max-pooled separable branch plus the strided 1x1 shortcut."""
        residual = x
        x = self.activation(batch_norm(train, "bn_a")(x))
        self.sow("intermediates", "act_a", x)
        x = SeparableConv(
            self.features, fast_convs=self.fast_convs, conv=self.conv, name="sepconv_a"
        )(x)
        self.sow("intermediates", "sepconv_a_out", x)
        x = self.activation(batch_norm(train, "bn_b")(x))
        self.sow("intermediates", "act_b", x)
        x = SeparableConv(
            self.features, fast_convs=self.fast_convs, conv=self.conv, name="sepconv_b"
        )(x)
        self.sow("intermediates", "sepconv_b_out", x)
        x = self.pool(x)
        self.sow("intermediates", "pool_out", x)
        residual = nn.Conv(
            self.features,
            (1, 1),
            strides=(2, 2),
            padding="SAME",
            use_bias=False,
            kernel_init=KERNEL_INIT,
            name="residual",
            conv_general_dilated=_impl(self, convolutions.pointwise_conv),
        )(residual)
        self.sow("intermediates", "residual_out", residual)
        return x + residual  # keras.layers.add([x, residual])


class MiniXception(nn.Module):
    """Keras mini Xception of Listing 6; input NHWC float32 pixels 0..255, output logits [N].

    Parameter names: `stem`, `block1`..`block5` (see `XceptionBlock`), `dense`; batch
    norm running averages live in the `batch_stats` collection. `train=True` uses
    batch statistics (pass `mutable=['batch_stats']`) and dropout (pass
    `rngs={'dropout': key}`). With `mutable=['intermediates']` it also returns the
    top-level activations in `INTERMEDIATES` plus each block's own (nested under
    `blockK`), each sown as a 1-tuple.
    """

    dropout_rate: float = 0.5
    sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    stem_features: int = 32
    # The ReLU inside every block; explanation methods swap in one with another
    # backward pass (guided backprop) via `model.clone(activation=...)`.
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    # The depthwise and 1x1 convolutions in the form XLA:CPU runs about 3x faster
    # (`jaxrepro.models.ops.convolutions`; other bits than XLA's convolutions; the
    # experiment config turns it on), or XLA's own convolutions (the module default).
    fast_convs: bool = False
    # 3x3 max pooling, stride 2, SAME: `nn.max_pool` with a cheaper backward pass that
    # gives the same bits, in float32 by jaxrepro's kernel (`max_pool_3x3_s2_native`;
    # the portable mode takes the XLA form `max_pool_3x3_s2`, see
    # `jaxrepro.models.ops.pooling`).
    pool: Callable[[jax.Array], jax.Array] = max_pool_3x3_s2_native
    # Every convolution's implementation, if given (the portable mode's,
    # `jaxrepro.models.ops.portable`); None: the stem by `first_conv`, the others by
    # `fast_convs`.
    conv: Callable[..., jax.Array] | None = None
    # The stem's convolution when `conv` is None: jaxrepro's kernel for an image's few
    # channels (`convolutions.first_conv`, other bits than XLA's); None: XLA's own.
    first_conv: Callable[..., jax.Array] | None = convolutions.first_conv
    # The dense layer's product (`lax.dot_general`'s signature).
    dot: Callable[..., jax.Array] = lax.dot_general

    INTERMEDIATES: ClassVar[tuple[str, ...]] = (
        "stem_out",
        "block1_out",
        "block2_out",
        "block3_out",
        "block4_out",
        "block5_out",
        "gap_out",
    )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """Logits [N] of images [N, H, W, 3]; `train` selects batch statistics and dropout."""
        x = rescale(jnp.asarray(x, jnp.float32))
        x = nn.Conv(
            self.stem_features,
            (5, 5),
            padding="VALID",
            use_bias=False,
            kernel_init=KERNEL_INIT,
            name="stem",
            conv_general_dilated=self.conv or self.first_conv,
        )(x)
        self.sow("intermediates", "stem_out", x)
        for i, size in enumerate(self.sizes, start=1):
            x = XceptionBlock(
                size,
                activation=self.activation,
                fast_convs=self.fast_convs,
                pool=self.pool,
                conv=self.conv,
                name=f"block{i}",
            )(x, train=train)
            self.sow("intermediates", f"block{i}_out", x)
        x = jnp.mean(x, axis=(1, 2))  # GlobalAveragePooling2D
        self.sow("intermediates", "gap_out", x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        x = nn.Dense(
            1, kernel_init=KERNEL_INIT, bias_init=BIAS_INIT, name="dense", dot_general=self.dot
        )(x)
        return x[:, 0]


def keras_layers(model: MiniXception) -> dict[str, str]:
    """Sown activation -> Keras layer of the twin, in forward order (a block's output is
    its `add` layer; the stem has no activation of its own)."""
    out = {"stem_out": "stem"}
    for i in range(1, len(model.sizes) + 1):
        b = f"block{i}"
        out.update(
            {
                f"{b}/act_a": f"{b}_act_a",
                f"{b}/sepconv_a_out": f"{b}_sepconv_a",
                f"{b}/act_b": f"{b}_act_b",
                f"{b}/sepconv_b_out": f"{b}_sepconv_b",
                f"{b}/pool_out": f"{b}_pool",
                f"{b}/residual_out": f"{b}_residual",
                f"{b}_out": f"{b}_add",
            }
        )
    out["gap_out"] = "gap"
    return out


def decision_points(model: MiniXception) -> DecisionPoints:
    """Per block, the ReLUs after both batch norms and the 3x3/2 SAME pool of the
    separable branch (the stem and the shortcut decide nothing)."""
    blocks = [f"block{i}" for i in range(1, len(model.sizes) + 1)]
    return DecisionPoints(
        relus=tuple(f"{b}/{a}" for b in blocks for a in ("act_a", "act_b")),
        pools=tuple(PoolPoint(f"{b}/sepconv_b_out", (3, 3), (2, 2), "SAME") for b in blocks),
    )


# Grad-CAM's A is block5's output, before the global average pooling. The 5x5 VALID
# stem needs 5 px; the blocks' SAME pooling takes any size (A is 1x1 up to 32 px).
SPEC = ModelSpec(
    name="minixception",
    module=MiniXception,
    min_image_size=5,
    gradcam=GradcamLayer("block5_out", module="block5", where="output"),
    keras_gradcam_layer="block5_add",
    keras_layers=keras_layers,
    config_options=("fast_convs",),
    decision_points=decision_points,
    portable_fields=(("pool", max_pool_3x3_s2),),
)

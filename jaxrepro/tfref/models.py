"""The paper's Keras models (Listings 3 and 6), layer for layer. TF side only.

Differences from the listings, none of which changes a parameter or a computation:

- Keras 3 names: `keras.layers.Rescaling` etc. (the listings use the TF 2.x
  `experimental.preprocessing` aliases).
- Layers are named after the Flax modules ('conv1', 'block2_bn_a', 'dense', see
  `transfer`), so weights map one to one.
- The head `Dense(1, activation="sigmoid")` is written as `Dense(1)` named 'dense'
  followed by `Activation("sigmoid")` named 'sigmoid': Keras's Dense applies its
  activation to exactly this output, so the model is the same, and `logit_model`
  exposes the logit, which is what the JAX models return.
- `augment=False` leaves out the augmentation block (it is the identity at inference).

ConvNet: 991,041 trainable parameters at 180x180; mini Xception: 718,849 trainable,
721,857 in all.
"""

from __future__ import annotations

import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # before keras is imported anywhere

import keras  # noqa: E402

init_glorot_u = keras.initializers.GlorotUniform

PDIM = 180


def data_augmentation() -> keras.Sequential:
    """The listings' augmentation: flip, rotate 0.1, zoom 0.2, each with seed 1."""
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=1),
            keras.layers.RandomRotation(0.1, seed=1),
            keras.layers.RandomZoom(0.2, seed=1),
        ],
        name="augmentation",
    )


def _head(x):
    """Dropout(0.5, seed 7001), the logit Dense(1) and its sigmoid."""
    x = keras.layers.Dropout(0.5, seed=7001, name="dropout")(x)
    logit = keras.layers.Dense(1, name="dense")(x)
    outputs = keras.layers.Activation("sigmoid", name="sigmoid")(logit)
    return outputs


def convnet(image_size: int = PDIM, augment: bool = True) -> keras.Model:
    """Listing 3: five 3x3 ReLU convolutions with max pooling, Flatten, Dropout, Dense."""
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    x = data_augmentation()(inputs) if augment else inputs
    x = keras.layers.Rescaling(1.0 / 255, name="rescaling")(x)
    for i, filters in enumerate((32, 64, 128, 256, 256), start=1):
        x = keras.layers.Conv2D(filters=filters, kernel_size=3, activation="relu", name=f"conv{i}")(
            x
        )
        if i < 5:
            x = keras.layers.MaxPooling2D(pool_size=2, name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inputs=inputs, outputs=_head(x), name="convnet")


def minixception(image_size: int = PDIM, augment: bool = True) -> keras.Model:
    """Listing 6: 5x5 stem, five residual separable-convolution blocks, GAP, Dropout, Dense."""
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    x = data_augmentation()(inputs) if augment else inputs
    x = keras.layers.Rescaling(1.0 / 255, name="rescaling")(x)
    x = keras.layers.Conv2D(
        filters=32,
        kernel_size=5,
        use_bias=False,
        kernel_initializer=init_glorot_u(seed=1),
        name="stem",
    )(x)
    for i, size in enumerate((32, 64, 128, 256, 512), start=1):
        b = f"block{i}_"
        residual = x
        x = keras.layers.BatchNormalization(name=b + "bn_a")(x)
        x = keras.layers.Activation("relu", name=b + "act_a")(x)
        x = keras.layers.SeparableConv2D(
            size,
            3,
            padding="same",
            use_bias=False,
            depthwise_initializer=init_glorot_u(seed=1),
            pointwise_initializer=init_glorot_u(seed=2),
            name=b + "sepconv_a",
        )(x)
        x = keras.layers.BatchNormalization(name=b + "bn_b")(x)
        x = keras.layers.Activation("relu", name=b + "act_b")(x)
        x = keras.layers.SeparableConv2D(
            size,
            3,
            padding="same",
            use_bias=False,
            depthwise_initializer=init_glorot_u(seed=1),
            pointwise_initializer=init_glorot_u(seed=2),
            name=b + "sepconv_b",
        )(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=b + "pool")(x)
        residual = keras.layers.Conv2D(
            size,
            1,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer=init_glorot_u(seed=1),
            name=b + "residual",
        )(residual)
        x = keras.layers.add([x, residual], name=b + "add")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs=inputs, outputs=_head(x), name="minixception")


MODELS = {"convnet": convnet, "minixception": minixception}


def build(name: str, image_size: int = PDIM, augment: bool = True) -> keras.Model:
    """The Keras model registered under `name` (same names as `jaxrepro.models`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {sorted(MODELS)}")
    return MODELS[name](image_size, augment)


def logit_model(model: keras.Model) -> keras.Model:
    """The same layers, output taken before the sigmoid: logits [N, 1]."""
    return keras.Model(
        inputs=model.inputs, outputs=model.get_layer("dense").output, name=f"{model.name}_logit"
    )


def count_params(model: keras.Model) -> dict[str, int]:
    """Trainable, non-trainable and total parameters, as `model.summary()` reports."""
    trainable = sum(int(v.numpy().size) for v in model.trainable_weights)
    frozen = sum(int(v.numpy().size) for v in model.non_trainable_weights)
    return {"trainable": trainable, "non_trainable": frozen, "total": trainable + frozen}

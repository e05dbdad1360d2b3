"""The Keras side of `python -m jaxrepro.analysis.kernels`: each op on given inputs. TF side only.

    python -m jaxrepro.tfref kernels INPUTS.npz OUT.npz [--tf-kernels onednn|eigen]

INPUTS.npz holds, as plain arrays keyed `<op>/<argument>`, each op's float32 arguments
in Flax layout and, for an op that is differentiated, the upstream gradient `<op>/g`.
Each op builds its Keras 3 layer for the input's shape, `set_weights` from the inputs
and calls it eagerly, op by op as the matched protocol's Keras step does (no
tf.function, so no graph rewrites such as oneDNN's fused convolutions), under a
GradientTape: `tape.gradient(y, [inputs, *layer.trainable_variables],
output_gradients=g)`. OUT.npz gets `<op>/y`, the gradients `<op>/d_<argument>` and any
other output, in Flax layout:

    rescale              Rescaling(1/255)
    stem5x5              Conv2D(f, 5, use_bias=False); d_kernel only (the stem reads images)
    conv3x3_relu         Conv2D(f, 3, activation="relu")
    conv3x3              Conv2D(f, 3)
    conv3x3_relu_in32    Conv2D(f, 3, activation="relu")
    maxpool2x2           MaxPooling2D(2)
    maxpool3x3s2         MaxPooling2D(3, strides=2, padding="same")
    dense                Dense(units)
    separable,
    separable_fast       SeparableConv2D(f, 3, padding="same", use_bias=False); the
                         depthwise kernel and its gradient transposed from and to Flax's
                         [kh, kw, 1, C] (`transfer.depthwise_to_keras` / `_to_flax`)
    residual1x1s2        Conv2D(f, 1, strides=2, padding="same", use_bias=False)
    batchnorm_train      BatchNormalization()(x, training=True); also the updated
                         moving_mean and moving_var
    batchnorm_inference  BatchNormalization()(x, training=False)
    relu                 Activation("relu")
    add                  Add()([x, residual])
    gap                  GlobalAveragePooling2D()
    bce                  tf.reduce_mean(keras.losses.binary_crossentropy(labels[:, None],
                         logits[:, None], from_logits=True)), as `jaxrepro.tfref.matched`
    rmsprop              keras.optimizers.RMSprop() (defaults) applied with g1, then g2,
                         to a variable w: w1, w2
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxrepro.tfref import transfer, weights

Arrays = dict[str, np.ndarray]


def _layer(
    layer: Any,
    a: Arrays,
    weight_names: Sequence[str] = (),
    weight_values: Sequence[np.ndarray] | None = None,
    inputs: Sequence[str] = ("x",),
    differentiate_inputs: bool = True,
    **call: Any,
) -> Arrays:
    """Call `layer` on `a[inputs]` with weights `weight_values` (default `a[weight_names]`,
    Keras order); with `a["g"]`, the gradients of y w.r.t. the inputs and the trainable
    weights, named `d_<name>`."""
    import tensorflow as tf  # noqa: PLC0415

    xs = [tf.constant(a[k]) for k in inputs]
    shapes = [tuple(x.shape) for x in xs]
    layer.build(shapes[0] if len(xs) == 1 else shapes)
    layer.set_weights(
        list(weight_values) if weight_values is not None else [a[k] for k in weight_names]
    )
    with tf.GradientTape() as tape:
        for x in xs:
            tape.watch(x)
        y = layer(xs[0] if len(xs) == 1 else xs, **call)
    out = {"y": y.numpy()}
    if "g" not in a:
        return out
    named = [(n, v) for n, v in zip(weight_names, layer.weights) if v.trainable]
    sources = (list(zip(inputs, xs)) if differentiate_inputs else []) + named
    grads = tape.gradient(y, [v for _, v in sources], output_gradients=tf.constant(a["g"], y.dtype))
    out.update({f"d_{n}": g.numpy() for (n, _), g in zip(sources, grads)})
    return out


def _conv(differentiate_inputs: bool = True, **options: Any) -> Callable[[Arrays], Arrays]:
    """A Conv2D of the kernel's size and filters, with a bias if the inputs have one."""

    def run(a: Arrays) -> Arrays:
        import keras  # noqa: PLC0415

        kh, kw, _, filters = a["kernel"].shape
        bias = "bias" in a
        layer = keras.layers.Conv2D(filters, (kh, kw), use_bias=bias, **options)
        names = ("kernel", "bias") if bias else ("kernel",)
        return _layer(layer, a, names, differentiate_inputs=differentiate_inputs)

    return run


def _separable(a: Arrays) -> Arrays:
    import keras  # noqa: PLC0415

    layer = keras.layers.SeparableConv2D(
        a["pointwise"].shape[-1], 3, padding="same", use_bias=False
    )
    values = (transfer.depthwise_to_keras(a["depthwise"]), a["pointwise"])
    out = _layer(layer, a, ("depthwise", "pointwise"), values)
    if "d_depthwise" in out:
        out["d_depthwise"] = transfer.depthwise_to_flax(out["d_depthwise"])
    return out


def _batch_norm(training: bool) -> Callable[[Arrays], Arrays]:
    def run(a: Arrays) -> Arrays:
        import keras  # noqa: PLC0415

        layer = keras.layers.BatchNormalization()  # momentum 0.99, epsilon 1e-3
        out = _layer(layer, a, ("scale", "bias", "mean", "var"), training=training)
        if training:
            out["moving_mean"] = layer.moving_mean.numpy()
            out["moving_var"] = layer.moving_variance.numpy()
        return out

    return run


def _keras_layer(make: Callable[[Any], Any], **options: Any) -> Callable[[Arrays], Arrays]:
    """An op of one weightless layer `make(keras.layers)`."""

    def run(a: Arrays) -> Arrays:
        import keras  # noqa: PLC0415

        return _layer(make(keras.layers), a, **options)

    return run


def _dense(a: Arrays) -> Arrays:
    import keras  # noqa: PLC0415

    return _layer(keras.layers.Dense(a["kernel"].shape[-1]), a, ("kernel", "bias"))


def _bce(a: Arrays) -> Arrays:
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    logits, labels = tf.constant(a["logits"]), tf.constant(a["labels"])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = tf.reduce_mean(
            keras.losses.binary_crossentropy(labels[:, None], logits[:, None], from_logits=True)
        )
    d = tape.gradient(loss, logits, output_gradients=tf.constant(a["g"]))
    return {"y": loss.numpy(), "d_logits": d.numpy()}


def _rmsprop(a: Arrays) -> Arrays:
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    w = keras.Variable(a["w"])
    optimizer = keras.optimizers.RMSprop()  # 1e-3, rho 0.9, epsilon 1e-7
    out = {}
    for k in (1, 2):
        optimizer.apply_gradients([(tf.constant(a[f"g{k}"]), w)])
        out[f"w{k}"] = np.array(w.numpy())
    return out


OPS: dict[str, Callable[[Arrays], Arrays]] = {
    "rescale": _keras_layer(lambda layers: layers.Rescaling(1.0 / 255)),
    "stem5x5": _conv(differentiate_inputs=False),
    "conv3x3_relu": _conv(activation="relu"),
    "conv3x3": _conv(),
    "conv3x3_relu_in32": _conv(activation="relu"),
    "maxpool2x2": _keras_layer(lambda layers: layers.MaxPooling2D(2)),
    "maxpool3x3s2": _keras_layer(lambda layers: layers.MaxPooling2D(3, strides=2, padding="same")),
    "dense": _dense,
    "separable": _separable,
    "separable_fast": _separable,
    "residual1x1s2": _conv(strides=2, padding="same"),
    "batchnorm_train": _batch_norm(training=True),
    "batchnorm_inference": _batch_norm(training=False),
    "relu": _keras_layer(lambda layers: layers.Activation("relu")),
    "add": _keras_layer(lambda layers: layers.Add(), inputs=("x", "residual")),
    "gap": _keras_layer(lambda layers: layers.GlobalAveragePooling2D()),
    "bce": _bce,
    "rmsprop": _rmsprop,
}


def run(inputs_path: str, out_path: str) -> dict:
    """Every op of INPUTS.npz in Keras, outputs to OUT.npz; the ops run, in order."""
    by_op: dict[str, Arrays] = {}
    for key, value in weights.load(inputs_path).items():
        op, name = key.split("/", 1)
        by_op.setdefault(op, {})[name] = value
    unknown = sorted(set(by_op) - set(OPS))
    if unknown:
        raise ValueError(f"ops without a Keras counterpart: {unknown}")
    out = {}
    for op, a in by_op.items():
        for name, value in OPS[op](a).items():
            out[f"{op}/{name}"] = np.asarray(value)
    weights.save(out_path, out)
    return {"ops": list(by_op)}

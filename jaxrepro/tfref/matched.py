"""The Keras half of the matched protocol (`jaxrepro.analysis.matched`). TF side only.

    python -m jaxrepro.tfref matched MODEL WEIGHTS.npz INPUTS.npz LAYERS.json OUTDIR

The JAX process writes the initial weights (Flax-named, see `weights`), LAYERS.json
(from the model's spec: `activations`, each sown Flax activation's Keras layer in
forward order, and `gradcam_layer`, the Keras layer whose output is Grad-CAM's A) and
INPUTS.npz with, as plain arrays (read with `allow_pickle=False`):

    train_images  float32 [N, B, S, S, 3]  the N training batches, already augmented
    train_labels  float32 [N, B]
    probe_images  float32 [P, S, S, 3]     un-augmented validation images
    val_images    uint8   [V, S, S, 3]     the validation split (accuracy), optional
    val_labels    int     [V]

and this writes into OUTDIR:

    weights_000.npz .. weights_NNN.npz  every weight Keras holds at step 0 (right after
                                        loading: must be the JAX init bit for bit) and
                                        after each step, Flax names and layout
    forward.npz      activations of the probe batch at step 0, inference mode, keyed by
                     the Flax sown name they correspond to (`ACTIVATIONS`), plus 'logits'
    gradients.npz    d(mean loss)/d(param) of step 1 (first batch, batch norm in training
                     mode), Flax parameter names
    decisions.npz    the activations of step 1's forward (first batch, initial weights,
                     training mode), keyed as forward.npz: the ReLU outputs and pool
                     inputs `jaxrepro.analysis.decisions` reads the decisions from
    trajectory.npz   'loss' [N]: the mean loss of each step, before its update
    gradcam.npz      'start', 'end': Grad-CAM [P, S, S] of the probe images at step 0 and
                     after N steps; 'start_lowres', 'end_lowres' at A's resolution
    result.json      validation accuracy of the final weights, versions

How the Keras side is made to compute what the JAX side does:
  * no augmentation layers (`build(..., augment=False)`): the batches arrive augmented;
  * the Dropout layer's rate is set to 0, so `training=True` affects batch norm only
    (batch statistics and moving-average updates), as the JAX side with dropout_rate=0;
  * the loss is `binary_crossentropy(labels, logit, from_logits=True)` on the logit
    model (TF's `sigmoid_cross_entropy_with_logits`, the formula optax uses) and not
    the listings' BCE on the sigmoid output, whose clipping would be another formula;
  * `keras.optimizers.RMSprop()` with its defaults; the step is eager Keras
    (GradientTape, `apply_gradients`), no XLA compilation.
Grad-CAM follows the keras.io example: a model with outputs (A, logit), the gradient
of the logit w.r.t. A under a GradientTape, channel weights = its spatial mean,
ReLU(A . weights) / max; then upsampled bilinearly to the input size
(`tf.image.resize`) and clipped to [0, 1].
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxrepro.tfref import transfer, weights


def read_layers(path: str | Path) -> dict[str, Any]:
    """LAYERS.json: {'activations': {flax sown name: keras layer}, 'gradcam_layer': name}."""
    return json.loads(Path(path).read_text())


def _trainable(model) -> list[tuple[str, Any]]:
    """(Flax name, Keras variable) of every trainable variable, in layer order."""
    out = []
    for layer in model.layers:
        for variable in layer.trainable_weights:
            name, _ = transfer.flax_name(layer.name, variable.name)
            out.append((name, variable))
    return out


def _grad_to_flax(name: str, value: np.ndarray) -> np.ndarray:
    return transfer.depthwise_to_flax(value) if name.endswith("depthwise/kernel") else value


def keras_gradcam(
    model: Any, gradcam_layer: str, head: str = "dense", target: Any = None
) -> Callable:
    """Grad-CAM as in the keras.io example: `x -> (A-sized maps, input-sized maps)`.

    Eager TF (GradientTape), explaining the logit of layer `head` (the one logit of the
    paper's models, or of class `target[i]` for image i of a multi-class head); maps
    normalised to their maximum (all-zero maps stay zero) and bilinearly upsampled to
    the input size.
    """
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    cam_model = keras.Model(
        model.inputs, [model.get_layer(gradcam_layer).output, model.get_layer(head).output]
    )

    def gradcam(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size = int(x.shape[1])
        with tf.GradientTape() as tape:
            conv_out, logit = cam_model(x, training=False)
            if target is None:
                score = logit[:, 0]
            else:
                score = tf.gather(logit, np.asarray(target), axis=1, batch_dims=1)
        grads = tape.gradient(score, conv_out)
        pooled = tf.reduce_mean(grads, axis=(1, 2))  # [P, c]
        heat = tf.einsum("nhwc,nc->nhw", conv_out, pooled)
        heat = tf.maximum(heat, 0.0)
        top = tf.reduce_max(heat, axis=(1, 2), keepdims=True)
        heat = tf.where(top > 0, heat / tf.where(top > 0, top, 1.0), 0.0)
        up = tf.image.resize(heat[..., None], (size, size), method="bilinear")[..., 0]
        return np.asarray(heat.numpy()), np.asarray(tf.clip_by_value(up, 0.0, 1.0).numpy())

    return gradcam


def run(model_name: str, weights_in: str, inputs: str, layers_file: str, outdir: str) -> dict:
    """Load, probe, train and explain in Keras; write the files listed in the docstring."""
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from jaxrepro.tfref import models  # noqa: PLC0415

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    with np.load(inputs, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    train_x, train_y = arrays["train_images"], arrays["train_labels"]
    probe_x = arrays["probe_images"]
    size = int(probe_x.shape[1])

    model = models.build(model_name, size, augment=False)
    model.get_layer("dropout").rate = 0.0  # dropout off; training=True still drives BN
    transfer.load_into_keras(model, weights.load(weights_in))
    weights.save(out / "weights_000.npz", transfer.from_keras(model))

    logit_model = models.logit_model(model)
    layers = read_layers(layers_file)
    names = layers["activations"]
    probe_model = keras.Model(
        model.inputs,
        [model.get_layer(k).output for k in names.values()] + [model.get_layer("dense").output],
    )
    acts = probe_model(probe_x, training=False)
    forward = {flax: np.asarray(a.numpy(), np.float32) for flax, a in zip(names, acts)}
    forward["logits"] = np.asarray(acts[-1].numpy(), np.float32)[:, 0]
    weights.save(out / "forward.npz", forward)

    # Step 1's forward, eager op by op as in the tape below, so the same bits; the
    # moving statistics that training mode updates are put back before training.
    moving = [(v, v.numpy()) for v in model.non_trainable_variables]
    acts = probe_model(train_x[0], training=True)
    for variable, value in moving:
        variable.assign(value)
    weights.save(
        out / "decisions.npz",
        {flax: np.asarray(a.numpy(), np.float32) for flax, a in zip(names, acts)},
    )

    gradcam = keras_gradcam(model, layers["gradcam_layer"])

    cams = {}
    cams["start_lowres"], cams["start"] = gradcam(probe_x)

    trainable = _trainable(model)
    variables = [v for _, v in trainable]
    optimizer = keras.optimizers.RMSprop()  # Keras defaults: 1e-3, rho 0.9, eps 1e-7

    def loss_and_grads(x, y):
        with tf.GradientTape() as tape:
            logits = logit_model(x, training=True)[:, 0]  # BN: batch statistics, updates
            loss = tf.reduce_mean(
                keras.losses.binary_crossentropy(y[:, None], logits[:, None], from_logits=True)
            )
        return loss, tape.gradient(loss, variables)

    losses = []
    for step in range(train_x.shape[0]):
        loss, grads = loss_and_grads(train_x[step], train_y[step])
        if step == 0:
            weights.save(
                out / "gradients.npz",
                {
                    name: _grad_to_flax(name, np.asarray(g.numpy(), np.float32))
                    for (name, _), g in zip(trainable, grads)
                },
            )
        optimizer.apply_gradients(zip(grads, variables))
        losses.append(float(loss.numpy()))
        weights.save(out / f"weights_{step + 1:03d}.npz", transfer.from_keras(model))
    np.savez(out / "trajectory.npz", loss=np.asarray(losses, np.float32))

    cams["end_lowres"], cams["end"] = gradcam(probe_x)
    weights.save(out / "gradcam.npz", {k: np.asarray(v, np.float32) for k, v in cams.items()})

    result: dict[str, Any] = {
        "model": model_name,
        "image_size": size,
        "steps": int(train_x.shape[0]),
    }
    if "val_images" in arrays and len(arrays["val_labels"]):
        vx, vy = arrays["val_images"], arrays["val_labels"]
        correct = 0
        for start in range(0, len(vy), 100):
            z = logit_model(vx[start : start + 100].astype(np.float32), training=False)
            correct += int(np.sum((z.numpy()[:, 0] > 0) == (vy[start : start + 100] > 0)))
        result["val_accuracy"] = correct / len(vy)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result

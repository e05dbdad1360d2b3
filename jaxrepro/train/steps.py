"""The training step, written once: loss, gradients, update, metrics, fingerprints.

`loss_and_grads` is the forward and backward pass every path shares: the training
step (`train_step`), the data-parallel micro-batches (`jaxrepro.train.parallel`), the
per-layer probe (`jaxrepro.train.probe`) and the matched JAX/Keras protocol
(`jaxrepro.analysis.matched`). `evaluate` is the one evaluation loop.

Bits: the batch is a pure function of (seed, step) and so are its keys: augmentation
`fold_in(augment stream, step)` and then `fold_in(., example position)`, dropout
`fold_in(dropout stream, step)`. Augmentation runs inside the jitted step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrepro import fingerprint, rng
from jaxrepro.data.augment import augment_batch
from jaxrepro.train.setup import TrainState


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy on the logit (sigmoid folded in, numerically stable)."""
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


class Gradients(NamedTuple):
    """One forward and backward pass in training mode."""

    loss: jax.Array  # mean BCE over the batch
    logits: jax.Array  # [N]
    batch_stats: Any  # the batch norms' updated running statistics
    grads: Any  # d loss / d params


def loss_and_grads(
    model: nn.Module,
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    labels: jax.Array,
    dropout_key: jax.Array | None = None,
) -> Gradients:
    """The mean loss of a batch (training mode: batch statistics, dropout from
    `dropout_key`; None for a model without dropout) and its parameter gradient."""
    rngs = {} if dropout_key is None else {"dropout": dropout_key}

    def loss_fn(p):
        logits, updates = model.apply(
            {"params": p, "batch_stats": batch_stats},
            images,
            train=True,
            rngs=rngs,
            mutable=["batch_stats"],
        )
        return jnp.mean(bce_loss(logits, labels)), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return Gradients(loss, logits, updates.get("batch_stats", {}), grads)


def apply_gradients(
    tx: optax.GradientTransformation, state: TrainState, grads: Any, batch_stats: Any
) -> TrainState:
    """The next state: one optimizer update and the new batch-norm statistics."""
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, param_updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )


def correct_count(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """How many predictions (logit > 0 is class 1) equal the labels."""
    return jnp.sum((logits > 0) == (labels > 0))


def augmentation(config: Mapping[str, Any]) -> dict[str, Any]:
    """The training step's augmentation settings: the config's `augment` (flip, rotation,
    zoom), and `native`, whether to resample with jaxrepro's kernel (the same bits as
    the XLA form, `augment.resample_native`). The portable mode keeps every op off the
    kernels, which the host's compiler builds, as its models do (`ModelSpec.build`)."""
    return {**config["augment"], "native": config.get("determinism") != "portable"}


def augment_images(
    images: jax.Array,
    key: jax.Array,
    augment: Mapping[str, Any],
    positions: jax.Array | None = None,
) -> jax.Array:
    """uint8 images as augmented float pixels: example at position i with fold_in(key, i).

    `augment`: flip, rotation, zoom and optionally native (`augmentation`)."""
    return augment_batch(
        key,
        images.astype(jnp.float32),
        flip=augment["flip"],
        rotation=augment["rotation"],
        zoom=augment["zoom"],
        positions=positions,
        native=augment.get("native", False),
    )


def state_fingerprints(state: TrainState) -> dict:
    """On-device fingerprints of every leaf of params, batch stats and optimizer state."""
    return {
        "params": fingerprint.tree_fingerprint(state.params),
        "batch_stats": fingerprint.tree_fingerprint(state.batch_stats),
        "opt_state": fingerprint.tree_fingerprint(state.opt_state),
    }


def train_step(
    model: nn.Module, tx: optax.GradientTransformation, augment: Mapping[str, Any]
) -> Callable:
    """The unjitted step `(state, images_u8, labels, keys) -> (state, metrics, fingerprints)`."""

    def step_fn(state: TrainState, images, labels, keys):
        step = state.step
        x = augment_images(images, rng.step_key(keys["augment"], step), augment)
        g = loss_and_grads(
            model, state.params, state.batch_stats, x, labels, rng.step_key(keys["dropout"], step)
        )
        new = apply_gradients(tx, state, g.grads, g.batch_stats)
        metrics = {"loss": g.loss, "correct": correct_count(g.logits, labels)}
        return new, metrics, state_fingerprints(new)

    return step_fn


def make_train_step(
    model: nn.Module, tx: optax.GradientTransformation, augment: Mapping[str, Any]
) -> Callable:
    """`train_step` jitted for one device, the state donated."""
    return jax.jit(train_step(model, tx, augment), donate_argnums=0)


# ------------------------------------------------------------------ evaluation


def make_eval_step(model: nn.Module) -> Callable:
    """A jitted `(variables, images_u8, labels, weights) -> (loss sum, correct, logits)`."""

    def eval_step(variables, images, labels, weights):
        logits = model.apply(variables, images.astype(jnp.float32), train=False)
        losses = bce_loss(logits, labels) * weights
        correct = jnp.sum(((logits > 0) == (labels > 0)) * weights)
        return jnp.sum(losses), correct, logits

    return jax.jit(eval_step)


class Evaluation(NamedTuple):
    """Loss and accuracy over a split, and every image's logit."""

    loss: float
    accuracy: float
    logits: np.ndarray


def evaluate(
    eval_step: Callable, variables: Any, images: np.ndarray, labels: np.ndarray, batch_size: int
) -> Evaluation:
    """Evaluate in fixed order, in batches of `batch_size` (the last one padded with
    repeats of the last image, weighted 0), so every batch has one compiled shape."""
    n = len(labels)
    loss_sum, correct, logits = 0.0, 0, []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        weights = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        loss, right, z = eval_step(variables, images[idx], labels[idx], weights)
        loss_sum += float(loss)
        correct += int(right)
        logits.append(np.asarray(z)[: n - start])
    return Evaluation(
        loss_sum / n, correct / n, np.concatenate(logits) if logits else np.zeros(0, np.float32)
    )


def probe_logits(
    eval_step: Callable, variables: Any, images: np.ndarray, labels: np.ndarray, count: int
) -> list[float]:
    """Logits of the first `count` images in one batch (a cheap per-epoch probe)."""
    if count <= 0:
        return []
    idx = np.arange(min(count, len(labels)))
    _, _, logits = eval_step(variables, images[idx], labels[idx], np.ones(len(idx), np.float32))
    return [float(v) for v in np.asarray(logits)]

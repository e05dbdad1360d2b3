"""Data-parallel placement, and a gradient combination whose bits ignore the device count.

Two ways to train on `num_devices` devices (a 1-D mesh, axis "data"):

- plain (`microbatches = 0`): the batch is sharded with a NamedSharding and XLA
  partitions the usual step, summing gradients with its own all-reduce. Correct on any
  device count that divides the batch, but the bits depend on the device count,
  because the reductions over the batch are split differently.
- invariant (`microbatches = M > 0`): the batch of B is cut into M fixed micro-batches
  of B/M examples (micro-batch m holds examples m*B/M .. (m+1)*B/M - 1). Each device
  runs a loop over its M/D micro-batches; the loop's trip count is a runtime argument,
  so XLA compiles one loop body, the same one on 1 device (8 trips) as on 8 devices
  (1 trip): a constant trip count of 1 would let XLA inline the body and compile it
  differently. Each micro-batch's loss gradient and batch-norm statistics come from
  that micro-batch alone ("ghost" batch norm over B/M examples: other maths than
  full-batch batch norm, hence an option). All M results are all-gathered and summed
  in a fixed pairwise tree in micro-batch order, then divided by M. The result is a
  function of (params, batch, M) only, not of D.

Cost of the invariant mode (`benchmarks/parallel_bench.py`): every device holds M/D
gradient slots plus M gathered gradients ((M + M/D) x params memory) and receives
(M - M/D) x params bytes per step, instead of an all-reduce of about 2 x params. On
XLA:CPU the step is also several times slower, mostly because XLA:CPU runs the run-time
loop's body slowly.

Both steps are `jaxrepro.train.steps`' step with another placement: the same
`loss_and_grads`, augmentation keys and update.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrepro import rng
from jaxrepro.errors import UserError
from jaxrepro.train import steps

DATA = "data"  # the mesh axis the batch is split over


class LayoutError(UserError, ValueError):
    """Batch size, micro-batch count and device count that do not fit together."""


def check_layout(
    batch_size: int, num_devices: int, microbatches: int, available: int | None = None
) -> None:
    """Raise LayoutError unless D divides B, and (if M > 0) M divides B and D divides M."""
    available = jax.device_count() if available is None else available
    if num_devices < 1 or num_devices > available:
        raise LayoutError(
            f"num_devices={num_devices}, but {available} device(s) are "
            "available (on CPU, simulate more with XLA_FLAGS="
            "--xla_force_host_platform_device_count=N)"
        )
    if batch_size % num_devices:
        raise LayoutError(f"num_devices={num_devices} does not divide batch_size={batch_size}")
    if microbatches < 0:
        raise LayoutError(f"microbatches={microbatches} must be 0 (off) or positive")
    if microbatches:
        if batch_size % microbatches:
            raise LayoutError(
                f"microbatches={microbatches} does not divide batch_size={batch_size}"
            )
        if microbatches % num_devices:
            raise LayoutError(
                f"num_devices={num_devices} does not divide microbatches={microbatches}"
            )


def make_mesh(num_devices: int) -> Mesh:
    """A 1-D mesh over the first `num_devices` global devices (all processes' devices)."""
    return Mesh(np.asarray(jax.devices()[:num_devices]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA))


def put(tree: Any, sharding: NamedSharding) -> Any:
    """Place a pytree of host (or local) values as global arrays with `sharding`.

    Every process passes the same full values and contributes the shards its devices
    hold, so this works alike in one process and in several.
    """

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(
                one(jax.random.key_data(x)), impl=jax.random.key_impl(x)
            )
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree)


def to_host(tree: Any) -> Any:
    """Numpy copies of replicated global arrays (read from a device of this process)."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)

    return jax.tree.map(one, tree)


def pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over axis 0 in a fixed binary tree: ((x0+x1)+(x2+x3))+..., an odd tail last."""
    while x.shape[0] > 1:
        n = x.shape[0]
        even = n - n % 2
        pairs = x[:even].reshape(even // 2, 2, *x.shape[1:])
        s = pairs[:, 0] + pairs[:, 1]
        x = jnp.concatenate([s, x[even:]]) if n % 2 else s
    return x[0]


def tree_mean(stacked: Any, count: int) -> Any:
    """Mean over the leading axis of every leaf: fixed-tree sum, then / count."""
    return jax.tree.map(lambda x: pairwise_sum(x) / jnp.asarray(count, x.dtype), stacked)


def microbatch_results(
    fn: Callable,
    images: jax.Array,
    labels: jax.Array,
    first: jax.Array,
    count: jax.Array,
    batch_per_micro: int,
) -> Any:
    """Per-micro-batch results of this device's `count` micro-batches, stacked.

    `fn(images, labels, m)` -> pytree for micro-batch m (global index `first + j`). The
    loop runs `count` times, a traced value, so XLA keeps it a loop and compiles the body
    once, whatever the number of devices. Optimization barriers around the body's inputs
    and outputs keep XLA from fusing the slicing of this device's buffer (whose size
    depends on the device count) into the body's arithmetic.
    """
    slots = images.shape[0] // batch_per_micro
    images = images.reshape(slots, batch_per_micro, *images.shape[1:])
    labels = labels.reshape(slots, batch_per_micro, *labels.shape[1:])
    m0 = jnp.zeros((), jnp.int32)
    out_shape = jax.eval_shape(fn, images[0], labels[0], m0)
    buffers = jax.tree.map(lambda s: jnp.zeros((slots, *s.shape), s.dtype), out_shape)

    def body(j, buffers):
        x, y = jax.lax.optimization_barrier((images[j], labels[j]))
        out = jax.lax.optimization_barrier(fn(x, y, first + j))
        return jax.tree.map(lambda b, o: b.at[j].set(o), buffers, out)

    return jax.lax.fori_loop(0, count, body, buffers)


def make_invariant_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    augment: Mapping[str, Any],
    mesh: Mesh,
    batch_size: int,
    microbatches: int,
) -> Callable:
    """A jitted `(state, images_u8, labels, keys) -> (state, metrics, fingerprints)`.

    The signature of `steps.train_step`; state and outputs replicated on `mesh`, images
    and labels sharded over it. The bits do not depend on `mesh.size`.
    """
    num_devices = mesh.size
    check_layout(batch_size, num_devices, microbatches, available=len(mesh.devices.flat))
    bm, per_device = batch_size // microbatches, microbatches // num_devices

    def step_fn(state, images, labels, keys, count):
        step = state.step
        augment_key = rng.step_key(keys["augment"], step)
        dropout_key = rng.step_key(keys["dropout"], step)

        def microbatch(x_u8, y, m):
            # Example i of the batch (i = m * bm + k) is augmented with fold_in(key, i),
            # as in the single-program step; dropout gets its own key per micro-batch.
            positions = m * bm + jnp.arange(bm, dtype=jnp.int32)
            x = steps.augment_images(x_u8, augment_key, augment, positions)
            g = steps.loss_and_grads(
                model, state.params, state.batch_stats, x, y, jax.random.fold_in(dropout_key, m)
            )
            return {
                "grads": g.grads,
                "batch_stats": g.batch_stats,
                "loss": g.loss,
                "correct": steps.correct_count(g.logits, y).astype(jnp.int32),
            }

        first = jax.lax.axis_index(DATA) * per_device
        local = microbatch_results(microbatch, images, labels, first, count, bm)
        every = jax.tree.map(lambda x: jax.lax.all_gather(x, DATA, axis=0, tiled=True), local)
        new = steps.apply_gradients(
            tx,
            state,
            tree_mean(every["grads"], microbatches),
            tree_mean(every["batch_stats"], microbatches),
        )
        loss = pairwise_sum(every["loss"]) / microbatches
        correct = jnp.sum(every["correct"])  # integers: exact in any order
        return new, {"loss": loss, "correct": correct}, steps.state_fingerprints(new)

    sharded = jax.shard_map(
        step_fn,
        mesh=mesh,
        in_specs=(P(), P(DATA), P(DATA), P(), P()),
        out_specs=(P(), P(), P()),
        # all_gather makes every device's copy equal; JAX's type
        # system cannot tell, so the replication check is off.
        check_vma=False,
    )
    rep = replicated(mesh)
    jitted = jax.jit(sharded, donate_argnums=0)
    count = put(np.int32(per_device), rep)  # a runtime value: keeps the loop a loop

    def train_step(state, images, labels, keys):
        return jitted(state, images, labels, keys, count)

    return train_step


def make_sharded_step(
    model: nn.Module, tx: optax.GradientTransformation, augment: Mapping[str, Any], mesh: Mesh
) -> Callable:
    """`steps.train_step` jitted with the batch sharded on `mesh`.

    XLA partitions it and all-reduces the gradients itself: correct, but the bits
    change with the device count.
    """
    rep, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        steps.train_step(model, tx, augment),
        in_shardings=(rep, data, data, rep),
        out_shardings=(rep, rep, rep),
        donate_argnums=0,
    )


def make_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    augment: Mapping[str, Any],
    mesh: Mesh | None,
    microbatches: int = 0,
    batch_size: int = 0,
) -> Callable:
    """The training step of a placement: one device (`mesh=None`), the batch sharded by
    XLA (`microbatches=0`), or device-count invariant micro-batches."""
    if mesh is None:
        return steps.make_train_step(model, tx, augment)
    if microbatches:
        return make_invariant_step(model, tx, augment, mesh, batch_size, microbatches)
    return make_sharded_step(model, tx, augment, mesh)

"""Keras's RMSprop as an optax transformation, operation for operation.

`optax.rmsprop` puts epsilon in a different place and multiplies by an rsqrt, so it
is the same algorithm with different bits. For a framework comparison to measure
numerics and not the optimizer, this follows Keras 3 (keras/src/optimizers/rmsprop.py):

    v <- rho * v + (1 - rho) * g**2
    w <- w - (lr * g) / sqrt(v + epsilon)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class KerasRMSpropState(NamedTuple):
    """The per-parameter velocity (Keras's `velocities`), starting at zero."""

    velocity: optax.Params


def keras_rmsprop(learning_rate: float = 1e-3, rho: float = 0.9,
                  epsilon: float = 1e-7) -> optax.GradientTransformation:
    """RMSprop with Keras 3 defaults and operation order (no momentum, not centred)."""

    def init(params: optax.Params) -> KerasRMSpropState:
        return KerasRMSpropState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        velocity = jax.tree.map(lambda v, g: rho * v + (1 - rho) * jnp.square(g),
                                state.velocity, grads)
        # Negated increment: w + (-d) rounds exactly like Keras's w - d.
        updates = jax.tree.map(lambda g, v: -((learning_rate * g) / jnp.sqrt(v + epsilon)),
                               grads, velocity)
        return updates, KerasRMSpropState(velocity)

    return optax.GradientTransformation(init, update)


OPTIMIZERS = {"rmsprop": keras_rmsprop}


def make_optimizer(name: str, **kwargs) -> optax.GradientTransformation:
    """An optimizer by config name."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](**kwargs)

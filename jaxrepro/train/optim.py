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

from jaxrepro.config import ConfigError


class KerasRMSpropState(NamedTuple):
    """The per-parameter velocity (Keras's `velocities`), starting at zero."""

    velocity: optax.Params


def keras_rmsprop(
    learning_rate: float = 1e-3, rho: float = 0.9, epsilon: float = 1e-7
) -> optax.GradientTransformation:
    """RMSprop with Keras 3 defaults and operation order (no momentum, not centred)."""

    def init(params: optax.Params) -> KerasRMSpropState:
        return KerasRMSpropState(jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        del params
        velocity = jax.tree.map(
            lambda v, g: rho * v + (1 - rho) * jnp.square(g), state.velocity, grads
        )
        updates = jax.tree.map(
            lambda g, v: _increment(learning_rate, g, v, epsilon), grads, velocity
        )
        return updates, KerasRMSpropState(velocity)

    return optax.GradientTransformation(init, update)


def _increment(lr: float, g: jax.Array, v: jax.Array, epsilon: float) -> jax.Array:
    """-(lr * g) / sqrt(v + epsilon), rounded op by op as Keras does.

    XLA's simplifier rewrites a / sqrt(b) into a * rsqrt(b) (optax's form, other
    bits); the optimization barrier keeps the square root a value of its own. The
    negation is exact: w + (-d) rounds exactly like Keras's w - d.
    """
    denominator = jax.lax.optimization_barrier(jnp.sqrt(v + epsilon))
    return -((lr * g) / denominator)


def frozen() -> optax.GradientTransformation:
    """No updates and no state: the optimizer of an imported network
    (`jaxrepro.pretrained`), whose checkpoint then holds its weights and nothing else."""
    return optax.set_to_zero()


OPTIMIZERS = {"rmsprop": keras_rmsprop, "frozen": frozen}


def make_optimizer(name: str, **kwargs) -> optax.GradientTransformation:
    """An optimizer by config name."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](**kwargs)

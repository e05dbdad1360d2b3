"""The model, the optimizer, the PRNG streams and the train state of a config.

Everything that must be built the same way wherever a run is started, resumed,
restored or compared: `build_model`, `build_optimizer`, `stream_keys` and
`init_state`, whose initial weights come from the `init` stream alone.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn
from flax import struct

from jaxrepro import models, rng
from jaxrepro.train.optim import make_optimizer


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; a pytree Orbax saves as is."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        """The model's variables: {'params': ..., 'batch_stats': ...}."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def build_model(config: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """The Flax module named by `config.model`, with the settings its spec reads;
    `overrides` replace them (e.g. `dropout_rate=0.0` for the matched protocol)."""
    return models.get_spec(config["model"]).build(config, **overrides)


def build_optimizer(config: Mapping[str, Any]) -> optax.GradientTransformation:
    """The optimizer of `config.optimizer` (Keras RMSprop by default)."""
    opt = dict(config["optimizer"])
    return make_optimizer(opt.pop("name"), **opt)


def stream_keys(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """The run's named PRNG stream keys, with the own seeds `config.rng` gives."""
    return rng.stream_keys(config.seed, {k: v for k, v in config.rng.items() if v >= 0})


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, init_key: jax.Array, image_size: int
) -> TrainState:
    """Initial train state: weights from the `init` stream only.

    Compiled as one function: the same bits as op by op (both models, both determinism
    modes), and one compilation instead of one per op, which is what an emulated CPU
    spends minutes on."""
    return _init_state(model, tx, init_key, image_size)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _init_state(
    model: nn.Module, tx: optax.GradientTransformation, init_key: jax.Array, image_size: int
) -> TrainState:
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": init_key}, dummy, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.int32(0),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
    )


def abstract_state(config: ml_collections.ConfigDict) -> TrainState:
    """The shapes and dtypes of `config`'s train state (what a checkpoint restores into)."""
    model, tx = build_model(config), build_optimizer(config)
    return jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0), config.data.image_size))

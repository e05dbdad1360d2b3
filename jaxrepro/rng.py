"""Explicit PRNG key threading: one root key per run, named streams, per-step keys.

Every random number in a run comes from a key derived here by `fold_in`, so it is
a pure function of (seed, stream, step, example). Each stream can be given its own
seed (config `rng.<stream>`), which changes only what that stream feeds: the
initial weights, the dropout masks, the augmentation or the epoch order.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

# Fixed stream numbers: renumbering would change every result, so never reuse one.
STREAMS: Mapping[str, int] = {"init": 0, "dropout": 1, "augment": 2, "shuffle": 3, "probe": 4}


def root_key(seed: int) -> jax.Array:
    """The run's root key (typed threefry key) from an integer seed."""
    return jax.random.key(seed)


def stream_key(seed: int, name: str, stream_seed: int = -1) -> jax.Array:
    """Key of a named stream: from the run seed, or from its own seed if >= 0."""
    if name not in STREAMS:
        raise ValueError(f"unknown PRNG stream {name!r}; valid streams: {sorted(STREAMS)}")
    base = root_key(stream_seed if stream_seed >= 0 else seed)
    return jax.random.fold_in(base, STREAMS[name])


def stream_keys(seed: int, overrides: Mapping[str, int] | None = None) -> dict[str, jax.Array]:
    """All named stream keys of a run; `overrides` maps stream name -> own seed."""
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(STREAMS)
    if unknown:
        raise ValueError(f"unknown PRNG stream(s) {sorted(unknown)}; valid: {sorted(STREAMS)}")
    return {name: stream_key(seed, name, overrides.get(name, -1)) for name in STREAMS}


def step_key(stream: jax.Array, step: jax.Array | int) -> jax.Array:
    """Key for one training step of a stream (usable inside jit)."""
    return jax.random.fold_in(stream, step)

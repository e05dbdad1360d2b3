"""Orbax checkpoints of the train state, with a SHA-256 manifest of every leaf.

A checkpoint holds two Orbax items: `state` (step, params, batch_stats, optimizer
state) and `meta` (JSON: data cursor, root key data, config hash and a manifest of
SHA-256 of each leaf's bytes). Restoring recomputes the hashes and refuses a
checkpoint whose bytes do not match, so a damaged or truncated checkpoint is
reported, never half-loaded. Saves are synchronous and Orbax finalises a step
directory atomically, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxrepro.fingerprint import sha256_leaves


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged or does not belong to this run."""


def manager(directory: str | Path, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    """A synchronous Orbax CheckpointManager for the `state` and `meta` items."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Save state and metadata (plus the leaf manifest) as checkpoint `step`."""
    meta = {**meta, "step": int(step), "manifest": sha256_leaves(state)}
    mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int,
            abstract_state: Any | None) -> tuple[Any, dict]:
    """Restore checkpoint `step`, verified against its manifest.

    With `abstract_state` the leaves come back in that structure (a TrainState);
    with None, as the nested dicts Orbax saved (for tools that have no model).
    """
    where = Path(mngr.directory) / str(step)
    try:
        restored = mngr.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for damaged files
        raise CheckpointError(f"checkpoint {where} could not be read "
                              f"({type(e).__name__}: {str(e)[:300]})") from e
    state, meta = restored["state"], restored["meta"]
    if not isinstance(meta, dict) or "manifest" not in meta:
        raise CheckpointError(f"checkpoint {where} has no manifest: not a jaxrepro checkpoint")
    actual, expected = sha256_leaves(state), meta["manifest"]
    bad = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
    if bad:
        raise CheckpointError(
            f"checkpoint {where} is damaged: {len(bad)} leaf/leaves do not match the "
            f"SHA-256 manifest written at save time: {', '.join(bad[:8])}")
    if int(meta.get("step", -1)) != int(step):
        raise CheckpointError(f"checkpoint {where} records step {meta.get('step')}, not {step}")
    return jax.device_put(state), meta


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    """The newest finalised checkpoint step, or None."""
    mngr.reload()
    return mngr.latest_step()

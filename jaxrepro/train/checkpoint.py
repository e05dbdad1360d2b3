"""Orbax checkpoints of the train state, with a SHA-256 manifest of every leaf.

A checkpoint holds two or three Orbax items: `state` (step, params, batch_stats,
optimizer state), `meta` (JSON: data cursor, root key data, config hash and a
manifest of SHA-256 of each leaf's bytes) and, optionally, `probe` (per-layer
activations and gradients on a fixed batch, see `jaxrepro.train.probe`, with its own
manifest). The checkpoint of step 0, the initial state, is always kept. Restoring
recomputes the hashes and refuses a checkpoint whose bytes do not match, so a damaged
or truncated checkpoint is reported, never half-loaded. Saves are synchronous and
Orbax finalises a step directory atomically, so a run killed mid-save leaves the
previous checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jaxrepro.errors import UserError
from jaxrepro.fingerprint import sha256_leaves

ITEMS = ("state", "meta", "probe")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged or does not belong to this run."""


def manager(directory: str | Path, max_to_keep: int | None = 3) -> ocp.CheckpointManager:
    """A synchronous Orbax CheckpointManager: the latest `max_to_keep` steps plus step 0."""
    policy = None
    if max_to_keep is not None:
        policy = cm.AnyPreservationPolicy([cm.LatestN(max_to_keep), cm.CustomSteps([0])])
    multi, create = ocp.options.MultiprocessingOptions(), True
    if jax.process_count() > 1:  # data parallel over processes: each keeps its own copy
        pid = jax.process_index()
        multi = ocp.options.MultiprocessingOptions(
            primary_host=pid, active_processes={pid}, barrier_sync_key_prefix=f"process{pid}"
        )
        Path(directory).mkdir(parents=True, exist_ok=True)
        create = False  # Orbax does not create directories for a subset of processes
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        enable_async_checkpointing=False,
        create=create,
        multiprocessing_options=multi,
    )
    return ocp.CheckpointManager(Path(directory).absolute(), options=options, item_names=ITEMS)


def save(
    mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict, probe: Any | None = None
) -> None:
    """Save state, metadata (plus leaf manifests) and an optional probe as `step`."""
    meta = {**meta, "step": int(step), "manifest": sha256_leaves(state)}
    items = {"state": ocp.args.StandardSave(state)}
    if probe is not None:
        meta["probe_manifest"] = sha256_leaves(probe)
        items["probe"] = ocp.args.StandardSave(probe)
    mngr.save(int(step), args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), force=True)
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state: Any | None) -> tuple[Any, dict]:
    """Restore checkpoint `step`, verified against its manifest.

    With `abstract_state` the leaves come back in that structure (a TrainState);
    with None, as the nested dicts Orbax saved (for tools that have no model).
    """
    where = Path(mngr.directory) / str(step)
    restored = _read(mngr, step, state=ocp.args.StandardRestore(abstract_state))
    state, meta = restored["state"], restored["meta"]
    if not isinstance(meta, dict) or "manifest" not in meta:
        raise CheckpointError(f"checkpoint {where} has no manifest: not a jaxrepro checkpoint")
    _verify(where, state, meta["manifest"])
    if int(meta.get("step", -1)) != int(step):
        raise CheckpointError(f"checkpoint {where} records step {meta.get('step')}, not {step}")
    return jax.device_put(state), meta


def _read(mngr: ocp.CheckpointManager, step: int, **items: Any) -> Any:
    """Orbax-restore `items` and the metadata of `step`; any failure is a CheckpointError."""
    try:
        return mngr.restore(
            int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items)
        )
    except Exception as e:  # Orbax raises many types for damaged files
        raise CheckpointError(
            f"checkpoint {Path(mngr.directory) / str(step)} could not be "
            f"read ({type(e).__name__}: {str(e)[:300]})"
        ) from e


def _verify(where: Path, tree: Any, manifest: dict) -> None:
    actual = sha256_leaves(tree)
    bad = sorted(k for k in set(actual) | set(manifest) if actual.get(k) != manifest.get(k))
    if bad:
        raise CheckpointError(
            f"checkpoint {where} is damaged: {len(bad)} leaf/leaves do not match the "
            f"SHA-256 manifest written at save time: {', '.join(bad[:8])}"
        )


def restore_probe(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, dict]:
    """The verified probe (numpy leaves) and metadata of checkpoint `step`."""
    where = Path(mngr.directory) / str(step)
    if not (where / "probe").is_dir():
        raise CheckpointError(
            f"checkpoint {where} has no probe (diff_probe_examples was 0, "
            "or the run predates probes)"
        )
    restored = _read(mngr, step, probe=ocp.args.StandardRestore(None))
    probe, meta = jax.device_get(restored["probe"]), restored["meta"]
    _verify(where / "probe", probe, meta.get("probe_manifest", {}))
    return probe, meta


def latest_step(mngr: ocp.CheckpointManager) -> int | None:
    """The newest finalised checkpoint step, or None."""
    mngr.reload()
    return mngr.latest_step()

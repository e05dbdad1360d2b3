"""Orbax checkpoints round-trip bitwise; damage is detected, never half-loaded."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_bitwise_equal

from jaxrepro.train import checkpoint as ckpt
from jaxrepro.train.optim import keras_rmsprop


def _state():
    params = {
        "conv1": {
            "kernel": jax.random.normal(jax.random.key(0), (3, 3, 3, 8)),
            "bias": jnp.arange(8, dtype=jnp.float32),
        }
    }
    return {"step": jnp.int32(7), "params": params, "opt_state": keras_rmsprop().init(params)}


def _saved(tmp_path):
    state = _state()
    mngr = ckpt.manager(tmp_path / "ck")
    ckpt.save(mngr, 7, state, {"cursor": {"epoch": 0, "batch": 7}})
    return mngr, state


def test_round_trip_is_bitwise(tmp_path):
    mngr, state = _saved(tmp_path)
    restored, meta = ckpt.restore(mngr, 7, jax.eval_shape(lambda: state))
    assert_bitwise_equal(restored, state)
    assert meta["cursor"] == {"epoch": 0, "batch": 7} and meta["step"] == 7
    assert len(meta["manifest"]) == 5  # step, 2 params, 2 velocities


def _data_files(mngr):
    files = [
        p
        for p in (Path(mngr.directory) / "7" / "state").rglob("*")
        if p.is_file() and p.parent.name == "d"
    ]
    assert files, "expected OCDBT data files"
    return files


def test_flipped_byte_is_detected(tmp_path):
    mngr, state = _saved(tmp_path)
    for f in _data_files(mngr):
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        f.write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointError, match="damaged|could not be read"):
        ckpt.restore(ckpt.manager(tmp_path / "ck"), 7, jax.eval_shape(lambda: state))


def test_truncated_file_is_detected(tmp_path):
    mngr, state = _saved(tmp_path)
    for f in _data_files(mngr):
        f.write_bytes(f.read_bytes()[:10])
    with pytest.raises(ckpt.CheckpointError):
        ckpt.restore(ckpt.manager(tmp_path / "ck"), 7, jax.eval_shape(lambda: state))


def test_tampered_manifest_is_detected(tmp_path):
    mngr, state = _saved(tmp_path)
    other = jax.tree.map(lambda a: a + 1, state)
    mngr2 = ckpt.manager(tmp_path / "ck2")
    ckpt.save(mngr2, 7, other, {})
    # Put the other checkpoint's state under this checkpoint's manifest.
    shutil.rmtree(Path(mngr.directory) / "7" / "state")
    shutil.copytree(Path(mngr2.directory) / "7" / "state", Path(mngr.directory) / "7" / "state")
    with pytest.raises(ckpt.CheckpointError, match="damaged"):
        ckpt.restore(ckpt.manager(tmp_path / "ck"), 7, jax.eval_shape(lambda: state))

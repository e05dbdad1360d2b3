"""Shared test fixtures: one TFDS data dir per session, tiny runs in-process and as CLIs."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import allocator, train
from jaxrepro import config as configlib
from jaxrepro.analysis import variants

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("convnet", "minixception")

# The test processes started after this (pytest-xdist's workers, the tools' children)
# get transparent huge pages for XLA's buffers, as a jaxrepro command gives itself
# (`jaxrepro.allocator`): the same bits, fewer page faults, a faster suite.
if allocator.supported():
    os.environ[allocator.VARIABLE] = allocator.with_tunable(os.environ.get(allocator.VARIABLE, ""))


def tiny_spec(model: str) -> str:
    """The tiny variant of an experiment (`get_config("tiny")`: the same code path,
    seconds instead of hours, no diff probes), as the CLI names it."""
    return f"{ROOT}/experiments/{model}.py:tiny"


def tiny_config(model: str, *overrides: str):
    """The resolved tiny config of `model` with `KEY=VALUE` overrides."""
    return configlib.resolve(tiny_spec(model), overrides)


def train_tiny(model: str, workdir: Path, *overrides: str, **kwargs) -> dict:
    """Train the tiny config of `model` into `workdir` in this process; final.json's record."""
    return train.train_and_evaluate(
        tiny_config(model, *overrides),
        workdir,
        progress=False,
        config_file=str(ROOT / f"experiments/{model}.py"),
        **kwargs,
    )


# The portable-mode tests' runs: the smallest that still take every op (both models,
# augmentation, dropout, batch norm, two optimizer steps, an evaluation and a
# checkpoint); an emulated CPU compiles and runs both in about 7 minutes.
SHORT_RUN = [
    "data.num_train=8",
    "data.num_val=4",
    "batch_size=4",
    "eval_batch_size=4",
    "num_epochs=1",
    "checkpoint_every_steps=2",
]


def short_variants(out, names, mode, **options) -> list[dict]:
    """`jaxrepro.analysis.variants` rows of both models' SHORT_RUN under `names`, in
    `mode`, every variant's process at once."""
    with contextlib.redirect_stdout(io.StringIO()):
        return variants.compare_variants(
            [tiny_spec(m) for m in MODELS],
            SHORT_RUN,
            names,
            out,
            modes=[mode],
            progress=False,
            jobs=len(names),
            **options,
        )


def _leaf_bytes(leaf) -> bytes | object:
    """The bytes of an array leaf (typed PRNG keys by their key data); other leaves as is."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
        a = np.asarray(leaf)
        return str(a.dtype).encode() + str(a.shape).encode() + np.ascontiguousarray(a).tobytes()
    return leaf


def assert_bitwise_equal(*trees) -> None:
    """Same structure, shapes, dtypes and bits in every leaf.

    `chex.assert_trees_all_equal` first (its messages name the leaf and the values),
    then the leaves' bytes: chex compares values, so it counts -0.0 and +0.0 as equal,
    and NaN as equal to any NaN.
    """
    chex.assert_trees_all_equal(*trees)
    first, *others = (jax.tree_util.tree_leaves_with_path(t) for t in trees)
    for k, other in enumerate(others, start=1):
        for (path, a), (_, b) in zip(first, other):
            if _leaf_bytes(a) != _leaf_bytes(b):
                raise AssertionError(
                    f"tree 0 and tree {k} differ in the bits of "
                    f"{jax.tree_util.keystr(path)} (signed zeros or NaN "
                    "payloads: equal as values)"
                )


def loss_and_grads(model, variables: dict, x, y):
    """Jitted binary cross-entropy (on logits) and its parameter gradient at `variables`.

    Models with batch norm run in training mode (batch statistics); build them with
    `dropout_rate=0.0` so that no dropout key is needed.
    """
    batch_norm = "batch_stats" in variables

    def loss(params):
        z = model.apply(
            {**variables, "params": params},
            x,
            train=batch_norm,
            mutable=["batch_stats"] if batch_norm else False,
        )
        z = z[0] if batch_norm else z
        return jnp.mean(jax.nn.softplus(z) - y * z)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory) -> Path:
    """A TFDS data dir shared by the session (and its subprocesses), built on demand."""
    path = Path(os.environ.get("JAXREPRO_TEST_DATA_DIR") or tmp_path_factory.mktemp("tfds"))
    os.environ["JAXREPRO_DATA_DIR"] = str(path)
    return path


def run_cli(
    module: str, *args: str, timeout: int = 600, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m module args...` in a fresh process from the repo root."""
    r = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {r.returncode}:\n{r.stderr[-3000:]}"
        )
    return r


def train_cli(model: str, workdir: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    """Train the tiny version of an experiment into `workdir` in a process of its own."""
    return run_cli(
        "jaxrepro.train", tiny_spec(model), "--workdir", str(workdir), "--no-progress", *extra, **kw
    )


def records(workdir: Path) -> dict:
    """The deterministic records of a run, as text, for byte-for-byte comparison."""
    return {
        name: (workdir / name).read_text()
        for name in ("steps.jsonl", "metrics.jsonl", "final.json", "data.json", "config.json")
    }


def final(workdir: Path) -> dict:
    return json.loads((workdir / "final.json").read_text())

"""End to end: training is bitwise reproducible across processes and across a kill.

The reference runs train in this process (the library, as flax's train_test.py does);
a subprocess runs only where the claim is about another process: a rerun in a fresh
process, and a run killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import chex
import jax
import ml_collections
import numpy as np
import pytest
from absl.testing import parameterized
from conftest import (
    MODELS,
    ROOT,
    assert_bitwise_equal,
    final,
    records,
    tiny_config,
    tiny_spec,
    train_cli,
    train_tiny,
)

from jaxrepro import rng, train
from jaxrepro.data.order import epoch_order
from jaxrepro.models.ops import convolutions
from jaxrepro.train import checkpoint as ckpt
from jaxrepro.train import cli as train_cli_module
from jaxrepro.train import steps


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """One tiny uninterrupted run of each model, trained in this process."""
    base = tmp_path_factory.mktemp("ref")
    for model in MODELS:
        train_tiny(model, base / model)
    return base


@pytest.mark.parametrize("model", MODELS)
def test_rerun_in_another_process_is_bitwise_identical(reference_runs, tmp_path, model):
    train_cli(model, tmp_path / "again")
    assert records(tmp_path / "again") == records(reference_runs / model)
    # And the Orbax checkpoints themselves restore to identical trees.
    abstract = train.abstract_state(tiny_config(model))
    trees = []
    for run in (reference_runs / model, tmp_path / "again"):
        mngr = ckpt.manager(run / "checkpoints")
        trees.append(ckpt.restore(mngr, ckpt.latest_step(mngr), abstract)[0])
    assert_bitwise_equal(*trees)
    assert int(trees[0].step) == final(reference_runs / model)["step"]


@pytest.mark.parametrize("model", MODELS)
def test_records_are_complete(reference_runs, model):
    run = reference_runs / model
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Step 0 is the initial state, then one record per training step.
    assert [s["step"] for s in steps] == list(range(9)) and steps[0]["loss"] is None
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(len(set(s["leaves"])) > 5 for s in steps)
    assert len({s["state"] for s in steps}) == len(steps)  # every step changes the state
    f = final(run)
    expected = {"convnet": 12545, "minixception": 718849}  # convnet: dense layer at 80 px
    assert f["param_count"]["trainable"] > expected[model] - 1
    assert (run / "curves.png").stat().st_size > 1000
    report = (run / "report.md").read_text()
    assert f["final_state_sha256"] in report and "validation accuracy" in report


def _kill_after_checkpoint(model: str, workdir: Path, step: int) -> None:
    """Start a tiny run and SIGKILL it as soon as checkpoint `step` exists."""
    cmd = [
        sys.executable,
        "-m",
        "jaxrepro.train",
        tiny_spec(model),
        "--workdir",
        str(workdir),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not (workdir / "checkpoints" / str(step) / "commit_success.txt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.parametrize("model", MODELS)
def test_sigkill_and_resume_equals_uninterrupted(reference_runs, tmp_path, model):
    run = tmp_path / "killed"
    _kill_after_checkpoint(model, run, 3)
    assert final(reference_runs / model)["step"] == 8
    assert not (run / "final.json").exists()
    train_tiny(model, run, resume=True)
    assert records(run) == records(reference_runs / model)
    envs = (run / "environment.jsonl").read_text().splitlines()
    assert len(envs) == 2 and json.loads(envs[1])["start_step"] >= 3


def _cli(model: str, workdir: Path, *extra: str) -> int:
    """The training CLI on the tiny config, in this process; its exit status."""
    return train_cli_module.main(
        [tiny_spec(model), "--workdir", str(workdir), "--no-progress", *extra]
    )


def test_existing_run_needs_resume_or_overwrite(reference_runs, capsys):
    assert _cli("minixception", reference_runs / "minixception") == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_with_other_config_is_refused(reference_runs, capsys):
    assert _cli("minixception", reference_runs / "minixception", "--resume", "--config.seed=5") == 2
    assert "seed: 1001 -> 5" in capsys.readouterr().err


def test_damaged_checkpoint_is_reported_not_loaded(reference_runs, tmp_path, capsys):

    run = tmp_path / "damaged"
    shutil.copytree(reference_runs / "minixception", run)
    latest = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    files = [
        p
        for p in (run / "checkpoints" / str(latest) / "state").rglob("*")
        if p.is_file() and p.parent.name == "d"
    ]
    for f in files:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    assert _cli("minixception", run, "--resume") == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and str(latest) in err


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "diverged"
    assert _cli("convnet", run, "--config.optimizer.learning_rate=1e30") == 3
    err = capsys.readouterr().err
    assert "the loss of step 2 is" in err and "--fork-from" in err
    steps_logged = [
        json.loads(line)["step"] for line in (run / "steps.jsonl").read_text().splitlines()
    ]
    assert steps_logged == [0, 1]  # the non-finite step is not recorded
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [0]
    assert not (run / "final.json").exists()
    ckpt.restore(
        ckpt.manager(run / "checkpoints"), 0, train.abstract_state(tiny_config("convnet"))
    )  # intact


# ---------------------------------------------------- in-process, per stream


def _tiny_config(**rng_seeds) -> ml_collections.ConfigDict:
    c = tiny_config("minixception").as_configdict()
    for k, v in rng_seeds.items():
        c.rng[k] = v
    return c


def _one_step(config, images, labels):
    keys = train.stream_keys(config)
    m, tx = train.build_model(config), train.build_optimizer(config)
    state0 = train.init_state(m, tx, keys["init"], config.data.image_size)
    step = steps.make_train_step(m, tx, steps.augmentation(config))
    state1, metrics, _ = step(jax.tree.map(np.asarray, state0), images, labels, keys)
    return state0, state1, epoch_order(keys["shuffle"], 0, 64)


@pytest.fixture(scope="module")
def tiny_batch():
    k1, k2 = jax.random.split(jax.random.key(42))
    images = np.asarray(jax.random.randint(k1, (16, 32, 32, 3), 0, 256), np.uint8)
    return images, np.arange(16, dtype=np.int32) % 2


@pytest.fixture(scope="module")
def base_step(tiny_batch):
    """`_one_step` with the config's own seeds, shared by the stream and seed tests."""
    return _one_step(_tiny_config(), *tiny_batch)


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("stream", ["init", "dropout", "augment", "shuffle"])
def test_each_stream_changes_only_what_it_feeds(tiny_batch, base_step, stream):
    base = base_step
    other = _one_step(_tiny_config(**{stream: 77}), *tiny_batch)
    init_same = _equal(base[0].params, other[0].params)
    step_same = _equal(base[1].params, other[1].params)
    order_same = np.array_equal(base[2], other[2])
    expected = {
        "init": (False, False, True),  # other weights, so other trained weights
        "dropout": (True, False, True),  # same start, other masks
        "augment": (True, False, True),  # same start, other transforms
        "shuffle": (True, True, False),  # same step on the same batch, other epoch order
    }[stream]
    assert (init_same, step_same, order_same) == expected


def test_other_seed_gives_other_parameters(tiny_batch, base_step):
    a = base_step
    c = _tiny_config()
    c.seed = 1002
    b = _one_step(c, *tiny_batch)
    assert not any(
        np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a[1].params), jax.tree.leaves(b[1].params))
    )


class TestJitVariants(chex.TestCase):
    """Training steps give the same weights jitted and op by op (chex variants).

    Parameters and optimizer state are bitwise equal because jaxrepro caps XLA:CPU at
    AVX (no FMA contraction, which would make jit round a*b+c once where op-by-op rounds
    twice) and keeps XLA from rewriting the optimizer's a/sqrt(b) into a*rsqrt(b);
    without either, the bits part; and because YNNPACK does the reductions in both
    (`jaxrepro.determinism`: XLA's own reduction loops part them). The mini
    Xception's batch-norm running means are the exception: the jitted program reduces
    the batch mean for the running average in another order, so they may differ in the
    last bits (measured: 1 ulp of the leaf's largest value).
    """

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*MODELS)
    def test_two_steps_equal_the_jitted_reference(self, model):
        # One image per chunk in the depthwise backward pass (`batch_chunk`): at this
        # size the whole batch would be one chunk, and the chunks' sum goes untested.
        with mock.patch.object(convolutions, "CHUNK_BYTES", 1):
            self._two_steps_equal_the_jitted_reference(model)

    def _two_steps_equal_the_jitted_reference(self, model):
        config = tiny_config(model)
        size = config.data.image_size
        images = np.asarray(
            jax.random.randint(jax.random.key(3), (4, size, size, 3), 0, 256), np.uint8
        )
        labels = np.array([0, 1, 0, 1], np.int32)
        keys = rng.stream_keys(config.seed)
        m, tx = train.build_model(config), train.build_optimizer(config)
        state0 = train.init_state(m, tx, keys["init"], size)
        jitted = steps.make_train_step(m, tx, steps.augmentation(config))
        step = self.variant(jitted.__wrapped__)

        def two_steps(fn):
            state = jax.tree.map(np.array, state0)
            for _ in range(2):
                state = fn(state, images, labels, keys)[0]
            return state

        reference = two_steps(jitted)
        if self.variant.type == chex.ChexVariantType.WITHOUT_JIT:
            with jax.disable_jit():
                result = two_steps(step)
        else:
            result = two_steps(step)
        assert_bitwise_equal(
            (result.step, result.params, result.opt_state),
            (reference.step, reference.params, reference.opt_state),
        )
        # Running means near zero come out of a cancelling sum: a few ulps of the
        # summands' scale, so the tolerance is relative to each leaf's largest value.
        for got, want in zip(
            jax.tree.leaves(result.batch_stats), jax.tree.leaves(reference.batch_stats)
        ):
            np.testing.assert_allclose(
                got, want, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(want)))
            )

"""Train a config in a run directory, bit for bit the same on every rerun.

`train_and_evaluate(config, workdir)` runs four phases:

* `start`: the run directory is created (or checked, for a resume), the data and
  the PRNG streams set up, and the state is the initial one, a resumed checkpoint or
  a fork's parent checkpoint;
* `Checkpointer`: saves the state, with the per-layer probe `jaxrepro.analysis.diff`
  reads, every `checkpoint_every_steps` steps and at every epoch end;
* `run_steps`: the loop. After every step an exact fingerprint of every leaf goes to
  `steps.jsonl`; after every epoch the validation metrics go to `metrics.jsonl`;
* `finish`: `final.json` (SHA-256 of the final state) and the report.

Everything a step needs is a pure function of (config, seed, step): the batch is
`epoch_order(shuffle key, epoch)`'s slice, augmentation and dropout keys are
`fold_in(stream, step)`. So a run resumed from a checkpoint continues with exactly
the bits it would have had without stopping.

A non-finite loss stops the run at that step (`NonFiniteLoss`): the bad state is not
saved, so the last checkpoint is the last good state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn
from tqdm import tqdm

from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro import determinism, fingerprint, models, native
from jaxrepro.records import append_jsonl, write_jsonl
from jaxrepro.train import checkpoint as ckpt
from jaxrepro.train import parallel, probe, report, rundir, setup, steps
from jaxrepro.train.rundir import RunDir, RunError


class NonFiniteLoss(RuntimeError):
    """The loss of a step was NaN or infinite; the run stopped before saving it."""

    def __init__(self, run: RunDir, step: int, loss: float, last_checkpoint: int | None):
        super().__init__(
            f"the loss of step {step} is {loss}: the run stopped there. Its last checkpoint "
            f"(step {last_checkpoint}) holds the last good state; a resume would repeat the "
            f"same step. Change the setting that diverged (e.g. the learning rate) and start "
            f"a fork from it: --fork-from {run.checkpoints / str(last_checkpoint)}"
        )
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint


@dataclasses.dataclass(frozen=True)
class Data:
    """The in-memory train and validation splits of a run."""

    train: datalib.DataSplit
    validation: datalib.DataSplit


def load_data(config: ml_collections.ConfigDict) -> Data:
    """The train and validation splits named by `config.data`."""
    splits = datalib.load_config_splits(config.data)
    return Data(train=splits["train"], validation=splits["validation"])


def data_steps_per_epoch(data: Data, batch_size: int) -> int:
    """Full batches per epoch (the rest is dropped); a batch larger than the split is a
    `DataError`."""
    n_train = len(data.train.labels)
    if batch_size > n_train:
        raise datalib.DataError(
            f"batch_size {batch_size} is larger than the {n_train} training examples"
        )
    return datalib.num_batches(n_train, batch_size)


def make_mesh(config: ml_collections.ConfigDict):
    """The device mesh of a data-parallel run, or None for the single-device program."""
    if config.num_devices == 1 and not config.microbatches and jax.process_count() == 1:
        return None
    parallel.check_layout(config.batch_size, config.num_devices, config.microbatches)
    if jax.process_count() > 1 and config.num_devices != jax.device_count():
        raise parallel.LayoutError(
            f"num_devices={config.num_devices}: a run over {jax.process_count()} "
            f"processes uses all their {jax.device_count()} devices"
        )
    return parallel.make_mesh(config.num_devices)


def data_record(
    config: ml_collections.ConfigDict, data: Data, shuffle_key: jax.Array, steps_per_epoch: int
) -> dict:
    """data.json: fingerprints of both splits and of every epoch's order."""
    n_train = len(data.train.labels)
    return {
        "train": datalib.data_fingerprint(data.train),
        "validation": datalib.data_fingerprint(data.validation),
        "epoch_order": datalib.order_fingerprint(shuffle_key, config.num_epochs, n_train),
        "num_train": n_train,
        "num_val": len(data.validation.labels),
        "steps_per_epoch": steps_per_epoch,
        "dropped_per_epoch": n_train - steps_per_epoch * config.batch_size,
    }


# ---------------------------------------------------------------------- start


@dataclasses.dataclass
class Run:
    """A started run: its directory, data, keys, model, placement and current state."""

    config: ml_collections.ConfigDict
    dir: RunDir
    data: Data
    keys: dict[str, jax.Array]
    model: nn.Module
    tx: Any
    mesh: Any
    mngr: Any
    steps_per_epoch: int
    start: int
    state: setup.TrainState
    step_records: list[dict]
    epoch_records: list[dict]

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs

    def local(self, tree: Any) -> Any:
        """A replicated state as ordinary single-device arrays."""
        return tree if self.mesh is None else jax.device_put(parallel.to_host(tree))


def start(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    config_file: str | None = None,
    fork_from: str | Path | None = None,
) -> Run:
    """Prepare the run directory and the initial, resumed or forked state."""
    run_dir = RunDir(workdir)
    if fork_from is not None and resume:
        raise RunError("--fork-from starts a new run; to continue a fork, pass --resume alone")
    if models.get_spec(config.model).pretrained:
        raise configlib.ConfigError(
            f"{config.model} is an ImageNet network (1000 classes) for inference and "
            "explanations, not for the paper's one-logit training: import its Keras "
            f"weights with python -m jaxrepro.pretrained import {config.model} FILE"
        )
    determinism.apply_config(config)  # before any JAX work: XLA reads its flags once
    fork_at = rundir.fork_source(fork_from) if fork_from is not None else None
    mesh = make_mesh(config)
    model, tx = setup.build_model(config), setup.build_optimizer(config)  # a bad name fails here
    rundir.prepare(run_dir, config, config_file, resume, overwrite)
    env = {**determinism.fingerprint(), "kernels": native.describe()}

    data = load_data(config)
    steps_per_epoch = data_steps_per_epoch(data, config.batch_size)
    keys = setup.stream_keys(config)
    rundir.check_data(run_dir, data_record(config, data, keys["shuffle"], steps_per_epoch))

    state = setup.init_state(model, tx, keys["init"], config.data.image_size)
    mngr = run_dir.manager(config.keep_checkpoints)
    first, last = 0, ckpt.latest_step(mngr)
    if fork_at is not None and last is None:
        try:
            state = rundir.fork(*fork_at, run_dir, config, jax.eval_shape(lambda: state))
        except RunError:
            shutil.rmtree(run_dir.path)  # created by this call (a fork never resumes)
            raise
        first = fork_at[1]
    elif last is not None:
        state, meta = ckpt.restore(mngr, last, jax.eval_shape(lambda: state))
        rundir.check_checkpoint(run_dir, last, meta, config, steps_per_epoch)
        first = last
    step_records, epoch_records = rundir.truncate_records(run_dir, first)
    append_jsonl(run_dir.environment, {"start_step": first, **env})
    if not step_records:  # the initial state is "step 0": a different init shows up here
        step_records = [
            {
                "step": 0,
                "epoch": 0,
                "loss": None,
                "accuracy": None,
                **rundir.fingerprint_record(jax.jit(steps.state_fingerprints)(state)),
            }
        ]
        write_jsonl(run_dir.steps, step_records)
    return Run(
        config=config,
        dir=run_dir,
        data=data,
        keys=keys,
        model=model,
        tx=tx,
        mesh=mesh,
        mngr=mngr,
        steps_per_epoch=steps_per_epoch,
        start=first,
        state=state,
        step_records=step_records,
        epoch_records=epoch_records,
    )


# ---------------------------------------------------------------- checkpoints


class Checkpointer:
    """Saves a run's state with its data cursor and, if configured, its diff probe.

    The probe (`jaxrepro.train.probe`) runs on the first `batch_size` validation
    images, unaugmented; its layer order is traced once here, compiled at the first save.
    """

    def __init__(self, run: Run):
        self.run = run
        config, val = run.config, run.data.validation
        self.meta = rundir.checkpoint_meta(config, run.steps_per_epoch)
        self.keep = min(config.diff_probe_examples, len(val.labels))
        size = min(config.batch_size, len(val.labels))
        self.batch = (val.images[:size].astype(np.float32), val.labels[:size])
        self.order = None
        if self.keep:
            self.probe = probe.make_probe(run.model, self.keep)
            self.order = probe.call_order(run.model, run.state.variables, self.batch[0])

    def save(self, step: int, state: setup.TrainState) -> None:
        """Save `state` as checkpoint `step` (synchronously)."""
        epoch, batch = divmod(step, self.run.steps_per_epoch)
        saved, probed = self.run.local(state), None
        if self.keep:
            probed = jax.device_get(
                self.probe(
                    saved.params, saved.batch_stats, *self.batch, self.run.keys["probe"], step
                )
            )
        if jax.process_count() > 1:  # Orbax refuses host-local jax.Arrays across processes
            saved = parallel.to_host(saved)
        ckpt.save(
            self.run.mngr,
            step,
            saved,
            {"cursor": {"epoch": epoch, "batch": batch}, **self.meta, "probe_order": self.order},
            probed,
        )

    def latest(self) -> int | None:
        return ckpt.latest_step(self.run.mngr)


# ----------------------------------------------------------------------- loop


def evaluate_epoch(
    run: Run, state: setup.TrainState, eval_step: Callable, epoch: int, step: int
) -> dict:
    """The record of an epoch that ended at `step`: its training means, validation
    metrics and probe logits."""
    config, val = run.config, run.data.validation
    variables = run.local(state).variables
    done = [r for r in run.step_records if r["epoch"] == epoch]
    result = steps.evaluate(eval_step, variables, val.images, val.labels, config.eval_batch_size)
    return {
        "epoch": epoch,
        "step": step,
        "train_loss": float(np.mean([r["loss"] for r in done])),
        "train_accuracy": float(np.mean([r["accuracy"] for r in done])),
        "val_loss": result.loss,
        "val_accuracy": result.accuracy,
        "probe_logits": steps.probe_logits(
            eval_step, variables, val.images, val.labels, config.probe_examples
        ),
        "state": run.step_records[-1]["state"],
    }


def run_steps(run: Run, saver: Checkpointer, progress: bool = True) -> setup.TrainState:
    """Train from `run.start` to the last step; returns the final state.

    Ctrl-C saves a checkpoint at the current step and exits with status 130.
    """
    config, train = run.config, run.data.train
    bs, n_train = config.batch_size, len(train.labels)
    train_step = parallel.make_step(
        run.model, run.tx, steps.augmentation(config), run.mesh, config.microbatches, bs
    )
    eval_step = steps.make_eval_step(run.model)
    state, keys = run.state, run.keys
    if run.mesh is not None:  # state and keys replicated on every device of the mesh
        state = parallel.put(state, parallel.replicated(run.mesh))
        keys = parallel.put(keys, parallel.replicated(run.mesh))
    step = run.start
    bar = tqdm(
        total=run.total_steps,
        initial=step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
    )
    t_epoch, timed_images = time.perf_counter(), 0
    try:
        while step < run.total_steps:
            epoch, batch = divmod(step, run.steps_per_epoch)
            bar.set_description(f"epoch {epoch + 1}/{config.num_epochs}")
            idx = datalib.batch_at(run.keys["shuffle"], epoch, batch, bs, n_train)
            images, labels = train.images[idx], train.labels[idx]
            if run.mesh is not None:  # each device (each process) gets its slice
                images, labels = parallel.put((images, labels), parallel.batch_sharded(run.mesh))
            new, metrics, prints = train_step(state, images, labels, keys)
            if run.mesh is not None:
                metrics, prints = parallel.to_host((metrics, prints))
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLoss(run.dir, step + 1, loss, saver.latest())
            state, step = new, step + 1
            record = {
                "step": step,
                "epoch": epoch + 1,
                "loss": loss,
                "accuracy": int(metrics["correct"]) / bs,
                **rundir.fingerprint_record(prints),
            }
            run.step_records.append(record)
            append_jsonl(run.dir.steps, record)
            timed_images += bs
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            end_of_epoch = step % run.steps_per_epoch == 0
            if end_of_epoch:
                elapsed = time.perf_counter() - t_epoch
                record = evaluate_epoch(run, state, eval_step, epoch + 1, step)
                run.epoch_records.append(record)
                append_jsonl(run.dir.metrics, record)
                append_jsonl(
                    run.dir.timing,
                    {
                        "epoch": epoch + 1,
                        "seconds": elapsed,
                        "train_images": timed_images,
                        "images_per_second": timed_images / elapsed,
                    },
                )
                bar.write(
                    f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} "
                    f"acc {record['train_accuracy']:.3f} | val loss "
                    f"{record['val_loss']:.4f} acc {record['val_accuracy']:.3f}"
                )
                t_epoch, timed_images = time.perf_counter(), 0
            if step % config.checkpoint_every_steps == 0 or end_of_epoch:
                saver.save(step, state)
    except KeyboardInterrupt:
        bar.close()
        if saver.latest() != step:
            saver.save(step, state)
        print(
            f"\ninterrupted at step {step}; checkpoint saved. Continue with --resume "
            f"--workdir {run.dir.path}",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    bar.close()
    if saver.latest() != step:
        saver.save(step, state)
    return run.local(state)


# --------------------------------------------------------------------- finish


def finish(run: Run, state: setup.TrainState) -> dict:
    """Write final.json (SHA-256 of every leaf of the final state) and the report."""
    leaves = fingerprint.sha256_leaves(
        {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}
    )
    config = run.config
    final = {
        "experiment": config.experiment,
        "step": int(state.step),
        "epochs": config.num_epochs,
        "config_hash": configlib.config_hash(config),
        "final_state_sha256": fingerprint.combine_hex(leaves),
        "leaf_sha256": leaves,
        "last_step_fingerprint": run.step_records[-1]["state"] if run.step_records else None,
        "metrics": run.epoch_records[-1] if run.epoch_records else None,
        "param_count": models.count_params(state.variables),
    }
    write_json(run.dir.final, final)
    report.write(run.dir.path)
    return final


def write_json(path: Path, record: dict) -> None:
    """A JSON record as the run directory holds it (sorted keys, indented, newline)."""
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True, **options
) -> dict:
    """Train `config` in `workdir`; returns the final record (also in final.json).

    `options` are `start`'s: `resume` continues the run in `workdir` from its latest
    checkpoint, `overwrite` starts it again, `fork_from` (a run or checkpoint directory)
    starts a new run from that checkpoint instead of the initial weights (see
    `rundir.fork`), `config_file` is copied into the run directory.
    """
    run = start(config, workdir, **options)
    saver = Checkpointer(run)
    if saver.latest() is None:
        saver.save(run.start, run.state)
    return finish(run, run_steps(run, saver, progress))

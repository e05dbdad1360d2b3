"""Train a model from a config file, bit for bit the same on every rerun.

    python -m jaxrepro.train CONFIG_FILE [--config.KEY=VALUE ...] [--workdir DIR] [--resume]

Everything a step needs is a pure function of (config, seed, step): the batch is
`epoch_order(shuffle key, epoch)`'s slice, augmentation and dropout keys are
`fold_in(stream, step)`. So a run resumed from a checkpoint continues with exactly
the bits it would have had without stopping. After every step an exact on-device
fingerprint of every parameter leaf is logged (`steps.jsonl`), so two runs can be
compared step by step.

Run directory (default `checkpoints/<experiment>/seed<seed>`):
  config.json, config_source.py   resolved config and the file it came from
  environment.jsonl               fingerprint of the environment at each start/resume
  data.json                       data and epoch-order fingerprints
  steps.jsonl, metrics.jsonl      per-step and per-epoch records (deterministic)
  timing.jsonl                    wall-clock figures (the only nondeterministic file)
  checkpoints/                    Orbax checkpoints with a SHA-256 manifest
  final.json, report.md, curves.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jaxrepro  # noqa: F401  (applies the determinism settings before jax starts)
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from tqdm import tqdm

from jaxrepro import checkpoint as ckpt
from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro import determinism, fingerprint, models, parallel, report, rng
from jaxrepro import probe as probelib
from jaxrepro.records import append_jsonl, read_jsonl, write_jsonl
from jaxrepro.data.augment import augment_batch
from jaxrepro.data.order import epoch_order
from jaxrepro.optim import make_optimizer


class TrainState(struct.PyTreeNode):
    """Everything that changes during training; a pytree Orbax saves as is."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


class RunError(RuntimeError):
    """A run directory that cannot be started or resumed as asked."""


@dataclass(frozen=True)
class Data:
    """The in-memory train and validation splits of a run."""

    train: Any
    validation: Any


def model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Model settings a config may hold besides its name (the mini Xception's fast_convs)."""
    return {"fast_convs": bool(config.fast_convs)} if "fast_convs" in config else {}


def build_model(config: ml_collections.ConfigDict):
    """The Flax module named by `config.model`."""
    return models.get_model(config.model, dropout_rate=config.dropout_rate,
                            **model_options(config))


def build_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer of `config.optimizer` (Keras RMSprop by default)."""
    opt = dict(config.optimizer)
    return make_optimizer(opt.pop("name"), **opt)


def init_state(model, tx: optax.GradientTransformation, init_key: jax.Array,
               image_size: int) -> TrainState:
    """Initial train state: weights from the `init` stream only."""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    variables = model.init({"params": init_key}, dummy, train=False)
    params = variables["params"]
    return TrainState(step=jnp.int32(0), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params))


def bce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Binary cross-entropy on the logit (sigmoid folded in, numerically stable)."""
    return optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype))


def make_train_step(model, tx: optax.GradientTransformation,
                    augment: ml_collections.ConfigDict, mesh=None, microbatches: int = 0,
                    batch_size: int = 0) -> Callable:
    """A jitted `(state, images_u8, labels, keys) -> (state, metrics, fingerprints)`.

    Without `mesh`, one program on one device. With a mesh (see `jaxrepro.parallel`),
    the batch is sharded over it: split in `microbatches` fixed micro-batches whose
    gradients are combined in a fixed order (bits independent of the device count),
    or, with `microbatches=0`, partitioned by XLA (bits depend on the device count).
    """
    if mesh is not None and microbatches:
        return parallel.make_invariant_step(model, tx, augment, mesh, batch_size, microbatches,
                                            bce_loss, _fingerprints, TrainState)

    def train_step(state: TrainState, images, labels, keys):
        step = state.step
        x = augment_batch(rng.step_key(keys["augment"], step), images.astype(jnp.float32),
                          flip=augment.flip, rotation=augment.rotation, zoom=augment.zoom)
        dropout_key = rng.step_key(keys["dropout"], step)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                rngs={"dropout": dropout_key}, mutable=["batch_stats"])
            return jnp.mean(bce_loss(logits, labels)), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(step=step + 1, params=optax.apply_updates(state.params, param_updates),
                         batch_stats=updates.get("batch_stats", {}), opt_state=opt_state)
        correct = jnp.sum((logits > 0) == (labels > 0))
        metrics = {"loss": loss, "correct": correct}
        return new, metrics, _fingerprints(new)

    if mesh is not None:
        return parallel.make_sharded_step(train_step, mesh)
    return jax.jit(train_step, donate_argnums=0)


def _fingerprints(state: TrainState) -> dict:
    """On-device fingerprints of every leaf of params, batch stats and optimizer state."""
    return {"params": fingerprint.tree_fingerprint(state.params),
            "batch_stats": fingerprint.tree_fingerprint(state.batch_stats),
            "opt_state": fingerprint.tree_fingerprint(state.opt_state)}


def _state_fingerprints(prints: dict) -> dict:
    """Host record of `_fingerprints`: per-leaf hex and their combined SHA-256."""
    leaves = {f"{group}.{k}" if k else group: v for group, tree in prints.items()
              for k, v in fingerprint.to_hex(tree).items()}
    return {"state": fingerprint.combine_hex(leaves), "leaves": leaves}


def make_eval_step(model) -> Callable:
    """A jitted `(state, images_u8, labels, weights) -> (loss sum, correct, logits)`."""

    def eval_step(state: TrainState, images, labels, weights):
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                             images.astype(jnp.float32), train=False)
        losses = bce_loss(logits, labels) * weights
        correct = jnp.sum(((logits > 0) == (labels > 0)) * weights)
        return jnp.sum(losses), correct, logits

    return jax.jit(eval_step)


def evaluate(eval_step: Callable, state: TrainState, split, batch_size: int) -> dict:
    """Loss and accuracy over a whole split in fixed order (last batch padded)."""
    n = len(split.labels)
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        weights = (idx < n).astype(np.float32)
        idx = np.minimum(idx, n - 1)
        l, c, _ = eval_step(state, split.images[idx], split.labels[idx], weights)
        loss_sum += float(l)
        correct += int(c)
    return {"loss": loss_sum / n, "accuracy": correct / n}


def probe_logits(eval_step: Callable, state: TrainState, split, count: int) -> list[float]:
    """Logits of the first `count` validation images (a cheap per-epoch probe)."""
    if count <= 0:
        return []
    idx = np.arange(min(count, len(split.labels)))
    _, _, logits = eval_step(state, split.images[idx], split.labels[idx],
                             np.ones(len(idx), np.float32))
    return [float(v) for v in np.asarray(logits)]


def load_data(config: ml_collections.ConfigDict) -> Data:
    """The train and validation splits named by `config.data`."""
    splits = datalib.load_config_splits(config.data)
    return Data(train=splits["train"], validation=splits["validation"])


# ---------------------------------------------------------------- run records


def default_workdir(config: ml_collections.ConfigDict) -> Path:
    """`checkpoints/<experiment>/seed<seed>` under the current directory."""
    return Path("checkpoints") / config.experiment / f"seed{config.seed}"


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, config_file: str | None,
                    resume: bool, overwrite: bool) -> None:
    """Create the run directory, or check that a resumed run has the same config."""
    saved = workdir / "config.json"
    if saved.exists() and overwrite:
        shutil.rmtree(workdir)
    if saved.exists():
        if not resume:
            raise RunError(f"run directory {workdir} already holds a run. Pass --resume to "
                           "continue it, --overwrite to start it again, or another --workdir.")
        old = json.loads(saved.read_text())
        changed = [c for c in configlib.diff_keys(old, json.loads(configlib.to_json(config)))
                   if not c.startswith(PLACEMENT_ONLY)]
        if changed:
            raise RunError(f"cannot resume {workdir}: the config differs from the saved one:\n  "
                           + "\n  ".join(changed))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(configlib.to_json(config) + "\n")
    if config_file:
        shutil.copyfile(config_file, workdir / "config_source.py")


# Keys a resumed run may change: where it runs, not what it computes (with
# microbatches > 0 not even the bits); a run from before data parallelism has neither,
# and a mini Xception run from before fast_convs ran what fast_convs=False runs.
PLACEMENT_ONLY = ("num_devices: ", "microbatches: None -> 0", "fast_convs: None -> False")


def make_mesh(config: ml_collections.ConfigDict):
    """The device mesh of a data-parallel run, or None for the single-device program."""
    if config.num_devices == 1 and not config.microbatches and jax.process_count() == 1:
        return None
    try:
        parallel.check_layout(config.batch_size, config.num_devices, config.microbatches)
        if jax.process_count() > 1 and config.num_devices != jax.device_count():
            raise parallel.LayoutError(
                f"num_devices={config.num_devices}: a run over {jax.process_count()} "
                f"processes uses all their {jax.device_count()} devices")
    except parallel.LayoutError as e:
        raise RunError(str(e)) from None
    return parallel.make_mesh(config.num_devices)


# ---------------------------------------------------------------------- train


def fork_source(parent: str | Path) -> tuple[Path, int]:
    """(run directory, step) of the checkpoint a fork starts from; checked before any write."""
    from jaxrepro import runs  # noqa: PLC0415

    try:
        parent_run, step = runs.locate(parent)
    except runs.RunNotFound as e:
        raise RunError(f"--fork-from: {e}") from None
    parent_mngr = ckpt.manager(parent_run / "checkpoints", max_to_keep=None)
    if step is None:
        step = ckpt.latest_step(parent_mngr)
    if step is None or step not in parent_mngr.all_steps():
        raise RunError(f"--fork-from: {parent_run} has no checkpoint at step {step}; it has "
                       f"{sorted(parent_mngr.all_steps())}")
    return parent_run, int(step)


def fork(parent_run: Path, step: int, workdir: Path, config: ml_collections.ConfigDict,
         state: TrainState) -> TrainState:
    """Start the run in `workdir` from checkpoint `step` of another run.

    The parent's checkpoint becomes this run's state, and the parent's step and epoch
    records up to that step are copied, so `jaxrepro.diff` compares the two step by
    step: they agree up to the fork step and part from the next one on, when this
    run's config takes over. Records the parent, the step and the config keys that
    differ in fork.json.
    """
    parent_mngr = ckpt.manager(parent_run / "checkpoints", max_to_keep=None)
    try:
        state, _ = ckpt.restore(parent_mngr, step, jax.eval_shape(lambda: state))
    except ckpt.CheckpointError as e:  # also a tree that does not fit this config's model
        raise RunError(f"--fork-from: {e}") from None
    parent_config = json.loads((parent_run / "config.json").read_text())
    changes = configlib.diff_keys(parent_config, json.loads(configlib.to_json(config)))
    write_jsonl(workdir / "steps.jsonl",
                [r for r in read_jsonl(parent_run / "steps.jsonl") if r["step"] <= step])
    write_jsonl(workdir / "metrics.jsonl",
                [r for r in read_jsonl(parent_run / "metrics.jsonl") if r["step"] <= step])
    (workdir / "fork.json").write_text(json.dumps(
        {"parent": str(parent_run.resolve()), "step": int(step), "config_changes": changes},
        indent=2) + "\n")
    return state


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, resume: bool = False,
          overwrite: bool = False, config_file: str | None = None,
          progress: bool = True, fork_from: str | Path | None = None) -> dict:
    """Train `config` in `workdir`; returns the final record (also in final.json).

    With `fork_from` (a run or checkpoint directory) a new run starts from that
    checkpoint instead of the initial weights; see `fork`.
    """
    workdir = Path(workdir)
    if fork_from is not None and resume:
        raise RunError("--fork-from starts a new run; to continue a fork, pass --resume alone")
    fork_at = fork_source(fork_from) if fork_from is not None else None
    mesh = make_mesh(config)

    def local(tree):  # a replicated state as ordinary single-device arrays
        return tree if mesh is None else jax.device_put(parallel.to_host(tree))

    prepare_workdir(workdir, config, config_file, resume, overwrite)
    env = determinism.fingerprint()

    data = load_data(config)
    n_train, bs = len(data.train.labels), config.batch_size
    steps_per_epoch = n_train // bs
    if steps_per_epoch == 0:
        raise RunError(f"batch_size {bs} is larger than the {n_train} training examples")
    total_steps = steps_per_epoch * config.num_epochs
    keys = rng.stream_keys(config.seed, {k: v for k, v in config.rng.items() if v >= 0})

    data_record = {
        "train": datalib.data_fingerprint(data.train),
        "validation": datalib.data_fingerprint(data.validation),
        "epoch_order": datalib.order_fingerprint(keys["shuffle"], config.num_epochs, n_train),
        "num_train": n_train, "num_val": len(data.validation.labels),
        "steps_per_epoch": steps_per_epoch, "dropped_per_epoch": n_train - steps_per_epoch * bs,
    }
    data_path = workdir / "data.json"
    if data_path.exists() and json.loads(data_path.read_text()) != data_record:
        raise RunError(f"cannot resume {workdir}: the data differ from the run's data.json "
                       "(different images, labels or epoch order)")
    data_path.write_text(json.dumps(data_record, indent=2, sort_keys=True) + "\n")

    model, tx = build_model(config), build_optimizer(config)
    state = init_state(model, tx, keys["init"], config.data.image_size)
    mngr = ckpt.manager(workdir / "checkpoints", config.keep_checkpoints)
    steps_log, epochs_log = workdir / "steps.jsonl", workdir / "metrics.jsonl"
    start = 0
    last = ckpt.latest_step(mngr)
    if fork_at is not None and last is None:
        try:
            state, start = fork(*fork_at, workdir, config, state), fork_at[1]
        except RunError:
            shutil.rmtree(workdir)  # created by this call (a fork never resumes): leave nothing
            raise
    elif last is not None:
        state, meta = ckpt.restore(mngr, last, jax.eval_shape(lambda: state))
        expected_root = np.asarray(jax.random.key_data(rng.root_key(config.seed))).tolist()
        if meta.get("root_key") != expected_root or meta.get("steps_per_epoch") != steps_per_epoch:
            raise RunError(f"checkpoint {last} in {workdir} belongs to another run "
                           "(root key or data cursor do not match)")
        start = last
    step_records = [r for r in read_jsonl(steps_log) if r["step"] <= start]
    epoch_records = [r for r in read_jsonl(epochs_log) if r["step"] <= start]
    write_jsonl(steps_log, step_records)
    write_jsonl(epochs_log, epoch_records)
    append_jsonl(workdir / "environment.jsonl", {"start_step": start, **env})

    train_step = make_train_step(model, tx, config.augment, mesh, config.microbatches, bs)
    eval_step = make_eval_step(model)
    n_probe = min(config.diff_probe_examples, len(data.validation.labels))
    probe_size = min(bs, len(data.validation.labels))
    probe_batch = (data.validation.images[:probe_size].astype(np.float32),
                   data.validation.labels[:probe_size])
    if n_probe:  # traced once here, compiled at the first save
        probe_fn = probelib.make_probe(model, bce_loss, n_probe)
        probe_order = probelib.call_order(
            model, {"params": state.params, "batch_stats": state.batch_stats}, probe_batch[0])

    def save(step: int) -> None:
        epoch, batch = divmod(step, steps_per_epoch)
        probe, saved = None, local(state)
        if n_probe:
            probe = jax.device_get(probe_fn(saved.params, saved.batch_stats, *probe_batch,
                                            keys["probe"], step))
        if jax.process_count() > 1:  # Orbax refuses host-local jax.Arrays across processes
            saved = parallel.to_host(saved)
        ckpt.save(mngr, step, saved, {
            "cursor": {"epoch": epoch, "batch": batch}, "steps_per_epoch": steps_per_epoch,
            "root_key": np.asarray(jax.random.key_data(rng.root_key(config.seed))).tolist(),
            "config_hash": configlib.config_hash(config),
            "probe_order": probe_order if n_probe else None}, probe)

    if not step_records:  # the initial state is "step 0": a different init shows up here
        record = {"step": 0, "epoch": 0, "loss": None, "accuracy": None,
                  **_state_fingerprints(jax.jit(_fingerprints)(state))}
        step_records = [record]
        write_jsonl(steps_log, step_records)
    if ckpt.latest_step(mngr) is None:
        save(start)
    step_keys = keys
    if mesh is not None:  # state and keys replicated on every device of the mesh
        state = parallel.put(state, parallel.replicated(mesh))
        step_keys = parallel.put(keys, parallel.replicated(mesh))
    step, order, order_epoch = start, None, -1
    bar = tqdm(total=total_steps, initial=start, disable=not progress, unit="step",
               dynamic_ncols=True, file=sys.stderr)
    t_epoch, timed_images = time.perf_counter(), 0
    try:
        while step < total_steps:
            epoch, batch = divmod(step, steps_per_epoch)
            if order_epoch != epoch:
                order, order_epoch = epoch_order(keys["shuffle"], epoch, n_train), epoch
                bar.set_description(f"epoch {epoch + 1}/{config.num_epochs}")
            idx = np.asarray(order[batch * bs:(batch + 1) * bs])
            images, labels = data.train.images[idx], data.train.labels[idx]
            if mesh is not None:  # each device (each process) gets its slice of the batch
                images, labels = parallel.put((images, labels), parallel.batch_sharded(mesh))
            state, metrics, prints = train_step(state, images, labels, step_keys)
            if mesh is not None:
                metrics, prints = parallel.to_host((metrics, prints))
            step += 1
            record = {"step": step, "epoch": epoch + 1, "loss": float(metrics["loss"]),
                      "accuracy": int(metrics["correct"]) / bs, **_state_fingerprints(prints)}
            step_records.append(record)
            append_jsonl(steps_log, record)
            timed_images += bs
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            end_of_epoch = step % steps_per_epoch == 0
            if end_of_epoch:
                elapsed = time.perf_counter() - t_epoch
                ep = [r for r in step_records if r["epoch"] == epoch + 1]
                val = evaluate(eval_step, local(state), data.validation,
                               config.eval_batch_size)
                epoch_record = {
                    "epoch": epoch + 1, "step": step,
                    "train_loss": float(np.mean([r["loss"] for r in ep])),
                    "train_accuracy": float(np.mean([r["accuracy"] for r in ep])),
                    "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                    "probe_logits": probe_logits(eval_step, local(state), data.validation,
                                                 config.probe_examples),
                    "state": record["state"]}
                epoch_records.append(epoch_record)
                append_jsonl(epochs_log, epoch_record)
                append_jsonl(workdir / "timing.jsonl", {
                    "epoch": epoch + 1, "seconds": elapsed, "train_images": timed_images,
                    "images_per_second": timed_images / elapsed})
                bar.write(f"epoch {epoch + 1}: train loss {epoch_record['train_loss']:.4f} "
                          f"acc {epoch_record['train_accuracy']:.3f} | val loss "
                          f"{val['loss']:.4f} acc {val['accuracy']:.3f}")
                t_epoch, timed_images = time.perf_counter(), 0
            if step % config.checkpoint_every_steps == 0 or end_of_epoch:
                save(step)
    except KeyboardInterrupt:
        bar.close()
        if ckpt.latest_step(mngr) != step:
            save(step)
        print(f"\ninterrupted at step {step}; checkpoint saved. Continue with --resume "
              f"--workdir {workdir}", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()
    if ckpt.latest_step(mngr) != step:
        save(step)
    state = local(state)

    leaves = fingerprint.sha256_leaves({"params": state.params,
                                        "batch_stats": state.batch_stats,
                                        "opt_state": state.opt_state})
    final = {
        "experiment": config.experiment, "step": step, "epochs": config.num_epochs,
        "config_hash": configlib.config_hash(config),
        "final_state_sha256": fingerprint.combine_hex(leaves),
        "leaf_sha256": leaves,
        "last_step_fingerprint": step_records[-1]["state"] if step_records else None,
        "metrics": epoch_records[-1] if epoch_records else None,
        "param_count": models.count_params({"params": state.params,
                                            "batch_stats": state.batch_stats}),
    }
    (workdir / "final.json").write_text(json.dumps(final, indent=2, sort_keys=True) + "\n")
    report.write(workdir)
    return final


# ------------------------------------------------------------------------ CLI


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split argv into options and `--config.KEY=VALUE` overrides."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxrepro.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a model deterministically from a config file "
                    "(a Python file defining get_config(); it is executed).",
        epilog="Overrides: --config.KEY=VALUE for any key of the config, e.g.\n"
               "  --config.num_epochs=90 --config.optimizer.learning_rate=0.0005\n"
               "  --config.data.source=folder --config.data.folder=PATH\n"
               "Values are parsed as the type of the key they replace; an unknown key "
               "lists the valid ones.\nSee `python -m jaxrepro.train CONFIG --show-config` "
               "for a config's keys and values.")
    parser.add_argument("config_file", help="experiment config, e.g. experiments/convnet.py")
    parser.add_argument("--workdir", help="run directory (default checkpoints/<experiment>/"
                        "seed<seed>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --workdir from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run in --workdir and start again")
    parser.add_argument("--fork-from", metavar="RUN_OR_CHECKPOINT",
                        help="start a new run from another run's checkpoint (its latest, or "
                             "<run>/checkpoints/<step>), e.g. with one setting changed; "
                             "`python -m jaxrepro.diff` then shows them parting at that step")
    parser.add_argument("--show-config", action="store_true",
                        help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = parser.add_argument_group(
        "multi-process (one process per host; README \"Data-parallel training\")")
    multi.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address of process 0, for jax.distributed.initialize")
    multi.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    multi.add_argument("--process-id", type=int, default=0, help="this process's index")
    overrides, rest = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return parser.parse_args(rest), overrides


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.coordinator:  # before any JAX computation; CPU collectives: gloo (JAX's default)
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    try:
        config = configlib.resolve(args.config_file, overrides)
        if args.show_config:
            print(configlib.to_json(config))
            return 0
        workdir = Path(args.workdir) if args.workdir else default_workdir(config)
        final = train(config, workdir, resume=args.resume, overwrite=args.overwrite,
                      config_file=args.config_file, progress=not args.no_progress,
                      fork_from=args.fork_from)
    except (configlib.ConfigError, RunError, ckpt.CheckpointError, datalib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = final["metrics"] or {}
    print(f"done: {final['step']} steps, val accuracy {m.get('val_accuracy', float('nan')):.3f}"
          f"\nfinal state sha256 {final['final_state_sha256']}\nreport: {workdir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

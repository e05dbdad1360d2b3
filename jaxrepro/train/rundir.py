"""A run directory: where its files are, how it is found, started, resumed or forked.

Layout (default `checkpoints/<experiment>/seed<seed>` under the current directory):

  config.json, config_source.py   the resolved config and the file it came from
  environment.jsonl               the environment's fingerprint at each start / resume
  data.json                       data and epoch-order fingerprints
  steps.jsonl, metrics.jsonl      per-step and per-epoch records (deterministic)
  timing.jsonl                    wall-clock figures (the only file reruns change)
  checkpoints/                    Orbax checkpoints with a SHA-256 manifest
  fork.json                       for a fork: the parent run, the step, the config changes
  final.json, report.md, curves.png

The tools that read a trained model (explanations, diffs, robustness) take a run
directory (its latest checkpoint) or a checkpoint directory `<run>/checkpoints/<step>`;
`load` restores it through `checkpoint.restore`, so a damaged one is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from jaxrepro import config as configlib
from jaxrepro import determinism, fingerprint, rng
from jaxrepro.errors import UserError
from jaxrepro.records import read_jsonl, write_jsonl
from jaxrepro.train import checkpoint as ckpt
from jaxrepro.train import setup

# Keys a resumed run may change: where it runs, not what it computes (with
# microbatches > 0 not even the bits). A config saved without `microbatches` ran the
# plain program, one without `fast_convs` what fast_convs=False runs, one without
# `determinism` the machine mode.
PLACEMENT_ONLY = (
    "num_devices: ",
    "microbatches: None -> 0",
    "fast_convs: None -> False",
    "determinism: None -> 'machine'",
)


class RunError(UserError, RuntimeError):
    """A run directory that cannot be started, resumed or forked as asked."""


class RunNotFound(RunError):
    """A path that is not a run or checkpoint directory, or has no such checkpoint."""


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The files of one run directory."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / "config.json")
    config_source = property(lambda self: self.path / "config_source.py")
    environment = property(lambda self: self.path / "environment.jsonl")
    data = property(lambda self: self.path / "data.json")
    steps = property(lambda self: self.path / "steps.jsonl")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    timing = property(lambda self: self.path / "timing.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    fork = property(lambda self: self.path / "fork.json")
    final = property(lambda self: self.path / "final.json")
    report = property(lambda self: self.path / "report.md")
    curves = property(lambda self: self.path / "curves.png")

    def read_config(self) -> ml_collections.FrozenConfigDict:
        """The resolved config the run was trained with."""
        return ml_collections.FrozenConfigDict(json.loads(self.config.read_text()))

    def manager(self, max_to_keep: int | None = None):
        """An Orbax manager of the run's checkpoints (None: keep every step)."""
        return ckpt.manager(self.checkpoints, max_to_keep)


def default_workdir(config: ml_collections.ConfigDict) -> Path:
    """`checkpoints/<experiment>/seed<seed>` under the current directory."""
    return Path("checkpoints") / config.experiment / f"seed{config.seed}"


def locate(path: str | Path) -> tuple[Path, int | None]:
    """(run directory, step or None for the latest) of a run or checkpoint path."""
    path = Path(path)
    if not path.exists():
        if path.name.isdigit() and path.parent.name == "checkpoints" and path.parent.is_dir():
            steps = sorted(int(p.name) for p in path.parent.iterdir() if p.name.isdigit())
            raise RunNotFound(
                f"{path.parent.parent} has no checkpoint at step {path.name}; it has {steps}"
            )
        raise RunNotFound(f"{path} does not exist")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "config.json").exists():
        return path, None
    raise RunNotFound(
        f"{path} is neither a run directory (with config.json and checkpoints/) "
        "nor a checkpoint directory (<run>/checkpoints/<step>)"
    )


def checkpoint_step(run: Path, step: int | None) -> int:
    """`step` if the run has that checkpoint, its latest if `step` is None (RunNotFound else)."""
    mngr = RunDir(run).manager()
    if step is None:
        step = ckpt.latest_step(mngr)
        if step is None:
            raise RunNotFound(f"{run} has no checkpoint yet")
    elif step not in mngr.all_steps():
        raise RunNotFound(
            f"{run} has no checkpoint at step {step}; it has {sorted(mngr.all_steps())}"
        )
    return int(step)


# ---------------------------------------------------------------- start, resume


def prepare(
    run: RunDir,
    config: ml_collections.ConfigDict,
    config_file: str | None,
    resume: bool,
    overwrite: bool,
) -> None:
    """Create the run directory, or check that a resumed run has the same config."""
    if run.config.exists() and overwrite:
        shutil.rmtree(run.path)
    if run.config.exists():
        if not resume:
            raise RunError(
                f"run directory {run.path} already holds a run. Pass --resume to "
                "continue it, --overwrite to start it again, or another --workdir."
            )
        old = json.loads(run.config.read_text())
        changed = [
            c
            for c in configlib.diff_keys(old, json.loads(configlib.to_json(config)))
            if not c.startswith(PLACEMENT_ONLY)
        ]
        if changed:
            raise RunError(
                f"cannot resume {run.path}: the config differs from the saved one:\n  "
                + "\n  ".join(changed)
            )
        return
    run.path.mkdir(parents=True, exist_ok=True)
    run.config.write_text(configlib.to_json(config) + "\n")
    if config_file:
        shutil.copyfile(configlib.split_spec(config_file)[0], run.config_source)


def check_data(run: RunDir, record: dict) -> None:
    """Write `data.json`, refusing a resume whose data differ from the saved record."""
    if run.data.exists() and json.loads(run.data.read_text()) != record:
        raise RunError(
            f"cannot resume {run.path}: the data differ from the run's data.json "
            "(different images, labels or epoch order)"
        )
    run.data.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def checkpoint_meta(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict:
    """The metadata every checkpoint of a run carries besides its cursor."""
    return {
        "steps_per_epoch": steps_per_epoch,
        "root_key": root_key_data(config.seed),
        "config_hash": configlib.config_hash(config),
    }


def root_key_data(seed: int) -> list:
    """The root key's data, as stored in checkpoints (a resume checks it)."""
    return np.asarray(jax.random.key_data(rng.root_key(seed))).tolist()


def check_checkpoint(
    run: RunDir, step: int, meta: dict, config: ml_collections.ConfigDict, steps_per_epoch: int
) -> None:
    """Refuse a checkpoint of another run (root key or data cursor differ)."""
    if (
        meta.get("root_key") != root_key_data(config.seed)
        or meta.get("steps_per_epoch") != steps_per_epoch
    ):
        raise RunError(
            f"checkpoint {step} in {run.path} belongs to another run "
            "(root key or data cursor do not match)"
        )


def truncate_records(run: RunDir, step: int) -> tuple[list[dict], list[dict]]:
    """Keep the step and epoch records up to `step` (a resume's start); returns them."""
    kept = []
    for path in (run.steps, run.metrics):
        records = [r for r in read_jsonl(path) if r["step"] <= step]
        write_jsonl(path, records)
        kept.append(records)
    return kept[0], kept[1]


def fingerprint_record(prints: dict) -> dict:
    """Host record of `steps.state_fingerprints`: per-leaf hex and their combined SHA-256."""
    leaves = {
        f"{group}.{k}" if k else group: v
        for group, tree in prints.items()
        for k, v in fingerprint.to_hex(tree).items()
    }
    return {"state": fingerprint.combine_hex(leaves), "leaves": leaves}


# ------------------------------------------------------------------------ forks


def fork_source(parent: str | Path) -> tuple[Path, int]:
    """(run directory, step) of the checkpoint a fork starts from; checked before any write."""
    try:
        parent_run, step = locate(parent)
        return parent_run, checkpoint_step(parent_run, step)
    except RunNotFound as e:
        raise RunError(f"--fork-from: {e}") from None


def fork(
    parent_run: Path,
    step: int,
    run: RunDir,
    config: ml_collections.ConfigDict,
    abstract: setup.TrainState,
) -> setup.TrainState:
    """Start `run` from checkpoint `step` of another run; its state.

    The parent's step and epoch records up to that step are copied, so `jaxrepro.analysis
    .diff` compares the two step by step: they agree up to the fork step and part from
    the next one on, when this run's config takes over. Records the parent, the step
    and the config keys that differ in fork.json.
    """
    parent = RunDir(parent_run)
    try:
        state, _ = ckpt.restore(parent.manager(), step, abstract)
    except ckpt.CheckpointError as e:  # also a tree that does not fit this config's model
        raise RunError(f"--fork-from: {e}") from None
    changes = configlib.diff_keys(
        json.loads(parent.config.read_text()), json.loads(configlib.to_json(config))
    )
    write_jsonl(run.steps, [r for r in read_jsonl(parent.steps) if r["step"] <= step])
    write_jsonl(run.metrics, [r for r in read_jsonl(parent.metrics) if r["step"] <= step])
    run.fork.write_text(
        json.dumps(
            {"parent": str(parent_run.resolve()), "step": int(step), "config_changes": changes},
            indent=2,
        )
        + "\n"
    )
    return state


# ------------------------------------------------------------------ trained model


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model and the variables of one checkpoint of a run."""

    run: Path
    step: int
    config: ml_collections.FrozenConfigDict
    model: nn.Module  # dropout is off in `apply(..., train=False)`
    variables: dict  # {'params': ..., 'batch_stats': ...}
    state: Any  # the whole TrainState (with optimizer state)

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)


def load(path: str | Path, step: int | None = None, *, take_mode: bool = True) -> TrainedModel:
    """The trained model of a run or checkpoint directory, verified against its manifest.

    `take_mode`: the process takes the run's determinism mode first
    (`determinism.apply_config`), so that what is computed with the model has the run's
    guarantee (ModeError if this process already runs the other mode). Without it the
    model computes in this process's mode: a measurement here, as diff makes."""
    run, path_step = locate(path)
    config = RunDir(run).read_config()
    if take_mode:  # before Orbax, which starts the backend
        determinism.apply_config(config)
    step = checkpoint_step(run, path_step if step is None else step)
    state, _ = ckpt.restore(RunDir(run).manager(), step, setup.abstract_state(config))
    return TrainedModel(
        run=run,
        step=step,
        config=config,
        model=setup.build_model(config),
        variables=state.variables,
        state=state,
    )

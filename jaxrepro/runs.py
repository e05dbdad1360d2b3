"""Open a trained run (or one of its checkpoints) as a config, a model and its variables.

The tools that use a trained model (explanations, prediction diffs, robustness) take
the same argument: a run directory (`checkpoints/<experiment>/seed<seed>`, latest
checkpoint) or a checkpoint directory (`<run>/checkpoints/<step>`). The checkpoint is
restored through `checkpoint.restore`, so a damaged one is refused, never half-loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jaxrepro import checkpoint as ckpt


class RunNotFound(RuntimeError):
    """A path that is not a run or checkpoint directory, or has no usable checkpoint."""


@dataclass(frozen=True)
class TrainedModel:
    """A model and the variables of one checkpoint of a run."""

    run: Path
    step: int
    config: ml_collections.FrozenConfigDict
    model: Any              # the flax module, with dropout off in `apply(..., train=False)`
    variables: dict         # {'params': ..., 'batch_stats': ...}
    state: Any              # the whole TrainState (with optimizer state)

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)


def locate(path: str | Path) -> tuple[Path, int | None]:
    """(run directory, step or None for the latest) of a run or checkpoint path."""
    path = Path(path)
    if not path.exists():
        if path.name.isdigit() and path.parent.name == "checkpoints" and path.parent.is_dir():
            steps = sorted(int(p.name) for p in path.parent.iterdir() if p.name.isdigit())
            raise RunNotFound(f"{path.parent.parent} has no checkpoint at step {path.name}; "
                              f"it has {steps}")
        raise RunNotFound(f"{path} does not exist")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "config.json").exists():
        return path, None
    raise RunNotFound(f"{path} is neither a run directory (with config.json and checkpoints/) "
                      "nor a checkpoint directory (<run>/checkpoints/<step>)")


def read_config(run: Path) -> ml_collections.FrozenConfigDict:
    """The resolved config a run was trained with (its config.json)."""
    return ml_collections.FrozenConfigDict(json.loads((Path(run) / "config.json").read_text()))


def load(path: str | Path, step: int | None = None) -> TrainedModel:
    """The trained model of a run or checkpoint directory, verified against its manifest."""
    from jaxrepro import train  # noqa: PLC0415  (train imports data, tqdm; keep this light)

    run, path_step = locate(path)
    step = path_step if step is None else step
    config = read_config(run)
    model, tx = train.build_model(config), train.build_optimizer(config)
    abstract = jax.eval_shape(lambda: train.init_state(
        model, tx, jax.random.key(0), config.data.image_size))
    mngr = ckpt.manager(run / "checkpoints", max_to_keep=None)
    if step is None:
        step = ckpt.latest_step(mngr)
        if step is None:
            raise RunNotFound(f"{run} has no checkpoint yet")
    elif step not in mngr.all_steps():
        raise RunNotFound(f"{run} has no checkpoint at step {step}; it has "
                          f"{sorted(mngr.all_steps())}")
    state, _ = ckpt.restore(mngr, step, abstract)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return TrainedModel(run=run, step=int(step), config=config, model=model,
                        variables=variables, state=state)

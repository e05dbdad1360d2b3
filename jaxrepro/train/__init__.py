"""The training library: a config and a run directory in, bit-identical runs out.

    from jaxrepro import train
    final = train.train_and_evaluate(config, workdir)

Modules, in the order a run uses them: `setup` (model, optimizer, PRNG streams, train
state), `steps` (loss, gradients, update, evaluation: written once), `parallel`
(data-parallel placements of the same step), `optim` (Keras's RMSprop), `probe` (the
per-layer probe stored with checkpoints), `checkpoint` (Orbax with a SHA-256
manifest), `rundir` (the run directory: paths, locate, start/resume/fork checks,
records, `load` of a trained model), `loop` (`train_and_evaluate` in named phases),
`report` (curves and report.md), `cli` (the command line).
"""

from jaxrepro.train.loop import NonFiniteLoss, load_data, train_and_evaluate
from jaxrepro.train.rundir import RunDir, RunError, RunNotFound, TrainedModel, load
from jaxrepro.train.setup import (
    TrainState,
    abstract_state,
    build_model,
    build_optimizer,
    init_state,
    stream_keys,
)

__all__ = [
    "NonFiniteLoss",
    "RunDir",
    "RunError",
    "RunNotFound",
    "TrainState",
    "TrainedModel",
    "abstract_state",
    "build_model",
    "build_optimizer",
    "init_state",
    "load",
    "load_data",
    "stream_keys",
    "train_and_evaluate",
]

"""Write a run's (or checkpoint's) variables to the weight file the TF side reads, and back.

    python -m jaxrepro.analysis.export RUN_OR_CHECKPOINT OUT.npz

writes 'params/...' and 'batch_stats/...' of the checkpoint (the latest of a run
directory) as an `.npz` (`jaxrepro.tfref.weights`) and prints, as JSON, the model, image
size, step and SHA-256 of each array. Then in a TF process:
`python -m jaxrepro.tfref mirror MODEL OUT.npz BACK.npz --image-size S`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from jaxrepro import cli
from jaxrepro.tfref import weights
from jaxrepro.train import rundir


def export_variables(variables: Mapping[str, Any], path: str | Path) -> dict[str, str]:
    """Write Flax variables ({'params': ..., 'batch_stats': ...}) to `path`; their hashes."""
    host = jax.device_get(dict(variables))
    flat = weights.flatten(host)
    weights.save(path, flat)
    return weights.sha256(flat)


def import_variables(path: str | Path) -> dict[str, Any]:
    """Flax variables (nested dicts of NumPy arrays) from a weight file."""
    return weights.unflatten(weights.load(path))


def export_run(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Export the variables of a run or checkpoint directory; what was written."""
    trained = rundir.load(path)
    hashes = export_variables(trained.variables, out)
    return {
        "run": str(trained.run),
        "step": trained.step,
        "model": trained.config.model,
        "image_size": trained.image_size,
        "out": str(out),
        "sha256": hashes,
    }


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.export",
        description=__doc__,
    )
    parser.add_argument("run", help="run directory or <run>/checkpoints/<step>")
    parser.add_argument("out", help="the .npz to write")
    args = parser.parse_args(argv)
    result = export_run(args.run, args.out)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train several configs one after the other in this process: a variant's child process.

    python -m jaxrepro.analysis.train_configs OUT_DIR CONFIG_FILE... [--config.KEY=VALUE ...]
                                              [--explain N] [--explain-methods a,b]
                                              [--no-progress]

Each config trains into OUT_DIR/<experiment> (started again if it exists), with the
overrides applied to every one. `--explain N`: then the heatmaps of the first N
validation images, by every explanation method (or those named), go to
OUT_DIR/<experiment>/explanations.npz.

One process for several configs pays the start-up (a JAX import, which takes minutes
on an emulated CPU) once. All configs must run in one determinism mode: the mode is a
property of the process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrepro import cli, explain
from jaxrepro import config as configlib
from jaxrepro.errors import UserError
from jaxrepro.train import loop, rundir

EXPLANATIONS = "explanations.npz"


class ConfigsError(UserError, ValueError):
    """Configs that cannot train in one process."""


def check_methods(methods: Sequence[str]) -> None:
    """Raise ConfigsError for an unknown explanation method, naming the valid ones."""
    unknown = [m for m in methods if m not in explain.METHODS]
    if unknown:
        raise ConfigsError(
            f"unknown explanation method(s) {', '.join(unknown)}; valid methods: "
            + ", ".join(explain.METHODS)
        )


def explain_run(
    workdir: Path, images: int, methods: Sequence[str] = explain.DEFAULT_METHODS
) -> Path:
    """The heatmaps of the first `images` validation images of a trained run by each of
    `methods`, written to `workdir/explanations.npz` (arrays only, no pickle); its path."""
    check_methods(methods)
    trained = rundir.load(workdir)
    pixels = loop.load_data(trained.config).validation.images[:images]
    maps = explain.explain_each(trained.model, trained.variables, pixels, methods)
    np.savez(workdir / EXPLANATIONS, **maps)
    return workdir / EXPLANATIONS


def train_configs(
    out: Path,
    config_files: Sequence[str],
    overrides: Sequence[str],
    progress: bool = True,
    explain_images: int = 0,
    explain_methods: Sequence[str] = explain.DEFAULT_METHODS,
) -> dict[str, dict]:
    """Train every config into `out/<experiment>` (and explain `explain_images`
    validation images of each with `explain_methods`); their final records by experiment."""
    check_methods(explain_methods)  # before any training
    configs = [configlib.resolve(f, overrides) for f in config_files]
    modes = {c.get("determinism") for c in configs}
    if len(modes) > 1:
        raise ConfigsError(
            f"the configs ask for several determinism modes ({sorted(modes)}); "
            "one process runs one mode"
        )
    names = [c.experiment for c in configs]
    if len(set(names)) != len(names):
        raise ConfigsError(f"two configs write the same experiment directory: {names}")
    finals = {}
    for f, c in zip(config_files, configs):
        finals[c.experiment] = loop.train_and_evaluate(
            c, out / c.experiment, overwrite=True, config_file=f, progress=progress
        )
        if explain_images:
            explain_run(out / c.experiment, explain_images, explain_methods)
    return finals


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    rest, overrides = cli.command_line(argv)
    parser = cli.parser("python -m jaxrepro.analysis.train_configs", __doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory of the runs (OUT/<experiment>)")
    parser.add_argument("configs", nargs="+", metavar="CONFIG_FILE")
    parser.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help=f"explain the first N validation images with every method ({EXPLANATIONS})",
    )
    parser.add_argument(
        "--explain-methods",
        default=",".join(explain.DEFAULT_METHODS),
        help="comma-separated methods for --explain (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(rest)
    finals = train_configs(
        args.out,
        args.configs,
        overrides,
        not args.no_progress,
        args.explain,
        [m.strip() for m in args.explain_methods.split(",") if m.strip()],
    )
    for name, final in finals.items():
        print(f"{name}: final state sha256 {final['final_state_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

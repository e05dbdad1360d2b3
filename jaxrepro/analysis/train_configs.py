"""Train several configs one after the other in this process: a variant's child process.

    python -m jaxrepro.analysis.train_configs OUT_DIR CONFIG_FILE... [--config.KEY=VALUE ...]
                                              [--no-progress]

Each config trains into OUT_DIR/<experiment> (started again if it exists), with the
overrides applied to every one. One process for several configs pays the start-up (a
JAX import, which takes minutes on an emulated CPU) once. All configs must run in one
determinism mode: the mode is a property of the process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from jaxrepro import cli
from jaxrepro import config as configlib
from jaxrepro.errors import UserError
from jaxrepro.train import loop


class ConfigsError(UserError, ValueError):
    """Configs that cannot train in one process."""


def train_configs(
    out: Path, config_files: Sequence[str], overrides: Sequence[str], progress: bool = True
) -> dict[str, dict]:
    """Train every config into `out/<experiment>`; their final records by experiment."""
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
    return {
        c.experiment: loop.train_and_evaluate(
            c, out / c.experiment, overwrite=True, config_file=f, progress=progress
        )
        for f, c in zip(config_files, configs)
    }


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    rest, overrides = cli.command_line(argv)
    parser = cli.parser("python -m jaxrepro.analysis.train_configs", __doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory of the runs (OUT/<experiment>)")
    parser.add_argument("configs", nargs="+", metavar="CONFIG_FILE")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(rest)
    finals = train_configs(args.out, args.configs, overrides, progress=not args.no_progress)
    for name, final in finals.items():
        print(f"{name}: final state sha256 {final['final_state_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

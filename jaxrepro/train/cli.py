"""`python -m jaxrepro.train CONFIG_FILE [--config.KEY=VALUE ...]`: the training CLI.

Parses the command line, resolves the config and calls
`jaxrepro.train.train_and_evaluate`. Exit status: 0 done, 2 a user error (config key,
run directory, damaged checkpoint, data), 3 a non-finite loss, 130 interrupted (a
checkpoint was saved).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

from jaxrepro import cli, determinism
from jaxrepro import config as configlib
from jaxrepro.train import loop, rundir

EXIT_NON_FINITE = 3


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split argv into options and `--config.KEY=VALUE` overrides."""
    parser = cli.parser(
        prog="python -m jaxrepro.train",
        description="Train a model deterministically from a config file "
        "(a Python file defining get_config(); it is executed).",
        epilog="Overrides: --config.KEY=VALUE for any key of the config, e.g.\n"
        "  --config.num_epochs=90 --config.optimizer.learning_rate=0.0005\n"
        "  --config.data.source=folder --config.data.folder=PATH\n"
        "Values are parsed as the type of the key they replace; an unknown key "
        "lists the valid ones.\n"
        "CONFIG_FILE:VARIANT picks a variant the file defines, e.g. "
        "experiments/convnet.py:tiny.\n"
        "Exit status: 0 done, 2 user error, 3 the loss became NaN or infinite "
        "(the run stops at that step; its last checkpoint is the last good state), "
        "130 interrupted (a checkpoint was saved; continue with --resume).",
    )
    parser.add_argument(
        "config_file", metavar="CONFIG_FILE", help="experiment config, e.g. experiments/convnet.py"
    )
    parser.add_argument(
        "--workdir", help="run directory (default checkpoints/<experiment>/seed<seed>)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --workdir from its latest checkpoint",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an existing run in --workdir and start again",
    )
    parser.add_argument(
        "--fork-from",
        metavar="RUN_OR_CHECKPOINT",
        help="start a new run from another run's checkpoint (its latest, or "
        "<run>/checkpoints/<step>), e.g. with one setting changed; "
        "`python -m jaxrepro.analysis.diff` then shows them parting at "
        "that step",
    )
    parser.add_argument(
        "--show-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    multi = parser.add_argument_group(
        'multi-process (one process per host; README "Data-parallel training")'
    )
    multi.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0, for jax.distributed.initialize",
    )
    multi.add_argument("--num-processes", type=int, default=1, help="processes in the run")
    multi.add_argument("--process-id", type=int, default=0, help="this process's index")
    rest, overrides = cli.split_overrides(argv)
    return parser.parse_args(rest), overrides


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    config = configlib.resolve(args.config_file, overrides)
    if args.show_config:
        print(configlib.to_json(config))
        return 0
    determinism.apply_config(config)  # before any JAX computation: XLA reads its flags once
    if args.coordinator:  # CPU collectives: gloo (JAX's default)
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    workdir = Path(args.workdir) if args.workdir else rundir.default_workdir(config)
    try:
        final = loop.train_and_evaluate(
            config,
            workdir,
            resume=args.resume,
            overwrite=args.overwrite,
            config_file=args.config_file,
            progress=not args.no_progress,
            fork_from=args.fork_from,
        )
    except loop.NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    m = final["metrics"] or {}
    print(
        f"done: {final['step']} steps, val accuracy {m.get('val_accuracy', float('nan')):.3f}"
        f"\nfinal state sha256 {final['final_state_sha256']}\n"
        f"report: {rundir.RunDir(workdir).report}"
    )
    return 0

"""What every command-line tool shares: arguments, user errors, child processes.

* `command_line(argv)`: the arguments and the `--config.KEY=VALUE` overrides apart;
  `parser(prog, description)`: the argument parser every tool's `--help` is laid out by.
* `guarded(main)`: a `main(argv) -> int` that reports a `UserError` as `error: ...`
  and returns exit status 2; run from the command line, it first gives the process
  transparent huge pages (`jaxrepro.allocator.ensure`).
* `run_child(module, args, ...)`: run `python -m module args` in a fresh process, the
  one way every tool starts a child (another XLA flag, another core count, an emulated
  CPU, a TensorFlow process); a failure raises `ChildError` with the child's stderr.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence

from jaxrepro import allocator
from jaxrepro.errors import UserError

CONFIG_PREFIX = "--config."
EXIT_USER_ERROR = 2


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(other arguments, overrides without the `--config.` prefix), order kept."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith(CONFIG_PREFIX):
            overrides.append(arg[len(CONFIG_PREFIX) :])
        else:
            rest.append(arg)
    return rest, overrides


def command_line(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(arguments, overrides) of `argv`, or of this process's command line if None."""
    return split_overrides(sys.argv[1:] if argv is None else argv)


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser whose description and epilog keep their line breaks, as every tool's."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def as_arguments(overrides: Sequence[str]) -> list[str]:
    """Overrides back as `--config.KEY=VALUE` arguments (for a child's command line)."""
    return [f"{CONFIG_PREFIX}{o}" for o in overrides]


def guarded(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """`main` with every `UserError` printed as `error: ...` and turned into exit status 2.

    Called without arguments (the command line's), it first re-executes a jaxrepro
    command with transparent huge pages for XLA's buffers (`jaxrepro.allocator`).
    """

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        if argv is None:
            allocator.ensure()
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR

    return run


class ChildError(RuntimeError):
    """A child process that exited with a status other than 0."""

    def __init__(self, what: str, returncode: int, stderr: str | None):
        tail = f":\n{stderr[-3000:]}" if stderr else ""
        super().__init__(f"{what} exited {returncode}{tail}")
        self.returncode = returncode


def _affinity(cpus: int | None) -> Callable[[], None] | None:
    """A preexec function that restricts the child to the first `cpus` usable CPUs."""
    if cpus is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))[:cpus]
    return lambda: os.sched_setaffinity(0, allowed)


def child_command(module: str, args: Sequence[str], prefix: Sequence[str] = ()) -> list[str]:
    """`[*prefix, python, -m, module, *args]` with this process's interpreter."""
    return [*prefix, sys.executable, "-m", module, *args]


def run_child(
    module: str,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    cpus: int | None = None,
    prefix: Sequence[str] = (),
    timeout: float | None = None,
    capture: bool = True,
    what: str | None = None,
) -> subprocess.CompletedProcess:
    """Run `python -m module args` in a fresh process and wait for it.

    `env`: the child's whole environment (default: this one's); `cpus`: the child may
    use only that many CPUs (its affinity, so XLA sizes its thread pool to them);
    `prefix`: a command the interpreter runs under (e.g. an emulator); `capture`:
    collect stdout and stderr as text (else they go to this process's). Raises
    `ChildError` (naming `what`) if the child fails.
    """
    r = subprocess.run(
        child_command(module, args, prefix),
        env=dict(env or os.environ),
        preexec_fn=_affinity(cpus),
        capture_output=capture,
        text=True,
        timeout=timeout,
        check=False,
    )
    if r.returncode != 0:
        raise ChildError(what or f"python -m {module}", r.returncode, r.stderr)
    return r

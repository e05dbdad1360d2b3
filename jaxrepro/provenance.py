"""Where a measurement came from: the command, the commit, the machine and the date.

Every file a measuring tool writes (`bench.md`, `variants.md`, `variance.md`,
`compare.json`, ...) carries this record, so a figure in `docs/results/` can be traced
to what made it and rerun.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jaxrepro

_SOURCE = Path(jaxrepro.__file__).resolve().parent  # the code that ran, not the cwd


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(_SOURCE), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


# Outside a checkout (a copy of the tree sent to another machine), the commit the copy
# was made from, as the sender wrote it (`benchmarks/gpu_wheels.sh` does).
COMMIT_VARIABLE = "JAXREPRO_SOURCE_COMMIT"


def commit() -> str:
    """The git commit of the jaxrepro source that runs (`+dirty` with local changes);
    outside a checkout, `$JAXREPRO_SOURCE_COMMIT` marked as given, else the version."""
    try:
        head = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        given = os.environ.get(COMMIT_VARIABLE)
        if given:
            return f"{given} (given by ${COMMIT_VARIABLE}; not a git checkout)"
        return f"jaxrepro {jaxrepro.__version__} (not a git checkout)"
    return head + ("+dirty" if dirty else "")


def machine() -> str:
    """A one-line description of this machine's CPU and the cores this process may use."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({platform.machine()}), {len(os.sched_getaffinity(0))} cores usable"


def record(prog: str, argv: Sequence[str]) -> dict[str, Any]:
    """The provenance of a measurement made by `prog argv`."""
    return {
        "command": f"{prog} {shlex.join(argv)}".strip(),  # prog is several words, unquoted
        "commit": commit(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(rec: dict[str, Any]) -> str:
    """The record as the head of a Markdown results file."""
    return (
        f"Command: `{rec['command']}`  \nCommit: `{rec['commit']}`  \n"
        f"Machine: {rec['machine']}  \nDate: {rec['date']}\n"
    )

"""How jaxrepro's processes use glibc's allocator: huge pages, and compilers' memory given back.

Neither changes a bit of any result; both are about time and memory. Importing this
module loads no framework: TensorFlow reference processes use it too.

Huge pages. XLA:CPU allocates every execution's buffers afresh, and glibc's malloc
serves a large block from a new anonymous map that it unmaps again when the block is
freed (a worker thread's arena maps every block over 64 MiB, whatever `mallopt` says).
So each training step or inference batch touches its whole working set as new memory:
one page fault per 4 KiB page. On a 2-core AMD EPYC that was 0.65 million faults per mini
Xception step, and `relu(x * a + b)` on a 127 MB map took 47 ms, against 7 ms once
the pages stayed mapped (`docs/results/speed/`).

glibc 2.35 and newer take the tunable `glibc.malloc.hugetlb=1`: malloc then asks the
kernel for transparent huge pages (`madvise`) on the maps it makes, one fault per 2
MiB. The buffers and the code that computes on them are the same, so are the bits;
only the faults go. glibc reads tunables when a process starts, so a jaxrepro command
re-executes itself once with the tunable added to `GLIBC_TUNABLES` (`ensure`, called
by every tool's `main` through `cli.guarded`, only in a process started as a jaxrepro
command); its child processes inherit it. A `GLIBC_TUNABLES` that already names
`glibc.malloc.hugetlb` is the user's choice and is kept as it is (`hugetlb=0` turns
this off). Nothing happens on another C library, on an older glibc, or where the
kernel's transparent huge pages are `never`. TensorFlow reference processes run
without it (`jaxrepro.tfref.process`): they are measured as their users run them.

Compilers' memory. XLA's compiler frees most of what it allocated when a compilation
ends, but malloc keeps freed memory in its arenas: 270 MB after compiling the mini
Xception's training step, which then counted under the step's own buffers in the
process's peak (2.95 against 2.67 GB, batch 32 at 180 px). `release_after_compiles`
registers a `jax.monitoring` listener that calls glibc's `malloc_trim(0)` after each
XLA compilation (`jaxrepro/__init__` does it in every JAX process), which gives the
freed pages back to the kernel before the compiled program first runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

VARIABLE = "GLIBC_TUNABLES"
TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
# The first glibc that knows the tunable.
GLIBC_SINCE = (2, 35)
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, ...] | None:
    """This process's glibc version, or None on another C library."""
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def kernel_mode(path: Path = THP_SETTING) -> str | None:
    """The kernel's transparent huge page mode (always, madvise, never), or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    chosen = [w[1:-1] for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else None


def supported() -> bool:
    """Whether the tunable can take effect here: Linux, glibc 2.35+, THP not `never`."""
    version = glibc_version()
    return (
        sys.platform.startswith("linux")
        and version is not None
        and version >= GLIBC_SINCE
        and kernel_mode() in ("always", "madvise")
    )


def with_tunable(tunables: str) -> str:
    """`GLIBC_TUNABLES` with the huge-page setting added, unless it names it already."""
    items = [t for t in tunables.split(":") if t]
    if any(t.split("=")[0] == TUNABLE for t in items):
        return tunables
    return ":".join([*items, SETTING])


def without_own_setting(env: Mapping[str, str]) -> dict[str, str]:
    """`env` without the setting this module adds (for a process measured as is)."""
    out = dict(env)
    items = [t for t in out.get(VARIABLE, "").split(":") if t and t != SETTING]
    if items:
        out[VARIABLE] = ":".join(items)
    else:
        out.pop(VARIABLE, None)
    return out


def active(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process started with the huge-page setting (as `environment.jsonl`
    records it)."""
    tunables = (os.environ if env is None else env).get(VARIABLE, "")
    return SETTING in tunables.split(":")


def started_as_command() -> bool:
    """Whether this process was started as a jaxrepro command (`python -m jaxrepro...`
    or a `jaxrepro-*` script), not by a program that imports jaxrepro."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.split(".")[0] == "jaxrepro"
    return Path(sys.argv[0] if sys.argv else "").name.startswith("jaxrepro-")


def ensure() -> None:
    """Re-execute this command with the huge-page tunable, once, where it can help.

    Returns at once when the tunable is already in the environment (also the user's own
    `glibc.malloc.hugetlb=...`), when it cannot take effect here, or when the process is
    not a jaxrepro command (a program that calls a tool's `main` is never replaced).
    Otherwise the process is replaced by the same command line (`sys.orig_argv`) with
    the tunable added: nothing has run yet but imports, so nothing is lost.
    """
    current = os.environ.get(VARIABLE, "")
    wanted = with_tunable(current)
    if wanted == current or not supported() or not started_as_command():
        return
    env = {**os.environ, VARIABLE: wanted}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


# The event jax records when XLA has compiled a program (jax._src.dispatch's
# BACKEND_COMPILE_EVENT), before the program runs.
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None on another C library."""
    if glibc_version() is None:
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return getattr(libc, "malloc_trim", None)


def give_back_free_memory() -> bool:
    """Return the memory malloc holds free to the kernel (`malloc_trim(0)`); False
    where there is no glibc to ask."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _after_compile(event: str, duration_secs: float, **kwargs: str | int) -> None:
    if event == COMPILE_EVENT:
        give_back_free_memory()


_registered = False


def release_after_compiles() -> None:
    """After every XLA compilation in this process, give malloc's free memory back
    (once per process, however often called)."""
    global _registered
    if not _registered:
        import jax.monitoring  # noqa: PLC0415  (JAX processes only; see the module doc)

        jax.monitoring.register_event_duration_secs_listener(_after_compile)
        _registered = True

"""Wall-clock and memory measurements for the benchmarks.

NumPy-free and framework-free, so the JAX and the TensorFlow halves of
`python -m jaxrepro.analysis.bench` measure the same way.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (which must block until done)."""
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t)
    return seconds


def peak_memory_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity)."""
    return len(os.sched_getaffinity(0))

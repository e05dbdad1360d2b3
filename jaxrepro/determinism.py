"""Determinism settings, applied once, before JAX initialises its backends.

Bitwise reproducibility needs three things fixed before the first array exists:
the XLA flags (read once, when a backend starts), the PRNG implementation and the
default matmul precision. `apply()` sets all three; `jaxrepro/__init__.py` calls it,
so importing anything from the package is enough. `fingerprint()` records what a
run actually ran with, so two runs can be told apart later.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

# Flags every backend parses (XLA registers all debug options on every build).
GPU_FLAGS = (
    "--xla_gpu_deterministic_ops=true",  # deterministic scatter/reductions/convolutions
    "--xla_gpu_exclude_nondeterministic_ops=true",  # fail rather than run a racy kernel
)
# CPU (x86-64): generate code for AVX at most. XLA:CPU otherwise compiles for the
# host's best ISA, so the bits depend on whether the machine has FMA, AVX2 or
# AVX-512, and under jit it contracts a*b+c into one FMA where op-by-op execution
# rounds twice. Capped at AVX there is no FMA: the optimizer matches Keras's formula
# bitwise under jit, and every x86-64 CPU with AVX runs the same generated code.
# Measured here: no slower for the ConvNet, about 10% slower for the mini Xception.
#
# CPU (all): YNNPACK for dot products and reductions only. jax 0.10.2's XLA:CPU sends
# convolutions to YNNPACK too unless the list is set; XLA's Eigen convolutions were 4x
# faster on a forward convolution here (the ConvNet's conv2 at 180 px, batch 32, 2
# cores: 99 against 467 ms). Measured training steps at 180 px, batch 32, before ->
# after: ConvNet 2.1 s -> 0.8-0.9 s, mini Xception 7.1 s -> 4.4 s. Leaving reductions to
# XLA's own loops (an empty list) was slower and made a jitted step differ from an
# op-by-op one (the mini Xception's batch-norm gradients); so did adding `eltwise`
# (the ConvNet's bias gradients). With `dot,reduce` both keep that equality (tested).
YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
CPU_FLAGS: tuple[str, ...] = (
    ("--xla_cpu_max_isa=AVX",) if platform.machine().lower() in ("x86_64", "amd64") else ()
) + (YNN_FUSIONS,)

JAX_CONFIG = {
    "jax_default_matmul_precision": "highest",
    "jax_default_prng_impl": "threefry2x32",
    "jax_threefry_partitionable": True,
    "jax_enable_x64": False,
}

# Settings jaxrepro leaves to the user but records, since they change the bits.
RECORDED_CONFIG = ("jax_disable_jit",)

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "tensorflow-datasets",
    "array-record",
    "chex",
    "ml-collections",
)

_applied = False


def xla_flags(extra: tuple[str, ...] = ()) -> str:
    """The XLA_FLAGS value jaxrepro runs with: the user's own flags, then ours."""
    user = os.environ.get("XLA_FLAGS", "").split()
    named = {f.split("=")[0] for f in user}  # a flag the user set keeps the user's value
    wanted = [f for f in (*GPU_FLAGS, *CPU_FLAGS, *extra) if f.split("=")[0] not in named]
    return " ".join(user + wanted)


def without_own_flags(value: str) -> str:
    """XLA_FLAGS minus the flags jaxrepro adds (for a process that is not JAX's)."""
    own = {*GPU_FLAGS, *CPU_FLAGS}
    return " ".join(f for f in value.split() if f not in own)


def backend_started() -> bool:
    """True once any JAX backend exists (after which XLA flags are ignored)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # noqa: PLC0415  (only if jax is loaded already)

    return bool(getattr(xla_bridge, "_backends", {}))


def apply(extra_xla_flags: tuple[str, ...] = ()) -> None:
    """Set XLA flags and JAX config for bitwise-deterministic runs.

    Raises RuntimeError if a backend already started with other flags, because
    then the flags could no longer take effect and the run would silently differ.
    """
    global _applied
    flags = xla_flags(tuple(extra_xla_flags))
    if backend_started():
        if flags != os.environ.get("XLA_FLAGS", ""):
            raise RuntimeError(
                "jaxrepro: a JAX backend is already running, so XLA flags can no longer "
                f"change. Wanted XLA_FLAGS={flags!r}. Import jaxrepro (or call "
                "jaxrepro.determinism.apply) before creating any JAX array."
            )
    else:
        os.environ["XLA_FLAGS"] = flags
    import jax  # noqa: PLC0415  (must come after XLA_FLAGS is set)

    for name, value in JAX_CONFIG.items():
        jax.config.update(name, value)
    _applied = True


def _cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or "", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key == "flags":
                    flags = sorted(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "flags": flags, "machine": platform.machine()}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def fingerprint() -> dict[str, Any]:
    """Everything about this process that can change the bits of a result."""
    import jax  # noqa: PLC0415

    devices = jax.devices()
    threads = {
        k: os.environ.get(k)
        for k in (
            "OMP_NUM_THREADS",
            "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "TF_NUM_INTRAOP_THREADS",
            "TF_NUM_INTEROP_THREADS",
        )
        if os.environ.get(k)
    }
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu": _cpu_info(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_config": {k: getattr(jax.config, k) for k in (*JAX_CONFIG, *RECORDED_CONFIG)},
        "threads": {"cpu_count": os.cpu_count(), "affinity": affinity, **threads},
    }

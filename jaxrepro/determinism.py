"""Determinism settings, applied once, before JAX initialises its backends.

Bitwise reproducibility needs three things fixed before the first array exists: the
XLA flags (read once, when a backend starts), the PRNG implementation and the default
matmul precision. `apply()` sets all three; `jaxrepro/__init__.py` calls it, so
importing anything from the package is enough. `fingerprint()` records what a run
actually ran with, so two runs can be told apart later.

Two modes (`MODES`), chosen by the config key `determinism` (the training CLI applies
it before the backend starts) or, for any process, by `$JAXREPRO_DETERMINISM`:

* `machine`: the fastest flags whose bits repeat on one machine, with its core count.
* `portable`: flags under which every contraction and reduction is code XLA generates
  for the AVX cap, the same on every x86-64 CPU (with the convolutions rewritten as
  matrix products by the models, `jaxrepro.models.ops.portable`); see
  docs/portable.md for what depends on the machine and why, op by op.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any

from jaxrepro import allocator
from jaxrepro.errors import UserError


def _numpy_cpu_features() -> dict[str, bool]:
    """NumPy's run-time CPUID readings, {feature: present}. A private name of NumPy's
    (`numpy._core`, `numpy.core` before 2.0): guarded, so that a NumPy that moves it
    costs the CPU check, not the import. Empty if it is gone."""
    for module in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:
            return dict(importlib.import_module(module).__cpu_features__)
        except (ImportError, AttributeError):
            continue
    return {}


__cpu_features__ = _numpy_cpu_features()

ENV_VARIABLE = "JAXREPRO_DETERMINISM"
X86 = platform.machine().lower() in ("x86_64", "amd64")

# Flags every backend parses (XLA registers all debug options on every build).
GPU_FLAGS = (
    "--xla_gpu_deterministic_ops=true",  # deterministic scatter/reductions/convolutions
    "--xla_gpu_exclude_nondeterministic_ops=true",  # fail rather than run a racy kernel
)
# The same flags switched off: XLA:GPU's default, which a user's XLA_FLAGS may ask for
# (a flag the user sets keeps the user's value; see `xla_flags`).
GPU_NONDETERMINISTIC_FLAGS = tuple(f.replace("=true", "=false") for f in GPU_FLAGS)
# x86-64: generate code for AVX at most. XLA:CPU otherwise compiles for the host's best
# ISA, so its generated code depends on whether the machine has FMA, AVX2 or AVX-512,
# and under jit it contracts a*b+c into one FMA where op-by-op execution rounds twice.
# Capped at AVX there is no FMA: the optimizer matches Keras's formula bitwise under jit,
# and every x86-64 CPU with AVX runs the same generated code.
ISA_CAP = ("--xla_cpu_max_isa=AVX",) if X86 else ()
# machine: YNNPACK for dot products and reductions, XLA's Eigen convolutions (4x faster
# than YNNPACK's on a forward convolution here). An empty list (XLA's own reduction
# loops) or adding `eltwise` makes a jitted step differ from an op-by-op one. YNNPACK
# picks its kernels for the CPU it runs on and splits long reductions over the thread
# pool; Eigen blocks its contractions by the cache sizes it reads: other CPUs, other bits.
YNN_FUSIONS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
MACHINE_FLAGS = (*ISA_CAP, YNN_FUSIONS)
# portable: no kernel library at all. No YNNPACK (empty fusion list) and no XNNPACK;
# dot products as XLA's own tiled LLVM-IR GEMM (a backend option of dot_op_emitter.cc)
# instead of Eigen; Eigen single-threaded for what would still reach it; no
# platform-dependent math. Reductions are then XLA's own loops, split over the thread
# pool by their output elements only, so the core count changes no sum.
# The GEMM's register tile: rows, depth, and columns in vectors (8 floats under the AVX
# cap). 4 x 8 x 4 ran the models' products 1.2-2.8x faster than XLA's default 11 x 9 x 1
# here; it is wrong for a column count that is not a multiple of 32, so the portable
# products pad their operands to whole tiles (jaxrepro.models.ops.portable).
GEMM_TILE = (4, 8, 4)
PORTABLE_FLAGS = (
    *ISA_CAP,
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_backend_extra_options=xla_force_enable_experimental_llvm_ir_gemm,"
    "xla_llvm_ir_gemm_tile_size={}:{}:{}*vectwidth".format(*GEMM_TILE),
    "--xla_cpu_enable_platform_dependent_math=false",
)
MODES: dict[str, tuple[str, ...]] = {"machine": MACHINE_FLAGS, "portable": PORTABLE_FLAGS}
DEFAULT_MODE = "machine"
CPU_FLAGS: tuple[str, ...] = MODES[DEFAULT_MODE]  # the CPU flags of the default mode
# What portable mode needs of the CPU: x86-64 with AVX (the ISA cap). jaxlib's own
# wheels need AVX too; FMA, AVX2 and AVX-512 are not used.
PORTABLE_FEATURES = ("AVX",)

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
    # XLA:GPU itself, when installed: the PJRT plugin and its CUDA bindings.
    "jax-cuda13-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda12-plugin",
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
_mode: str | None = None


class ModeError(UserError, RuntimeError):
    """A determinism mode that cannot take effect in this process."""


def requested_mode() -> str:
    """The mode `$JAXREPRO_DETERMINISM` asks for (the default if unset)."""
    mode = os.environ.get(ENV_VARIABLE) or DEFAULT_MODE
    check_mode(mode)
    return mode


def check_mode(mode: str) -> None:
    """Raise ModeError for an unknown mode name."""
    if mode not in MODES:
        raise ModeError(f"unknown determinism mode {mode!r}; valid modes: {', '.join(MODES)}")


def check_cpu(mode_name: str) -> None:
    """Raise ModeError if this CPU cannot give `mode_name`'s bits (portable: x86-64 with
    AVX; the mode would otherwise run other code and silently give other bits)."""
    if mode_name != "portable":
        return
    if not X86:
        raise ModeError(
            f"determinism mode 'portable' gives its bits on x86-64 CPUs only; this machine "
            f"is {platform.machine()}. Use 'machine' here."
        )
    if not __cpu_features__:
        raise ModeError(
            "determinism mode 'portable' cannot check this CPU's features: this NumPy "
            "does not report them"
        )
    missing = [f for f in PORTABLE_FEATURES if not __cpu_features__.get(f)]
    if missing:
        raise ModeError(
            f"determinism mode 'portable' needs the CPU feature(s) {', '.join(missing)}, "
            "which this CPU does not report"
        )


def mode() -> str | None:
    """The mode this process runs in (None before `apply`)."""
    return _mode


def own_flags() -> set[str]:
    """Every flag jaxrepro adds, in any mode."""
    return {*GPU_FLAGS, *(f for flags in MODES.values() for f in flags)}


def xla_flags(mode_name: str, current: str | None = None) -> str:
    """The XLA_FLAGS value of `mode_name`: the user's own flags (those of `current`,
    default $XLA_FLAGS, that jaxrepro did not add), then the mode's."""
    current = os.environ.get("XLA_FLAGS", "") if current is None else current
    user = [f for f in current.split() if f not in own_flags()]
    named = {f.split("=")[0] for f in user}  # a flag the user set keeps the user's value
    wanted = [f for f in (*GPU_FLAGS, *MODES[mode_name]) if f.split("=")[0] not in named]
    return " ".join(user + wanted)


def without_own_flags(value: str) -> str:
    """XLA_FLAGS minus the flags jaxrepro adds (for a process that is not JAX's)."""
    return " ".join(f for f in value.split() if f not in own_flags())


# The jaxlib versions whose XLA is known to parse every flag above: the lock's. XLA
# ends the process at the first flag in XLA_FLAGS it does not know, so on any other
# jaxlib (a GPU machine's own jax, say) `known_flags` asks a child XLA first.
FLAGS_CHECKED_WITH = ("0.10.2",)
# Set for child processes (JSON: the jaxlib version, the flags asked about, those XLA
# did not know), so that a child does not ask again about a flag its parent asked about.
CHECKED_VARIABLE = "JAXREPRO_XLA_FLAGS_CHECKED"
_dropped: list[str] = []


def unknown_xla_flags(flags: list[str]) -> list[str]:
    """The flags of `flags` this jaxlib's XLA does not know. A child starts XLA's CPU
    backend with them; XLA stops at an unknown flag and names it, and the child is
    started again without it. Another failure ends the search (the real process will
    then fail the same way, with XLA's own message)."""
    unknown: list[str] = []
    for _ in range(len(flags) + 1):
        rest = [f for f in flags if f not in unknown]
        r = subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices()"],
            env={**os.environ, "XLA_FLAGS": " ".join(rest), "JAX_PLATFORMS": "cpu"},
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        named = re.findall(r"Unknown flags? in XLA_FLAGS: (\S+)", r.stderr)
        names = {n.split("=")[0] for n in named}
        new = [f for f in rest if f.split("=")[0] in names]
        if r.returncode == 0 or not new:
            return unknown
        unknown += new
    return unknown


def known_flags(flags: str) -> str:
    """`flags` without those of jaxrepro's that this jaxlib's XLA does not know (only
    asked on a jaxlib other than `FLAGS_CHECKED_WITH`). A CPU flag is dropped, with a
    warning and a record in `fingerprint()`: the run is not the lock's anyway, and
    nothing else would let it start. A GPU determinism flag is never dropped: without
    it there is no determinism to speak of, so that is a ModeError."""
    global _dropped
    version = _version("jaxlib")
    if version in FLAGS_CHECKED_WITH:
        return flags
    own = [f for f in flags.split() if f in own_flags()]
    try:
        cached = json.loads(os.environ.get(CHECKED_VARIABLE, "{}"))
    except ValueError:
        cached = {}
    if cached.get("jaxlib") != version:
        cached = {"jaxlib": version, "checked": [], "unknown": []}
    new = [f for f in own if f not in cached["checked"]]
    if new:
        cached["checked"] += new
        cached["unknown"] += unknown_xla_flags(new)
        os.environ[CHECKED_VARIABLE] = json.dumps(cached)
    unknown = [f for f in own if f in cached["unknown"]]
    if any(f in GPU_FLAGS for f in unknown):
        raise ModeError(
            f"jaxlib {version}'s XLA does not know the GPU determinism flag(s) "
            f"{' '.join(f for f in unknown if f in GPU_FLAGS)}; jaxrepro cannot promise "
            f"determinism with it (its flags are checked with jaxlib "
            f"{', '.join(FLAGS_CHECKED_WITH) or 'none'}, the lock file's)."
        )
    if unknown and unknown != _dropped:
        print(
            f"jaxrepro: jaxlib {version}'s XLA does not know {' '.join(unknown)}; running "
            "without (recorded in the environment fingerprint)",
            file=sys.stderr,
        )
    _dropped = unknown
    return " ".join(f for f in flags.split() if f not in unknown)


def backend_started() -> bool:
    """True once any JAX backend exists (after which XLA flags are ignored).

    JAX has no public call for this: the locked jax 0.10.2 has the private
    `xla_bridge.backends_are_initialized()`, older ones only its `_backends` dict. If
    both are gone (another jax), the answer is True once jax is imported: `apply` then
    refuses to change flags it cannot check, instead of running with flags that may not
    take effect.
    """
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge  # noqa: PLC0415  (only if jax is loaded already)
    except ImportError:
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    if callable(started):
        return bool(started())
    backends = getattr(xla_bridge, "_backends", None)
    return True if backends is None else bool(backends)


def apply(mode_name: str | None = None) -> str:
    """Set the XLA flags of a determinism mode and the JAX config; returns the mode.

    `mode_name`: "machine" or "portable" (default: `$JAXREPRO_DETERMINISM`, else
    `DEFAULT_MODE`). Before a backend starts, a later call may change the mode. Once a
    backend runs, its flags can no longer change: asking for other flags then raises
    ModeError, because the run would silently differ.
    """
    global _applied, _mode
    mode_name = requested_mode() if mode_name is None else mode_name
    check_mode(mode_name)
    check_cpu(mode_name)
    flags = known_flags(xla_flags(mode_name))
    if backend_started():
        if flags != os.environ.get("XLA_FLAGS", ""):
            raise ModeError(
                f"jaxrepro: determinism mode {mode_name!r} needs other XLA flags than this "
                f"process's JAX backend started with (mode {_mode!r}); they can no longer "
                f"change. Set {ENV_VARIABLE}={mode_name} before starting Python, or apply "
                "the mode before creating any JAX array."
            )
    else:
        os.environ["XLA_FLAGS"] = flags
    import jax  # noqa: PLC0415  (must come after XLA_FLAGS is set)

    for name, value in JAX_CONFIG.items():
        jax.config.update(name, value)
    _applied, _mode = True, mode_name
    return mode_name


def apply_config(config: Any) -> str:
    """Run in the mode a (run's) config names; a config without the key ran `machine`.

    A no-op when the process already runs in that mode; else `apply` (ModeError once a
    backend runs with the other mode's flags, or when `$JAXREPRO_DETERMINISM` asks for
    another mode: the config is what the run records, so it must say the mode)."""
    wanted = config.get("determinism") or "machine"
    asked = os.environ.get(ENV_VARIABLE)
    if asked and asked != wanted:
        raise ModeError(
            f"{ENV_VARIABLE}={asked} but the config asks for determinism mode {wanted!r}; "
            f"pass --config.determinism={asked} (or unset {ENV_VARIABLE})"
        )
    return wanted if _mode == wanted else apply(wanted)


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
    return {"model": model, "flags": flags, "machine": platform.machine(), "isa": cpu_isa()}


def cpu_isa() -> list[str]:
    """The vector ISA features this process's CPU reports through CPUID, as NumPy detects
    them at run time (an emulated CPU shows its own; /proc/cpuinfo shows the host's)."""
    return sorted(name for name, present in __cpu_features__.items() if present)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# The CUDA library versions jax's CUDA plugin reports (module `<plugin>._versions`),
# where a function of that name exists; as integers, e.g. 13000 for CUDA 13.0.
CUDA_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jaxlib.cuda")
CUDA_VERSION_FUNCTIONS = (
    "cuda_runtime_get_version",
    "cuda_driver_get_version",
    "cudnn_get_version",
    "cublas_get_version",
    "cufft_get_version",
    "cusolver_get_version",
    "cusparse_get_version",
)


def cuda_versions() -> dict[str, Any]:
    """The CUDA versions the installed jax CUDA plugin was built with and finds ({} with
    no plugin). Each is read in its own guard: a plugin without one of the functions,
    or that fails without a GPU, records an error string for it instead."""
    for name in CUDA_PLUGINS:
        try:
            module = importlib.import_module(f"{name}._versions")
        except ImportError:
            continue
        out: dict[str, Any] = {"plugin": name}
        for fn in CUDA_VERSION_FUNCTIONS:
            if hasattr(module, fn):
                try:
                    out[fn.removesuffix("_get_version")] = int(getattr(module, fn)())
                except Exception as e:  # noqa: BLE001  (recorded, never fatal)
                    out[fn.removesuffix("_get_version")] = f"error: {e}"
        return out
    return {}


def nvidia_driver() -> dict[str, Any] | None:
    """GPU names, memory and the driver version from `nvidia-smi` (or the kernel module's
    version file); None on a machine without an NVIDIA driver."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            rows = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.splitlines()
            gpus = [
                dict(zip(("name", "driver", "memory"), (c.strip() for c in r.split(","))))
                for r in rows
                if r.strip()
            ]
            if gpus:
                return {"driver": gpus[0].get("driver"), "gpus": gpus, "source": "nvidia-smi"}
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            return {"driver": f.readline().strip(), "gpus": [], "source": "/proc"}
    except OSError:
        return None


def gpu_fingerprint(devices: list[Any], flags: str) -> dict[str, Any]:
    """The GPU side of a fingerprint: the XLA GPU flags in force (recorded on every
    backend, since a flag jaxrepro sets must be seen to be set), and, on a GPU backend,
    each device's kind and compute capability, the driver and the CUDA versions."""
    gpu_devices = [d for d in devices if d.platform in ("gpu", "cuda", "rocm")]
    out: dict[str, Any] = {
        "xla_gpu_flags": [f for f in flags.split() if f.startswith("--xla_gpu")],
        "devices": [
            {"kind": d.device_kind, "compute_capability": getattr(d, "compute_capability", None)}
            for d in gpu_devices
        ],
    }
    if gpu_devices:
        out["driver"] = nvidia_driver()
        out["cuda"] = cuda_versions()
    return out


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
        "determinism": _mode,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # jaxrepro's flags this jaxlib's XLA did not know and the process ran without
        "xla_flags_dropped": list(_dropped),
        "gpu": gpu_fingerprint(devices, os.environ.get("XLA_FLAGS", "")),
        "jax_config": {k: getattr(jax.config, k) for k in (*JAX_CONFIG, *RECORDED_CONFIG)},
        "threads": {"cpu_count": os.cpu_count(), "affinity": affinity, **threads},
        # Speed only, never bits (jaxrepro.allocator); recorded to explain timings.
        "memory": {
            "glibc_tunables": os.environ.get(allocator.VARIABLE, ""),
            "transparent_hugepages": allocator.kernel_mode(),
        },
    }

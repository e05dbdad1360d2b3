"""jaxrepro's own CPU kernels: built on first use, called through JAX's FFI.

A core package, below the data pipeline and the models that both call kernels: the
augmentation (`jaxrepro.data.augment`) and the models' ops (`jaxrepro.models.ops`)
hold the JAX side of each kernel, this package its C++ source and the build.

`depthwise.cc` (depthwise convolutions), `first_conv.cc` (a network's first
convolution, over an image's few channels), `pooling.cc` (max pooling's forward and
backward passes) and `resample.cc` (the training augmentation's bilinear resampling)
share `parallel.h`.
They are compiled into one library once per source, compiler and jaxlib (whose FFI
headers they include) into a cache directory (`$JAXREPRO_KERNEL_CACHE`, else
`$XDG_CACHE_HOME/jaxrepro/kernels`, else `~/.cache/jaxrepro/kernels`), loaded with
ctypes and registered as XLA:CPU custom calls. A process that finds the library
built loads it; processes that build it at once each write their own file and move
it into place, so none reads a half-written library.

The flags are part of the bits: `-ffp-contract=off` and no fast-math keep every
multiply and add a separate IEEE float32 operation in the order the source writes,
so the kernels give the same bits with any conforming compiler; `-mavx` is the same
ISA cap as XLA's code in both determinism modes, so the library runs on every CPU
the modes run on. `describe()` goes into `environment.jsonl`.

Building needs a C++17 compiler (`$CXX`, else `c++` or `g++`); without one the
first use is a `KernelBuildError` that says so (exit status 2 from the tools),
never a silent switch to other code with other bits.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

from jaxrepro.errors import UserError

HERE = Path(__file__).parent
SOURCES = (
    HERE / "depthwise.cc",
    HERE / "first_conv.cc",
    HERE / "pooling.cc",
    HERE / "resample.cc",
)
HEADERS = (HERE / "parallel.h",)
FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-mavx",
    "-ffp-contract=off",
    "-fno-fast-math",
)
# FFI target name -> the symbol the library exports for it.
TARGETS = {
    "jaxrepro_shifted_sum": "JaxreproShiftedSum",
    "jaxrepro_tap_gradients": "JaxreproTapGradients",
    "jaxrepro_max_pool": "JaxreproMaxPool",
    "jaxrepro_max_pool_gradient": "JaxreproMaxPoolGradient",
    "jaxrepro_affine_resample": "JaxreproAffineResample",
    "jaxrepro_first_conv": "JaxreproFirstConv",
}


class KernelBuildError(UserError, RuntimeError):
    """jaxrepro's kernels cannot be built here (no compiler, or it failed)."""


def compiler() -> str:
    """The C++ compiler to build with: `$CXX`, else `c++`, else `g++`."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelBuildError(
        "jaxrepro's CPU kernels (jaxrepro/native/*.cc) are built on first use "
        "and need a C++17 compiler; none was found (tried $CXX, c++, g++). Install one "
        "(Debian/Ubuntu: apt-get install g++) or set CXX."
    )


@functools.cache
def compiler_version(path: str) -> str:
    """The first line of `path --version`."""
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""


def cache_dir() -> Path:
    """Where built libraries are kept."""
    if os.environ.get("JAXREPRO_KERNEL_CACHE"):
        return Path(os.environ["JAXREPRO_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxrepro" / "kernels"


def build_key(cxx: str) -> str:
    """A digest of everything the library's code depends on."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (*FLAGS, compiler_version(cxx), jax.__version__, jax.ffi.include_dir()):
        h.update(b"\0" + str(part).encode())
    return h.hexdigest()[:16]


def build(cxx: str, target: Path) -> None:
    """Compile `SOURCES` into `target` (written under another name, then moved)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [cxx, *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", tmp]
    r = subprocess.run(command, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        raise KernelBuildError(
            f"building jaxrepro's CPU kernels failed ({' '.join(command)}):\n{r.stderr[-3000:]}"
        )
    os.replace(tmp, target)


@functools.cache
def library() -> ctypes.CDLL:
    """The built kernel library, its FFI targets registered with XLA:CPU."""
    cxx = compiler()
    path = cache_dir() / f"kernels-{build_key(cxx)}.so"
    if not path.exists():
        build(cxx, path)
    lib = ctypes.CDLL(str(path))
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib


def describe() -> dict[str, str | None]:
    """How the library is (or would be, on first use) built here, for
    `environment.jsonl`: the compiler, the flags and the build key. Never raises:
    without a compiler, `compiler` and `key` are None."""
    try:
        cxx = compiler()
    except KernelBuildError:
        return {"compiler": None, "flags": " ".join(FLAGS), "key": None}
    return {"compiler": compiler_version(cxx), "flags": " ".join(FLAGS), "key": build_key(cxx)}

"""jaxrepro: bitwise-reproducible training and explanations in JAX/Flax.

Importing the package applies the determinism settings (XLA flags, PRNG
implementation, matmul precision) before any JAX backend starts, and has the
compilers' freed memory given back after each compilation (`jaxrepro.allocator`),
except in a TensorFlow reference process (JAXREPRO_SIDE=tensorflow, see `jaxrepro.tfref.runtime`),
which must neither load JAX nor carry its XLA flags.
"""

import os as _os

from jaxrepro import allocator as _allocator
from jaxrepro import determinism as _determinism

if _os.environ.get("JAXREPRO_SIDE") != "tensorflow" and not _determinism._applied:
    _determinism.apply()
    _allocator.release_after_compiles()  # compilers' freed memory back before each run

__version__ = "0.1.0"

"""jaxrepro: bitwise-reproducible training and explanations in JAX/Flax.

Importing the package applies the determinism settings (XLA flags, PRNG
implementation, matmul precision) before any JAX backend starts.
"""

from jaxrepro import determinism as _determinism

if not _determinism._applied:
    _determinism.apply()

__version__ = "0.1.0"

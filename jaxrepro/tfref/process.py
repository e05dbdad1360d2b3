"""How a TensorFlow reference process is started: its environment and the recipe.

Neutral (no TensorFlow, no JAX): the JAX process uses it to start TF children, and
TF-side entry points use it to make sure they run in a clean process.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from jaxrepro import allocator, determinism  # flags only; imports no JAX

# Marks a TF reference process: `jaxrepro/__init__` then neither imports JAX nor sets
# XLA flags, so that neither framework's settings leak into the other.
SIDE_VARIABLE = "JAXREPRO_SIDE"

# The paper's seed (Listing 2).
SEED = 1001


# TF's CPU kernel libraries: "onednn" (TF's default on x86-64: convolutions and matrix
# products by oneDNN) and "eigen" (TF_ENABLE_ONEDNN_OPTS=0: TF's Eigen
# kernels, the library XLA:CPU also calls for convolutions). TF reads the variable
# once, when it loads, so it is part of the child's environment.
KERNELS = {"onednn": "1", "eigen": "0"}
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


@dataclass(frozen=True)
class Recipe:
    """What `start` applies; `deterministic=False` seeds nothing and leaves TF as is.
    `kernels` (a key of `KERNELS`) is the CPU kernel library TF computes with."""

    deterministic: bool = True
    single_thread: bool = False
    seed: int = SEED
    kernels: str = "onednn"

    def __post_init__(self) -> None:
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels {self.kernels!r}: one of {sorted(KERNELS)}")


# The determinism modes every TF entry point offers: no recipe; the paper's Listings 1
# and 2 plus enable_op_determinism(); and that plus Listing 7 (one thread).
MODES = {
    "none": Recipe(deterministic=False),
    "recipe": Recipe(deterministic=True),
    "single": Recipe(deterministic=True, single_thread=True),
}


def mode_recipe(mode: str, kernels: str = "onednn") -> Recipe:
    """`MODES[mode]` computing with `kernels`."""
    return dataclasses.replace(MODES[mode], kernels=kernels)


def child_environment(recipe: Recipe, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a TF child process: Listing 1's variables when deterministic,
    and the recipe's kernel library."""
    env = tf_side_environment(os.environ if base is None else base)
    env["KERAS_BACKEND"] = "tensorflow"
    env[ONEDNN_VARIABLE] = KERNELS[recipe.kernels]
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("PYTHONHASHSEED", "TF_DETERMINISTIC_OPS", "TF_CUDNN_DETERMINISTIC"):
        env.pop(name, None)
    if recipe.deterministic:
        env.update(PYTHONHASHSEED="1", TF_DETERMINISTIC_OPS="1", TF_CUDNN_DETERMINISTIC="1")
    return env


def tf_side_environment(base: dict[str, str] | os._Environ) -> dict[str, str]:
    """`base` marked as a TF process, without the XLA flags and the glibc huge-page
    tunable jaxrepro adds for JAX (`jaxrepro.allocator`): TF runs as its users run it."""
    env = allocator.without_own_setting(base)
    env[SIDE_VARIABLE] = "tensorflow"
    flags = determinism.without_own_flags(env.get("XLA_FLAGS", ""))
    if flags:
        env["XLA_FLAGS"] = flags
    else:
        env.pop("XLA_FLAGS", None)
    return env


def ensure_tf_process(module: str, argv: Sequence[str], recipe: Recipe | None = None) -> None:
    """Re-execute `python -m module argv` as a clean TF process if this one is not.

    Started from a shell, `python -m jaxrepro.tfref ...` imports `jaxrepro` first, and
    that sets up JAX and its XLA_FLAGS; a TF-side entry point calls this first thing,
    so its work always runs in a process that has neither, with `recipe`'s environment
    (Listing 1's variables must be set before Python starts) when one is given.
    """
    kernels_set = recipe is None or os.environ.get(ONEDNN_VARIABLE) == KERNELS[recipe.kernels]
    if os.environ.get(SIDE_VARIABLE) == "tensorflow" and kernels_set:
        # Importing the jax module starts nothing (jaxrepro.data and TF's tf.lite do);
        # a started backend would mean JAX work in the TF process.
        if determinism.backend_started():
            raise RuntimeError("a JAX backend runs in a TensorFlow reference process")
        return
    env = (
        child_environment(recipe, dict(os.environ))
        if recipe is not None
        else tf_side_environment(os.environ)
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)

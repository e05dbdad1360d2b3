"""Start TensorFlow in this process, with or without the paper's determinism recipe.

TF side only. The recipe (the paper's Listings 1, 2 and 7): PYTHONHASHSEED
(must be set before Python starts, so the caller sets it in the child's environment
and `start` only checks it), TF_DETERMINISTIC_OPS / `enable_op_determinism()`, the
Python, NumPy and TensorFlow seeds, and optionally one thread for inter- and intra-op
parallelism. Keras runs on the TensorFlow backend, whatever KERAS_BACKEND says outside.
"""

from __future__ import annotations

import os
import random
from typing import Any

from jaxrepro import determinism
from jaxrepro.tfref.process import (  # noqa: F401  (re-exported for TF-side callers)
    KERNELS,
    MODES,
    ONEDNN_VARIABLE,
    SEED,
    SIDE_VARIABLE,
    Recipe,
    child_environment,
    ensure_tf_process,
    mode_recipe,
    tf_side_environment,
)


def start(recipe: Recipe) -> Any:
    """Import TensorFlow, apply `recipe`, and return the `tf` module."""
    if os.environ.get(ONEDNN_VARIABLE) != KERNELS[recipe.kernels]:
        raise RuntimeError(
            f"TF kernels {recipe.kernels!r} need {ONEDNN_VARIABLE}="
            f"{KERNELS[recipe.kernels]} set before TensorFlow loads (use child_environment)"
        )
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf  # noqa: PLC0415  (TF side: only ever imported here)

    if recipe.single_thread:  # Listing 7; must precede any op
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    if recipe.deterministic:
        if os.environ.get("PYTHONHASHSEED") != "1":
            raise RuntimeError(
                "the determinism recipe needs PYTHONHASHSEED=1 set before "
                "Python starts (use child_environment)"
            )
        tf.config.experimental.enable_op_determinism()
        reseed(tf, recipe)
    return tf


def reseed(tf: Any, recipe: Recipe) -> None:
    """Listing 2's seeds (Python, NumPy, TF), set again.

    TF derives each random op's seed from the global seed and a counter of the random
    ops made since it was set; work done before training (e.g. a TFDS builder that
    generates the data set the first time and only reads it later) moves that counter.
    Seeding again right before the model is built makes the run independent of it.
    """
    if not recipe.deterministic:
        return
    import numpy as np  # noqa: PLC0415

    tf.random.set_seed(recipe.seed)
    np.random.seed(recipe.seed)
    random.seed(recipe.seed)


def describe(tf: Any, recipe: Recipe) -> dict[str, Any]:
    """Versions and settings of the running TF (after `start(recipe)`), for the record."""
    import keras  # noqa: PLC0415

    return {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "recipe": {
            "deterministic": recipe.deterministic,
            "single_thread": recipe.single_thread,
            "seed": recipe.seed,
            "kernels": recipe.kernels,
        },
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "onednn": os.environ.get(ONEDNN_VARIABLE, "default (on)"),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED"),
        # TF's own tf.lite imports the jax module when it is installed, but no JAX
        # backend may start here, and jaxrepro's XLA flags must be absent.
        "jax_backend_started": determinism.backend_started(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }

"""The paper's Keras training, on the data set a JAX run of the same config reads. TF side.

    python -m jaxrepro.tfref train CONFIG_FILE --out DIR [--mode recipe|none|single]
                                   [--tf-kernels onednn|eigen] [--init-from WEIGHTS.npz]
                                   [--config.KEY=VALUE ...]

What the paper ran, as it ran it: the Keras model of Listing 3 or 6 with its own
augmentation layers (RandomFlip, RandomRotation(0.1), RandomZoom(0.2), seeded as in the
listings), `model.fit(..., shuffle=True)` with the config's batch size and epochs, binary
cross-entropy on the sigmoid, RMSprop with the config's settings, eager TF kernels
(`jit_compile=False`). The data are the config's train and validation splits, loaded by
`jaxrepro.data` exactly as `python -m jaxrepro.train` loads them (the data fingerprint
in result.json equals the JAX run's `data.json`), as float32 pixel values in 0..255.
Keras shuffles, augments and draws dropout with its own generators, and runs the
epoch's last partial batch, so this is a reference for what TF does, not a bitwise twin
of the JAX run (`python -m jaxrepro.analysis.compare` is the matched one).

Modes (`jaxrepro.tfref.determinism`): `recipe` (default; the paper's Listings 1 and 2 plus
`enable_op_determinism()`), `none`, `single` (the recipe plus Listing 7: one thread).
`--tf-kernels eigen` runs TF with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0), on its Eigen
kernels; the default, `onednn`, is TF's own default on x86-64. `--init-from` starts
from given Flax-named weights (e.g. a JAX run's step 0, written by
`python -m jaxrepro.analysis.export`) instead of Keras's seeded initialisers.

Writes DIR/final.npz (Flax names and layouts, readable by the JAX side), DIR/history.json
(per epoch: loss, accuracy, val_loss, val_accuracy) and DIR/result.json (SHA-256 of every
final weight, data fingerprints, throughput, TF runtime and recipe).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro.tfref import transfer, weights


def compile_as_paper(model: Any, config: Any) -> None:
    """The listings' compile: BCE on the sigmoid, the config's RMSprop, TF kernels (no XLA)."""
    import keras  # noqa: PLC0415

    opt = config.optimizer
    if opt.name != "rmsprop":
        raise configlib.ConfigError(
            f"optimizer {opt.name!r}: the Keras reference runs RMSprop only"
        )
    model.compile(
        loss="binary_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,
        optimizer=keras.optimizers.RMSprop(
            learning_rate=opt.learning_rate, rho=opt.rho, epsilon=opt.epsilon
        ),
    )


def train(
    config_file: str,
    overrides: Sequence[str],
    out: Path,
    mode: str,
    init_from: str | None = None,
    verbose: int = 2,
    kernels: str = "onednn",
) -> dict[str, Any]:
    """Train the config's Keras model in this (TF) process on `kernels`; write DIR's files."""
    from jaxrepro.tfref import models, runtime  # noqa: PLC0415  (TF side)

    config = configlib.resolve(config_file, overrides)
    recipe = runtime.mode_recipe(mode, kernels)
    tf = runtime.start(recipe)
    splits = datalib.load_config_splits(config.data)
    train, val = splits["train"], splits["validation"]
    runtime.reseed(tf, recipe)  # the first load generates the data set: forget its draws
    model = models.build(config.model, config.data.image_size, augment=True)
    model.get_layer("dropout").rate = float(config.dropout_rate)
    if init_from:
        transfer.load_into_keras(model, weights.load(init_from))
    compile_as_paper(model, config)
    x = train.images.astype(np.float32)
    y = train.labels.astype(np.float32)
    start = time.perf_counter()
    history = model.fit(
        x,
        y,
        batch_size=config.batch_size,
        epochs=config.num_epochs,
        shuffle=True,
        verbose=verbose,
        validation_data=(val.images.astype(np.float32), val.labels.astype(np.float32)),
    )
    seconds = time.perf_counter() - start
    final = transfer.from_keras(model)
    out.mkdir(parents=True, exist_ok=True)
    weights.save(out / "final.npz", final)
    epochs = [
        {k: float(v[e]) for k, v in history.history.items()}
        for e in range(len(history.history["loss"]))
    ]
    (out / "history.json").write_text(json.dumps(epochs, indent=1) + "\n")
    result = {
        "model": config.model,
        "mode": mode,
        "tf_kernels": kernels,
        "config_file": config_file,
        "overrides": list(overrides),
        "init_from": init_from,
        "num_train": len(train.labels),
        "num_val": len(val.labels),
        "data_fingerprint": {
            "train": datalib.data_fingerprint(train),
            "validation": datalib.data_fingerprint(val),
        },
        "epochs": epochs,
        "seconds": seconds,
        "images_per_s": config.num_epochs * len(train.labels) / seconds,
        "sha256": weights.sha256(final),
        "runtime": runtime.describe(tf, recipe),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result

"""The Keras/TF half of `python -m jaxrepro.bench`: one model, one recipe. TF side.

    python -m jaxrepro.tfref.bench MODEL --mode recipe|none|single --json OUT
                                   [--image-size 180] [--batch-size 32] [--steps 6]
                                   [--repeats 3]

What seeds/000 timed: the Keras model of Listing 3 or 6 with its augmentation layers,
`model.fit(shuffle=True)` with RMSprop and binary cross-entropy, TF's own (oneDNN)
kernels (`jit_compile=False`), on the same images `jaxrepro.bench` gives the JAX side
(`jaxrepro.data`, the experiment's config). Compile time: the first `fit` (one batch,
which traces the train function) minus one steady step. Then `--repeats` timed `fit`
calls of `--steps` batches, `predict` over the same images, and Grad-CAM as in the
keras.io example (`matched.keras_gradcam`). Started from a shell it re-executes itself
as a clean TF process with the recipe's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxrepro import bench as benchlib
from jaxrepro.tfref import process


def measure(model_name: str, mode: str, image_size: int, batch_size: int, steps: int,
            repeats: int) -> dict:
    """Measure Keras training, inference and Grad-CAM in this (TF) process."""
    from jaxrepro import config as configlib  # noqa: PLC0415
    from jaxrepro import data as datalib  # noqa: PLC0415
    from jaxrepro.tfref import matched, models, runtime  # noqa: PLC0415
    from jaxrepro.tfref import train as trainlib  # noqa: PLC0415

    recipe = process.MODES[mode]
    tf = runtime.start(recipe)

    config = configlib.resolve(benchlib.experiment_file(model_name),
                               benchlib.data_overrides(image_size, batch_size, steps))
    splits = datalib.load_config_splits(config.data)
    runtime.reseed(tf, recipe)
    n = steps * batch_size
    x = splits["train"].images[:n].astype(np.float32)
    y = splits["train"].labels[:n].astype(np.float32)
    model = models.build(model_name, image_size, augment=True)
    trainlib.compile_as_paper(model, config)

    def fit(count: int):
        return lambda: model.fit(x[:count], y[:count], batch_size=batch_size, epochs=1,
                                 shuffle=True, verbose=0)

    first = benchlib.timed(fit(batch_size), 1)[0]  # traces the train function
    train_s = benchlib.timed(fit(n), repeats)
    compile_s = max(first - min(train_s) / steps, 0.0)

    def infer():
        model.predict(x, batch_size=batch_size, verbose=0)

    gradcam = matched.keras_gradcam(model, model_name)
    explain_x = x[:batch_size]
    infer()
    gradcam(explain_x)
    return {
        "compile_s": compile_s,
        "train_images_per_s": [n / s for s in train_s],
        "infer_images_per_s": [n / s for s in benchlib.timed(infer, repeats)],
        "gradcam_per_s": [batch_size / s
                          for s in benchlib.timed(lambda: gradcam(explain_x), repeats)],
        "lrp_per_s": None,
        "repeats_bitwise": None,  # Keras continues training across repeats; see tfref.determinism
        "peak_memory_mib": benchlib.peak_memory_mib(),
        "runtime": {**runtime.describe(tf, recipe), "cpus": len(os.sched_getaffinity(0))},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (normally started by `python -m jaxrepro.bench`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m jaxrepro.tfref.bench",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=benchlib.MODELS)
    parser.add_argument("--mode", choices=list(process.MODES), default="recipe")
    parser.add_argument("--json", required=True, help="where to write the result")
    parser.add_argument("--image-size", type=int, default=180)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    process.ensure_tf_process("jaxrepro.tfref.bench", argv, process.MODES[args.mode])
    result = measure(args.model, args.mode, args.image_size, args.batch_size, args.steps,
                     args.repeats)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

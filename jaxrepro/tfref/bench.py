"""The Keras/TF half of `python -m jaxrepro.analysis.bench`: one config, one recipe. TF side.

    python -m jaxrepro.tfref.bench CONFIG_FILE --mode recipe|none|single --json OUT
                                   [--steps 6] [--repeats 3] [--config.KEY=VALUE ...]

What the paper timed: the Keras model of Listing 3 or 6 with its augmentation layers,
`model.fit(shuffle=True)` with RMSprop and binary cross-entropy, TF's own (oneDNN)
kernels (`jit_compile=False`), on the images the config names (`jaxrepro.data`, as
the JAX side reads them). Compile time: the first `fit` (one batch,
which traces the train function) minus one steady step. Then `--repeats` timed `fit`
calls of `--steps` batches, `predict` over the same images, and Grad-CAM as in the
keras.io example (`matched.keras_gradcam`). Started from a shell it re-executes itself
as a clean TF process with the recipe's environment.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrepro import cli
from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro.tfref import process
from jaxrepro.timing import peak_memory_mib, timed, usable_cpus


def measure(
    config_file: str,
    overrides: Sequence[str],
    mode: str,
    steps: int,
    repeats: int,
    gradcam_layer: str,
) -> dict:
    """Measure Keras training, inference and Grad-CAM in this (TF) process."""
    # TF side: TensorFlow only after `runtime.start` applied the recipe
    from jaxrepro.tfref import matched, models, runtime  # noqa: PLC0415
    from jaxrepro.tfref import train as trainlib  # noqa: PLC0415

    recipe = process.MODES[mode]
    tf = runtime.start(recipe)

    config = configlib.resolve(config_file, overrides)
    splits = datalib.load_config_splits(config.data)
    runtime.reseed(tf, recipe)
    batch_size = config.batch_size
    n = steps * batch_size
    x = splits["train"].images[:n].astype(np.float32)
    y = splits["train"].labels[:n].astype(np.float32)
    model = models.build(config.model, config.data.image_size, augment=True)
    trainlib.compile_as_paper(model, config)

    def fit(count: int):
        return lambda: model.fit(
            x[:count], y[:count], batch_size=batch_size, epochs=1, shuffle=True, verbose=0
        )

    first = timed(fit(batch_size), 1)[0]  # traces the train function
    train_s = timed(fit(n), repeats)
    compile_s = max(first - min(train_s) / steps, 0.0)
    train_peak_memory = peak_memory_mib()  # training alone, as the JAX row measures it

    def infer():
        model.predict(x, batch_size=batch_size, verbose=0)

    gradcam = matched.keras_gradcam(model, gradcam_layer)
    explain_x = x[:batch_size]
    infer()
    gradcam(explain_x)
    return {
        "compile_s": compile_s,
        "train_images_per_s": [n / s for s in train_s],
        "infer_images_per_s": [n / s for s in timed(infer, repeats)],
        "gradcam_per_s": [batch_size / s for s in timed(lambda: gradcam(explain_x), repeats)],
        "lrp_per_s": None,
        "repeats_bitwise": None,  # Keras continues training across repeats; see tfref.determinism
        "train_peak_memory_mib": train_peak_memory,
        "peak_memory_mib": peak_memory_mib(),
        "runtime": {**runtime.describe(tf, recipe), "cpus": usable_cpus()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point (normally started by `python -m jaxrepro.analysis.bench`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = cli.split_overrides(argv)
    parser = cli.parser(
        prog="python -m jaxrepro.tfref.bench",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("config_file")
    parser.add_argument("--mode", choices=list(process.MODES), default="recipe")
    parser.add_argument("--json", required=True, help="where to write the result")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--gradcam-layer",
        required=True,
        help="the Keras layer whose output is Grad-CAM's A (the model spec's)",
    )
    args = parser.parse_args(rest)
    process.ensure_tf_process("jaxrepro.tfref.bench", argv, process.MODES[args.mode])
    result = measure(
        args.config_file, overrides, args.mode, args.steps, args.repeats, args.gradcam_layer
    )
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

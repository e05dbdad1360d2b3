"""One short Keras training in this TF process: the child of `jaxrepro.tfref.determinism`.

    python -m jaxrepro.tfref.rerun MODEL MODE --out RESULT.json [--epochs 2] [--images 256]
                                   [--image-size 80]

Trains MODEL (the listings' compile: binary cross-entropy, RMSprop defaults, TF's own
kernels) on seeded random images under MODE's recipe and writes the SHA-256 of every
final weight, the losses and the speed. Started from a shell it re-executes itself as
a clean TF process with the recipe's environment.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrepro import cli
from jaxrepro.tfref import runtime, transfer, weights

DATA_SEED = 20240101  # the data are fixed; only the training may vary


def random_images(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` random uint8-valued float32 images and balanced labels, always the same."""
    rng = np.random.default_rng(DATA_SEED)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    return images, (np.arange(n) % 2).astype(np.float32)


def train_once(
    model_name: str, mode: str, epochs: int, num_images: int, image_size: int, batch_size: int = 32
) -> dict:
    """Train in this process (a TF child) and return weight hashes and speed."""
    recipe = runtime.MODES[mode]
    tf = runtime.start(recipe)
    from jaxrepro.tfref import models  # noqa: PLC0415  (imports keras)

    model = models.build(model_name, image_size)
    model.compile(
        loss="binary_crossentropy", optimizer="rmsprop", metrics=["accuracy"], jit_compile=False
    )
    x, y = random_images(num_images, image_size)
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    seconds = time.perf_counter() - start
    hashes = weights.sha256(transfer.from_keras(model))
    return {
        "model": model_name,
        "mode": mode,
        "image_size": image_size,
        "images_per_s": epochs * (num_images // batch_size) * batch_size / seconds,
        "loss": [float(v) for v in history.history["loss"]],
        "sha256": hashes,
        "runtime": runtime.describe(tf, recipe),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.parser(prog="python -m jaxrepro.tfref.rerun", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("convnet", "minixception"))
    parser.add_argument("mode", choices=list(runtime.MODES))
    parser.add_argument("--out", required=True, help="where to write the result (JSON)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=80)
    args = parser.parse_args(argv)
    runtime.ensure_tf_process("jaxrepro.tfref.rerun", argv, runtime.MODES[args.mode])
    result = train_once(args.model, args.mode, args.epochs, args.images, args.image_size)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

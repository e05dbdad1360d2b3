"""TF's own determinism on this machine: rerun a short Keras training, compare the bits.

    python -m jaxrepro.tfref.determinism [--models convnet minixception] [--epochs 2]
                                         [--images 256] [--out REPORT.json]

For each model and each mode, two trainings in two fresh processes (2 epochs of 256
seeded random images, batch 32, the listings' compile: binary cross-entropy, RMSprop
defaults), then SHA-256 of every final weight. Modes:

- `none`: no recipe (only the seeds written into the listings themselves);
- `recipe`: seeds/000 Listings 1 and 2 (PYTHONHASHSEED=1, TF_DETERMINISTIC_OPS,
  Python/NumPy/TF seeds) plus `tf.config.experimental.enable_op_determinism()`;
- `single`: the recipe plus Listing 7 (one inter-op and one intra-op thread).

Keras is compiled with `jit_compile=False`: TF's own (oneDNN) kernels, as in the
paper's TF 2 runs, not XLA. The parent process never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxrepro.tfref import runtime, transfer, weights

MODES = runtime.MODES
# Smallest sizes the models take (the ConvNet's VALID convolutions need 80 px).
IMAGE_SIZES = {"convnet": 80, "minixception": 32}
DATA_SEED = 20240101  # the data are fixed; only the training may vary


def random_images(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` random uint8-valued float32 images and balanced labels, always the same."""
    rng = np.random.default_rng(DATA_SEED)
    images = rng.integers(0, 256, (n, size, size, 3)).astype(np.float32)
    return images, (np.arange(n) % 2).astype(np.float32)


def train_once(model_name: str, mode: str, epochs: int, num_images: int,
               image_size: int, batch_size: int = 32) -> dict:
    """Train in this process (a TF child) and return weight hashes and speed."""
    recipe = MODES[mode]
    tf = runtime.start(recipe)
    from jaxrepro.tfref import models  # noqa: PLC0415  (imports keras)

    model = models.build(model_name, image_size)
    model.compile(loss="binary_crossentropy", optimizer="rmsprop", metrics=["accuracy"],
                  jit_compile=False)
    x, y = random_images(num_images, image_size)
    start = time.perf_counter()
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0)
    seconds = time.perf_counter() - start
    hashes = weights.sha256(transfer.from_keras(model))
    return {"model": model_name, "mode": mode, "image_size": image_size,
            "images_per_s": epochs * (num_images // batch_size) * batch_size / seconds,
            "loss": [float(v) for v in history.history["loss"]],
            "sha256": hashes, "runtime": runtime.describe(tf, recipe)}


def run_child(model_name: str, mode: str, epochs: int, num_images: int, image_size: int,
              out: Path) -> dict:
    """`train_once` in a fresh process with the recipe's environment."""
    cmd = [sys.executable, "-m", "jaxrepro.tfref.determinism", "--child", model_name, mode,
           "--epochs", str(epochs), "--images", str(num_images),
           "--image-size", str(image_size), "--out", str(out)]
    subprocess.run(cmd, env=runtime.child_environment(MODES[mode]), check=True,
                   capture_output=True, text=True)
    return json.loads(out.read_text())


def compare(a: dict, b: dict) -> dict:
    """Bitwise equality of two runs' final weights."""
    differ = sorted(k for k in a["sha256"] if a["sha256"][k] != b["sha256"].get(k))
    return {"same_bits": not differ, "weights": len(a["sha256"]), "differing": len(differ),
            "first_differing": differ[:3],
            "images_per_s": [round(a["images_per_s"], 1), round(b["images_per_s"], 1)],
            "loss_equal": a["loss"] == b["loss"]}


def measure(model_names: Sequence[str], modes: Sequence[str], epochs: int, num_images: int,
            image_size: int | None, workdir: Path) -> list[dict]:
    """Two runs per (model, mode); one comparison each."""
    rows = []
    for name in model_names:
        size = image_size or IMAGE_SIZES[name]
        for mode in modes:
            runs = [run_child(name, mode, epochs, num_images, size,
                              workdir / f"{name}_{mode}_{i}.json") for i in (1, 2)]
            row = {"model": name, "mode": mode, "image_size": size, **compare(*runs)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxrepro.tfref.determinism",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(IMAGE_SIZES),
                        choices=sorted(IMAGE_SIZES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=None,
                        help="default: 80 (ConvNet), 32 (mini Xception)")
    parser.add_argument("--out", help="write the comparison as JSON here")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        name, mode = args.child
        result = train_once(name, mode, args.epochs, args.images,
                            args.image_size or IMAGE_SIZES[name])
        Path(args.out).write_text(json.dumps(result, indent=1))
        return 0
    with tempfile.TemporaryDirectory(prefix="tfref_determinism_") as tmp:
        rows = measure(args.models, args.modes, args.epochs, args.images, args.image_size,
                       Path(tmp))
    text = json.dumps(rows, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    runtime.ensure_tf_process("jaxrepro.tfref.determinism", sys.argv[1:])
    sys.exit(main())

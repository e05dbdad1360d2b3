"""TF's own determinism on this machine: rerun a short Keras training, compare the bits.

    python -m jaxrepro.tfref.determinism [--models convnet minixception] [--epochs 2]
                                         [--images 256] [--out REPORT.json]

For each model and each mode, two trainings in two fresh processes (2 epochs of 256
seeded random images, batch 32, the listings' compile: binary cross-entropy, RMSprop
defaults), then SHA-256 of every final weight. Modes:

- `none`: no recipe (only the seeds written into the listings themselves);
- `recipe`: the paper's Listings 1 and 2 (PYTHONHASHSEED=1, TF_DETERMINISTIC_OPS,
  Python/NumPy/TF seeds) plus `tf.config.experimental.enable_op_determinism()`;
- `single`: the recipe plus Listing 7 (one inter-op and one intra-op thread).

Keras is compiled with `jit_compile=False`: TF's own (oneDNN) kernels, as in the
paper's TF 2 runs, not XLA. Every training runs in a process of its own
(`jaxrepro.tfref.rerun`); this one never imports TensorFlow.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from jaxrepro import cli
from jaxrepro.tfref import runtime

MODES = runtime.MODES
MODELS = ("convnet", "minixception")
# One size both models take (the ConvNet's five VALID convolutions need 80 px).
IMAGE_SIZE = 80


def run_child(
    model_name: str, mode: str, epochs: int, num_images: int, image_size: int, out: Path
) -> dict:
    """`python -m jaxrepro.tfref.rerun` (one training) in a fresh process with the
    recipe's environment; its result."""
    cli.run_child(
        "jaxrepro.tfref.rerun",
        [
            model_name,
            mode,
            "--epochs",
            str(epochs),
            "--images",
            str(num_images),
            "--image-size",
            str(image_size),
            "--out",
            str(out),
        ],
        env=runtime.child_environment(MODES[mode]),
        what=f"the Keras training of {model_name} ({mode})",
    )
    return json.loads(out.read_text())


def compare(a: dict, b: dict) -> dict:
    """Bitwise equality of two runs' final weights."""
    differ = sorted(k for k in a["sha256"] if a["sha256"][k] != b["sha256"].get(k))
    return {
        "same_bits": not differ,
        "weights": len(a["sha256"]),
        "differing": len(differ),
        "first_differing": differ[:3],
        "images_per_s": [round(a["images_per_s"], 1), round(b["images_per_s"], 1)],
        "loss_equal": a["loss"] == b["loss"],
    }


def measure(
    model_names: Sequence[str],
    modes: Sequence[str],
    epochs: int,
    num_images: int,
    image_size: int,
    workdir: Path,
) -> list[dict]:
    """Two runs per (model, mode); one comparison each."""
    rows = []
    for name in model_names:
        for mode in modes:
            runs = [
                run_child(
                    name, mode, epochs, num_images, image_size, workdir / f"{name}_{mode}_{i}.json"
                )
                for i in (1, 2)
            ]
            row = {"model": name, "mode": mode, "image_size": image_size, **compare(*runs)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.parser(
        prog="python -m jaxrepro.tfref.determinism",
        description=__doc__,
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument(
        "--image-size",
        type=int,
        default=IMAGE_SIZE,
        help="default: %(default)s (the mini Xception also takes 32)",
    )
    parser.add_argument("--out", help="write the comparison as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tfref_determinism_") as tmp:
        rows = measure(
            args.models, args.modes, args.epochs, args.images, args.image_size, Path(tmp)
        )
    text = json.dumps(rows, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

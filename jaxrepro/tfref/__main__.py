"""The TF-side CLI: `python -m jaxrepro.tfref {summary,mirror,matched} ...` (a TF process).

    summary [--image-size 180]
        parameter counts of both Keras models, as JSON
    mirror MODEL WEIGHTS.npz OUT.npz [--image-size S] [--images IMAGES.npy --logits LOGITS.npy]
        load Flax-named weights into the Keras model, write back what Keras then holds
        (OUT.npz, same names), and optionally the Keras logits of IMAGES (inference mode:
        dropout off, batch norm on its moving statistics)
    matched MODEL WEIGHTS.npz INPUTS.npz OUTDIR
        the Keras half of `python -m jaxrepro.compare` (see `jaxrepro.tfref.matched`):
        activations, gradients, N training steps and Grad-CAM on given batches

The JAX side writes WEIGHTS.npz with `python -m jaxrepro.tfref.export` and compares.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import numpy as np

from jaxrepro.tfref import runtime, transfer, weights


def summary(image_size: int) -> dict:
    """Parameter counts of both Keras models at `image_size`."""
    from jaxrepro.tfref import models  # noqa: PLC0415  (imports keras)

    return {name: models.count_params(models.build(name, image_size)) for name in models.MODELS}


def mirror(model_name: str, weights_in: str, weights_out: str, image_size: int,
           images: str | None = None, logits: str | None = None) -> dict:
    """Flax weights -> Keras model -> Flax weights (and Keras logits of `images`)."""
    from jaxrepro.tfref import models  # noqa: PLC0415

    model = models.build(model_name, image_size)
    transfer.load_into_keras(model, weights.load(weights_in))
    weights.save(weights_out, transfer.from_keras(model))
    out = {"model": model_name, "image_size": image_size, "params": models.count_params(model)}
    if images is not None:
        x = np.load(images, allow_pickle=False).astype(np.float32)
        z = models.logit_model(model)(x, training=False)
        np.save(logits, np.asarray(z.numpy(), np.float32)[:, 0], allow_pickle=False)
        out["images"] = int(x.shape[0])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxrepro.tfref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("summary", help="parameter counts of both Keras models")
    p.add_argument("--image-size", type=int, default=180)
    p = sub.add_parser("mirror", help="Flax weights through Keras and back, plus logits")
    p.add_argument("model", choices=("convnet", "minixception"))
    p.add_argument("weights_in")
    p.add_argument("weights_out")
    p.add_argument("--image-size", type=int, default=180)
    p.add_argument("--images", help="float32 or uint8 images [N, S, S, 3] (.npy)")
    p.add_argument("--logits", help="where to write the Keras logits [N] (.npy)")
    p = sub.add_parser("matched", help="Keras side of python -m jaxrepro.compare")
    p.add_argument("model", choices=("convnet", "minixception"))
    p.add_argument("weights_in")
    p.add_argument("inputs", help="batches and probe images (.npz, see tfref.matched)")
    p.add_argument("outdir")
    args = parser.parse_args(argv)
    if args.command == "mirror" and (args.images is None) != (args.logits is None):
        parser.error("--images and --logits go together")

    # matched trains: the paper's recipe (the caller sets PYTHONHASHSEED=1, see
    # runtime.child_environment); summary and mirror draw nothing random.
    recipe = runtime.Recipe(deterministic=args.command == "matched")
    tf = runtime.start(recipe)
    if args.command == "matched":
        from jaxrepro.tfref import matched  # noqa: PLC0415

        result = matched.run(args.model, args.weights_in, args.inputs, args.outdir)
    elif args.command == "summary":
        result = summary(args.image_size)
    else:
        result = mirror(args.model, args.weights_in, args.weights_out, args.image_size,
                        args.images, args.logits)
    result["runtime"] = runtime.describe(tf, recipe)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    runtime.ensure_tf_process("jaxrepro.tfref", sys.argv[1:])
    sys.exit(main())

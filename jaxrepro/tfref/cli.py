"""The TF-side CLI: `python -m jaxrepro.tfref {summary,mirror,matched,train} ...` (a TF process).

    summary [--image-size 180]
        parameter counts of both Keras models, as JSON
    mirror MODEL WEIGHTS.npz OUT.npz [--image-size S] [--images IMAGES.npy --logits LOGITS.npy]
        load Flax-named weights into the Keras model, write back what Keras then holds
        (OUT.npz, same names), and optionally the Keras logits of IMAGES (inference mode:
        dropout off, batch norm on its moving statistics)
    matched MODEL WEIGHTS.npz INPUTS.npz LAYERS.json OUTDIR [--tf-kernels onednn|eigen]
        the Keras half of the matched protocol (`python -m jaxrepro.analysis.compare`,
        see `jaxrepro.tfref.matched`): activations, gradients, N training steps and
        Grad-CAM on given batches
    kernels INPUTS.npz OUT.npz [--tf-kernels onednn|eigen]
        the Keras side of `python -m jaxrepro.analysis.kernels` (see
        `jaxrepro.tfref.kernels`): each layer type of both models on given inputs,
        output and gradients
    pretrained APPLICATION ORDER.json SOURCE OUT.npz --image-size S
        a Keras weight file (.h5, .weights.h5, .keras) of a keras.applications network,
        as Flax-named arrays (`python -m jaxrepro.pretrained import`, see
        `jaxrepro.tfref.applications`)
    pretrained-reference APPLICATION IMAGES.npy GRADCAM_LAYER OUTDIR --image-size S
        random weights as a legacy .h5 file, their Keras logits and keras.io Grad-CAM
        of IMAGES (the tests' reference)
    train CONFIG_FILE --out DIR [--mode recipe|none|single] [--tf-kernels onednn|eigen]
          [--init-from W.npz] [--config.K=V]
        the paper's Keras training (model.fit, Keras augmentation) on the config's data
        set, as `python -m jaxrepro.train` loads it (see `jaxrepro.tfref.train`)

`--tf-kernels eigen` computes with TF's Eigen kernels (TF_ENABLE_ONEDNN_OPTS=0),
`onednn` (default) with oneDNN, TF's default on x86-64.

Started from a shell, the command re-executes itself as a clean TF process (no JAX
backend, none of jaxrepro's XLA flags; the recipe's environment when it needs one).

The JAX side writes WEIGHTS.npz with `python -m jaxrepro.analysis.export` and compares.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxrepro import cli
from jaxrepro.errors import UserError
from jaxrepro.tfref import applications, runtime, transfer, weights
from jaxrepro.tfref import train as trainlib


def summary(image_size: int) -> dict:
    """Parameter counts of both Keras models at `image_size`."""
    from jaxrepro.tfref import models  # noqa: PLC0415  (imports keras)

    return {name: models.count_params(models.build(name, image_size)) for name in models.MODELS}


def mirror(
    model_name: str,
    weights_in: str,
    weights_out: str,
    image_size: int,
    images: str | None = None,
    logits: str | None = None,
) -> dict:
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
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = cli.split_overrides(argv)
    parser = cli.parser(
        prog="python -m jaxrepro.tfref",
        description=__doc__,
    )
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
    p = sub.add_parser("matched", help="Keras side of python -m jaxrepro.analysis.compare")
    p.add_argument("model", choices=("convnet", "minixception"))
    p.add_argument("weights_in")
    p.add_argument("inputs", help="batches and probe images (.npz, see tfref.matched)")
    p.add_argument("layers", help="Keras layer names from the model's spec (.json)")
    p.add_argument("outdir")
    _kernels_argument(p)
    p = sub.add_parser("kernels", help="Keras side of python -m jaxrepro.analysis.kernels")
    p.add_argument("inputs", help="each op's arguments (.npz, see tfref.kernels)")
    p.add_argument("out", help="where to write each op's outputs (.npz)")
    _kernels_argument(p)
    p = sub.add_parser("pretrained", help="a Keras weight file as Flax-named arrays")
    p.add_argument("application", help="keras.applications constructor, e.g. Xception")
    p.add_argument("order", help="Flax module paths of the weighted Keras layers (.json)")
    p.add_argument("source", help="the Keras weight file")
    p.add_argument("out", help="where to write the arrays (.npz)")
    p.add_argument("--image-size", type=int, required=True)
    p = sub.add_parser("pretrained-reference", help="random-weight reference of a network")
    p.add_argument("application")
    p.add_argument("images", help="float32 pixels 0..255 [N, S, S, 3] (.npy)")
    p.add_argument("gradcam_layer")
    p.add_argument("outdir")
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser(
        "train",
        help="the paper's Keras training on the config's data set",
        description=train_doc(),
    )
    p.add_argument("config_file", help="experiment config (Python; it is executed)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--mode",
        default="recipe",
        choices=("recipe", "none", "single"),
        help="determinism recipe (default: %(default)s)",
    )
    _kernels_argument(p)
    p.add_argument("--init-from", help="start from these Flax-named weights (.npz)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines from Keras")
    args = parser.parse_args(rest)
    if args.command == "mirror" and (args.images is None) != (args.logits is None):
        parser.error("--images and --logits go together")
    if overrides and args.command != "train":
        parser.error("--config.KEY=VALUE goes with the train command only")

    # matched trains and kernels measures it op by op: the paper's recipe; summary and
    # mirror draw nothing random.
    if args.command == "train":
        recipe = runtime.mode_recipe(args.mode, args.tf_kernels)
    elif args.command in ("matched", "kernels"):
        recipe = runtime.Recipe(deterministic=True, kernels=args.tf_kernels)
    else:
        recipe = runtime.Recipe(deterministic=False)
    runtime.ensure_tf_process("jaxrepro.tfref", argv, recipe)
    if args.command == "train":
        try:
            result = trainlib.train(
                args.config_file,
                overrides,
                Path(args.out),
                args.mode,
                args.init_from,
                verbose=0 if args.quiet else 2,
                kernels=args.tf_kernels,
            )
        except (UserError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        result = {k: v for k, v in result.items() if k != "sha256"}
    else:
        tf = runtime.start(recipe)
        if args.command == "matched":
            from jaxrepro.tfref import matched  # noqa: PLC0415

            result = matched.run(args.model, args.weights_in, args.inputs, args.layers, args.outdir)
        elif args.command == "kernels":
            from jaxrepro.tfref import kernels  # noqa: PLC0415

            result = kernels.run(args.inputs, args.out)
        elif args.command == "pretrained":
            try:
                result = applications.export(
                    args.application, args.order, args.source, args.out, args.image_size
                )
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        elif args.command == "pretrained-reference":
            result = applications.reference(
                args.application,
                args.image_size,
                args.images,
                args.gradcam_layer,
                args.outdir,
                args.seed,
            )
        elif args.command == "summary":
            result = summary(args.image_size)
        else:
            result = mirror(
                args.model,
                args.weights_in,
                args.weights_out,
                args.image_size,
                args.images,
                args.logits,
            )
        result["runtime"] = runtime.describe(tf, recipe)
        if args.command == "matched":  # the record next to the run's arrays says it all
            (Path(args.outdir) / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


def _kernels_argument(p) -> None:
    p.add_argument(
        "--tf-kernels",
        default="onednn",
        choices=sorted(runtime.KERNELS),
        help="TF's CPU kernel library: onednn (TF's default) or eigen "
        "(TF_ENABLE_ONEDNN_OPTS=0); default: %(default)s",
    )


def train_doc() -> str:
    return trainlib.__doc__

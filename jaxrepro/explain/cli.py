"""Explain a trained model's prediction for image files: heatmap PNGs and raw arrays.

    python -m jaxrepro.explain RUN_OR_CHECKPOINT IMAGE... [--method NAME] [--class C]
                               [--top K] [--steps N] [--composite NAME] [--layer PATH]
                               [--samples N] [--seed S] [--out DIR]

For each IMAGE it prints the prediction (class, probability, logit; for an imported
ImageNet network, `jaxrepro.pretrained`, the top-K list of class index, name and
probability, as the paper's Tables 1-3) and writes
`<stem>.<method>.npy` (the raw float32 heatmap at the model's input size [S, S]),
`<stem>.<method>.json` (how that map lies on the original image) and
`<stem>.<method>.png` (the heatmap laid over the original image, at its own size and
aspect, as keras.io draws it). The model sees the image resized by the project's one
rule (`jaxrepro.data.images.decode_rgb`: Pillow, RGB, bilinear, whole image, aspect
not kept), so map pixel (i, j) covers the original's rows i*H/S..(i+1)*H/S and columns
j*W/S..(j+1)*W/S. Each image is explained on its own (batch of 1), so its heatmap does
not depend on the other images named; two runs of the same command write
byte-identical .npy files.
Exit status: 0 done, 2 user error (bad run path, damaged checkpoint, unreadable image).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxrepro import cli, models
from jaxrepro.explain import METHODS, UNSIGNED, explain, lrp, render
from jaxrepro.explain.inputs import InputError, read_image
from jaxrepro.explain.prediction import CLASS_CHOICES, class_sign, logits, predict, ranked_class
from jaxrepro.models import imagenet
from jaxrepro.train import rundir


def mapping(heatmap_size: tuple[int, int], original_size: tuple[int, int]) -> dict[str, Any]:
    """How a map at the model's input size lies on the original image (the .json file)."""
    (rows, cols), (width, height) = heatmap_size, original_size
    return {
        "map_shape": [rows, cols],
        "original_size": {"width": width, "height": height},
        "resize": "the whole original resized to the map's shape by Pillow, bilinear, "
        "aspect ratio not kept (jaxrepro.data.images.decode_rgb)",
        "map_pixel_to_original": {"row_scale": height / rows, "col_scale": width / cols},
        "overlay": "colours at the map's shape, resized to the original by Pillow, bicubic",
    }


def save_heatmap(
    out: Path, stem: str, method: str, original: np.ndarray, heatmap: np.ndarray
) -> tuple[Path, Path]:
    """Write `<stem>.<method>.npy` (raw float32 at the model's size), `.json` (its mapping
    to the original) and `.png` (overlay on the original); returns the png and npy paths."""
    npy, png = out / f"{stem}.{method}.npy", out / f"{stem}.{method}.png"
    heatmap = np.asarray(heatmap, np.float32)
    np.save(npy, heatmap, allow_pickle=False)
    size = (original.shape[1], original.shape[0])
    (out / f"{stem}.{method}.json").write_text(
        json.dumps(mapping(heatmap.shape, size), indent=2) + "\n"
    )
    render.save_png(render.overlay(original, heatmap, signed=method not in UNSIGNED), png)
    return png, npy


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = cli.parser(
        prog="python -m jaxrepro.explain",
        description="Explain a trained model's prediction for image files: for each image, "
        "print the prediction and write <stem>.<method>.png (overlay) and "
        "<stem>.<method>.npy (raw float32 heatmap).",
        epilog="Methods: gradcam (Grad-CAM at the last conv, [0, 1]); guided-backprop; "
        "guided-gradcam; ig (Integrated Gradients, black baseline, trapezoid rule); "
        "lrp (Layer-wise Relevance Propagation, --composite); lime (LIME on quickshift "
        "superpixels, --samples, --seed).\n"
        "The model sees each image resized as in training data preparation "
        "(Pillow, RGB, bilinear, whole image, aspect ratio not kept); the .npy map is at "
        "that size, the .json says how it lies on the original, and the .png draws it on "
        "the original at the original's size.\n"
        "Exit status: 0 done, 2 bad run path, damaged checkpoint, unreadable image or a "
        "--class the model has not.\n"
        "Examples:\n  python -m jaxrepro.explain checkpoints/convnet/seed1001 "
        "cat.jpg dog.png --method gradcam --class predicted --out heatmaps\n"
        "  python -m jaxrepro.explain checkpoints/xception-imagenet chow-cat.jpg "
        "--top 17 --method gradcam --class 3",
    )
    parser.add_argument(
        "run",
        help="run directory (latest checkpoint) or checkpoint directory <run>/checkpoints/<step>",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size)")
    parser.add_argument(
        "--method",
        default="gradcam",
        choices=sorted(METHODS),
        help="attribution method (default gradcam)",
    )
    parser.add_argument(
        "--class",
        dest="target",
        default="predicted",
        help=f"class to explain: {', '.join(CLASS_CHOICES)} for the paper's models; for an "
        "ImageNet network 'predicted', a rank K (the K-th most probable class) or a class "
        "name such as tabby (default predicted)",
    )
    parser.add_argument(
        "--top",
        type=int,
        default=5,
        help="ImageNet networks: print the K most probable classes (default 5)",
    )
    parser.add_argument(
        "--steps", type=int, default=32, help="ig: number of path intervals (default 32)"
    )
    parser.add_argument(
        "--rule",
        default="trapezoid",
        choices=("trapezoid", "midpoint"),
        help="ig: quadrature rule (default trapezoid)",
    )
    parser.add_argument(
        "--composite",
        default=None,
        help="lrp: rule composite (default: the model's, else thesis; the pretrained "
        "networks' composites are in their model files)",
    )
    parser.add_argument(
        "--samples", type=int, default=1000, help="lime: perturbed images (default 1000)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="lime: seed of the perturbations (default 0)"
    )
    parser.add_argument(
        "--layer",
        default=None,
        help="gradcam, guided-gradcam: module path of A (default: the model's Grad-CAM "
        "layer; a wrong path lists the candidates)",
    )
    parser.add_argument(
        "--out", default="explanations", help="output directory (default ./explanations)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Explain every image of `args`; raises the errors `main` reports."""
    run_dir, _ = rundir.locate(args.run)
    config = rundir.RunDir(run_dir).read_config()
    image_size = int(config.data.image_size)
    spec = models.SPECS.get(config.model)
    multiclass = spec is not None and spec.pretrained
    composite = args.composite or (spec.lrp_composite if spec else None) or "thesis"
    paths = [Path(p) for p in args.images]
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise InputError(
            "two images have the same file name stem; their outputs would "
            "overwrite each other: " + ", ".join(sorted({s for s in stems if stems.count(s) > 1}))
        )
    if args.method == "lrp":
        try:
            lrp.get_composite(composite)
        except ValueError as e:
            raise InputError(f"--composite: {e}") from None
    if args.steps < 1 or args.samples < 2 or args.top < 0:
        raise InputError(
            f"--steps must be at least 1, --samples at least 2 and --top at least 0, got "
            f"{args.steps}, {args.samples}, {args.top}"
        )
    if not multiclass and args.target not in CLASS_CHOICES:
        raise InputError(f"--class {args.target!r}: {config.model} has {list(CLASS_CHOICES)}")
    pictures = [read_image(p, image_size) for p in paths]  # all readable before any work
    trained = rundir.load(args.run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"run {trained.run} step {trained.step} ({trained.config.model}, "
        f"{image_size}x{image_size}); method {args.method}"
    )
    options = {
        "steps": args.steps,
        "rule": args.rule,
        "composite": composite,
        "layer": args.layer,
        "num_samples": args.samples,
        "seed": args.seed,
    }
    for path, picture in zip(
        tqdm(paths, disable=args.no_progress, unit="image", file=sys.stderr), pictures
    ):
        pixels, (width, height) = picture.pixels, picture.size
        batch = pixels[None].astype(np.float32)
        resized = (
            ""
            if (width, height) == (image_size, image_size)
            else f" [resized {width}x{height} -> {image_size}x{image_size}]"
        )
        if multiclass:
            row = np.asarray(logits(trained.model, trained.variables, batch))[0]
            names = imagenet.class_names()
            try:
                index = ranked_class(args.target, row, names)
            except ValueError as e:
                raise InputError(str(e)) from None
            print(f"{path}:{resized}")
            for line in imagenet.top_k(row, args.top):
                print(f"  {line}")
            sign, target, explained = 1.0, index, f"class {index} {names[index]}"
        else:
            prediction = predict(trained.model, trained.variables, batch)[0]
            sign, target = class_sign(args.target, prediction), None
            explained = "dog" if sign > 0 else "cat"
            print(f"{path}: predicted {prediction}{resized}")
        heatmap = np.asarray(
            explain(
                args.method,
                trained.model,
                trained.variables,
                batch,
                sign=sign,
                target=target,
                **options,
            )
        )[0]
        png, npy = save_heatmap(out, path.stem, args.method, picture.original, heatmap)
        print(f"  explained {explained} -> {png}, {npy.name}")
    return 0


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    return run(parse_args(sys.argv[1:] if argv is None else argv))

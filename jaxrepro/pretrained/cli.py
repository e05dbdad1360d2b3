"""`python -m jaxrepro.pretrained {import,list,variants,predict}`: see `convert` and
`crossmachine`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxrepro import cli
from jaxrepro.pretrained import convert, crossmachine

EPILOG = """\
Weight files: jaxrepro never downloads. Keras's own files are what keras.applications
caches in ~/.keras/models/ (for example xception_weights_tf_dim_ordering_tf_kernels.h5,
inception_v3_weights_tf_dim_ordering_tf_kernels.h5,
vgg16_weights_tf_dim_ordering_tf_kernels.h5, the networks with their 1000-class top);
a .weights.h5 from Keras 3's save_weights or a .keras model of the same architecture
works too. Keras reads the file in a TensorFlow process (the tf extra); the run
directory written holds one checkpoint (step 0), for example:

  python -m jaxrepro.pretrained import xception \\
      ~/.keras/models/xception_weights_tf_dim_ordering_tf_kernels.h5
  python -m jaxrepro.explain checkpoints/xception-imagenet cat.jpg --top 5 --method gradcam

Exit status: 0 imported, 2 unknown network, unreadable file or a file of another
network (nothing is written then).
"""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = cli.parser(
        prog="python -m jaxrepro.pretrained",
        description="Import the Keras ImageNet weights of Xception, Inception V3 or VGG-16 "
        "as a jaxrepro run directory that jaxrepro.explain and jaxrepro.analysis.diff take.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "import",
        help="a Keras weight file as a run directory",
        description="Import a Keras weight file of NETWORK as a run directory.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("network", help=f"one of {', '.join(convert.names())}")
    p.add_argument("weights", help="Keras weight file (.h5, .hdf5, .weights.h5 or .keras)")
    p.add_argument("--out", help="run directory to write (default checkpoints/<network>-imagenet)")
    p.add_argument(
        "--determinism",
        default="machine",
        choices=("machine", "portable"),
        help="the determinism mode the tools run the network in (default machine)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size to build the network at (default: its ImageNet size, 299 or 224; "
        "VGG-16's dense head is then (size/32)^2*512 x 4096)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    sub.add_parser("list", help="the networks that can be imported")
    p = sub.add_parser(
        "variants",
        help="the same network and images under CPU variants: which bits agree",
        description=crossmachine.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="an imported network's run directory")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "--variants",
        default="default,one-core",
        help="comma-separated jaxrepro.analysis.variants names, cpu:<model> for an emulated "
        "CPU; the first is the baseline (default: %(default)s)",
    )
    p.add_argument(
        "--modes", default="machine,portable", help="determinism modes (default: %(default)s)"
    )
    p.add_argument(
        "--methods", default="gradcam", help="explanations to compare (default: %(default)s)"
    )
    p.add_argument("--jobs", type=int, default=1, help="variants' processes at once")
    p.add_argument("--out", type=Path, default=Path("checkpoints/crossmachine"))
    p = sub.add_parser("predict", help="one variant's process: logits and heatmaps to an .npz")
    p.add_argument("run")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="")
    return parser.parse_args(argv)


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.command == "predict":
        return crossmachine.main_predict(args)
    if args.command == "variants":
        return crossmachine.main_variants(args, argv)
    if args.command == "list":
        for name in convert.names():
            s = convert.spec(name)
            print(f"{name:<14} keras.applications.{s.keras_application}, {s.image_size} px")
        return 0
    spec = convert.spec(args.network)  # an unknown name fails before TF starts
    out = Path(args.out) if args.out else convert.default_out(args.network)
    size = args.image_size or spec.image_size
    print(f"importing {args.weights} as {spec.name} ({size} px) in a Keras process")
    run = convert.import_weights(
        args.network,
        args.weights,
        out,
        determinism=args.determinism,
        image_size=args.image_size,
        overwrite=args.overwrite,
        argv=argv,
    )
    info = json.loads((run / "pretrained.json").read_text())
    print(f"wrote {run} (checkpoint 0; source SHA-256 {info['source_sha256']})")
    return 0

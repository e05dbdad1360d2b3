"""How stable are the explanations? The rotation and noise protocol of Heggen's thesis.

    python -m jaxrepro.explain.robustness RUN_OR_CHECKPOINT [--images N | IMAGE...]
                                          [--methods gradcam,ig,...] [--seed S] [--out DIR]
    python -m jaxrepro.explain.robustness RUN_OR_CHECKPOINT --correctness [--images N]
    python -m jaxrepro.explain.robustness RUN_OR_CHECKPOINT [--images N | IMAGE...]
        [--faithfulness [--patch-size 8] [--baseline mean] [--faithfulness-steps K]]
        [--randomisation] [--lipschitz [--lipschitz-samples 10] [--lipschitz-sigma 0.1]]

Protocol (the thesis's sections 7.1-7.4, figures 8.2-8.37), per image and method:

- reference: the heatmap of the image, explaining its predicted class.
- transformed: the heatmap of the transformed image, explaining *its* predicted class
  (the thesis explains each input's first prediction); when that class differs from
  the original's, the row says so (`label_changed`) and the plots mark it, since the
  RMSE then compares explanations of two different classes.
- rotation by 0.5, 1, 5, 10 degrees and by 15, 20, 25, 40 degrees (counter-clockwise):
  the reference heatmap is rotated by the same angle, and both maps are cropped to
  the largest centred square that the rotation fills with image content (side
  S / (|cos a| + |sin a|)), as the thesis crops its grey rotated borders away.
  Rotation reuses `jaxrepro.data.augment.rotate_image`: bilinear, deterministic,
  cos/sin snapped to a 2^-15 grid (exact coordinates), reflect fill (cropped away).
- Gaussian noise with sigma 0.01..0.10 (step 0.01) and 0.25..10: sigma is in units of
  the [0, 1] pixel range (the models' own input after their Rescaling(1/255); the
  thesis' PyTorch images are [0, 1] tensors), i.e. noise of standard deviation
  255*sigma on 0..255 pixels, not clipped. One standard normal draw z per image,
  from `fold_in(key(seed), image index)`, is scaled by each sigma: reruns are bit
  for bit, another seed gives other noise, and the curves over sigma are of one
  direction of noise.
- RMSE (eq. 7.1) of the two maps, both divided by the largest magnitude of the
  reference map, so methods with different units compare (Grad-CAM is in [0, 1]
  already).

Every heatmap is computed on a batch of one image with the same jitted function, so
the angle-0 and sigma-0 transforms reproduce the reference bit for bit (RMSE 0).

Correctness (`--correctness`, needs a source with object masks: the embedded shapes
set): for validation images, the pointing-game hit rate and the positive relevance
mass inside the object mask per method, explaining the true class
(`jaxrepro.explain.metrics`).

The checks XAI users run (`jaxrepro.explain.checks`; any of them instead of the
protocol, on the first `--images N` validation images (default 3) or IMAGE files, each
image explained for its predicted class in a batch of one):

- `--faithfulness`: region perturbation / pixel flipping (Samek et al. 2017): the
  `--patch-size` patches (1: pixel flipping) replaced by the `--baseline` (the image's
  mean colour; black; uniform noise) most relevant first, the explained score after
  each step, against a random patch order; AUC over the fraction removed (lower than
  the random order's: faithful). `faithfulness.csv` (a row per image, method and step),
  `faithfulness.png`.
- `--randomisation`: cascading model-parameter randomisation (Adebayo et al. 2018): the
  layers re-initialised top first (`model.init(key(--seed))`, batch statistics kept),
  each map compared with the original (Spearman of the map and of |map|, SSIM).
  `randomisation.csv` (a row per image, method and step), `randomisation.png`.
- `--lipschitz`: local Lipschitz estimate (Alvarez-Melis & Jaakkola 2018): max over
  `--lipschitz-samples` noisy copies (`--lipschitz-sigma`, the protocol's sigma) of
  ||e(x) - e(x')|| / ||x - x'||, raw and with the maps divided by max |e(x)|.
  `lipschitz.csv` (a row per image and method), `lipschitz.png`.

Their randomness (random order, uniform baseline, noise, re-initialisation) comes from
`--seed` alone: reruns write the same bytes.

LIME against LRP (`--lime-vs-lrp`): the protocol with the methods and transforms of the
thesis's LIME study (chapter 8 runs LIME on the small transforms only): lime and lrp,
rotations 0.5-10 degrees, sigma 0.01-0.10.

Writes `robustness.csv` (one row per image, method and transform), per image
`<name>.rotation.png`, `<name>.noise.png` (RMSE curves) and `<name>.rotation.heatmaps.png`,
`<name>.noise.heatmaps.png` (the compared maps), and `all.rotation.png`, `all.noise.png`
(the curves averaged over the images); or `correctness.csv`; or the checks' files
(`jaxrepro.explain.check_report`). Exit 2 on user errors.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

from jaxrepro import cli, models
from jaxrepro import data as datalib
from jaxrepro.data.augment import rotate_image
from jaxrepro.errors import UserError
from jaxrepro.explain import DEFAULT_METHODS, METHODS, UNSIGNED, checks, explain, lrp, metrics
from jaxrepro.explain.check_report import (
    CheckSettings,
    faithfulness_rows,
    lipschitz_rows,
    plot_faithfulness,
    plot_lipschitz,
    plot_randomisation,
    print_checks,
    randomisation_rows,
)
from jaxrepro.explain.inputs import read_image
from jaxrepro.explain.prediction import CLASS_NAMES, class_sign, predict
from jaxrepro.train import rundir

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

ANGLES_SMALL = (0.5, 1.0, 5.0, 10.0)
ANGLES_LARGE = (15.0, 20.0, 25.0, 40.0)
SIGMAS_SMALL = tuple(round(0.01 * k, 2) for k in range(1, 11))
SIGMAS_LARGE = (0.25, 0.45, 1.0, 2.5, 5.0, 10.0)  # the thesis names 0.25, 0.45, 1, 5, 10
PIXEL_RANGE = 255.0  # sigma 1 = the whole pixel range


class ProtocolError(UserError, RuntimeError):
    """Options or inputs the protocol cannot run with; reported with exit status 2."""


# ------------------------------------------------------------------ transforms


@jax.jit
def rotate(images: jax.Array, degrees: jax.Array) -> jax.Array:
    """Rotate images [N, H, W, C] counter-clockwise by `degrees` (augment.rotate_image)."""
    radians = jnp.asarray(degrees, jnp.float32) * jnp.float32(math.pi / 180.0)
    return jax.vmap(lambda im: rotate_image(im, radians))(jnp.asarray(images, jnp.float32))


def rotate_map(heatmap: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate one heatmap [H, W] like its image."""
    return np.asarray(rotate(jnp.asarray(heatmap)[None, :, :, None], degrees))[0, :, :, 0]


def crop_box(size: int, degrees: float) -> tuple[int, int]:
    """(start, stop) of the centred square a rotation by `degrees` fills with image content.

    The largest axis-aligned square inside a square of side S turned by a has side
    S / (|cos a| + |sin a|); rounded down, centred.
    """
    a = math.radians(degrees)
    side = min(size, int(math.floor(size / (abs(math.cos(a)) + abs(math.sin(a))) + 1e-9)))
    start = (size - side) // 2
    return start, start + side


def standard_noise(seed: int, index: int, shape: tuple[int, ...]) -> jax.Array:
    """The standard normal draw of image `index` under `seed` (float32)."""
    key = jax.random.fold_in(jax.random.key(seed), index)
    return jax.random.normal(key, shape, jnp.float32)


@jax.jit
def add_noise(images: jax.Array, z: jax.Array, sigma: jax.Array) -> jax.Array:
    """images + 255 * sigma * z (sigma in units of the [0, 1] pixel range; no clipping)."""
    scale = jnp.asarray(sigma, jnp.float32) * jnp.float32(PIXEL_RANGE)
    return jnp.asarray(images, jnp.float32) + scale * z


# -------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Row:
    """One image, method and transform of the protocol (a CSV row)."""

    image: str
    method: str
    transform: str  # "rotation" (degrees) or "noise" (sigma)
    amount: float
    rmse: float
    crop: int  # side of the compared square
    label_before: str
    p_before: float
    logit_before: float
    label_after: str
    p_after: float
    logit_after: float
    label_changed: bool


@dataclass(frozen=True)
class Transformed:
    kind: str
    amount: float
    image: jax.Array  # [1, H, W, 3]


def transforms(
    image: jax.Array, index: int, *, angles: Sequence[float], sigmas: Sequence[float], seed: int
) -> list[Transformed]:
    """The rotated and noisy versions of one image [1, H, W, 3]."""
    out = [Transformed("rotation", float(a), rotate(image, a)) for a in angles]
    if sigmas:
        z = standard_noise(seed, index, image.shape)
        out += [Transformed("noise", float(s), add_noise(image, z, s)) for s in sigmas]
    return out


def protocol(
    model: Any,
    variables: Any,
    images: np.ndarray,
    names: Sequence[str],
    *,
    methods: Sequence[str],
    angles: Sequence[float] = ANGLES_SMALL + ANGLES_LARGE,
    sigmas: Sequence[float] = SIGMAS_SMALL + SIGMAS_LARGE,
    seed: int = 0,
    options: dict | None = None,
    progress: bool = False,
    maps: dict | None = None,
) -> list[Row]:
    """Rows of the protocol for images [N, H, W, 3] (0..255) and each method.

    If `maps` is a dict, it receives the compared heatmaps for figures:
    maps[(image, method)] = {"reference": [H, W], (transform, amount): cropped map}.
    """
    options = options or {}
    rows: list[Row] = []
    size = images.shape[1]
    bar = tqdm(
        total=len(images) * len(methods), disable=not progress, unit="map set", file=sys.stderr
    )
    for index, (name, pixels) in enumerate(zip(names, images)):
        image = jnp.asarray(pixels, jnp.float32)[None]
        before = predict(model, variables, image)[0]
        variants = transforms(image, index, angles=angles, sigmas=sigmas, seed=seed)
        after = [predict(model, variables, v.image)[0] for v in variants]
        for method in methods:
            reference = np.asarray(
                explain(
                    method,
                    model,
                    variables,
                    image,
                    sign=class_sign("predicted", before),
                    target=before.target,
                    **options,
                )
            )[0]
            scale = float(np.max(np.abs(reference))) or 1.0
            if maps is not None:
                maps[(name, method)] = {"reference": reference}
            for variant, pred in zip(variants, after):
                heat = np.asarray(
                    explain(
                        method,
                        model,
                        variables,
                        variant.image,
                        sign=class_sign("predicted", pred),
                        target=pred.target,
                        **options,
                    )
                )[0]
                ref = reference
                lo, hi = 0, size
                if variant.kind == "rotation":
                    ref = rotate_map(reference, variant.amount)
                    lo, hi = crop_box(size, variant.amount)
                if maps is not None:
                    maps[(name, method)][(variant.kind, variant.amount)] = heat[lo:hi, lo:hi]
                rows.append(
                    Row(
                        image=name,
                        method=method,
                        transform=variant.kind,
                        amount=variant.amount,
                        rmse=metrics.rmse(heat[lo:hi, lo:hi] / scale, ref[lo:hi, lo:hi] / scale),
                        crop=hi - lo,
                        label_before=before.name,
                        p_before=before.probability,
                        logit_before=before.logit,
                        label_after=pred.name,
                        p_after=pred.probability,
                        logit_after=pred.logit,
                        label_changed=pred.label != before.label,
                    )
                )
            bar.update(1)
    bar.close()
    return rows


def write_csv(rows: Sequence[Any], path: Path) -> None:
    """Dataclass rows as CSV (floats with repr precision, so reruns compare byte for byte)."""
    with open(path, "w", newline="") as f:
        writer = None
        for row in rows:
            record = asdict(row)
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(record))
                writer.writeheader()
            writer.writerow(record)


def plot_rmse(rows: Sequence[Row], image: str, kind: str, path: Path) -> None:
    """RMSE against angle or sigma per method (small and large ranges side by side),
    a changed predicted label marked with a red cross, as in the thesis' figures 8.x."""
    mine = [r for r in rows if r.image == image and r.transform == kind]
    if not mine:
        return
    small_top = 10.0 if kind == "rotation" else 0.1
    ranges = [("small", lambda a: a <= small_top + 1e-9), ("large", lambda a: a > small_top + 1e-9)]
    ranges = [(label, keep) for label, keep in ranges if any(keep(r.amount) for r in mine)]
    fig, axes = plt.subplots(1, len(ranges), figsize=(5.5 * len(ranges), 4), squeeze=False)
    for ax, (label, keep) in zip(axes[0], ranges):
        for method in dict.fromkeys(r.method for r in mine):
            pts = sorted(
                (r.amount, r.rmse, r.label_changed)
                for r in mine
                if r.method == method and keep(r.amount)
            )
            if not pts:
                continue
            xs, ys, changed = zip(*pts)
            ax.plot(xs, ys, "o-", label=method)
            cx = [x for x, c in zip(xs, changed) if c]
            cy = [y for y, c in zip(ys, changed) if c]
            if cx:
                ax.plot(cx, cy, "x", color="red", markersize=10, markeredgewidth=2)
        ax.set_xlabel("angle (degrees)" if kind == "rotation" else "sigma ([0, 1] pixel range)")
        ax.set_ylabel("RMSE (reference max |h| = 1)")
        ax.set_title(f"{label} {kind}s")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    first = mine[0]
    fig.suptitle(
        "mean over the images; red x = predicted label changed for one of them"
        if image == ALL_IMAGES
        else f"{image}: predicted {first.label_before} (p={first.p_before:.3f}); "
        "red x = predicted label changed"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


ALL_IMAGES = "all images"


def mean_over_images(rows: Sequence[Row]) -> list[Row]:
    """One row per method, transform and amount: the RMSE averaged over the images, the
    label marked changed if it changed for any image (for the `all.<kind>.png` plots)."""
    groups: dict[tuple[str, str, float], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.method, r.transform, r.amount), []).append(r)
    return [
        replace(
            rs[0],
            image=ALL_IMAGES,
            rmse=float(np.mean([r.rmse for r in rs])),
            label_changed=any(r.label_changed for r in rs),
        )
        for rs in groups.values()
    ]


def plot_heatmaps(rows: Sequence[Row], maps: dict, image: str, kind: str, path: Path) -> None:
    """The compared heatmaps, one row per method: the reference, then each transformed
    input's map (cropped), a changed label in red, as in the thesis' figures 8.1, 8.5."""
    mine = [r for r in rows if r.image == image and r.transform == kind]
    if not mine:
        return
    methods = list(dict.fromkeys(r.method for r in mine))
    amounts = list(dict.fromkeys(r.amount for r in mine))
    changed = {r.amount: r.label_changed for r in mine}
    fig, axes = plt.subplots(
        len(methods),
        1 + len(amounts),
        squeeze=False,
        figsize=(1.4 * (1 + len(amounts)), 1.5 * len(methods) + 0.6),
    )
    for row, method in zip(axes, methods):
        stored = maps[(image, method)]
        reference = stored["reference"]
        signed = method not in UNSIGNED
        top = float(np.max(np.abs(reference))) or 1.0
        style = (
            dict(cmap="bwr", vmin=-top, vmax=top) if signed else dict(cmap="jet", vmin=0, vmax=top)
        )
        for ax, (label, heat) in zip(
            row, [("reference", reference)] + [(a, stored[(kind, a)]) for a in amounts]
        ):
            ax.imshow(heat, **style)
            ax.set_xticks([])
            ax.set_yticks([])
            if label == "reference":
                ax.set_ylabel(method, fontsize=8)
            title = (
                label
                if label == "reference"
                else (f"{label:g}°" if kind == "rotation" else f"σ {label:g}")
            )
            ax.set_title(
                title,
                fontsize=8,
                color="red" if label != "reference" and changed[label] else "black",
            )
    fig.suptitle(
        f"{image}, {kind}: heatmaps of the transformed inputs (red: label changed)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(rows: Sequence[Row]) -> None:
    """Mean RMSE per method and transform range, and how many labels changed."""
    print(f"{'method':16s} {'transform':18s} {'mean RMSE':>10s} {'changed':>8s}")
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        small = r.amount <= (10.0 if r.transform == "rotation" else 0.1) + 1e-9
        groups.setdefault((r.method, f"{r.transform} {'small' if small else 'large'}"), []).append(
            r
        )
    for (method, group), rs in groups.items():
        print(
            f"{method:16s} {group:18s} {np.mean([r.rmse for r in rs]):10.4f} "
            f"{sum(r.label_changed for r in rs):4d}/{len(rs)}"
        )


# ----------------------------------------------------------------- correctness


@dataclass(frozen=True)
class Score:
    """Correctness of one method on the validation images (a CSV row)."""

    method: str
    images: int
    pointing_hits: int
    pointing_rate: float
    mass_mean: float
    mass_defined: int  # images with some positive relevance


def correctness(
    model: Any,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    *,
    methods: Sequence[str],
    batch_size: int = 8,
    options: dict | None = None,
    progress: bool = False,
) -> list[Score]:
    """Pointing game and relevance mass per method, explaining each image's true class."""
    options = options or {}
    signs = np.where(np.asarray(labels) > 0, 1.0, -1.0).astype(np.float32)
    scores = []
    for method in methods:
        maps = []
        for start in tqdm(
            range(0, len(images), batch_size), disable=not progress, desc=method, file=sys.stderr
        ):
            batch = jnp.asarray(images[start : start + batch_size], jnp.float32)
            maps.append(
                np.asarray(
                    explain(
                        method,
                        model,
                        variables,
                        batch,
                        sign=signs[start : start + batch_size],
                        **options,
                    )
                )
            )
        heat = np.concatenate(maps)
        hits = metrics.pointing_game(heat, masks)
        mass = metrics.relevance_mass(heat, masks)
        defined = ~np.isnan(mass)
        scores.append(
            Score(
                method=method,
                images=len(heat),
                pointing_hits=int(hits.sum()),
                pointing_rate=float(hits.mean()),
                mass_mean=float(mass[defined].mean()) if defined.any() else math.nan,
                mass_defined=int(defined.sum()),
            )
        )
    return scores


# ---------------------------------------------------------------------- checks


def run_checks(
    model: Any,
    variables: Any,
    images: np.ndarray,
    names: Sequence[str],
    out: Path,
    *,
    methods: Sequence[str],
    settings: CheckSettings,
    options: dict | None = None,
    progress: bool = False,
) -> list[Path]:
    """Run the checks `settings` names, write their CSVs and plots in `out`, print the
    tables; the files written."""
    common = dict(methods=methods, settings=settings, options=options, progress=progress)
    written: list[Path] = []
    faith = rand = lip = []
    if settings.faithfulness:
        faith = faithfulness_rows(model, variables, images, names, **common)
        write_csv(faith, out / "faithfulness.csv")
        plot_faithfulness(faith, out / "faithfulness.png")
        written += [out / "faithfulness.csv", out / "faithfulness.png"]
    if settings.randomisation:
        rand = randomisation_rows(model, variables, images, names, **common)
        write_csv(rand, out / "randomisation.csv")
        plot_randomisation(rand, out / "randomisation.png")
        written += [out / "randomisation.csv", out / "randomisation.png"]
    if settings.lipschitz:
        lip = lipschitz_rows(model, variables, images, names, **common)
        write_csv(lip, out / "lipschitz.csv")
        plot_lipschitz(lip, out / "lipschitz.png")
        written += [out / "lipschitz.csv", out / "lipschitz.png"]
    print_checks(faith, rand, lip)
    return written


# ------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = cli.parser(
        prog="python -m jaxrepro.explain.robustness",
        description="Robustness of explanations under rotation and Gaussian noise (the "
        "protocol of Heggen's thesis, ch. 7-8): RMSE between the heatmap of a "
        "transformed image and the equally transformed reference heatmap. "
        "With --correctness: pointing game and relevance mass inside the "
        "object masks of the validation images. With --faithfulness, --randomisation "
        "and/or --lipschitz instead: the checks XAI users run (region perturbation, "
        "cascading model-parameter randomisation, local Lipschitz estimate; "
        "jaxrepro.explain.checks), bit for bit.",
        epilog=f"Angles (degrees): {ANGLES_SMALL} and {ANGLES_LARGE}.\n"
        f"Sigmas ([0, 1] pixel range; noise std 255*sigma on 0..255 pixels): "
        f"{SIGMAS_SMALL} and {SIGMAS_LARGE}.\n"
        "Writes robustness.csv and <image>.rotation.png / <image>.noise.png "
        "(or correctness.csv) in --out; the checks write instead:\n"
        "  faithfulness.csv/.png   a row per image, method and step: the score with the\n"
        "                          most relevant patches removed first and in a random\n"
        "                          order, and both AUCs\n"
        "  randomisation.csv/.png  a row per image, method and step: Spearman and SSIM\n"
        "                          with the original map\n"
        "  lipschitz.csv/.png      a row per image and method\n"
        "--seed also seeds the checks: the random patch order, the uniform baseline,\n"
        "the re-initialisation (model.init(key(seed))) and the Lipschitz noise.\n"
        "Examples:\n  python -m jaxrepro.explain.robustness checkpoints/convnet/seed1001 "
        "--images 3 --methods gradcam,ig --out robustness\n"
        "  python -m jaxrepro.explain.robustness checkpoints/convnet/seed1001 "
        "--faithfulness --patch-size 8 --randomisation --lipschitz --out checks",
    )
    parser.add_argument("run", help="run directory or checkpoint directory")
    parser.add_argument(
        "files",
        nargs="*",
        metavar="IMAGE",
        help="image files (default: the first --images validation images)",
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        help="number of validation images of the run's data (default 3; with --correctness 100)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated methods of {','.join(METHODS)} (default: all but lime: "
        f"{','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--angles", default=None, help="comma-separated angles in degrees (default: the thesis')"
    )
    parser.add_argument(
        "--sigmas", default=None, help="comma-separated noise sigmas (default: the thesis')"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="noise seed, and the checks' and LIME's (default 0)",
    )
    parser.add_argument("--steps", type=int, default=32, help="ig: path intervals (default 32)")
    parser.add_argument(
        "--samples", type=int, default=1000, help="lime: perturbed images per map (default 1000)"
    )
    parser.add_argument(
        "--composite",
        default=None,
        help="lrp: composite (default: the model's own, else thesis)",
    )
    parser.add_argument(
        "--lime-vs-lrp",
        action="store_true",
        help="the thesis's LIME against LRP comparison: methods lime,lrp, rotations "
        f"{','.join(f'{a:g}' for a in ANGLES_SMALL)} degrees and sigmas 0.01..0.10 "
        "(unless --methods, --angles, --sigmas say otherwise)",
    )
    parser.add_argument(
        "--correctness",
        action="store_true",
        help="score heatmaps against the validation object masks instead",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="--correctness: images per batch (default 8)"
    )
    checks_group = parser.add_argument_group("checks (instead of the protocol; any combination)")
    checks_group.add_argument(
        "--faithfulness",
        action="store_true",
        help="region perturbation / pixel flipping: the score as the most relevant "
        "patches are replaced, against a random order",
    )
    checks_group.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="--faithfulness: patch side in pixels (default 8; 1 = pixel flipping)",
    )
    checks_group.add_argument(
        "--baseline",
        default=None,
        help=f"--faithfulness: what removed patches become: {', '.join(checks.BASELINES)} "
        "(default mean: the image's mean colour)",
    )
    checks_group.add_argument(
        "--faithfulness-steps",
        type=int,
        default=None,
        help="--faithfulness: points of the curve after the first (default: one per patch)",
    )
    checks_group.add_argument(
        "--randomisation",
        action="store_true",
        help="cascading model-parameter randomisation (layers re-initialised top first)",
    )
    checks_group.add_argument(
        "--lipschitz", action="store_true", help="local Lipschitz estimate under Gaussian noise"
    )
    checks_group.add_argument(
        "--lipschitz-samples",
        type=int,
        default=None,
        help="--lipschitz: noisy copies per image (default 10)",
    )
    checks_group.add_argument(
        "--lipschitz-sigma",
        type=float,
        default=None,
        help="--lipschitz: noise sigma in the [0, 1] pixel range (default 0.1)",
    )
    parser.add_argument(
        "--out", default="robustness", help="output directory (default ./robustness)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _floats(text: str | None, default: tuple[float, ...], what: str) -> tuple[float, ...]:
    if text is None:
        return default
    if not text.strip():
        return ()
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ProtocolError(f"--{what} takes comma-separated numbers, got {text!r}") from None


def _methods(text: str | None) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_METHODS
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise ProtocolError(f"unknown methods {unknown}; valid: {sorted(METHODS)}")
    return chosen


def check_settings(args: argparse.Namespace, image_size: int) -> CheckSettings:
    """The checks' settings from `args` (ProtocolError for bad values, or for an option
    of a check that was not asked for)."""
    owners = {
        "patch_size": "faithfulness",
        "baseline": "faithfulness",
        "faithfulness_steps": "faithfulness",
        "lipschitz_samples": "lipschitz",
        "lipschitz_sigma": "lipschitz",
    }
    for option, check in owners.items():
        if getattr(args, option) is not None and not getattr(args, check):
            raise ProtocolError(
                f"--{option.replace('_', '-')} is an option of --{check}, which was not given"
            )
    given = {k: getattr(args, k) for k in owners if getattr(args, k) is not None}
    settings = CheckSettings(
        faithfulness=args.faithfulness,
        randomisation=args.randomisation,
        lipschitz=args.lipschitz,
        seed=args.seed,
        **given,
    )
    if not 1 <= settings.patch_size <= image_size:
        raise ProtocolError(
            f"--patch-size must be in 1..{image_size} (the image size), got {settings.patch_size}"
        )
    if settings.baseline not in checks.BASELINES:
        raise ProtocolError(
            f"--baseline {settings.baseline!r}: valid baselines are {list(checks.BASELINES)}"
        )
    patches = checks.patch_ids(image_size, image_size, settings.patch_size).max() + 1
    steps = settings.faithfulness_steps
    if steps is not None and not 1 <= steps <= patches:
        raise ProtocolError(
            f"--faithfulness-steps must be in 1..{patches} (the patches of "
            f"{settings.patch_size} px), got {steps}"
        )
    if settings.lipschitz_samples < 1:
        raise ProtocolError(
            f"--lipschitz-samples must be at least 1, got {settings.lipschitz_samples}"
        )
    if not (math.isfinite(settings.lipschitz_sigma) and settings.lipschitz_sigma > 0):
        raise ProtocolError(
            f"--lipschitz-sigma must be a positive number, got {settings.lipschitz_sigma}"
        )
    if settings.chosen and args.correctness:
        raise ProtocolError(
            "--correctness and the checks (--faithfulness, --randomisation, --lipschitz) "
            "run separately"
        )
    return settings


def _validation(trained: rundir.TrainedModel) -> Any:
    d = trained.config.data
    return datalib.load(
        source=d.source,
        split="validation",
        image_size=d.image_size,
        num_train=d.num_train,
        num_val=d.num_val,
        data_dir=d.data_dir or None,
        folder=d.folder or None,
    )


def run(args: argparse.Namespace) -> int:
    """Run the protocol (or the correctness scores) as `args` say."""
    if args.lime_vs_lrp:  # the thesis's LIME study: the small transforms only (sec. 8)
        methods = _methods(args.methods or "lime,lrp")
        angles = _floats(args.angles, ANGLES_SMALL, "angles")
        sigmas = _floats(args.sigmas, SIGMAS_SMALL, "sigmas")
    else:
        methods = _methods(args.methods)
        angles = _floats(args.angles, ANGLES_SMALL + ANGLES_LARGE, "angles")
        sigmas = _floats(args.sigmas, SIGMAS_SMALL + SIGMAS_LARGE, "sigmas")
    if args.steps < 1 or args.batch_size < 1 or (args.images is not None and args.images < 1):
        raise ProtocolError("--steps, --batch-size and --images must be at least 1")
    if args.files and (args.images is not None or args.correctness):
        raise ProtocolError(
            "give IMAGE files or --images N (validation images), not both; "
            "--correctness uses validation images only"
        )
    run_dir, _ = rundir.locate(args.run)
    config = rundir.RunDir(run_dir).read_config()
    spec = models.SPECS.get(config.model)
    pretrained = spec is not None and spec.pretrained
    args.composite = args.composite or (spec.lrp_composite if spec else None) or "thesis"
    if pretrained and not args.files:
        raise ProtocolError(
            f"{config.model} is an imported ImageNet network without a validation split: "
            "give IMAGE files"
        )
    if pretrained and (
        args.correctness or args.faithfulness or args.randomisation or args.lipschitz
    ):
        raise ProtocolError(
            "--correctness and the checks take the paper's one-logit models; for an "
            "ImageNet network run the robustness protocol (the default) or --lime-vs-lrp"
        )
    if "lrp" in methods:
        try:
            lrp.get_composite(args.composite)
        except ValueError as e:
            raise ProtocolError(f"--composite: {e}") from None
    if args.samples < 2:
        raise ProtocolError(f"--samples must be at least 2, got {args.samples}")
    options = {
        "steps": args.steps,
        "composite": args.composite,
        "num_samples": args.samples,
        "seed": args.seed,
    }
    image_size = int(config.data.image_size)
    settings = check_settings(args, image_size)
    if args.files:
        pictures = [read_image(Path(p), image_size).pixels for p in args.files]
        images, names = np.stack(pictures), [Path(p).stem for p in args.files]
    trained = rundir.load(args.run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.files:
        split = _validation(trained)
        count = args.images or (100 if args.correctness else 3)
        if count > len(split.labels):
            raise ProtocolError(
                f"--images {count}: the validation split has {len(split.labels)} images"
            )
        images = split.images[:count]
        names = [f"val{i:04d}_{CLASS_NAMES[int(split.labels[i])]}" for i in range(count)]
    if args.correctness:
        if split.masks is None:
            raise ProtocolError(
                f"source {trained.config.data.source!r} has no object masks "
                "(only the embedded shapes set has)"
            )
        scores = correctness(
            trained.model,
            trained.variables,
            images,
            split.labels[:count],
            split.masks[:count],
            methods=methods,
            batch_size=args.batch_size,
            options=options,
            progress=not args.no_progress,
        )
        write_csv(scores, out / "correctness.csv")
        print(f"{'method':16s} {'pointing game':>14s} {'mass in mask':>13s}  images")
        for s in scores:
            print(f"{s.method:16s} {s.pointing_rate:14.3f} {s.mass_mean:13.3f}  {s.images}")
        print(f"wrote {out / 'correctness.csv'}")
        return 0
    if settings.chosen:
        written = run_checks(
            trained.model,
            trained.variables,
            images,
            names,
            out,
            methods=methods,
            settings=settings,
            options=options,
            progress=not args.no_progress,
        )
        print("wrote " + ", ".join(str(p) for p in written))
        return 0
    maps: dict = {}
    rows = protocol(
        trained.model,
        trained.variables,
        images,
        names,
        methods=methods,
        angles=angles,
        sigmas=sigmas,
        seed=args.seed,
        options=options,
        progress=not args.no_progress,
        maps=maps,
    )
    write_csv(rows, out / "robustness.csv")
    for name in names:
        for kind in ("rotation", "noise"):
            plot_rmse(rows, name, kind, out / f"{name}.{kind}.png")
            plot_heatmaps(rows, maps, name, kind, out / f"{name}.{kind}.heatmaps.png")
    for kind in ("rotation", "noise"):
        plot_rmse(mean_over_images(rows), ALL_IMAGES, kind, out / f"all.{kind}.png")
    for name in names:
        first = next(r for r in rows if r.image == name)
        changed = sorted(
            {(r.transform, r.amount) for r in rows if r.image == name and r.label_changed}
        )
        print(
            f"{name}: predicted {first.label_before} (p={first.p_before:.4f}, "
            f"logit={first.logit_before:+.6g}); label changed at: "
            + (", ".join(f"{k} {a:g}" for k, a in changed) or "none")
        )
    print_table(rows)
    print(f"wrote {out / 'robustness.csv'} and the plots in {out}")
    return 0


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())

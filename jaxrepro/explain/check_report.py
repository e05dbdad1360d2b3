"""The checks of `jaxrepro.explain.checks` over images and methods: CSV rows, plots and
the printed tables that `python -m jaxrepro.explain.robustness --faithfulness
--randomisation --lipschitz` writes (see that module for what each check measures)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

from jaxrepro.errors import UserError
from jaxrepro.explain import checks
from jaxrepro.explain.prediction import class_sign, predict

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


class CheckError(UserError, RuntimeError):
    """A check that cannot run with the options given; reported with exit status 2."""


@dataclass(frozen=True)
class FaithfulnessRow:
    """One point of an image's region-perturbation curves for one method (a CSV row)."""

    image: str
    method: str
    label: str  # the explained (predicted) class
    patch_size: int
    baseline: str
    step: int
    removed: int  # patches replaced by the baseline
    fraction: float  # removed / all patches
    score_morf: float  # the explained score, most relevant patches removed first
    score_random: float  # the same in the random order
    auc_morf: float  # the image's AUCs (the same on each row of its curve)
    auc_random: float


@dataclass(frozen=True)
class RandomisationRow:
    """One image, method and step of the cascading randomisation (a CSV row)."""

    image: str
    method: str
    label: str
    step: int  # layers randomised (top first, cumulative)
    layer: str  # the layer randomised at this step ("" at step 0)
    spearman: float  # NaN when a map is constant
    spearman_abs: float
    ssim: float


@dataclass(frozen=True)
class LipschitzRow:
    """One image and method's local Lipschitz estimate (a CSV row)."""

    image: str
    method: str
    label: str
    sigma: float
    samples: int
    lipschitz: float  # max ||e(x) - e(x')|| / ||x - x'|| ([0, 1] pixel range)
    lipschitz_scaled: float  # the same with the maps divided by max |e(x)|


@dataclass(frozen=True)
class CheckSettings:
    """The checks to run and their options (validated by `check_settings`)."""

    faithfulness: bool = False
    randomisation: bool = False
    lipschitz: bool = False
    patch_size: int = 8
    baseline: str = "mean"
    faithfulness_steps: int | None = None
    lipschitz_samples: int = 10
    lipschitz_sigma: float = 0.1
    seed: int = 0

    @property
    def chosen(self) -> bool:
        return self.faithfulness or self.randomisation or self.lipschitz


def _keys(seed: int) -> dict[str, jax.Array]:
    """The checks' own keys, all from `seed`."""
    root = jax.random.key(seed)
    return {name: jax.random.fold_in(root, k) for k, name in enumerate(("order", "fill", "noise"))}


def _predicted(
    model: Any, variables: Any, images: np.ndarray
) -> tuple[jax.Array, list, np.ndarray]:
    """(pixels as float32, each image's prediction, the sign explaining it): the
    predictions each computed in a batch of one, as the protocol does."""
    pixels = jnp.asarray(images, jnp.float32)
    before = [predict(model, variables, x[None])[0] for x in pixels]
    signs = np.array([class_sign("predicted", p) for p in before], np.float32)
    return pixels, before, signs


def faithfulness_rows(
    model: Any,
    variables: Any,
    images: np.ndarray,
    names: Sequence[str],
    *,
    methods: Sequence[str],
    settings: CheckSettings,
    options: dict | None = None,
    progress: bool = False,
) -> list[FaithfulnessRow]:
    """Region perturbation of every method's maps (`checks.region_perturbation`)."""
    pixels, before, signs = _predicted(model, variables, images)
    keys = _keys(settings.seed)
    rows = []
    for method in tqdm(methods, disable=not progress, desc="faithfulness", file=sys.stderr):
        heat = checks.explain_one_by_one(
            method, model, variables, pixels, sign=signs, options=options
        )
        try:
            result = checks.region_perturbation(
                model,
                variables,
                pixels,
                heat,
                key=keys["order"],
                sign=signs,
                patch_size=settings.patch_size,
                baseline=settings.baseline,
                baseline_key=keys["fill"],
                steps=settings.faithfulness_steps,
            )
        except ValueError as e:
            raise CheckError(f"--faithfulness: {e}") from None
        morf, rand = result.morf, result.random
        for i, name in enumerate(names):
            for k in range(len(morf.fractions)):
                rows.append(
                    FaithfulnessRow(
                        image=name,
                        method=method,
                        label=before[i].name,
                        patch_size=settings.patch_size,
                        baseline=settings.baseline,
                        step=k,
                        removed=int(morf.removed[k]),
                        fraction=float(morf.fractions[k]),
                        score_morf=float(morf.scores[i, k]),
                        score_random=float(rand.scores[i, k]),
                        auc_morf=float(morf.auc[i]),
                        auc_random=float(rand.auc[i]),
                    )
                )
    return rows


def randomisation_rows(
    model: Any,
    variables: Any,
    images: np.ndarray,
    names: Sequence[str],
    *,
    methods: Sequence[str],
    settings: CheckSettings,
    options: dict | None = None,
    progress: bool = False,
) -> list[RandomisationRow]:
    """Cascading model-parameter randomisation per method
    (`checks.model_parameter_randomisation`), the randomised models shared."""
    pixels, before, signs = _predicted(model, variables, images)
    randomised = checks.cascading_randomisation(model, variables, pixels, seed=settings.seed)
    rows = []
    for method in tqdm(methods, disable=not progress, desc="randomisation", file=sys.stderr):
        result = checks.model_parameter_randomisation(
            model, variables, pixels, method, sign=signs, options=options, randomised=randomised
        )
        for i, name in enumerate(names):
            for k in range(len(result.layers) + 1):
                rows.append(
                    RandomisationRow(
                        image=name,
                        method=method,
                        label=before[i].name,
                        step=k,
                        layer=result.layers[k - 1] if k else "",
                        spearman=float(result.spearman[k, i]),
                        spearman_abs=float(result.spearman_abs[k, i]),
                        ssim=float(result.ssim[k, i]),
                    )
                )
    return rows


def lipschitz_rows(
    model: Any,
    variables: Any,
    images: np.ndarray,
    names: Sequence[str],
    *,
    methods: Sequence[str],
    settings: CheckSettings,
    options: dict | None = None,
    progress: bool = False,
) -> list[LipschitzRow]:
    """Local Lipschitz estimate per image and method (`checks.local_lipschitz_estimate`)."""
    pixels, before, signs = _predicted(model, variables, images)
    rows = []
    for method in tqdm(methods, disable=not progress, desc="lipschitz", file=sys.stderr):
        result = checks.local_lipschitz_estimate(
            model,
            variables,
            pixels,
            method,
            key=_keys(settings.seed)["noise"],
            sign=signs,
            num_samples=settings.lipschitz_samples,
            sigma=settings.lipschitz_sigma,
            options=options,
        )
        rows += [
            LipschitzRow(
                image=name,
                method=method,
                label=before[i].name,
                sigma=result.sigma,
                samples=result.samples,
                lipschitz=float(result.estimate[i]),
                lipschitz_scaled=float(result.scaled[i]),
            )
            for i, name in enumerate(names)
        ]
    return rows


def _methods_of(rows: Sequence[Any]) -> list[str]:
    return list(dict.fromkeys(r.method for r in rows))


def plot_faithfulness(rows: Sequence[FaithfulnessRow], path: Path, most: int = 6) -> None:
    """Score against the fraction of patches removed, a panel per image (the first
    `most`): each method's MoRF curve, and dashed the random order's (one per image: the
    order comes from the seed and the image, not from a map)."""
    images = list(dict.fromkeys(r.image for r in rows))
    shown = images[:most]
    fig, axes = plt.subplots(1, len(shown), squeeze=False, figsize=(4.2 * len(shown), 3.8))
    for ax, image in zip(axes[0], shown):
        mine = [r for r in rows if r.image == image]
        for method in _methods_of(rows):
            curve = [r for r in mine if r.method == method]
            ax.plot(
                [r.fraction for r in curve],
                [r.score_morf for r in curve],
                "-",
                label=f"{method} (AUC {curve[0].auc_morf:.4g})",
            )
        random = [r for r in mine if r.method == mine[0].method]
        ax.plot(
            [r.fraction for r in random],
            [r.score_random for r in random],
            "--",
            color="grey",
            label=f"random order (AUC {random[0].auc_random:.4g})",
        )
        ax.set_xlabel("fraction of patches removed")
        ax.set_ylabel("explained score (sign * logit)")
        ax.set_title(f"{image}: {mine[0].label}, {mine[0].patch_size} px patches", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    more = f" (first {most} of {len(images)} images)" if len(images) > most else ""
    fig.suptitle(
        "Region perturbation: most relevant patches first (solid; lower AUC = more faithful) "
        f"vs a random order (dashed); baseline {rows[0].baseline}{more}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_randomisation(rows: Sequence[RandomisationRow], path: Path) -> None:
    """Mean similarity to the original map (over the images) against the layers
    randomised, top first, one line per method; a panel per measure."""
    measures = (
        ("spearman", "Spearman (map)"),
        ("spearman_abs", "Spearman (|map|)"),
        ("ssim", "SSIM"),
    )
    steps = sorted({r.step for r in rows})
    layers = {r.step: r.layer for r in rows}
    ticks = ["none"] + [f"+{layers[k]}" for k in steps[1:]]
    fig, axes = plt.subplots(1, len(measures), figsize=(14, 4.2))
    for ax, (field, title) in zip(axes, measures):
        for method in _methods_of(rows):
            ys = []
            for k in steps:
                values = np.array(
                    [getattr(r, field) for r in rows if r.method == method and r.step == k]
                )
                defined = values[~np.isnan(values)]
                ys.append(float(defined.mean()) if defined.size else math.nan)
            ax.plot(steps, ys, "o-", label=method)
        ax.set_xticks(steps, ticks, rotation=60, fontsize=7, ha="right")
        ax.set_ylim(-1.05, 1.05)  # Spearman and SSIM both range over [-1, 1]
        ax.set_xlabel("layers randomised (top first, cumulative)")
        ax.set_ylabel(f"{title} with the original")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        "Cascading model-parameter randomisation (Adebayo et al.): mean over images; "
        "a method that passes falls",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lipschitz(rows: Sequence[LipschitzRow], path: Path) -> None:
    """A bar per method (mean over the images, each image a dot): the estimate with the
    maps scaled to max |e(x)| = 1 (comparable across methods), and raw (log scale)."""
    methods = _methods_of(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, field, title in zip(
        axes,
        ("lipschitz_scaled", "lipschitz"),
        ("maps scaled to max |e(x)| = 1", "raw maps (log scale)"),
    ):
        for x, method in enumerate(methods):
            values = [getattr(r, field) for r in rows if r.method == method]
            ax.bar(x, float(np.mean(values)), color="tab:blue", alpha=0.6)
            ax.plot([x] * len(values), values, "k.", markersize=6)
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
        ax.set_ylabel("max ||e(x) - e(x')|| / ||x - x'||")
        ax.set_title(title)
        if field == "lipschitz" and any(r.lipschitz > 0 for r in rows):
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    first = rows[0]
    fig.suptitle(
        f"Local Lipschitz estimate: {first.samples} noisy copies, sigma {first.sigma:g} "
        "([0, 1] pixel range); bar = mean, dots = images",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean(values: Sequence[float]) -> float:
    a = np.asarray(values, np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def print_checks(
    faithfulness: Sequence[FaithfulnessRow],
    randomisation: Sequence[RandomisationRow],
    lipschitz: Sequence[LipschitzRow],
) -> None:
    """Short tables of the checks: means over the images."""
    if faithfulness:
        print(f"{'method':16s} {'AUC MoRF':>12s} {'AUC random':>12s} {'MoRF lower':>10s}")
        for method in _methods_of(faithfulness):
            firsts = [r for r in faithfulness if r.method == method and r.step == 0]
            lower = sum(r.auc_morf < r.auc_random for r in firsts)
            print(
                f"{method:16s} {_mean([r.auc_morf for r in firsts]):12.5g} "
                f"{_mean([r.auc_random for r in firsts]):12.5g} {lower:6d}/{len(firsts)}"
            )
    if randomisation:
        last = max(r.step for r in randomisation)
        print(
            f"{'method':16s} {'Spearman top':>12s} {'SSIM top':>9s} {'Spearman all':>12s} "
            f"{'SSIM all':>9s}"
        )
        for method in _methods_of(randomisation):
            top = [r for r in randomisation if r.method == method and r.step == min(1, last)]
            every = [r for r in randomisation if r.method == method and r.step == last]
            print(
                f"{method:16s} {_mean([r.spearman for r in top]):12.4f} "
                f"{_mean([r.ssim for r in top]):9.4f} "
                f"{_mean([r.spearman for r in every]):12.4f} "
                f"{_mean([r.ssim for r in every]):9.4f}"
            )
    if lipschitz:
        print(f"{'method':16s} {'Lipschitz':>12s} {'scaled':>12s}")
        for method in _methods_of(lipschitz):
            mine = [r for r in lipschitz if r.method == method]
            print(
                f"{method:16s} {_mean([r.lipschitz for r in mine]):12.5g} "
                f"{_mean([r.lipschitz_scaled for r in mine]):12.5g}"
            )

"""Tests of the checks XAI users run (jaxrepro.explain.checks) and their robustness options."""

from __future__ import annotations

import csv
import functools
import hashlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, assert_bitwise_equal, train_tiny

from jaxrepro import models
from jaxrepro.explain import checks, explain, robustness
from jaxrepro.train import probe

# ------------------------------------------------------------------ tiny models


class Linear(nn.Module):
    """f(x) = sum_hw sum_c w_c x_hwc: a 1x1 conv to one channel, summed to one logit.

    Linear in the pixels, so the true contribution of a pixel is sum_c w_c x_hwc; the
    `activation` field (never applied) lets guided backprop clone it.
    """

    activation: Callable = nn.relu

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        y = nn.Conv(1, (1, 1), use_bias=False, name="mix")(x)
        return jnp.sum(y, axis=(1, 2, 3))


WEIGHTS = np.array([0.5, -1.0, 2.0], np.float32)


@functools.cache
def linear(size: int = 16, n: int = 2):
    """(model, variables, images [n, size, size, 3] in 0..255) of the linear model."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.uniform(0.0, 255.0, (n, size, size, 3)).astype(np.float32))
    variables = {"params": {"mix": {"kernel": jnp.asarray(WEIGHTS.reshape(1, 1, 3, 1))}}}
    return Linear(), variables, images


def contributions(images) -> np.ndarray:
    """The true relevance of each pixel of the linear model: sum_c w_c x_hwc."""
    return np.einsum("nhwc,c->nhw", np.asarray(images, np.float64), WEIGHTS.astype(np.float64))


@functools.cache
def small_convnet():
    """A narrow ConvNet at 112 px (its last conv map 3x3, so Grad-CAM is not constant),
    initialised by its own initialisers from key 1 (the checks randomise from key 0)."""
    model = models.ConvNet(filters=(4, 4, 8, 8, 8))
    images = jnp.asarray(
        np.random.default_rng(1).uniform(0.0, 255.0, (2, 112, 112, 3)).astype(np.float32)
    )
    # the checks' own jitted init: the randomisation (key 0) reuses its compilation
    return model, checks.init_variables(model, jax.random.key(1), images[:1]), images


# ---------------------------------------------------------------- faithfulness


def test_patches_are_a_row_major_grid_with_smaller_edge_patches():
    ids = checks.patch_ids(5, 7, 3)
    assert ids.shape == (5, 7) and ids.max() == 2 * 3 - 1
    assert ids[0, 0] == 0 and ids[0, 6] == 2 and ids[4, 0] == 3 and ids[4, 6] == 5
    heat = np.arange(35, dtype=np.float32).reshape(1, 5, 7)
    np.testing.assert_array_equal(
        checks.patch_relevance(heat, 3)[0], [np.sum(heat[0][ids == p]) for p in range(6)]
    )
    # ties go to the lower patch index: a constant map keeps the grid order
    flat = np.ones((1, 6, 6), np.float32)
    np.testing.assert_array_equal(checks.patch_order(flat, 3, "morf")[0], np.arange(4))
    np.testing.assert_array_equal(checks.patch_order(flat, 3, "lerf")[0], np.arange(4))
    # on the ragged grid the smaller edge patches hold less of a constant map
    np.testing.assert_array_equal(
        checks.patch_order(np.ones((1, 5, 7)), 3, "morf")[0], [0, 1, 3, 4, 2, 5]
    )
    np.testing.assert_array_equal(checks.removal_counts(6, 3), [0, 2, 4, 6])
    with pytest.raises(ValueError):
        checks.patch_ids(5, 7, 0)


@pytest.mark.parametrize("baseline", ["mean", "black"])
def test_true_contributions_are_more_faithful_than_reversed_and_random_orders(baseline):
    model, variables, images = linear()
    truth = contributions(images)
    result = checks.region_perturbation(
        model, variables, images, truth, key=jax.random.key(0), patch_size=4, baseline=baseline
    )
    lerf = checks.perturbation_curve(
        model,
        variables,
        images,
        checks.patch_order(truth, 4, "lerf"),
        patch_size=4,
        baseline=baseline,
    )
    morf, rand = result.morf, result.random
    assert morf.scores.shape == (2, 16 + 1) and morf.removed.tolist() == list(range(17))
    np.testing.assert_array_equal(morf.fractions, np.arange(17) / 16)
    # Measured (mean baseline): MoRF AUC 43504 / 46708, random 45965 / 49030, LeRF 49180 /
    # 50764 for the two images.
    assert np.all(morf.auc < rand.auc) and np.all(morf.auc < lerf.auc)
    # the curve starts at the unperturbed score and ends at the all-baseline score
    logits = np.asarray(model.apply(variables, images))
    fill = np.asarray(images).mean(axis=(1, 2)) if baseline == "mean" else np.zeros((2, 3))
    all_baseline = 16 * 16 * fill @ WEIGHTS
    for curve in (morf, rand, lerf):
        np.testing.assert_allclose(curve.scores[:, 0], logits, rtol=1e-6)
        np.testing.assert_allclose(curve.scores[:, -1], all_baseline, rtol=1e-6, atol=1e-3)
    # the model is additive over patches, so MoRF removes the largest contribution
    # (relative to the baseline) first: the steps of its curve only grow (convex curve)
    steps = np.diff(morf.scores.astype(np.float64), axis=1)
    assert np.all(np.diff(steps, axis=1) >= -0.05)  # float32 rounding at ~5e4


def test_pixel_flipping_and_a_ragged_grid():
    model, variables, images = linear(size=10, n=1)
    truth = contributions(images)
    flip = checks.region_perturbation(
        model, variables, images, truth, key=jax.random.key(3), patch_size=1, baseline="black"
    )
    assert flip.morf.scores.shape == (1, 101)
    assert flip.morf.scores[0, -1] == 0.0  # every pixel black: f = 0
    assert flip.morf.auc[0] < flip.random.auc[0]
    ragged = checks.region_perturbation(
        model, variables, images, truth, key=jax.random.key(3), patch_size=4, steps=3
    )
    assert ragged.morf.removed.tolist() == [0, 3, 6, 9]  # 3 x 3 patches, the edges smaller
    with pytest.raises(ValueError, match="baseline"):
        checks.region_perturbation(
            model, variables, images, truth, key=jax.random.key(0), baseline="grey"
        )
    with pytest.raises(ValueError, match="key"):
        checks.region_perturbation(
            model, variables, images, truth, key=jax.random.key(0), baseline="uniform"
        )


class TwoClass(nn.Module):
    """A two-class head [N, 2] on the linear model's f: logits [f, 3e4 - f]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        f = Linear(name="linear")(x)
        return jnp.stack([f, jnp.float32(3e4) - f], axis=-1)


def test_a_multi_class_head_keeps_the_unperturbed_images_class():
    _, linear_variables, images = linear()
    model, variables = TwoClass(), {"params": {"linear": linear_variables["params"]}}
    truth = contributions(images)
    # black patches take f from about 4.6e4 to 0: the arg-max class flips to class 1
    # (f < 1.5e4) on the way; the curve stays the score of class 0, the predicted one
    one_logit = checks.perturbation_curve(
        Linear(),
        linear_variables,
        images,
        checks.patch_order(truth, 4),
        patch_size=4,
        baseline="black",
    )
    two = checks.perturbation_curve(
        model, variables, images, checks.patch_order(truth, 4), patch_size=4, baseline="black"
    )
    np.testing.assert_array_equal(two.scores, one_logit.scores)
    assert np.any(two.scores < 1.5e4)  # where class 1 is the arg-max
    other = checks.perturbation_curve(
        model,
        variables,
        images,
        checks.patch_order(truth, 4),
        patch_size=4,
        baseline="black",
        target=1,
    )
    np.testing.assert_array_equal(other.scores, np.float32(3e4) - one_logit.scores)
    with pytest.raises(ValueError, match="permutation"):
        checks.perturbation_curve(
            model, variables, images, np.zeros((2, 16), np.int32), patch_size=4
        )


def test_random_order_is_a_permutation_per_image_from_the_key():
    orders = checks.random_patch_order(jax.random.key(5), 3, 25)
    assert all(sorted(o) == list(range(25)) for o in orders)
    assert len({tuple(o) for o in orders}) == 3
    # image i's order does not depend on the images after it
    np.testing.assert_array_equal(checks.random_patch_order(jax.random.key(5), 1, 25), orders[:1])
    assert not np.array_equal(checks.random_patch_order(jax.random.key(6), 3, 25), orders)


# The linear model and the check in a fresh process, importing only what they need.
FAITHFULNESS_SCRIPT = """
import hashlib
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jaxrepro.explain import checks

class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, *, train=False):
        return jnp.sum(nn.Conv(1, (1, 1), use_bias=False, name="mix")(x), axis=(1, 2, 3))

w = np.array([0.5, -1.0, 2.0], np.float32)
pixels = np.random.default_rng(0).uniform(0.0, 255.0, (2, 16, 16, 3))
images = jnp.asarray(pixels.astype(np.float32))
variables = {"params": {"mix": {"kernel": jnp.asarray(w.reshape(1, 1, 3, 1))}}}
truth = np.einsum("nhwc,c->nhw", np.asarray(images, np.float64), w.astype(np.float64))
r = checks.region_perturbation(Linear(), variables, images, truth, key=jax.random.key(0),
                               patch_size=4, baseline="uniform", baseline_key=jax.random.key(9))
data = b"".join(np.ascontiguousarray(a).tobytes()
                for a in (r.morf.scores, r.morf.auc, r.random.scores, r.random.auc))
print(hashlib.sha256(data).hexdigest())
"""


def test_faithfulness_is_bitwise_reproducible_in_this_and_a_fresh_process():
    model, variables, images = linear()

    def once():
        r = checks.region_perturbation(
            model,
            variables,
            images,
            contributions(images),
            key=jax.random.key(0),
            patch_size=4,
            baseline="uniform",
            baseline_key=jax.random.key(9),
        )
        return r.morf.scores, r.morf.auc, r.random.scores, r.random.auc

    first, again = once(), once()
    assert_bitwise_equal(first, again)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in first))
    fresh = subprocess.run(
        [sys.executable, "-c", FAITHFULNESS_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert fresh.stdout.strip() == digest.hexdigest()


# --------------------------------------------------------------- randomisation


def test_layers_are_the_probes_call_order_and_randomisation_is_cascading():
    model, variables, images = small_convnet()
    layers = checks.parameterised_layers(model, variables, images)
    assert layers == probe.call_order(model, variables, images)["layers"]
    assert layers == ["conv1", "conv2", "conv3", "conv4", "conv5", "dense"]
    steps = checks.cascading_randomisation(model, variables, images, seed=0)
    assert [layer for layer, _ in steps] == layers[::-1]  # top first
    for k, (_, randomised) in enumerate(steps, start=1):
        changed = [
            name
            for name in layers
            if not np.array_equal(
                randomised["params"][name]["kernel"], variables["params"][name]["kernel"]
            )
        ]
        assert sorted(changed) == sorted(layers[::-1][:k])


@pytest.mark.parametrize("method", ["gradcam", "guided-backprop"])
def test_randomisation_changes_the_maps(method):
    model, variables, images = small_convnet()
    result = checks.model_parameter_randomisation(
        model, variables, images, method, seed=0, keep_maps=True
    )
    original = np.asarray(explain(method, model, variables, images[:1]))[0]
    assert_bitwise_equal(result.maps[0, 0], original)  # step 0: the same map
    assert result.spearman.shape == (7, 2) and result.layers[0] == "dense"
    for measure in (result.spearman, result.spearman_abs, result.ssim):
        assert np.all(measure[0] == 1.0)  # exactly: the same map
    # Measured at the last step (all six layers randomised), images 0 / 1:
    #   gradcam: the map is all zero from 3 layers on (Spearman undefined: NaN), SSIM 0 / 0
    #            (after one layer: Spearman 0.932 / 0.905, SSIM 0.930 / 0.983);
    #   guided-backprop: Spearman 0.128 / 0.161, |.| 0.429 / 0.494, SSIM 0.690 / 0.563
    #            (it keeps much of its structure: Adebayo et al.'s finding).
    last = result.ssim[-1]
    if method == "gradcam":
        assert np.all(last < 0.1)
        assert not np.any(result.spearman[-1] >= 0.5)  # NaN (constant map) or low
    else:
        assert np.all(last < 0.8) and np.all(result.spearman[-1] < 0.3)
        assert np.all(result.spearman[1:] < 0.9) and np.all(np.diff(result.ssim, axis=0) < 0)
    again = checks.model_parameter_randomisation(
        model, variables, images, method, seed=0, keep_maps=True
    )
    assert_bitwise_equal(
        (result.maps, result.spearman, result.spearman_abs, result.ssim),
        (again.maps, again.spearman, again.spearman_abs, again.ssim),
    )


def test_similarities_of_hand_made_maps():
    a = np.arange(64, dtype=np.float64).reshape(8, 8)
    assert checks.spearman(a, a) == 1.0 and checks.spearman(a, -a) == -1.0
    assert checks.spearman(a, a**3) == 1.0  # ranks only
    assert np.isnan(checks.spearman(a, np.zeros_like(a)))
    assert checks.ssim(a / 63, a / 63, 1.0) == 1.0
    assert checks.ssim(a / 63, np.zeros_like(a), 1.0) < 0.1


# ------------------------------------------------------------------- Lipschitz


def test_lipschitz_of_a_linear_model_by_hand():
    model, variables, images = linear()
    key = jax.random.key(4)
    ig = checks.local_lipschitz_estimate(
        model, variables, images, "ig", key=key, num_samples=3, sigma=0.1, options={"steps": 2}
    )
    # IG from a black baseline is exact for a linear model: e(x) = sum_c w_c x_c, so
    # e(x) - e(x') = sum_c w_c (x - x')_c, whatever x is.
    expected = []
    for i in range(2):
        ratios = []
        for s in range(3):
            z = np.asarray(checks.lipschitz_noise(key, i, s, (16, 16, 3), jnp.float32))
            noisy = np.asarray(images[i] + jnp.float32(25.5) * jnp.asarray(z), np.float64)
            delta = noisy - np.asarray(images[i], np.float64)
            change = np.linalg.norm(np.einsum("hwc,c->hw", delta, WEIGHTS.astype(np.float64)))
            ratios.append(change / (np.linalg.norm(delta) / 255.0))
        expected.append(max(ratios))
    # Measured: 360.1 and 328.1 (at most 255 * |w| = 585.6 for any direction).
    np.testing.assert_allclose(ig.estimate, expected, rtol=1e-4)
    assert np.all(ig.estimate <= 255 * np.linalg.norm(WEIGHTS))
    assert ig.ratios.shape == (2, 3)
    # guided backprop of a ReLU-free model is the gradient, w: it does not depend on x
    gb = checks.local_lipschitz_estimate(
        model, variables, images, "guided-backprop", key=key, num_samples=3
    )
    np.testing.assert_array_equal(gb.estimate, [0.0, 0.0])
    np.testing.assert_array_equal(gb.scaled, [0.0, 0.0])
    again = checks.local_lipschitz_estimate(
        model, variables, images, "ig", key=key, num_samples=3, sigma=0.1, options={"steps": 2}
    )
    assert_bitwise_equal(
        (ig.estimate, ig.scaled, ig.ratios), (again.estimate, again.scaled, again.ratios)
    )
    other = checks.local_lipschitz_estimate(
        model, variables, images, "ig", key=jax.random.key(5), num_samples=3, options={"steps": 2}
    )
    assert not np.array_equal(other.ratios, ig.ratios)
    with pytest.raises(ValueError):
        checks.local_lipschitz_estimate(model, variables, images, "ig", key=key, num_samples=0)


# ------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny ConvNet run at 80 px, one epoch (as tests/test_explain.py trains one)."""
    path = tmp_path_factory.mktemp("checks_run") / "convnet"
    train_tiny("convnet", path, "num_epochs=1")
    return path


def test_checks_cli_writes_csvs_and_plots(trained_run, tmp_path, capsys):
    out = tmp_path / "checks"
    args = [
        str(trained_run),
        "--images",
        "2",
        "--methods",
        "gradcam,guided-backprop",
        "--faithfulness",
        "--patch-size",
        "20",
        "--randomisation",
        "--lipschitz",
        "--lipschitz-samples",
        "2",
        "--no-progress",
    ]
    assert robustness.main([*args, "--out", str(out)]) == 0
    for name in ("faithfulness", "randomisation", "lipschitz"):
        assert (out / f"{name}.png").stat().st_size > 0
    assert not (out / "robustness.csv").exists()  # the checks run instead of the protocol
    with open(out / "faithfulness.csv", newline="") as f:
        faith = list(csv.DictReader(f))
    assert len(faith) == 2 * 2 * (16 + 1)  # images x methods x (patches + 1)
    assert [(r["method"], r["step"], r["removed"]) for r in faith[:2]] == [
        ("gradcam", "0", "0"),
        ("gradcam", "1", "1"),
    ]
    assert {r["image"].split("_")[0] for r in faith} == {"val0000", "val0001"}
    assert all(r["score_morf"] == r["score_random"] for r in faith if r["step"] == "0")
    with open(out / "randomisation.csv", newline="") as f:
        rand = list(csv.DictReader(f))
    assert len(rand) == 2 * 2 * (6 + 1)  # images x methods x (layers + 1)
    assert [r["layer"] for r in rand[:7]] == [
        "",
        "dense",
        "conv5",
        "conv4",
        "conv3",
        "conv2",
        "conv1",
    ]
    assert all(float(r["ssim"]) == 1.0 for r in rand if r["step"] == "0")
    with open(out / "lipschitz.csv", newline="") as f:
        lip = list(csv.DictReader(f))
    assert [(r["method"], r["samples"], r["sigma"]) for r in lip] == [
        ("gradcam", "2", "0.1"),
        ("gradcam", "2", "0.1"),
        ("guided-backprop", "2", "0.1"),
        ("guided-backprop", "2", "0.1"),
    ]
    assert all(float(r["lipschitz"]) >= 0 for r in lip)
    printed = capsys.readouterr().out
    assert "AUC MoRF" in printed and "SSIM all" in printed and "Lipschitz" in printed
    # reruns write the same bytes (the randomisation's are tested without the CLI)
    again = [a for a in args if a != "--randomisation"]
    assert robustness.main([*again, "--out", str(tmp_path / "again")]) == 0
    for name in ("faithfulness", "lipschitz"):
        assert (tmp_path / "again" / f"{name}.csv").read_bytes() == (
            out / f"{name}.csv"
        ).read_bytes()


@pytest.mark.parametrize(
    "bad",
    [
        ["--faithfulness", "--patch-size", "0"],
        ["--faithfulness", "--patch-size", "81"],
        ["--faithfulness", "--baseline", "grey"],
        ["--faithfulness", "--patch-size", "20", "--faithfulness-steps", "17"],
        ["--lipschitz", "--lipschitz-samples", "0"],
        ["--lipschitz", "--lipschitz-sigma", "-0.1"],
        ["--lipschitz", "--lipschitz-sigma", "nan"],
        ["--patch-size", "4"],  # an option of a check not asked for
        ["--randomisation", "--correctness"],
    ],
)
def test_checks_cli_bad_values_exit_2(trained_run, tmp_path, capsys, bad):
    assert robustness.main([str(trained_run), *bad, "--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err

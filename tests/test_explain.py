"""Tests of the explanation methods (jaxrepro.explain), their CLI and the robustness protocol."""

import csv
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_bitwise_equal, run_cli, train_tiny
from PIL import Image

from jaxrepro import models, train
from jaxrepro.data.images import decode_rgb
from jaxrepro.explain import METHODS, explain, ig, lrp, metrics, prediction, robustness
from jaxrepro.explain import gradcam as gc
from jaxrepro.explain.cli import main as explain_main
from jaxrepro.models.spec import GradcamLayer

# Narrow models at sizes where the last conv map is 3x3 (at the CLI's 80 px the
# ConvNet's is 1x1, which would make every Grad-CAM map constant).
TINY_MODELS = {
    "convnet": (lambda: models.ConvNet(filters=(4, 4, 8, 8, 8)), 112),
    "minixception": (lambda: models.MiniXception(sizes=(4, 4, 8, 8, 8), stem_features=4), 96),
}
# Methods that do not need the LRP module (merged separately).
LOCAL_METHODS = ["gradcam", "guided-backprop", "guided-gradcam", "ig"]


@functools.cache
def _jitted(name: str):
    """(model, jitted apply) of a narrow model (compiled once per session)."""
    model = TINY_MODELS[name][0]()
    return model, jax.jit(functools.partial(model.apply, train=False))


def _random_leaf(path, shape, rng) -> np.ndarray:
    """Glorot-uniform kernels, small random biases, BN at its initial values."""
    leaf = jax.tree_util.keystr(path)
    if "scale" in leaf or "'var'" in leaf:
        return np.ones(shape, np.float32)
    if "'mean'" in leaf or ("bn_" in leaf and "bias" in leaf):
        return np.zeros(shape, np.float32)
    if "kernel" in leaf:
        limit = np.sqrt(6.0 / (np.prod(shape[:-1]) + shape[-1]))
        return rng.uniform(-limit, limit, shape).astype(np.float32)
    return rng.uniform(-0.1, 0.1, shape).astype(np.float32)


# Seeds whose random weights give a Grad-CAM map with both signs on every image (so
# explaining "dog" and "cat" each highlights something); checked in the sign test.
SEEDS = {"convnet": 1, "minixception": 2}


@functools.cache
def tiny(name: str, seed: int | None = None):
    """(model, variables, images [2, S, S, 3] in 0..255) of a narrow random model.

    Weights from an explicit NumPy generator (compiling `init` costs ~5 s a model).
    """
    model, _ = _jitted(name)
    size = TINY_MODELS[name][1]
    rng = np.random.default_rng(SEEDS[name] if seed is None else seed)
    images = jnp.asarray(rng.uniform(0.0, 255.0, (2, size, size, 3)).astype(np.float32))
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), images[:1]
    )
    variables = jax.tree_util.tree_map_with_path(
        lambda p, s: jnp.asarray(_random_leaf(p, s.shape, rng)), shapes
    )
    return model, variables, images


def logits_of(name, variables, images):
    return _jitted(name)[1](variables, images)


def head_reference(name: str, model, variables, images, sign):
    """A and d(sign*logit)/dA by splitting the model by hand at its last conv."""
    _, state = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))(
        variables, images
    )
    act = models.flat_intermediates(state["intermediates"])[gc.gradcam_layer(model).activation]
    dense = variables["params"]["dense"]

    def head(a):  # the layers after the last conv, written out
        features = a.reshape(a.shape[0], -1) if name == "convnet" else jnp.mean(a, axis=(1, 2))
        return (features @ dense["kernel"] + dense["bias"])[:, 0]

    logits = jax.jit(head)(act)
    np.testing.assert_allclose(logits, logits_of(name, variables, images), rtol=1e-5)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(jnp.asarray(sign) * head(a))))(act)
    return act, grad


# --------------------------------------------------------------------- Grad-CAM


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradcam_matches_hand_written_reference(name, sign):
    model, variables, images = tiny(name)
    act, grad = head_reference(name, model, variables, images, sign)
    assert act.shape[1:3] == (3, 3)
    got_act, got_grad, _ = gc.last_conv_gradient(model, variables, images, sign=sign)
    np.testing.assert_array_equal(got_act, act)
    np.testing.assert_allclose(got_grad, grad, rtol=1e-5, atol=1e-7)

    weights = grad.mean(axis=(1, 2))  # alpha_k
    raw = np.maximum(np.einsum("nhwc,nc->nhw", act, weights), 0.0)  # ReLU(sum alpha A)
    top = raw.max(axis=(1, 2), keepdims=True)
    low = np.where(top > 0, raw / np.where(top > 0, top, 1), 0)
    expected = jax.image.resize(low, (2, *images.shape[1:3]), method="linear")
    heat = gc.gradcam(model, variables, images, sign=sign)
    assert heat.shape == (2, *images.shape[1:3]) and heat.dtype == jnp.float32
    np.testing.assert_allclose(heat, expected, atol=1e-5)
    assert float(heat.min()) >= 0.0 and float(heat.max()) <= 1.0


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_gradcam_sign_flips_which_channels_count(name):
    model, variables, images = tiny(name)
    act, g_dog, _ = gc.last_conv_gradient(model, variables, images, sign=1.0)
    _, g_cat, _ = gc.last_conv_gradient(model, variables, images, sign=-1.0)
    np.testing.assert_array_equal(g_cat, -g_dog)
    dog, cat = gc.cam(act, g_dog), gc.cam(act, g_cat)
    # ReLU(s) and ReLU(-s): both non-empty here, never positive at the same place.
    assert np.all(np.asarray(dog).max(axis=(1, 2)) > 0)
    assert np.all(np.asarray(cat).max(axis=(1, 2)) > 0)
    assert not np.any((np.asarray(dog) > 0) & (np.asarray(cat) > 0))
    heat_dog = gc.gradcam(model, variables, images, sign=1.0)
    heat_cat = gc.gradcam(model, variables, images, sign=-1.0)
    assert np.abs(np.asarray(heat_dog) - np.asarray(heat_cat)).max() > 0.1
    # A per-image sign explains each image's own class.
    mixed = gc.gradcam(model, variables, images, sign=jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(mixed[0], heat_dog[0], atol=1e-6)
    np.testing.assert_allclose(mixed[1], heat_cat[1], atol=1e-6)


def test_gradcam_all_zero_map_stays_zero_and_max_is_one():
    maps = jnp.array([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [1.0, 0.5]]])
    out = np.asarray(gc.normalise_max(maps))
    np.testing.assert_array_equal(out[0], 0.0)
    np.testing.assert_array_equal(out[1], [[0.0, 1.0], [0.5, 0.25]])


def test_gradcam_rejects_a_model_without_spec_untraced_and_a_layer_it_does_not_meet(
    monkeypatch,
):
    with pytest.raises(ValueError, match="needs the variables and images"):
        gc.gradcam_layer(models.SeparableConv(4))
    monkeypatch.setattr(
        gc,
        "gradcam_layer",
        lambda model, *args: GradcamLayer("conv5_out", "conv9", "output"),
    )
    model, variables, images = tiny("convnet")
    with pytest.raises(ValueError, match="met 0 times"):
        # a shape no other test uses, so jit traces again with the patched cut
        gc.last_conv_gradient(model, variables, jnp.concatenate([images, images[:1]]))


# --------------------------------------------------------------- guided backprop


def test_guided_relu_backward_zeroes_negative_gradients_and_inputs():
    x = jnp.array([-1.0, 2.0, 3.0, -4.0, 5.0])
    upstream = jnp.array([5.0, -6.0, 7.0, 8.0, 0.0])
    y, vjp = jax.vjp(gc.guided_relu, x)
    np.testing.assert_array_equal(y, [0.0, 2.0, 3.0, 0.0, 5.0])
    np.testing.assert_array_equal(vjp(upstream)[0], [0.0, 0.0, 7.0, 0.0, 0.0])
    # the plain ReLU passes the negative gradient at a positive input
    np.testing.assert_array_equal(
        jax.vjp(jax.nn.relu, x)[1](upstream)[0], [0.0, -6.0, 7.0, 0.0, 0.0]
    )


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_guided_backprop_is_not_the_plain_gradient(name):
    model, variables, images = tiny(name)
    guided = gc.guided_backprop_attribution(model, variables, images)
    plain = jax.jit(jax.grad(lambda x: jnp.sum(logits_of(name, variables, x))))(images)
    assert guided.shape == images.shape
    assert np.abs(np.asarray(guided)).max() > 0
    assert not np.allclose(guided, plain)
    np.testing.assert_allclose(
        gc.guided_backprop(model, variables, images),
        np.asarray(guided).sum(-1),
        rtol=1e-5,
        atol=1e-9,
    )


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_guided_gradcam_is_guided_backprop_times_gradcam(name):
    model, variables, images = tiny(name)
    sign = jnp.array([1.0, -1.0])
    product = np.asarray(gc.guided_backprop(model, variables, images, sign=sign)) * np.asarray(
        gc.gradcam(model, variables, images, sign=sign)
    )
    got = gc.guided_gradcam(model, variables, images, sign=sign)
    np.testing.assert_array_equal(got, product)
    assert np.abs(product).max() > 0


# ---------------------------------------------------------- integrated gradients


def _analytic(x):
    """A smooth non-linear function, one value per example."""
    flat = x.reshape(x.shape[0], -1)
    return jnp.sum(jnp.sin(flat) ** 2 + 0.1 * flat**3 + flat[:, :1] * flat, axis=1)


@pytest.mark.parametrize("rule", ig.RULES)
def test_ig_completeness_on_an_analytic_function(rule):
    x = jax.random.uniform(jax.random.key(0), (3, 4, 4, 3), minval=-1.0, maxval=1.0)
    baseline = jnp.full_like(x, 0.25)
    gap = np.asarray(_analytic(x) - _analytic(baseline))
    errors = []
    for steps in (4, 16, 64):
        attr = ig.integrated_gradients_fn(_analytic, x, baseline, steps=steps, rule=rule)
        errors.append(np.abs(np.asarray(attr.sum(axis=(1, 2, 3))) - gap).max())
    assert errors[2] < 2e-3 * np.abs(gap).max()
    assert errors[0] > errors[1] > errors[2]  # O(1/steps^2): about 16x per step
    assert errors[0] / errors[2] > 100


def test_ig_is_exact_for_a_linear_function():
    w = jax.random.normal(jax.random.key(1), (2 * 3 * 3,))
    f = lambda x: x.reshape(x.shape[0], -1) @ w  # noqa: E731
    x = jax.random.normal(jax.random.key(2), (2, 2, 3, 3))
    attr = ig.integrated_gradients_fn(f, x, steps=3)
    np.testing.assert_allclose(attr, x * w.reshape(2, 3, 3), rtol=1e-5, atol=1e-6)


def test_ig_quadrature_weights():
    a, w = ig.quadrature(4, "trapezoid")
    np.testing.assert_array_equal(a, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_array_equal(w, [0.125, 0.25, 0.25, 0.25, 0.125])
    a, w = ig.quadrature(2, "midpoint")
    np.testing.assert_array_equal(a, [0.25, 0.75])
    np.testing.assert_array_equal(w, [0.5, 0.5])
    with pytest.raises(ValueError):
        ig.quadrature(0)


def test_ig_completeness_error_on_the_convnet_shrinks_with_steps():
    model, variables, images = tiny("convnet")
    sign = jnp.array([1.0, -1.0])
    gap = sign * (
        logits_of("convnet", variables, images)
        - logits_of("convnet", variables, jnp.zeros_like(images))
    )
    errors = [
        np.abs(
            np.asarray(
                ig.integrated_gradients(model, variables, images, sign=sign, steps=steps).sum(
                    axis=(1, 2)
                )
                - gap
            )
        )
        for steps in (2, 16, 128)
    ]
    assert np.all(errors[0] > errors[1]) and np.all(errors[1] > errors[2])
    assert np.all(errors[2] < 0.02 * np.abs(np.asarray(gap)))


def test_ig_chunking_does_not_change_what_is_integrated():
    model, variables, images = tiny("convnet")
    a = ig.integrated_gradients(model, variables, images, steps=6, chunk=7)
    b = ig.integrated_gradients(model, variables, images, steps=6, chunk=2)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- bits


@pytest.mark.parametrize("method", LOCAL_METHODS)
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_each_method_gives_the_same_bits_twice(method, name):
    model, variables, images = tiny(name)
    options = {"steps": 4} if method == "ig" else {}
    first = explain(method, model, variables, images, sign=-1.0, **options)
    again = explain(method, model, variables, jnp.array(np.asarray(images)), sign=-1.0, **options)
    assert first.shape == images.shape[:3] and first.dtype == jnp.float32
    assert np.abs(np.asarray(first)).max() > 0
    assert_bitwise_equal(first, again)


def test_registry_names_every_method():
    assert sorted(METHODS) == sorted([*LOCAL_METHODS, "lrp", "lime"])
    with pytest.raises(ValueError, match="valid methods"):
        explain("saliency", *tiny("convnet"))


def test_lrp_entry_is_the_lrp_module_with_sign_and_composite():
    model, variables, images = tiny("convnet")
    heat = explain("lrp", model, variables, images, sign=-1.0, composite="epsilon", steps=9)
    direct = lrp.heatmap(lrp.attribute(model, variables, images, sign=-1.0, composite="epsilon"))
    assert_bitwise_equal(heat, direct)  # `steps` is not an lrp option
    other = explain("lrp", model, variables, images, sign=-1.0, composite="lrp0")
    assert not np.array_equal(np.asarray(heat), np.asarray(other))


# ------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """The one tiny training run of this file: a ConvNet at 80 px, one epoch (4 steps)."""
    path = tmp_path_factory.mktemp("explain_run") / "convnet"
    train_tiny("convnet", path, "num_epochs=1")
    return path


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict[str, Path]:
    """An 80x80 PNG, a 64x50 PNG, that one resized by decode_rgb, and a broken file."""
    base = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    files = {
        "square": base / "square.png",
        "small": base / "small.png",
        "small_resized": base / "small_resized.png",
        "broken": base / "broken.png",
    }
    Image.fromarray(rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(files["square"])
    Image.fromarray(rng.integers(0, 256, (50, 64, 3), dtype=np.uint8)).save(files["small"])
    Image.fromarray(decode_rgb(files["small"].read_bytes(), 80)).save(files["small_resized"])
    files["broken"].write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    return files


def test_cli_writes_png_and_npy_prints_prediction_and_resizes(
    trained_run, image_files, tmp_path, capsys
):
    out = tmp_path / "out"
    args = [
        str(trained_run),
        str(image_files["square"]),
        str(image_files["small"]),
        str(image_files["small_resized"]),
        "--method",
        "gradcam",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert explain_main(args) == 0
    printed = capsys.readouterr().out
    trained = train.load(trained_run)
    pixels = decode_rgb(image_files["square"].read_bytes(), 80)[None].astype(np.float32)
    expected = prediction.predict(trained.model, trained.variables, pixels)[0]
    assert f"square.png: predicted {expected}" in printed
    assert f"p={expected.probability:.4f}, logit={expected.logit:+.6g}" in printed
    assert "[resized 64x50 -> 80x80]" in printed
    for stem, size in (("square", (80, 80)), ("small", (64, 50)), ("small_resized", (80, 80))):
        heat = np.load(out / f"{stem}.gradcam.npy", allow_pickle=False)
        assert heat.shape == (80, 80) and heat.dtype == np.float32  # the model's size
        with Image.open(out / f"{stem}.gradcam.png") as png:  # drawn on the original
            assert png.size == size and png.mode == "RGB"
        placed = json.loads((out / f"{stem}.gradcam.json").read_text())
        assert placed["map_shape"] == [80, 80]
        assert placed["original_size"] == {"width": size[0], "height": size[1]}
        assert placed["map_pixel_to_original"]["col_scale"] == size[0] / 80
    # the 64x50 image went through the one resize rule: same pixels, same heatmap bytes
    assert (out / "small.gradcam.npy").read_bytes() == (
        out / "small_resized.gradcam.npy"
    ).read_bytes()


def test_cli_npy_files_are_byte_identical_across_processes(trained_run, image_files, tmp_path):
    args = [
        str(image_files["square"]),
        str(image_files["small"]),
        "--method",
        "ig",
        "--steps",
        "4",
        "--class",
        "dog",
        "--no-progress",
    ]
    assert explain_main([str(trained_run), *args, "--out", str(tmp_path / "here")]) == 0
    run_cli("jaxrepro.explain", str(trained_run), *args, "--out", str(tmp_path / "there"))
    for stem in ("square", "small"):
        here = (tmp_path / "here" / f"{stem}.ig.npy").read_bytes()
        assert here == (tmp_path / "there" / f"{stem}.ig.npy").read_bytes()
        assert np.abs(np.load(tmp_path / "here" / f"{stem}.ig.npy")).max() > 0


def test_cli_explains_with_lrp_and_a_composite(trained_run, image_files, tmp_path, capsys):
    args = [str(trained_run), str(image_files["square"]), "--method", "lrp", "--no-progress"]
    assert explain_main([*args, "--composite", "epsilon", "--out", str(tmp_path / "e")]) == 0
    assert "square.png: predicted" in capsys.readouterr().out
    eps = np.load(tmp_path / "e" / "square.lrp.npy", allow_pickle=False)
    assert eps.shape == (80, 80) and np.abs(eps).max() > 0
    assert explain_main([*args, "--composite", "lrp0", "--out", str(tmp_path / "z")]) == 0
    assert not np.array_equal(eps, np.load(tmp_path / "z" / "square.lrp.npy"))


def test_cli_unreadable_image_exits_2_with_a_clear_message(
    trained_run, image_files, tmp_path, capsys
):
    code = explain_main(
        [
            str(trained_run),
            str(image_files["square"]),
            str(image_files["broken"]),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert f"cannot read image {image_files['broken']}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written before the check
    assert explain_main([str(trained_run), str(tmp_path / "missing.png")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_cli_bad_layer_or_composite_exits_2_naming_the_choices(
    trained_run, image_files, tmp_path, capsys
):
    square = str(image_files["square"])
    out = ["--out", str(tmp_path / "o"), "--no-progress"]
    assert explain_main([str(trained_run), square, "--layer", "conv9", *out]) == 2
    err = capsys.readouterr().err
    assert "no conv-like layer 'conv9'" in err and "conv5" in err and "Traceback" not in err
    assert explain_main([str(trained_run), square, "--method", "lrp", "--composite", "x"]) == 2
    err = capsys.readouterr().err
    assert "--composite: unknown composite 'x'" in err and "epsilon-plus-flat" in err
    # a real module path of the paper's ConvNet is taken as Grad-CAM's layer
    assert explain_main([str(trained_run), square, "--layer", "conv4", *out]) == 0
    assert np.load(tmp_path / "o" / "square.gradcam.npy").shape == (80, 80)


def test_cli_missing_run_exits_2(image_files, tmp_path, capsys):
    assert explain_main([str(tmp_path / "no_run"), str(image_files["square"])]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "not_a_run").mkdir()
    assert explain_main([str(tmp_path / "not_a_run"), str(image_files["square"])]) == 2
    assert "neither a run directory" in capsys.readouterr().err


# ------------------------------------------------------------------ robustness


def test_rotation_is_counter_clockwise_and_exact_at_0_and_90_degrees():
    image = np.arange(5 * 5, dtype=np.float32).reshape(1, 5, 5, 1)
    assert_bitwise_equal(np.asarray(robustness.rotate(image, 0.0)), image)
    np.testing.assert_array_equal(
        robustness.rotate(image, 90.0)[0, :, :, 0], np.rot90(image[0, :, :, 0])
    )
    assert robustness.crop_box(80, 0.0) == (0, 80)
    assert robustness.crop_box(80, 45.0) == (12, 68)  # 80 / sqrt(2) = 56.6 -> 56


def test_noise_reruns_bit_for_bit_and_differs_with_another_seed():
    _, _, images = tiny("convnet")
    image = images[:1]
    first = robustness.transforms(image, 3, angles=(), sigmas=(0.05, 1.0), seed=11)
    again = robustness.transforms(image, 3, angles=(), sigmas=(0.05, 1.0), seed=11)
    other = robustness.transforms(image, 3, angles=(), sigmas=(0.05, 1.0), seed=12)
    assert_bitwise_equal([t.image for t in first], [t.image for t in again])
    assert not np.array_equal(first[0].image, other[0].image)
    # sigma is in units of the [0, 1] pixel range: std 255 * sigma on 0..255 pixels
    noise = np.asarray(first[1].image - image)
    assert 0.9 * 255 < noise.std() < 1.1 * 255
    zero = robustness.transforms(image, 3, angles=(0.0,), sigmas=(0.0,), seed=11)
    for t in zero:
        assert_bitwise_equal(t.image, image)


def test_protocol_rmse_is_exactly_zero_at_angle_0_and_sigma_0():
    model, variables, images = tiny("convnet")
    rows = robustness.protocol(
        model,
        variables,
        np.asarray(images[:1]),
        ["img"],
        methods=LOCAL_METHODS,
        angles=(0.0, 5.0),
        sigmas=(0.0, 0.05),
        seed=0,
        options={"steps": 2},
    )
    assert [(r.method, r.transform, r.amount) for r in rows] == [
        (m, kind, a)
        for m in LOCAL_METHODS
        for kind, a in (("rotation", 0.0), ("rotation", 5.0), ("noise", 0.0), ("noise", 0.05))
    ]
    for r in rows:
        if r.amount == 0.0:
            assert r.rmse == 0.0 and not r.label_changed and r.crop == 112
        else:
            assert r.rmse > 0.0
    assert {r.crop for r in rows if r.transform == "rotation" and r.amount == 5.0} == {103}


def test_robustness_cli_writes_csv_and_plots(trained_run, tmp_path, capsys):
    out = tmp_path / "rob"
    code = robustness.main(
        [
            str(trained_run),
            "--images",
            "2",
            "--methods",
            "gradcam,ig",
            "--steps",
            "2",
            "--angles",
            "0,10",
            "--sigmas",
            "0,0.05,1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    with open(out / "robustness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["transform"], float(r["amount"])) for r in rows[:5]] == [
        ("gradcam", "rotation", 0.0),
        ("gradcam", "rotation", 10.0),
        ("gradcam", "noise", 0.0),
        ("gradcam", "noise", 0.05),
        ("gradcam", "noise", 1.0),
    ]
    assert len(rows) == 2 * 2 * 5  # images x methods x transforms
    names = sorted({r["image"] for r in rows})  # val<index>_<true class>
    assert [n.split("_")[0] for n in names] == ["val0000", "val0001"]
    zero = [r for r in rows if float(r["amount"]) == 0.0]
    assert len(zero) == 2 * 2 * 2 and all(float(r["rmse"]) == 0.0 for r in zero)
    assert all(r["label_changed"] in ("True", "False") for r in rows)
    for name in names:
        for kind in ("rotation", "noise"):
            assert (out / f"{name}.{kind}.png").stat().st_size > 0
            assert (out / f"{name}.{kind}.heatmaps.png").stat().st_size > 0
    for kind in ("rotation", "noise"):
        assert (out / f"all.{kind}.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "predicted" in printed and "label changed at:" in printed
    # the protocol reruns bit for bit; another seed changes only the noise rows
    same = [
        str(trained_run),
        "--images",
        "2",
        "--methods",
        "gradcam,ig",
        "--steps",
        "2",
        "--angles",
        "0,10",
        "--sigmas",
        "0,0.05,1",
        "--no-progress",
    ]
    assert robustness.main([*same, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "robustness.csv").read_bytes() == (
        out / "robustness.csv"
    ).read_bytes()
    assert robustness.main([*same, "--seed", "1", "--out", str(tmp_path / "seed1")]) == 0
    with open(tmp_path / "seed1" / "robustness.csv", newline="") as f:
        other = list(csv.DictReader(f))
    for a, b in zip(rows, other):
        noisy = a["transform"] == "noise" and float(a["amount"]) > 0
        assert (a["logit_after"] != b["logit_after"]) == noisy
    assert robustness.main([str(trained_run), "--methods", "saliency"]) == 2


def test_robustness_lime_vs_lrp_runs_the_thesis_small_transforms(trained_run, tmp_path):
    out = tmp_path / "lime-vs-lrp"
    args = [str(trained_run), "--lime-vs-lrp", "--images", "1", "--samples", "16"]
    assert robustness.main([*args, "--out", str(out), "--no-progress"]) == 0
    with open(out / "robustness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    amounts = {(r["transform"], float(r["amount"])) for r in rows}
    assert amounts == {("rotation", a) for a in robustness.ANGLES_SMALL} | {
        ("noise", s) for s in robustness.SIGMAS_SMALL
    }
    assert sorted({r["method"] for r in rows}) == ["lime", "lrp"]
    assert len(rows) == 2 * (4 + 10)


def test_robustness_cli_takes_image_files(trained_run, image_files, tmp_path):
    out = tmp_path / "files"
    assert (
        robustness.main(
            [
                str(trained_run),
                str(image_files["square"]),
                str(image_files["small"]),
                "--methods",
                "gradcam",
                "--angles",
                "5",
                "--sigmas",
                "",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    with open(out / "robustness.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["transform"], r["amount"]) for r in rows] == [
        ("square", "rotation", "5.0"),
        ("small", "rotation", "5.0"),
    ]
    assert robustness.main([str(trained_run), str(image_files["broken"])]) == 2


def test_correctness_cli_scores_every_method(trained_run, tmp_path, capsys):
    out = tmp_path / "cor"
    assert (
        robustness.main(
            [
                str(trained_run),
                "--correctness",
                "--images",
                "4",
                "--methods",
                "gradcam,guided-backprop",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    lines = (out / "correctness.csv").read_text().splitlines()
    assert lines[0] == "method,images,pointing_hits,pointing_rate,mass_mean,mass_defined"
    assert [line.split(",")[:2] for line in lines[1:]] == [
        ["gradcam", "4"],
        ["guided-backprop", "4"],
    ]
    assert "pointing game" in capsys.readouterr().out


# --------------------------------------------------------------------- metrics


def test_pointing_game_and_relevance_mass_on_hand_made_maps():
    heat = np.zeros((3, 4, 4), np.float32)
    masks = np.zeros((3, 4, 4), np.uint8)
    masks[:, :2, :2] = 255  # the object: top-left 2x2
    heat[0, 0, 1] = 3.0  # peak inside; all mass inside
    heat[0, 3, 3] = -5.0  # negative relevance does not count
    heat[1, 3, 3] = 4.0  # peak outside; 1 of 5 inside
    heat[1, 1, 1] = 1.0
    heat[2] = -1.0  # nothing positive: mass undefined
    np.testing.assert_array_equal(metrics.pointing_game(heat, masks), [True, False, True])
    mass = metrics.relevance_mass(heat, masks)
    np.testing.assert_allclose(mass[:2], [1.0, 0.2])
    assert np.isnan(mass[2])
    assert metrics.rmse(heat[0], heat[0]) == 0.0
    assert metrics.rmse(np.zeros((2, 2)), np.full((2, 2), 3.0)) == 3.0

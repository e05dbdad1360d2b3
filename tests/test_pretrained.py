"""The pretrained ImageNet networks against Keras, on random weights exported by Keras.

Per network, one TF process (`python -m jaxrepro.tfref pretrained-reference`) builds
`keras.applications.<Network>(weights=None)` at the smallest size the tests use, gives
it random weights under which the logits depend on the image, writes them as a legacy
`.h5` file (the format of Keras's own downloads) and computes Keras's logits and the
keras.io Grad-CAM of fixed images; `python -m jaxrepro.pretrained import` then reads the
file in a second TF process, as a user's import does. Everything else runs here.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.resources
import importlib.util
import json
import re
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from jaxrepro import cli, models, train
from jaxrepro.analysis import diff as difflib
from jaxrepro.config import ConfigError
from jaxrepro.explain import METHODS, explain, gradcam, lrp, robustness
from jaxrepro.explain import cli as explain_cli
from jaxrepro.explain.inputs import read_image
from jaxrepro.explain.prediction import logits as predict_logits
from jaxrepro.explain.prediction import ranked_class
from jaxrepro.models import imagenet
from jaxrepro.pretrained import cli as pretrained_cli
from jaxrepro.pretrained import convert, crossmachine
from jaxrepro.tfref import process
from jaxrepro.train import rundir

# The smallest input each keras.applications network takes (VGG-16's dense head then
# sees a 1x1x512 map).
SIZES = {"xception": 71, "inception_v3": 75, "vgg16": 32}
NETWORKS = tuple(SIZES)


def _images(size: int) -> np.ndarray:
    """Two smooth images (a random 6x6 grid, upsampled) and two of noise, pixels 0..255:
    through a global average pool, noise alone gives nearly the same logits for every
    image."""
    rng = np.random.default_rng(7)
    smooth = [
        np.asarray(
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
                (size, size), Image.BILINEAR
            ),
            np.float32,
        )
        for _ in range(2)
    ]
    noise = list(rng.integers(0, 256, (2, size, size, 3)).astype(np.float32))
    return np.stack(smooth + noise)


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """name -> (TrainedModel of the imported file, Keras reference, reference record, dir)."""
    out = {}
    for name in NETWORKS:
        spec, size = models.SPECS[name], SIZES[name]
        work = tmp_path_factory.mktemp(name)
        np.save(work / "images.npy", _images(size))
        r = cli.run_child(
            "jaxrepro.tfref",
            [
                "pretrained-reference",
                spec.keras_application,
                str(work / "images.npy"),
                spec.keras_gradcam_layer,
                str(work / "keras"),
                "--image-size",
                str(size),
            ],
            env=process.child_environment(process.Recipe(deterministic=False)),
            what="the Keras reference",
        )
        run = convert.import_weights(
            name, work / "keras" / "weights.h5", work / "run", image_size=size
        )
        reference = dict(np.load(work / "keras" / "reference.npz"))
        out[name] = (rundir.load(run), reference, json.loads(r.stdout), work)
    return out


@pytest.mark.parametrize("name", NETWORKS)
def test_parameter_counts_are_keras_counts_at_the_imagenet_size(networks, name):
    spec = models.SPECS[name]
    keras_counts = networks[name][2]["params"]
    x = jnp.zeros((1, spec.image_size, spec.image_size, 3))
    shapes = jax.eval_shape(lambda: spec.module().init(jax.random.key(0), x, train=False))
    assert models.count_params(shapes) == {
        "trainable": keras_counts["trainable"],
        "total": keras_counts["total"],
    }
    # the paper's and Keras's figures (Xception 22,910,480; Inception V3 23,851,784; VGG-16
    # 138,357,544 parameters)
    assert (
        keras_counts["total"]
        == {
            "xception": 22_910_480,
            "inception_v3": 23_851_784,
            "vgg16": 138_357_544,
        }[name]
    )


@pytest.mark.parametrize("name", NETWORKS)
def test_logits_and_top_k_lists_match_keras(networks, name):
    trained, reference, _, work = networks[name]
    images = np.load(work / "images.npy")
    ours = np.asarray(predict_logits(trained.model, trained.variables, images))
    theirs = reference["logits"]
    assert ours.shape == theirs.shape == (4, 1000)
    # Measured: xception 1.8e-6, inception_v3 1.2e-6, vgg16 1.2e-6 of the largest logit
    # (float32 rounding of two kernel libraries); a layout or preprocessing error is
    # of order 1.
    assert np.abs(ours - theirs).max() / np.abs(theirs).max() < 1e-5
    for row_ours, row_theirs in zip(ours, theirs):
        assert [r.index for r in imagenet.top_k(row_ours, 5)] == [
            r.index for r in imagenet.top_k(row_theirs, 5)
        ]
    # the images are told apart: the test would see a model that ignores its input
    assert len({tuple(r.index for r in imagenet.top_k(row, 5)) for row in ours}) > 1


def _vgg_head_margins(trained, images: np.ndarray) -> np.ndarray:
    """Per image, the smallest relative distance to a decision between VGG-16's Grad-CAM
    layer and its logits: fc1 and fc2 pre-activations from zero (ReLU), and the top two
    of each block5_pool window."""
    taken = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            taken[context.module.name] = out
        return out

    with nn.intercept_methods(interceptor):
        trained.model.apply(trained.variables, images, train=False)
    margins = []
    for name in ("fc1", "fc2"):
        z = np.asarray(taken[name])
        margins.append(np.abs(z).min(axis=1) / np.abs(z).max())
    a = np.asarray(taken["block5_conv3_relu"])
    n, h, w, c = a.shape
    windows = a[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
    windows = np.sort(windows.transpose(0, 1, 3, 5, 2, 4).reshape(n, -1, 4), axis=-1)
    gap = windows[..., -1] - windows[..., -2]
    live = windows[..., -1] > 0  # a window of zeros routes a zero gradient either way
    margins.append(np.where(live, gap, np.inf).min(axis=1) / a.max())
    return np.min(margins, axis=0)


@pytest.mark.parametrize("name", NETWORKS)
def test_gradcam_matches_the_keras_io_recipe(networks, name):
    trained, reference, _, work = networks[name]
    images = np.load(work / "images.npy")
    top = np.argmax(reference["logits"], axis=1)
    maps = np.asarray(gradcam.gradcam(trained.model, trained.variables, images, target=top))
    assert maps.shape == reference["gradcam"].shape == images.shape[:3]
    diffs = np.abs(maps - reference["gradcam"]).max(axis=(1, 2))
    if name == "vgg16":
        # Between A and the logit VGG-16 has ReLUs and max pooling: a unit within
        # rounding of its threshold decides differently in the two frameworks and moves
        # the map by 1e-3 (measured). Only images with no such unit are compared.
        # Xception and Inception V3 pool A globally into the dense head: no decision.
        keep = _vgg_head_margins(trained, images) > 1e-5
        assert keep.sum() >= 2
        diffs = diffs[keep]
    assert diffs.max() < 1e-4  # maps in [0, 1]


def test_every_method_explains_a_chosen_class_of_vgg16(networks):
    trained, _, _, work = networks["vgg16"]
    image = np.load(work / "images.npy")[:1]
    row = np.asarray(predict_logits(trained.model, trained.variables, image))[0]
    third = ranked_class("3", row, imagenet.class_names())
    composite = models.SPECS["vgg16"].lrp_composite
    for method in METHODS:
        options = {"composite": composite, "num_samples": 20, "batch_size": 10}
        a = np.asarray(
            explain(method, trained.model, trained.variables, image, target=third, **options)
        )
        b = np.asarray(
            explain(method, trained.model, trained.variables, image, target=int(np.argmax(row)))
            if method != "lime"
            else a
        )
        assert a.shape == (1, 32, 32) and np.isfinite(a).all() and np.abs(a).max() > 0, method
        if method not in ("lime", "gradcam"):  # Grad-CAM of a 1x1 map is flat for any class
            assert not np.array_equal(a, b), method  # the class chosen is the class explained


@pytest.mark.parametrize("name", ["xception", "inception_v3"])
def test_lrp_merges_every_batch_norm_into_its_conv(networks, name):
    trained, _, _, work = networks[name]
    image = np.load(work / "images.npy")[:1]
    plan = lrp.batchnorm_plan(trained.model, trained.variables, image)
    assert plan.unmerged == ()
    assert len(plan.merged) == {"xception": 40, "inception_v3": 94}[name]


def test_imported_checkpoint_records_its_source_and_diffs_as_identical(networks):
    trained, _, _, work = networks["xception"]
    info = json.loads((work / "run" / "pretrained.json").read_text())
    source = (work / "keras" / "weights.h5").read_bytes()
    assert info["source_sha256"] == hashlib.sha256(source).hexdigest()
    assert info["network"] == "xception" and info["keras_application"] == "Xception"
    report = difflib.diff(work / "run", work / "run" / "checkpoints" / "0")
    assert report["verdict"] == "identical"
    assert "no validation split" in report["predictions"]["skipped"]
    # a damaged checkpoint is refused, never half-loaded
    victim = max(
        (p for p in (work / "run" / "checkpoints" / "0" / "state").rglob("*") if p.is_file()),
        key=lambda p: p.stat().st_size,
    )
    damaged = work / "damaged"
    subprocess.run(["cp", "-r", str(work / "run"), str(damaged)], check=True)
    target = damaged / victim.relative_to(work / "run")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(Exception, match="damaged|could not be read"):
        rundir.load(damaged)


def test_explain_cli_prints_the_top_k_and_explains_the_kth_class(networks, tmp_path, capsys):
    trained, _, _, work = networks["vgg16"]
    picture = np.load(work / "images.npy")[0].astype(np.uint8)
    Image.fromarray(picture).resize((40, 36)).save(tmp_path / "picture.png")
    code = explain_cli.main(
        [
            str(work / "run"),
            str(tmp_path / "picture.png"),
            "--top",
            "4",
            "--class",
            "2",
            "--method",
            "guided-backprop",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    lines = [line for line in printed.splitlines() if re.match(r"\s+\d\. ", line)]
    assert [int(line.split()[0][:-1]) for line in lines] == [1, 2, 3, 4]
    second = int(lines[1].split()[1])
    assert f"explained class {second} {imagenet.class_names()[second]}" in printed
    probabilities = [float(line.split()[-1]) for line in lines]
    assert probabilities == sorted(probabilities, reverse=True)
    saved = np.load(tmp_path / "out" / "picture.guided-backprop.npy")
    pixels = read_image(tmp_path / "picture.png", 32).pixels[None].astype(np.float32)
    expected = explain("guided-backprop", trained.model, trained.variables, pixels, target=second)
    np.testing.assert_array_equal(saved, np.asarray(expected)[0])
    # a class the network has not is a user error
    assert (
        explain_cli.main([str(work / "run"), str(tmp_path / "picture.png"), "--class", "dog"]) == 2
    )


def test_import_refuses_a_file_of_another_network_and_a_truncated_file(networks, tmp_path, capsys):
    _, _, _, work = networks["vgg16"]
    vgg_file = work / "keras" / "weights.h5"
    out = tmp_path / "run"
    assert pretrained_cli.main(["import", "xception", str(vgg_file), "--out", str(out)]) == 2
    assert "layers" in capsys.readouterr().err
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(vgg_file.read_bytes()[: vgg_file.stat().st_size // 3])
    args = ["import", "vgg16", str(truncated), "--image-size", "32", "--out", str(out)]
    assert pretrained_cli.main(args) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert pretrained_cli.main(["import", "resnet50", str(vgg_file)]) == 2
    assert "valid" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "run.partial").exists()


def test_class_index_is_the_file_keras_checks():
    keras_source = importlib.util.find_spec("keras").submodule_search_locations[0]
    utils = open(f"{keras_source}/src/applications/imagenet_utils.py").read()
    recorded = re.search(r'file_hash="([0-9a-f]{32})"', utils).group(1)
    shipped = (
        importlib.resources.files("jaxrepro.models").joinpath("imagenet_class_index.json")
    ).read_bytes()
    assert hashlib.md5(shipped).hexdigest() == recorded == imagenet.CLASS_INDEX_MD5
    names = imagenet.class_names()
    assert len(names) == 1000 and names[281] == "tabby" and names[260] == "chow"


def test_ranked_class_by_rank_and_name():
    logits = np.array([0.5, 3.0, -1.0, 2.0], np.float32)
    names = ("a", "b", "c_d", "e")
    assert ranked_class("predicted", logits, names) == 1
    assert ranked_class("2", logits, names) == 3
    assert ranked_class("c d", logits, names) == 2
    with pytest.raises(ValueError, match="rank from 1 to 4"):
        ranked_class("5", logits, names)
    with pytest.raises(ValueError, match="not a rank or a class name"):
        ranked_class("zebra", logits, names)


def test_training_a_pretrained_network_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="jaxrepro.pretrained import"):
        train.train_and_evaluate(tiny_config("convnet", "model=vgg16"), tmp_path, progress=False)


def test_the_cli_lists_the_networks(capsys):
    assert pretrained_cli.main(["list"]) == 0
    printed = capsys.readouterr().out
    assert [line.split()[0] for line in printed.splitlines()] == sorted(NETWORKS)
    r = subprocess.run(
        [sys.executable, "-m", "jaxrepro.pretrained", "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0 and "never downloads" in r.stdout


def test_portable_predictions_keep_their_bits_on_one_core(networks, tmp_path):
    """The cross-machine measurement's own claim: in portable mode, the same imported
    network gives the same logits, probabilities and Grad-CAM bits with one core as
    with all (each variant a process of its own)."""
    _, _, _, work = networks["vgg16"]
    picture = np.load(work / "images.npy")[0].astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    rows = crossmachine.run_variants(
        work / "run",
        [str(tmp_path / "picture.png")],
        ["default", "one-core"],
        ["portable"],
        ["gradcam"],
        tmp_path / "out",
    )
    (row,) = rows
    assert {k: v["equal"] for k, v in row["diff"].items() if isinstance(v, dict)} == {
        "logits": True,
        "probabilities": True,
        "gradcam": True,
    }
    assert row["diff"]["max_probability_difference"] == 0.0 and row["diff"]["top5_equal"]
    assert (
        "| portable | one-core | equal | equal | equal | 0 | yes |"
        in (tmp_path / "out" / "crossmachine.md").read_text()
    )
    # the comparison sees one flipped bit
    flipped = tmp_path / "flipped.npz"
    with np.load(tmp_path / "out" / "portable" / "default" / crossmachine.PREDICTIONS) as p:
        arrays = {k: p[k].copy() for k in p.files}
    arrays["logits"].view(np.uint32)[0, 0] ^= 1
    np.savez(flipped, **arrays)
    diff = crossmachine.compare(
        tmp_path / "out" / "portable" / "default" / crossmachine.PREDICTIONS, flipped
    )
    assert not diff["logits"]["equal"] and diff["logits"]["max_ulp"] == 1


def test_the_thesis_robustness_protocol_runs_on_an_imported_network(networks, tmp_path, capsys):
    _, _, _, work = networks["vgg16"]
    picture = np.load(work / "images.npy")[0].astype(np.uint8)
    Image.fromarray(picture).save(tmp_path / "picture.png")
    args = [str(work / "run"), str(tmp_path / "picture.png"), "--out", str(tmp_path / "out")]
    small = ["--methods", "gradcam,lrp", "--angles", "5", "--sigmas", "0.05", "--no-progress"]
    assert robustness.main([*args, *small]) == 0
    with open(tmp_path / "out" / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"gradcam", "lrp"} and len(rows) == 4
    names = imagenet.class_names()
    assert all(r["label_before"] in names for r in rows)
    assert all(np.isfinite(float(r["rmse"])) for r in rows)
    # the checks take one-logit heads; an ImageNet network needs image files
    assert robustness.main([*args, "--faithfulness"]) == 2
    assert robustness.main([str(work / "run"), "--images", "2"]) == 2
    assert "give IMAGE files" in capsys.readouterr().err


def test_import_never_writes_into_a_directory_that_is_not_a_run(networks, tmp_path):
    _, _, _, work = networks["vgg16"]
    occupied = tmp_path / "documents"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    weights_file = str(work / "keras" / "weights.h5")
    with pytest.raises(convert.WeightImportError, match="not a run directory"):
        convert.import_weights("vgg16", weights_file, occupied, image_size=32, overwrite=True)
    assert (occupied / "notes.txt").read_text() == "mine"
    with pytest.raises(convert.WeightImportError, match="already holds a run"):
        convert.import_weights("vgg16", weights_file, work / "run", image_size=32)


def test_keras_3_weight_files_and_models_import_to_the_same_bits(networks, tmp_path):
    _, _, _, work = networks["vgg16"]
    legacy = rundir.load(work / "run")
    for name in ("model.weights.h5", "model.keras"):
        run = convert.import_weights("vgg16", work / "keras" / name, tmp_path / name, image_size=32)
        chex.assert_trees_all_equal(rundir.load(run).variables, legacy.variables)

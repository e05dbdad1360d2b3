"""TensorFlow reference: Keras models, Flax<->Keras transfer, forward agreement, isolation.

TF runs only in subprocesses (`python -m jaxrepro.tfref ...`); this process is a JAX one.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, assert_bitwise_equal, run_cli, tiny_config

from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro import determinism, models
from jaxrepro.analysis import export
from jaxrepro.numerics import ulp_distance
from jaxrepro.tfref import runtime, transfer, weights
from jaxrepro.train import load_data

# Each model at its tiny config's size.
SIZES = {
    name: tiny_config(name).data.image_size
    for name, spec in models.SPECS.items()
    if not spec.pretrained  # their Keras twins are keras.applications (test_pretrained)
}
# Forward agreement: float32 logits of two frameworks (different kernels, different
# summation orders) agree to a few ULP of the largest logit, not bitwise.
RTOL = 1e-4


def _json(r: subprocess.CompletedProcess) -> dict:
    return json.loads(r.stdout)


def _perturbed_variables(name: str, size: int) -> dict:
    """Initial Flax variables with batch norm moved off its identity defaults.

    Scale 1, bias 0, mean 0, var 1 would hide a swapped gamma/beta or mean/var, and
    would make moving and batch statistics hard to tell apart.
    """
    model = models.get_model(name)
    variables = jax.device_get(
        model.init(
            {"params": jax.random.key(7)}, np.zeros((1, size, size, 3), np.float32), train=False
        )
    )
    flat = weights.flatten(variables)
    rng = np.random.default_rng(11)
    for key, value in flat.items():
        noise = rng.standard_normal(value.shape).astype(np.float32)
        if key.endswith("/scale"):
            flat[key] = np.float32(1) + np.float32(0.2) * noise
        elif key.endswith("/bias") and key.split("/")[-2].startswith("bn"):
            flat[key] = np.float32(0.2) * noise
        elif key.endswith("/mean"):
            flat[key] = np.float32(0.3) * noise
        elif key.endswith("/var"):
            flat[key] = rng.uniform(0.5, 2.0, value.shape).astype(np.float32)
        elif key.endswith("dense/bias"):
            flat[key] = np.float32(0.1) * noise
    return weights.unflatten(flat)


def _images(size: int, n: int = 4) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=sorted(SIZES))
def mirrored(request, tmp_path_factory) -> dict:
    """Flax variables sent through Keras and back, with both frameworks' logits."""
    name, size = request.param, SIZES[request.param]
    tmp = tmp_path_factory.mktemp(f"tfref_{name}")
    variables = _perturbed_variables(name, size)
    images = _images(size)
    export.export_variables(variables, tmp / "flax.npz")
    np.save(tmp / "images.npy", images, allow_pickle=False)
    r = run_cli(
        "jaxrepro.tfref",
        "mirror",
        name,
        str(tmp / "flax.npz"),
        str(tmp / "back.npz"),
        "--image-size",
        str(size),
        "--images",
        str(tmp / "images.npy"),
        "--logits",
        str(tmp / "keras_logits.npy"),
        timeout=300,
    )
    model = models.get_model(name)
    return {
        "name": name,
        "size": size,
        "model": model,
        "variables": variables,
        "images": images,
        "report": _json(r),
        "back": export.import_variables(tmp / "back.npz"),
        "keras_logits": np.load(tmp / "keras_logits.npy", allow_pickle=False),
        "jax_logits": np.asarray(model.apply(variables, images, train=False)),
    }


def test_keras_parameter_counts_match_the_paper():
    counts = _json(run_cli("jaxrepro.tfref", "summary", "--image-size", "180", timeout=300))
    assert counts["convnet"]["trainable"] == 991_041
    assert counts["minixception"]["trainable"] == 718_849
    assert counts["minixception"]["total"] == 721_857
    # ... and the Flax models count the same.
    for name in ("convnet", "minixception"):
        model = models.get_model(name)
        abstract = jax.eval_shape(
            lambda m=model: m.init(
                {"params": jax.random.key(0)}, np.zeros((1, 180, 180, 3), np.float32), train=False
            )
        )
        assert models.count_params(abstract) == {k: counts[name][k] for k in ("trainable", "total")}


def test_round_trip_flax_keras_flax_is_bitwise(mirrored):
    before, after = weights.flatten(mirrored["variables"]), weights.flatten(mirrored["back"])
    assert sorted(before) == sorted(after)
    assert_bitwise_equal(mirrored["variables"], mirrored["back"])
    assert weights.sha256(before) == weights.sha256(after)


def test_keras_and_jax_logits_agree(mirrored, record_property):
    jax_logits, keras_logits = mirrored["jax_logits"], mirrored["keras_logits"]
    assert keras_logits.shape == jax_logits.shape == (4,)
    assert np.ptp(jax_logits) > 1e-3, "logits too alike to tell the images apart"
    ulp = int(ulp_distance(jax_logits, keras_logits).max())
    rel = float(np.max(np.abs(jax_logits - keras_logits)) / np.max(np.abs(jax_logits)))
    record_property("max_ulp", ulp)
    record_property("max_rel", rel)
    print(f"{mirrored['name']}: max {ulp} ULP, max relative difference {rel:.3g}")
    assert ulp >= 0 and rel <= RTOL, (jax_logits, keras_logits)


def test_batchnorm_inference_uses_moving_statistics(mirrored):
    """The agreement above is only meaningful if batch statistics would disagree."""
    if mirrored["name"] != "minixception":
        assert "batch_stats" not in mirrored["variables"]
        return
    model = mirrored["model"].clone(dropout_rate=0.0)
    with_batch_stats, _ = model.apply(
        mirrored["variables"], mirrored["images"], train=True, mutable=["batch_stats"]
    )
    gap = np.max(np.abs(np.asarray(with_batch_stats) - mirrored["jax_logits"]))
    assert gap > 100 * RTOL * np.max(np.abs(mirrored["jax_logits"]))
    np.testing.assert_allclose(
        mirrored["keras_logits"],
        mirrored["jax_logits"],
        rtol=0,
        atol=RTOL * np.max(np.abs(mirrored["jax_logits"])),
    )


def test_weight_file_refuses_pickle(tmp_path):
    np.savez(tmp_path / "evil.npz", **{"params/x": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="pickle"):
        weights.load(tmp_path / "evil.npz")
    with pytest.raises(TypeError):
        weights.save(tmp_path / "x.npz", {"params/x": np.array([None], dtype=object)})


class _Var:
    def __init__(self, name, value):
        self.name, self.value = name, np.asarray(value)
        self.shape, self.dtype = self.value.shape, self.value.dtype

    def assign(self, value):
        self.value = np.array(value)

    def numpy(self):
        return self.value


class _Layer:
    def __init__(self, name, *variables):
        self.name, self.weights = name, list(variables)


class _Model:
    def __init__(self, *layers):
        self.layers = list(layers)


def _fake_sepconv_model(channels=3, features=4):
    return _Model(
        _Layer(
            "block1_sepconv_a",
            _Var("depthwise_kernel", np.zeros((3, 3, channels, 1), np.float32)),
            _Var("pointwise_kernel", np.zeros((1, 1, channels, features), np.float32)),
        ),
        _Layer(
            "block1_bn_b",
            *(
                _Var(n, np.zeros(features, np.float32))
                for n in ("gamma", "beta", "moving_mean", "moving_variance")
            ),
        ),
    )


def test_transfer_maps_names_and_depthwise_layout():
    rng = np.random.default_rng(0)
    flat = {
        "params/block1/sepconv_a/depthwise/kernel": rng.standard_normal((3, 3, 1, 3), np.float32),
        "params/block1/sepconv_a/pointwise/kernel": rng.standard_normal((1, 1, 3, 4), np.float32),
        "params/block1/bn_b/scale": rng.standard_normal(4, np.float32),
        "params/block1/bn_b/bias": rng.standard_normal(4, np.float32),
        "batch_stats/block1/bn_b/mean": rng.standard_normal(4, np.float32),
        "batch_stats/block1/bn_b/var": rng.standard_normal(4, np.float32),
    }
    model = _fake_sepconv_model()
    transfer.load_into_keras(model, flat)
    depthwise, bn = model.layers[0].weights[0].value, model.layers[1].weights
    np.testing.assert_array_equal(
        depthwise[:, :, 2, 0], flat["params/block1/sepconv_a/depthwise/kernel"][:, :, 0, 2]
    )
    np.testing.assert_array_equal(bn[0].value, flat["params/block1/bn_b/scale"])
    np.testing.assert_array_equal(bn[3].value, flat["batch_stats/block1/bn_b/var"])
    assert_bitwise_equal(transfer.from_keras(model), flat)


def test_transfer_refuses_partial_extra_or_misshapen_weights():
    flat = {
        "params/block1/sepconv_a/depthwise/kernel": np.zeros((3, 3, 1, 3), np.float32),
        "params/block1/sepconv_a/pointwise/kernel": np.zeros((1, 1, 3, 4), np.float32),
        **{
            f"{c}/block1/bn_b/{k}": np.zeros(4, np.float32)
            for c, k in (
                ("params", "scale"),
                ("params", "bias"),
                ("batch_stats", "mean"),
                ("batch_stats", "var"),
            )
        },
    }
    transfer.load_into_keras(_fake_sepconv_model(), flat)
    missing = {k: v for k, v in flat.items() if not k.endswith("/var")}
    with pytest.raises(transfer.TransferError, match="no array"):
        transfer.load_into_keras(_fake_sepconv_model(), missing)
    with pytest.raises(transfer.TransferError, match="no variable"):
        transfer.load_into_keras(
            _fake_sepconv_model(), {**flat, "params/dense/kernel": np.zeros(1)}
        )
    wrong = {**flat, "params/block1/sepconv_a/depthwise/kernel": np.zeros((3, 3, 3, 1), np.float32)}
    with pytest.raises(transfer.TransferError, match="does not fit"):
        transfer.load_into_keras(_fake_sepconv_model(), wrong)


def test_recipe_environment_is_listing_1():
    on = runtime.child_environment(runtime.Recipe(), base={"PYTHONHASHSEED": "0"})
    assert (on["PYTHONHASHSEED"], on["TF_DETERMINISTIC_OPS"], on["KERAS_BACKEND"]) == (
        "1",
        "1",
        "tensorflow",
    )
    off = runtime.child_environment(
        runtime.Recipe(deterministic=False),
        base={"TF_DETERMINISTIC_OPS": "1", "PYTHONHASHSEED": "1"},
    )
    assert "TF_DETERMINISTIC_OPS" not in off and "PYTHONHASHSEED" not in off


def test_the_kernel_library_is_set_in_the_childs_environment():
    base = {"TF_ENABLE_ONEDNN_OPTS": "0"}  # a user's setting does not leak into a run
    assert runtime.child_environment(runtime.Recipe(), base=base)["TF_ENABLE_ONEDNN_OPTS"] == "1"
    eigen = runtime.mode_recipe("single", "eigen")
    assert eigen.single_thread and eigen.kernels == "eigen"
    assert runtime.child_environment(eigen, base={})["TF_ENABLE_ONEDNN_OPTS"] == "0"
    with pytest.raises(ValueError, match="one of"):
        runtime.Recipe(kernels="mkl")


def test_a_tf_process_has_no_jax_backend_and_no_jaxrepro_flags():
    # This test process carries jaxrepro's XLA_FLAGS (set on import); the TF command,
    # started plainly, re-executes itself as a clean TF process.
    own = {*determinism.GPU_FLAGS, *determinism.CPU_FLAGS}
    assert own <= set(os.environ["XLA_FLAGS"].split())
    r = run_cli(
        "jaxrepro.tfref",
        "summary",
        "--image-size",
        "80",
        timeout=300,
        env={"XLA_FLAGS": os.environ["XLA_FLAGS"] + " --xla_dump_to=/nonexistent"},
    )
    described = _json(r)["runtime"]
    assert described["jax_backend_started"] is False
    assert described["xla_flags"] == "--xla_dump_to=/nonexistent"  # the user's own flag stays
    env = runtime.child_environment(runtime.Recipe(), base=dict(os.environ))
    assert env[runtime.SIDE_VARIABLE] == "tensorflow"
    assert not set(determinism.GPU_FLAGS) & set(env.get("XLA_FLAGS", "").split())


TF_SIDE = {
    "models.py",
    "runtime.py",
    "__main__.py",
    "determinism.py",
    "matched.py",
    "train.py",
    "bench.py",
    "rerun.py",
    "cli.py",
    "kernels.py",
    "applications.py",
}
# What the TF side may import of jaxrepro: the core and the weight exchange.
TF_SIDE_MAY_IMPORT = {
    "jaxrepro",
    "jaxrepro.allocator",  # to take jaxrepro's malloc tunable out of TF's environment
    "jaxrepro.cli",
    "jaxrepro.config",
    "jaxrepro.data",
    "jaxrepro.determinism",
    "jaxrepro.errors",
    "jaxrepro.timing",
}


def test_tensorflow_stays_out_of_the_jax_process():
    code = (
        "import sys, jaxrepro, jaxrepro.train, jaxrepro.analysis.diff, "
        "jaxrepro.analysis.compare, jaxrepro.analysis.export, jaxrepro.explain, "
        "jaxrepro.tfref.transfer, jaxrepro.tfref.weights, jaxrepro.pretrained.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert r.stdout.strip() == "[]", r.stdout
    assert "tensorflow" not in sys.modules and "keras" not in sys.modules


def test_only_tf_side_modules_import_tensorflow():
    offenders = []
    for path in sorted((ROOT / "jaxrepro").rglob("*.py")):
        if path.parent.name == "tfref" and path.name in TF_SIDE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            names += [
                f"jaxrepro.tfref.{a.name}"
                for a in getattr(node, "names", [])
                if isinstance(node, ast.ImportFrom) and node.module == "jaxrepro.tfref"
            ]
            for name in names:
                top = name.split(".")[0]
                tf_side = any(name == f"jaxrepro.tfref.{m[:-3]}" for m in TF_SIDE)
                if top in ("tensorflow", "keras", "tf_keras") or tf_side:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


KERAS_TINY = [
    "--config.data.image_size=80",
    "--config.data.num_train=48",
    "--config.data.num_val=16",
    "--config.batch_size=16",
    "--config.num_epochs=1",
]


def test_tfref_imports_only_the_core_and_the_weight_exchange():
    offenders = []
    for path in sorted((ROOT / "jaxrepro" / "tfref").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxrepro"):
                names = (
                    [node.module]
                    if node.module != "jaxrepro"
                    else [f"jaxrepro.{a.name}" for a in node.names]
                )
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("jaxrepro")]
            else:
                continue
            for name in names:
                if not (
                    name in TF_SIDE_MAY_IMPORT
                    or name.startswith("jaxrepro.tfref")
                    or name.startswith("jaxrepro.data.")
                ):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []


def test_keras_training_reads_the_jax_data_set_and_repeats_its_bits(tmp_path):
    # A fresh data dir: the first run generates the data set, the second only reads it,
    # and generating must not move TF's random draws (it did, before `runtime.reseed`).
    fresh = {"JAXREPRO_DATA_DIR": str(tmp_path / "tfds")}
    results = []
    for i in (1, 2):
        out = tmp_path / f"keras{i}"
        run_cli(
            "jaxrepro.tfref",
            "train",
            "experiments/convnet.py",
            "--out",
            str(out),
            "--quiet",
            *KERAS_TINY,
            timeout=600,
            env=fresh,
        )
        results.append(json.loads((out / "result.json").read_text()))
        final = weights.load(out / "final.npz")
        assert weights.sha256(final) == results[-1]["sha256"]
    a, b = results
    assert a["sha256"] == b["sha256"]  # the ConvNet under the recipe: the same bits
    assert a["runtime"]["recipe"]["deterministic"] and a["runtime"]["pythonhashseed"] == "1"
    assert a["runtime"]["jax_backend_started"] is False
    # The data are those python -m jaxrepro.train reads for this config.
    config = configlib.resolve(
        ROOT / "experiments" / "convnet.py",
        [o[len("--config.") :] for o in KERAS_TINY]
        + [f"data.data_dir={fresh['JAXREPRO_DATA_DIR']}"],
    )
    data = load_data(config)
    assert a["data_fingerprint"] == {
        "train": datalib.data_fingerprint(data.train),
        "validation": datalib.data_fingerprint(data.validation),
    }
    assert (a["num_train"], a["num_val"]) == (48, 16)
    assert len(a["epochs"]) == 1 and set(a["epochs"][0]) >= {"loss", "val_accuracy"}


def test_keras_training_rejects_a_bad_config_key(tmp_path):
    r = run_cli(
        "jaxrepro.tfref",
        "train",
        "experiments/convnet.py",
        "--out",
        str(tmp_path),
        "--config.no_such_key=1",
        check=False,
        timeout=300,
    )
    assert r.returncode == 2
    assert "no_such_key" in r.stderr and "batch_size" in r.stderr

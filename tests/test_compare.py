"""`python -m jaxrepro.analysis.compare`: JAX vs Keras from the same init on the same batches.

One tiny end-to-end run (mini Xception at 64 px, so Grad-CAM's A is 2x2 and not a
single pixel; 2 steps) with the exchanged files kept: the JAX half in this process,
the Keras half in the TF process the tool starts. A second one, the ConvNet at 80 px
against TF's Eigen kernels, checks that the kernel choice reaches TF.
"""

from __future__ import annotations

import contextlib
import io
import json

import jax
import numpy as np
import pytest
from conftest import ROOT

from jaxrepro import config as configlib
from jaxrepro import models, rng
from jaxrepro.analysis import compare
from jaxrepro.tfref import weights
from jaxrepro.train import build_optimizer, init_state

CONFIG = str(ROOT / "experiments" / "minixception.py")
TINY = [
    "--config.data.image_size=64",
    "--config.data.num_train=48",
    "--config.data.num_val=16",
    "--config.batch_size=16",
]
STEPS = 2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compare")
    buffer = io.StringIO()  # the CLI's stdout (capsys is per test, this fixture per module)
    with contextlib.redirect_stdout(buffer):
        code = compare.main(
            [
                CONFIG,
                "--against",
                "tensorflow",
                "--steps",
                str(STEPS),
                "--out",
                str(out),
                "--probe",
                "4",
                "--keep-exchange",
                *TINY,
            ]
        )
    assert code == 0
    return {
        "out": out,
        "stdout": buffer.getvalue(),
        "report": json.loads((out / "compare.json").read_text()),
        "ex": out / "exchange",
    }


def _bitwise(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def test_cli_writes_every_section_and_the_plot(run):
    rep = run["report"]
    assert {"forward", "backward", "trajectory", "gradcam"} <= set(rep)
    assert [r["step"] for r in rep["trajectory"]] == list(range(STEPS + 1))
    assert {r["layer"] for r in rep["forward"]} >= {
        "stem_out",
        "block1_out",
        "block5_out",
        "logits",
    }
    params = weights.load(run["ex"] / "init.npz")
    assert {r["param"] for r in rep["backward"]} == {n for n in params if n.startswith("params/")}
    assert set(rep["gradcam"]) == {"start", "end"}
    assert rep["gradcam"]["start"]["lowres_shape"] == [2, 2]
    assert (run["out"] / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "forward" in run["stdout"] and "Grad-CAM" in run["stdout"]
    md = (run["out"] / "compare.md").read_text()
    assert md.startswith("Command: `python -m jaxrepro.analysis.compare") and "decisions" in md
    assert rep["tf_kernels"] == "onednn" and rep["keras_runtime"]["onednn"] == "1"
    assert rep["jax"]["determinism"] == "machine"


def test_the_decisions_section_covers_every_relu_pool_and_parameter(run):
    rep = run["report"]
    d = rep["decisions"]
    points = models.get_spec("minixception").decision_points(
        models.get_model("minixception", dropout_rate=0.0)
    )
    assert [r["activation"] for r in d["relus"]] == list(points.relus)
    assert [r["input"] for r in d["pools"]] == [p.input for p in points.pools]
    assert [r["param"] for r in d["gradients"]] == [r["param"] for r in rep["backward"]]
    measured = {r["param"]: r["rel_to_max"] for r in rep["backward"]}
    for r in d["gradients"]:
        assert r["measured_rel_to_max"] == measured[r["param"]]
        # Aligned to Keras's decisions, what remains is rounding of two formulas.
        assert r["formula_rel_to_max"] < 5e-5, r
    assert d["replay_rel_to_max"] == 0.0  # replaying JAX's own decisions changes nothing
    keras = weights.load(run["ex"] / "keras" / "decisions.npz")
    assert set(points.relus) <= set(keras)
    assert "as measured = formulas + flipped decisions" in run["stdout"]


def test_initial_weights_are_the_config_init_and_bitwise_equal_in_keras(run):
    config = configlib.resolve(CONFIG, [t[len("--config.") :] for t in TINY])
    keys = rng.stream_keys(config.seed, {k: v for k, v in config.rng.items() if v >= 0})
    model = models.get_model(config.model, dropout_rate=0.0)
    state = init_state(model, build_optimizer(config), keys["init"], config.data.image_size)
    ours = weights.flatten(
        jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    )
    sent = weights.load(run["ex"] / "init.npz")
    keras0 = weights.load(run["ex"] / "keras" / "weights_000.npz")
    assert set(ours) == set(sent) == set(keras0)
    for name in ours:
        assert _bitwise(ours[name], sent[name]), name
        assert _bitwise(sent[name], keras0[name]), name
    assert run["report"]["initial_weights_bitwise"] is True


def _independent_ulp(a: np.ndarray, b: np.ndarray) -> int:
    """Max ULP distance via sign and magnitude bits (another route than numerics.ulp_distance)."""
    ia = np.frombuffer(np.asarray(a, "<f4").tobytes(), "<u4").astype(np.int64)
    ib = np.frombuffer(np.asarray(b, "<f4").tobytes(), "<u4").astype(np.int64)
    ma, mb = ia & 0x7FFFFFFF, ib & 0x7FFFFFFF
    same_sign = (ia >> 31) == (ib >> 31)
    return int(np.max(np.where(same_sign, np.abs(ma - mb), ma + mb)))


def test_forward_logits_agree_and_the_reported_ulp_is_right(run):
    keras = weights.load(run["ex"] / "keras" / "forward.npz")
    ours = weights.load(run["ex"] / "jax" / "forward.npz")
    z_k, z_j = keras["logits"], ours["logits"]
    assert z_k.shape == z_j.shape == (4,)
    assert np.max(np.abs(z_k - z_j)) <= 1e-4 * np.max(np.abs(z_j))
    rows = {r["layer"]: r for r in run["report"]["forward"]}
    for layer in ("logits", "stem_out", "block3_out", "gap_out"):
        assert rows[layer]["max_ulp"] == _independent_ulp(ours[layer], keras[layer]), layer
        d = np.abs(ours[layer].astype(np.float64) - keras[layer])
        assert rows[layer]["rel_to_max"] == pytest.approx(d.max() / np.abs(ours[layer]).max())
    # The JAX logits in the report are those of the sent weights, recomputed here.
    inputs = np.load(run["ex"] / "inputs.npz", allow_pickle=False)
    model = models.get_model("minixception", dropout_rate=0.0)
    z = np.asarray(
        model.apply(
            weights.unflatten(weights.load(run["ex"] / "init.npz")),
            inputs["probe_images"],
            train=False,
        )
    )
    assert np.max(np.abs(z - z_j)) <= 1e-5 * np.max(np.abs(z_j))


def test_trajectory_starts_at_exactly_zero_and_losses_agree_at_step_1(run):
    t = run["report"]["trajectory"]
    assert t[0]["all_bitwise"] and t[0]["params_max_ulp"] == 0
    assert t[0]["params_max_rel"] == 0.0 and t[0]["params_rel_to_max"] == 0.0
    assert t[1]["loss_jax"] == pytest.approx(t[1]["loss_keras"], rel=1e-5)
    assert not t[STEPS]["all_bitwise"]  # two frameworks' float32: not the same bits
    # The reported difference at the last step is that of the exported weights.
    jw = weights.load(run["ex"] / "jax" / f"weights_{STEPS:03d}.npz")
    kw = weights.load(run["ex"] / "keras" / f"weights_{STEPS:03d}.npz")
    ulp = max(_independent_ulp(jw[n], kw[n]) for n in jw if n.startswith("params/"))
    assert t[STEPS]["params_max_ulp"] == ulp


def test_gradients_agree_loosely(run):
    for r in run["report"]["backward"]:
        assert r["rel_to_max"] < 0.05, r


def test_gradcam_agrees_at_the_start(run):
    g = run["report"]["gradcam"]["start"]
    assert g["rmse_mean"] < 1e-3 and g["top10_overlap_mean"] > 0.9
    assert g["spearman_mean"] is not None and g["spearman_mean"] > 0.99


@pytest.fixture(scope="module")
def eigen(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compare_eigen")
    with contextlib.redirect_stdout(io.StringIO()):
        code = compare.main(
            [
                str(ROOT / "experiments" / "convnet.py"),
                "--against",
                "tensorflow",
                "--steps",
                "1",
                "--probe",
                "4",
                "--tf-kernels",
                "eigen",
                "--out",
                str(out),
                "--config.data.image_size=80",
                "--config.data.num_train=32",
                "--config.data.num_val=16",
                "--config.batch_size=16",
            ]
        )
    assert code == 0
    return json.loads((out / "compare.json").read_text())


def test_on_eigen_kernels_keras_computes_the_convnets_convolutions_with_jaxs_bits(eigen):
    assert eigen["tf_kernels"] == "eigen" and eigen["keras_runtime"]["onednn"] == "0"
    rows = {r["layer"]: r for r in eigen["forward"]}
    for i in range(1, 6):  # oneDNN's convolutions part from conv3 on (README settings)
        assert rows[f"conv{i}_out"]["equal"], i
    assert eigen["bitwise"]["forward_layers_equal"] >= 9


@pytest.mark.parametrize(
    "args,message",
    [
        (["--against", "pytorch"], "only"),
        (["--against", "tensorflow", "--config.no_such_key=1"], "unknown config key"),
    ],
)
def test_user_errors_exit_2(args, message, capsys):
    assert compare.main([str(ROOT / "experiments" / "convnet.py"), *args]) == 2
    assert message in capsys.readouterr().err

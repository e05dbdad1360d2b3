"""`python -m jaxrepro.analysis.variance`: seed vs framework vs code path vs rerun, measured.

One tiny end-to-end decomposition (mini Xception at 64 px so that Grad-CAM's A is 2x2,
K=2, 3 steps, the one-core variant; every trainer a process of its own, the
evaluation in this one); plus the pair measures and the plan on hand-made inputs.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from conftest import ROOT

from jaxrepro.analysis import variance

CONFIG = str(ROOT / "experiments" / "minixception.py")

TINY = [
    "--config.data.image_size=64",
    "--config.data.num_train=48",
    "--config.data.num_val=16",
    "--config.batch_size=16",
    "--config.eval_batch_size=16",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("variance")
    buffer = io.StringIO()  # the CLI's stdout (capsys is per test, this fixture per module)
    with contextlib.redirect_stdout(buffer):
        code = variance.main(
            [
                CONFIG,
                "--k",
                "2",
                "--steps",
                "3",
                "--probe",
                "4",
                "--variants",
                "one-core",
                "--out",
                str(out),
                "--no-progress",
                *TINY,
            ]
        )
    assert code == 0
    return {
        "out": out,
        "stdout": buffer.getvalue(),
        "json": json.loads((out / "variance.json").read_text()),
    }


def test_every_factor_has_its_pairs(report):
    factors = report["json"]["factors"]
    assert {k: v["pairs"] for k, v in factors.items()} == {
        "seed": 1,
        "framework": 2,
        "framework, same kernels": 2,
        "code path": 1,
        "rerun JAX": 1,
        "rerun TF": 1,
    }
    assert "| rerun JAX | 1 | 1/1 |" in report["stdout"]
    png = (report["out"] / "variance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_same_kernels_factor_runs_keras_on_eigen_and_the_other_on_onednn(report):
    seed = report["json"]["seed"]
    for run, kernels, variable in (("keras-eigen", "eigen", "0"), ("keras", "onednn", "1")):
        result = json.loads(
            (report["out"] / "runs" / f"{run}-s{seed}" / "keras" / "result.json").read_text()
        )
        assert result["runtime"]["recipe"]["kernels"] == kernels
        assert result["runtime"]["onednn"] == variable


def test_the_same_kernels_factor_runs_jax_with_eigens_first_convolution(report):
    """The stem is jaxrepro's kernel in the default runs and XLA's (Eigen's) in the
    same-kernels runs: same seed, same inputs, other bits."""
    seed = report["json"]["seed"]
    runs = report["out"] / "runs"
    eigen = (runs / f"jax-eigen-s{seed}" / "final.npz").read_bytes()
    assert eigen != (runs / f"jax-s{seed}" / "final.npz").read_bytes()
    (pair, _) = report["json"]["pairs"]["framework, same kernels"]
    assert (pair["a"], pair["b"]) == (f"jax-eigen-s{seed}", f"keras-eigen-s{seed}")


def test_a_jax_rerun_is_bitwise_identical_and_measures_zero(report):
    (pair,) = report["json"]["pairs"]["rerun JAX"]
    assert pair["bitwise"]
    assert (pair["param_rel_diff"], pair["accuracy_diff"], pair["gradcam_rmse"]) == (0, 0, 0)
    runs = report["out"] / "runs"
    assert (runs / pair["a"] / "final.npz").read_bytes() == (
        runs / pair["b"] / "final.npz"
    ).read_bytes()


def test_the_seed_moves_the_weights_more_than_the_framework(report):
    pairs = report["json"]["pairs"]
    (seed,) = pairs["seed"]
    assert not seed["bitwise"] and seed["gradcam_rmse"] > 0
    framework = [p["param_rel_diff"] for p in pairs["framework"]]
    assert all(not p["bitwise"] for p in pairs["framework"])  # XLA vs oneDNN kernels
    assert seed["param_rel_diff"] > 100 * max(framework) > 0


def test_one_core_changes_the_bits(report):
    (pair,) = report["json"]["pairs"]["code path"]
    assert not pair["bitwise"] and pair["param_rel_diff"] > 0


def _result(params: dict, acc: float, maps: np.ndarray) -> dict:
    return {"weights": params, "val_accuracy": acc, "gradcam": maps}


def test_pair_measures_on_known_values():
    ones = {"params/w": np.ones((2, 2), np.float32), "batch_stats/m": np.zeros(2, np.float32)}
    twos = {"params/w": 2 * np.ones((2, 2), np.float32), "batch_stats/m": np.zeros(2, np.float32)}
    maps = np.zeros((1, 2, 2))
    same = variance.pair_measures(_result(ones, 0.5, maps), _result(dict(ones), 0.5, maps))
    assert same == {
        "bitwise": True,
        "param_rel_diff": 0.0,
        "accuracy_diff": 0.0,
        "gradcam_rmse": 0.0,
    }
    other = variance.pair_measures(
        _result(ones, 0.5, maps), _result(twos, 0.75, np.full((1, 2, 2), 0.5))
    )
    assert other == {
        "bitwise": False,
        "param_rel_diff": 1.0,
        "accuracy_diff": 0.25,
        "gradcam_rmse": 0.5,
    }
    # Batch statistics count for bitwise, not for the parameter difference.
    stats_only = dict(ones, **{"batch_stats/m": np.ones(2, np.float32)})
    m = variance.pair_measures(_result(ones, 0.5, maps), _result(stats_only, 0.5, maps))
    assert not m["bitwise"] and m["param_rel_diff"] == 0.0
    # -0.0 and 0.0 are equal numbers but different bits.
    neg = {"params/w": -np.zeros((2, 2), np.float32)}
    pos = {"params/w": np.zeros((2, 2), np.float32)}
    assert not variance.pair_measures(_result(pos, 0.5, maps), _result(neg, 0.5, maps))["bitwise"]


def test_plan_pairs_runs_that_exist():
    runs, pairs = variance.plan(7, 3, ["ynn", "one-core"])
    names = {r.name for r in runs}
    assert len(names) == len(runs) == 3 + 3 + 3 + 3 + 2 + 2 + 2
    assert len(pairs["seed"]) == 3 and len(pairs["framework"]) == 3
    assert pairs["framework, same kernels"] == [
        (f"jax-eigen-s{s}", f"keras-eigen-s{s}") for s in (7, 8, 9)
    ]
    by_name = {r.name: r for r in runs}
    assert {by_name[f"jax-eigen-s{s}"].kernels for s in (7, 8, 9)} == {"eigen"}
    assert {by_name[f"jax-s{s}"].kernels for s in (7, 8, 9)} == {"default"}
    assert pairs["code path"] == [("jax-s7", "jax-s7-ynn"), ("jax-s7", "jax-s7-one-core")]
    assert all(a in names and b in names for p in pairs.values() for a, b in p)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "1"], "--k must be at least 2"),
        (
            ["--variants", "warp-drive"],
            "unknown variant 'warp-drive'; valid variants: default, ynn",
        ),
        (["--config.no_such_key=1"], "no_such_key"),
    ],
)
def test_bad_input_exits_2_and_says_why(tmp_path, args, message, capsys):
    assert variance.main([CONFIG, "--out", str(tmp_path / "v"), *args]) == 2
    assert message in capsys.readouterr().err

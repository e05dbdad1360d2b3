"""`python -m jaxrepro.diff`: verdicts, exit codes, first divergent step, ULPs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli, train_cli
from jaxrepro.diff import compare_leaf, first_divergent_step, ulp_distance


# ------------------------------------------------------------ hand-picked ULPs


def f32(*v):
    return np.array(v, dtype=np.float32)


def test_ulp_of_adjacent_floats_is_one():
    x = f32(1.0, -1.0, 1e-30, 3.4e38)
    up = np.nextafter(x, np.float32(np.inf))
    assert ulp_distance(x, up).tolist() == [1, 1, 1, 1]


def test_ulp_across_zero_and_signed_zeros():
    tiny = np.nextafter(np.float32(0), np.float32(1))  # smallest subnormal
    assert ulp_distance(f32(0.0), f32(-0.0)).tolist() == [0]
    assert ulp_distance(f32(tiny), f32(-tiny)).tolist() == [2]
    assert ulp_distance(f32(0.0), f32(tiny)).tolist() == [1]


def test_ulp_of_infinity_and_nan():
    big = np.finfo(np.float32).max
    assert ulp_distance(f32(big), f32(np.inf)).tolist() == [1]
    assert ulp_distance(f32(np.nan), f32(1.0)).tolist() == [-1]
    assert ulp_distance(f32(np.nan), f32(np.nan)).tolist() == [-1]


def test_ulp_between_one_and_two_is_two_to_the_23():
    assert ulp_distance(f32(1.0), f32(2.0)).tolist() == [2**23]


def test_compare_leaf_counts_bits_not_values():
    a, b = f32(0.0, 1.0, 2.0), f32(-0.0, 1.0, np.nextafter(np.float32(2), np.float32(3)))
    r = compare_leaf(a, b)
    assert not r["equal"] and r["num_different"] == 2  # -0.0 differs in its bits
    assert r["max_ulp"] == 1 and r["ulp_histogram"]["[0,1)"] == 2  # 1.0 vs 1.0, 0.0 vs -0.0
    assert r["ulp_histogram"]["[1,2)"] == 1
    assert compare_leaf(a, a.copy())["equal"]


def test_first_divergent_step_from_records():
    same = [{"step": i, "state": f"s{i}", "leaves": {"w": f"w{i}"}, "loss": 0.1} for i in range(4)]
    other = [dict(r) for r in same]
    other[2] = {**other[2], "state": "x", "leaves": {"w": "x"}}
    assert first_divergent_step(same, same)["step"] is None
    fd = first_divergent_step(same, other)
    assert fd["step"] == 2 and fd["leaves"] == ["w"]


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffruns")
    train_cli("convnet", base / "a", "--config.num_epochs=1")
    train_cli("convnet", base / "b", "--config.num_epochs=1")
    train_cli("convnet", base / "seed", "--config.num_epochs=1", "--config.seed=7")
    train_cli("convnet", base / "size", "--config.num_epochs=1", "--config.data.image_size=96")
    return base


def _diff(*args):
    return run_cli("jaxrepro.diff", *map(str, args), check=False)


def test_identical_runs_exit_0(runs):
    r = _diff(runs / "a", runs / "b")
    assert r.returncode == 0, r.stderr
    assert "verdict: identical" in r.stdout


def test_other_seed_differs_from_step_0(runs):
    r = _diff(runs / "a", runs / "seed", "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["verdict"] == "different"
    assert report["first_divergence"]["step"] == 0  # the initial weights differ
    assert all(not leaf["equal"] for k, leaf in report["leaves"].items() if "kernel" in k)
    assert report["environment_diff"] == {}


def test_different_models_are_not_comparable(runs):
    r = _diff(runs / "a", runs / "size")
    assert r.returncode == 2
    assert "not comparable" in r.stdout and "params.dense.kernel" in r.stdout


def test_checkpoint_directory_and_plot(runs, tmp_path):
    ck = sorted((runs / "a" / "checkpoints").iterdir(), key=lambda p: int(p.name))[-1]
    r = _diff(ck, runs / "seed", "--plot", tmp_path / "growth.png")
    assert r.returncode == 1
    assert (tmp_path / "growth.png").stat().st_size > 1000


def test_corrupted_checkpoint_is_an_error(runs, tmp_path):
    shutil.copytree(runs / "b", tmp_path / "b")
    latest = max(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir())
    for f in (tmp_path / "b" / "checkpoints" / str(latest) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])
    r = _diff(runs / "a", tmp_path / "b")
    assert r.returncode == 2 and "error:" in r.stderr and "checkpoint" in r.stderr


def test_missing_path_is_an_error(tmp_path):
    r = _diff(tmp_path / "nope", tmp_path / "nope2")
    assert r.returncode == 2 and "does not exist" in r.stderr

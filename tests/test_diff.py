"""`python -m jaxrepro.analysis.diff`: verdicts, exit codes, first divergent step, ULPs.

Runs train and diffs run in this process (the CLIs' `main`); only the variant runs,
which need another XLA flag, get processes of their own (started by the variants tool).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import tiny_spec, train_tiny

from jaxrepro import determinism
from jaxrepro.analysis import diff as difflib
from jaxrepro.analysis import variants
from jaxrepro.analysis.diff import compare_leaf, compare_probes, first_divergent_step
from jaxrepro.analysis.variants import VARIANTS, variant_env
from jaxrepro.numerics import ulp_distance
from jaxrepro.train import cli as train_cli

# The diff reads the checkpoints' probes, which the tiny config leaves out.
PROBED = ("diff_probe_examples=1",)


def train(workdir, *overrides: str, **kwargs) -> None:
    """The tiny ConvNet for one epoch (4 steps; checkpoints 0, 3, 4), with diff probes."""
    train_tiny("convnet", workdir, *PROBED, "num_epochs=1", *overrides, **kwargs)


def train_main(workdir, *extra: str) -> int:
    """The training CLI on the same config, in this process; its exit status."""
    return train_cli.main(
        [
            tiny_spec("convnet"),
            "--config.diff_probe_examples=1",
            "--config.num_epochs=1",
            "--workdir",
            str(workdir),
            "--no-progress",
            *extra,
        ]
    )


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


def _probe(**changes):
    acts = {"conv1_out": f32(1, 2), "pool1_out": f32(3), "conv2_out": f32(4)}
    grads = {"dense/kernel": f32(1), "conv2/kernel": f32(2), "conv1/kernel": f32(3)}
    for name, value in changes.items():
        (grads if "/" in name else acts)[name] = value
    return {"logits": f32(0.5), "activations": acts, "gradients": grads}


def test_probe_comparison_names_layers_in_call_order_not_alphabetically():
    order = {
        "activations": ["conv1_out", "pool1_out", "conv2_out"],
        "layers": ["conv1", "conv2", "dense"],
    }
    nudged = np.nextafter(f32(4), f32(5))
    r = compare_probes(
        _probe(), order, _probe(conv2_out=nudged, pool1_out=f32(3.5), **{"conv1/kernel": f32(0)})
    )
    assert r["first_forward"] == "pool1_out"  # alphabetically conv2_out would come first
    assert r["forward"]["conv2_out"]["max_ulp"] == 1 and r["forward"]["conv1_out"]["equal"]
    assert r["forward"]["logits"]["equal"]  # logits unchanged here
    assert r["first_gradient"] == "conv1/kernel"
    same = compare_probes(_probe(), order, _probe())
    assert same["first_forward"] is None and same["first_gradient"] is None
    backward = compare_probes(
        _probe(), order, _probe(**{"dense/kernel": f32(9), "conv1/kernel": f32(9)})
    )
    assert backward["first_gradient"] == "dense/kernel"  # backward order: the head first


def test_variant_flag_replaces_the_same_flag_in_the_parent():
    # The parent's XLA_FLAGS hold jaxrepro's own YNNPACK list; the variant's value must
    # be the only one the child sees (a second `+dot` would edit the first).
    base = {"XLA_FLAGS": f"--xla_dump_to=/tmp/x {determinism.YNN_FUSIONS}"}
    flags = variant_env(VARIANTS["ynn-convs"], base)["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/tmp/x", "--xla_cpu_experimental_ynn_fusion_type=+dot"]


def test_variant_environment_appends_xla_flags():
    env = variant_env(VARIANTS["ynn"], {"XLA_FLAGS": "--xla_dump_to=/tmp/x", "A": "1"})
    assert env["XLA_FLAGS"] == (
        "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"
    )
    assert env["A"] == "1" and variant_env(VARIANTS["no-jit"], {})["JAX_DISABLE_JIT"] == "1"


def test_an_emulated_cpu_variant_runs_the_child_under_qemu():
    variant = variants.get_variant("cpu:Haswell")
    assert variant.prefix == ("qemu-x86_64", "-cpu", "Haswell")
    with pytest.raises(variants.VariantError, match="unknown CPU model 'Pentium9'"):
        variants.get_variant("cpu:Pentium9")


def test_a_missing_emulator_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(variants.shutil, "which", lambda name: None)
    assert variants.main(["experiments/convnet.py", "--variants", "default,cpu:Haswell"]) == 2
    assert "apt-get install qemu-user" in capsys.readouterr().err


def test_explanations_are_compared_bitwise(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    maps = {"gradcam": np.zeros((1, 4, 4), np.float32), "ig": np.ones((1, 4, 4), np.float32)}
    np.savez(a / "explanations.npz", **maps)
    np.savez(b / "explanations.npz", **{k: v.copy() for k, v in maps.items()})
    assert variants.explanations_differing(a, b) == []
    signed_zero = {**maps, "gradcam": -maps["gradcam"]}  # equal values, other bits
    np.savez(b / "explanations.npz", **signed_zero)
    assert variants.explanations_differing(a, b) == ["gradcam"]
    np.savez(b / "explanations.npz", gradcam=maps["gradcam"])  # a method missing
    assert variants.explanations_differing(a, b) == ["ig"]
    assert variants.explanations_differing(a, c) is None  # nothing explained in c


def test_an_unknown_mode_is_an_error_before_any_run(capsys):
    assert variants.main(["experiments/convnet.py", "--modes", "machine,fast"]) == 2
    assert "valid modes: machine, portable" in capsys.readouterr().err
    assert variants.main(["experiments/convnet.py", "--explain=1", "--explain-methods=cam"]) == 2
    assert "valid methods: gradcam" in capsys.readouterr().err


def test_unknown_variant_is_an_error(capsys):
    assert variants.main(["experiments/convnet.py", "--variants", "default,gpu9"]) == 2
    err = capsys.readouterr().err
    assert "gpu9" in err and "one-core" in err


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("diffruns")
    train(base / "a")
    train(base / "b")
    train(base / "seed", "seed=7")
    train(base / "size", "data.image_size=96")
    return base


class Result:
    """A CLI call in this process: exit status, stdout, stderr."""

    def __init__(self, returncode: int, out: str, err: str):
        self.returncode, self.stdout, self.stderr = returncode, out, err


@pytest.fixture
def diff(capsys):
    def run(*args) -> Result:
        capsys.readouterr()
        code = difflib.main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def test_identical_runs_exit_0(runs, diff):
    r = diff(runs / "a", runs / "b")
    assert r.returncode == 0, r.stderr
    assert "verdict: identical" in r.stdout
    report = json.loads(diff(runs / "a", runs / "b", "--json").stdout)
    assert report["common_checkpoints"][0] == 0  # the initial state is kept
    assert report["layers"]["step"] is None  # every probe identical
    assert all(p["first_forward"] is None for p in report["layers"]["probed_steps"])
    pred = report["predictions"]
    assert pred["predictions_changed"] == 0 and pred["logits"]["equal"]
    assert pred["num_images"] == 32 and pred["accuracy_a"] == pred["accuracy_b"]


def test_other_seed_differs_from_step_0(runs, diff):
    r = diff(runs / "a", runs / "seed", "--json")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["verdict"] == "different"
    assert report["first_divergence"]["step"] == 0  # the initial weights differ
    assert all(not leaf["equal"] for k, leaf in report["leaves"].items() if "kernel" in k)
    assert report["environment_diff"] == {}
    layers = report["layers"]  # other weights from the start: every layer differs
    assert layers["step"] == 0 and layers["state_equal"] is False
    assert layers["first_forward"] == "conv1_out" and layers["first_gradient"] == "dense/bias"
    assert report["predictions"]["logits"]["equal"] is False


def test_fork_parts_from_the_other_run_at_the_fork(runs, tmp_path, diff):
    # 1 epoch of 4 steps, checkpoints at 0, 3, 4. Fork at 3 with another learning rate:
    # the states agree up to step 3, the update of step 4 (the fork's first) differs.
    train(
        tmp_path / "fork",
        "optimizer.learning_rate=0.002",
        fork_from=runs / "a" / "checkpoints" / "3",
    )
    report = json.loads(diff(runs / "a", tmp_path / "fork", "--json").stdout)
    assert report["verdict"] == "different"
    assert report["fork"]["step"] == 3 and report["fork"]["child"] == "B"
    assert report["fork"]["config_changes"] == ["optimizer.learning_rate: 0.001 -> 0.002"]
    assert report["first_divergence"]["step"] == report["fork"]["step"] + 1
    growth = {g["step"]: g["leaves_different"] for g in report["checkpoint_growth"]}
    assert growth[3] == 0 and growth[4] > 0


def test_fork_from_a_missing_checkpoint_is_refused_before_writing(runs, tmp_path, capsys):
    assert train_main(tmp_path / "fork", "--fork-from", str(runs / "a" / "checkpoints" / "2")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step 2" in err and "[0, 3, 4]" in err
    assert not (tmp_path / "fork").exists()


def test_fork_from_another_model_is_refused_and_leaves_nothing(runs, tmp_path, capsys):
    assert train_main(tmp_path / "fork", "--fork-from", str(runs / "size")) == 2
    err = capsys.readouterr().err
    assert "--fork-from" in err and "could not be read" in err
    assert not (tmp_path / "fork").exists()


def test_code_path_variant_differs_and_names_the_first_layer(tmp_path, capsys, diff):
    # AVX2 code contracts a*b+c into FMAs: the same initial state, other logits.
    assert (
        variants.main(
            [
                tiny_spec("convnet"),
                "--variants",
                "default,avx2",
                "--out",
                str(tmp_path),
                "--no-progress",
                "--config.diff_probe_examples=1",
                "--config.num_epochs=1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "variants.json").read_text())["rows"][0]
    assert row["variant"] == "avx2" and row["verdict"] == "different", out
    assert row["probe_step"] == 0 and row["state_equal_at_probe"] is True
    first = row["first_forward_layer"] or row["first_gradient_layer"]
    assert first is not None and first in out
    assert (row["mode"], row["experiment"]) == ("machine", "convnet")
    d = diff(
        tmp_path / "machine" / "default" / "convnet", tmp_path / "machine" / "avx2" / "convnet"
    )
    assert d.returncode == 1 and "computed differently by the two environments" in d.stdout
    assert "--xla_cpu_max_isa=AVX2" in d.stdout  # the cause, by name


def test_different_models_are_not_comparable(runs, diff):
    r = diff(runs / "a", runs / "size")
    assert r.returncode == 2
    assert "not comparable" in r.stdout and "params.dense.kernel" in r.stdout


def test_checkpoint_directory_and_plot(runs, tmp_path, diff):
    ck = sorted((runs / "a" / "checkpoints").iterdir(), key=lambda p: int(p.name))[-1]
    r = diff(ck, runs / "seed", "--plot", tmp_path / "growth.png")
    assert r.returncode == 1
    assert (tmp_path / "growth.png").stat().st_size > 1000


def test_corrupted_checkpoint_is_an_error(runs, tmp_path, diff):
    shutil.copytree(runs / "b", tmp_path / "b")
    latest = max(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir())
    for f in (tmp_path / "b" / "checkpoints" / str(latest) / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])
    r = diff(runs / "a", tmp_path / "b")
    assert r.returncode == 2 and "error:" in r.stderr and "checkpoint" in r.stderr


def test_missing_path_is_an_error(tmp_path, diff):
    r = diff(tmp_path / "nope", tmp_path / "nope2")
    assert r.returncode == 2 and "does not exist" in r.stderr

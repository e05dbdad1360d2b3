"""The benchmark CLI runs every kind of system end to end and writes a readable table.

Speed itself is never asserted here (2 shared CI cores); the figures belong to
`python -m jaxrepro.analysis.bench` runs, written to docs/results/. The parent runs
in this process; every measurement is a process of its own, as the tool starts it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import jax
import numpy as np
from conftest import ROOT, tiny_config

from jaxrepro.analysis import bench, bench_jax
from jaxrepro.train import setup, steps

CONVNET = str(ROOT / "experiments" / "convnet.py")
MINIXCEPTION = str(ROOT / "experiments" / "minixception.py")


def test_bench_measures_jax_and_keras_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        bench.main(
            [
                CONVNET,
                "--systems",
                "jax",
                "jax-flax-pool",
                "tf-recipe",
                "--image-size",
                "80",
                "--batch-size",
                "8",
                "--steps",
                "2",
                "--repeats",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "bench.json").read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"jax", "jax-flax-pool", "tf-recipe"}
    for r in rows.values():
        assert len(r["train_images_per_s"]) == 2 and min(r["train_images_per_s"]) > 0
        assert r["compile_s"] >= 0 and r["peak_memory_mib"] > 100
        assert 100 < r["train_peak_memory_mib"] <= r["peak_memory_mib"]
        assert len(r["gradcam_per_s"]) == 2 and len(r["infer_images_per_s"]) == 2
    # Each JAX repeat restarts from the same state on the same batches: the same bits.
    assert rows["jax"]["repeats_bitwise"] and rows["jax-flax-pool"]["repeats_bitwise"]
    # The cheaper max-pool gradient changes the speed, never the bits.
    assert rows["jax"]["final_sha256"] == rows["jax-flax-pool"]["final_sha256"]
    assert rows["tf-recipe"]["runtime"]["recipe"]["deterministic"]
    assert rows["tf-recipe"]["runtime"]["jax_backend_started"] is False
    assert rows["tf-recipe"]["lrp_per_s"] is None and len(rows["jax"]["lrp_per_s"]) == 2
    ratios = result["ratios"]["convnet"]
    tf_median = sorted(rows["tf-recipe"]["train_images_per_s"])
    jax_median = sorted(rows["jax"]["train_images_per_s"])
    assert ratios["jaxrepro/TF-deterministic"] == (sum(jax_median) / 2) / (sum(tf_median) / 2)
    memory = result["ratios_by_measure"]["training peak memory"]["convnet"]
    assert memory["jaxrepro/TF-deterministic"] == (
        rows["jax"]["train_peak_memory_mib"] / rows["tf-recipe"]["train_peak_memory_mib"]
    )
    assert set(result["ratios_by_measure"]) == {"train", "inference", "training peak memory"}
    # XLA's operation count of the step (80 px, augmentation included) and the peak
    # measured in each JAX process; TF's row is judged against the JAX count.
    flops = rows["jax"]["train_flops_per_image"]
    assert 1e8 < flops < 1e9 and rows["jax-flax-pool"]["fp32_peak_gflops"] > 1
    assert rows["tf-recipe"].get("train_flops_per_image") is None
    used = {(u["model"], u["system"]): u for u in result["fraction_of_peak"]}
    assert set(used) == {("convnet", s) for s in rows}
    tf_used = used["convnet", "tf-recipe"]
    assert tf_used["gflops"] == bench.summary(tf_median)["median"] * flops / 1e9
    assert tf_used["peak_gflops"] == max(
        rows["jax"]["fp32_peak_gflops"], rows["jax-flax-pool"]["fp32_peak_gflops"]
    )
    table = (out / "bench.md").read_text()
    assert "jaxrepro/TF-deterministic" in table and "| convnet | tf-recipe |" in table
    assert "of fp32 peak" in table and f"convnet {flops / 1e9:.2f} GFLOP" in table
    assert (out / "bench.png").stat().st_size > 0
    assert table.strip() in capsys.readouterr().out


def test_the_fraction_of_peak_uses_one_count_and_the_highest_peak_per_model():
    rows = [
        {
            "model": "m",
            "system": "jax",
            "train_images_per_s": [9.0, 10.0, 11.0],
            "train_flops_per_image": 2e9,
            "fp32_peak_gflops": 100.0,
        },
        {
            "model": "m",
            "system": "jax-portable",
            "train_images_per_s": [5.0],
            "train_flops_per_image": 3e9,
            "fp32_peak_gflops": 80.0,
        },
        {"model": "m", "system": "tf-none", "train_images_per_s": [20.0]},
        {"model": "other", "system": "tf-none", "train_images_per_s": [1.0]},
    ]
    used = bench.fraction_of_peak(rows)
    assert used["m", "jax"] == {"gflops": 20.0, "peak_gflops": 100.0, "fraction": 0.2}
    # the same count (the first JAX row's) and the same peak (the highest) for every row
    assert used["m", "jax-portable"]["gflops"] == 10.0
    assert used["m", "jax-portable"]["fraction"] == 10.0 / 100.0
    assert used["m", "tf-none"] == {"gflops": 40.0, "peak_gflops": 100.0, "fraction": 0.4}
    assert ("other", "tf-none") not in used  # no JAX row: nothing to count with


def test_ratios_compare_medians_per_measure_and_skip_what_is_missing():
    rows = [
        {
            "model": "m",
            "system": "jax",
            "train_images_per_s": [9.0, 10.0, 11.0],
            "infer_images_per_s": [30.0, 40.0],
            "train_peak_memory_mib": 1000.0,
        },
        {
            "model": "m",
            "system": "tf-none",
            "train_images_per_s": [20.0],
            "infer_images_per_s": [20.0],
            "train_peak_memory_mib": 4000.0,
        },
        {"model": "m", "system": "tf-recipe", "train_images_per_s": [5.0]},
    ]
    assert bench.ratios(rows)["m"] == {"jaxrepro/TF-default": 0.5, "jaxrepro/TF-deterministic": 2.0}
    assert bench.ratios(rows, "inference")["m"] == {"jaxrepro/TF-default": 1.75}
    assert bench.ratios(rows, "training peak memory")["m"] == {"jaxrepro/TF-default": 0.25}
    full = [
        {"compile_s": 1.0, "peak_memory_mib": 5000.0, "infer_images_per_s": [], **r} for r in rows
    ]
    table = bench.table(full, {"command": "c", "commit": "x", "machine": "m", "date": "d"})
    assert "| m | jaxrepro/TF-deterministic | 2.00x | - | - |" in table


def test_bench_rejects_bad_settings(tmp_path, capsys):
    assert bench.main([CONVNET, "--image-size", "40", "--out", str(tmp_path)]) == 2
    assert "at least 78" in capsys.readouterr().err
    try:
        bench.main(["--steps", "0", "--out", str(tmp_path)])
    except SystemExit as e:  # argparse's own errors exit 2
        assert e.code == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    try:
        bench.main(["--systems", "tf-fast"])
    except SystemExit as e:
        assert e.code == 2
    assert "tf-recipe" in capsys.readouterr().err  # names the valid systems


def test_each_before_system_passes_its_own_switch(tmp_path):
    args = argparse.Namespace(image_size=80, batch_size=8, steps=2, repeats=2)
    switches = {
        "--flax-pool",
        "--xla-pool",
        "--xla-resample",
        "--xla-convs",
        "--one-chunk",
        "--shifted-sums",
    }
    for system, switch in [
        ("jax", None),
        ("jax-flax-pool", "--flax-pool"),
        ("jax-xla-pool", "--xla-pool"),
        ("jax-xla-resample", "--xla-resample"),
        ("jax-xla-convs", "--xla-convs"),
        ("jax-one-chunk", "--one-chunk"),
        ("jax-shifted-sums", "--shifted-sums"),
    ]:
        module, cmd = bench.child_command(
            system, MINIXCEPTION, "minixception", args, tmp_path / "out.json"
        )
        assert module == "jaxrepro.analysis.bench_jax"
        assert switches & set(cmd) == ({switch} if switch else set()), system
    module, cmd = bench.child_command(
        "tf-single", MINIXCEPTION, "minixception", args, tmp_path / "out.json"
    )
    assert module == "jaxrepro.tfref.bench" and cmd[cmd.index("--mode") + 1] == "single"
    assert cmd[cmd.index("--gradcam-layer") + 1] == "block5_add"  # from the model's spec


ONEDNN_ISA_CHILD = """
import tensorflow as tf
tf.nn.conv2d(tf.ones([1, 8, 8, 4]), tf.ones([3, 3, 4, 4]), 1, "SAME")
"""


def test_the_avx2_system_caps_onednn_and_the_others_do_not(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    capped = bench.child_environment("tf-none-avx2")
    assert capped["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert "ONEDNN_MAX_CPU_ISA" not in bench.child_environment("tf-none")
    assert {k: v for k, v in capped.items() if k != "ONEDNN_MAX_CPU_ISA"} == (
        bench.child_environment("tf-none")
    )
    # oneDNN itself says which ISA it runs at (its verbose mode's info line).
    r = subprocess.run(
        [sys.executable, "-c", ONEDNN_ISA_CHILD],
        env={**capped, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    isa = [line for line in r.stdout.splitlines() if ",isa:" in line]
    assert isa and "AVX-512" not in isa[0] and "AVX2" in isa[0], isa


def test_fast_convs_systems_run_only_for_a_model_that_has_them():
    args = argparse.Namespace(
        configs=[CONVNET, MINIXCEPTION],
        image_size=80,
        systems=["jax", "jax-xla-convs", "jax-one-chunk", "jax-shifted-sums"],
    )
    plan = {model: systems for _, model, systems in bench.plan(args)}
    assert plan == {
        "convnet": ["jax"],
        "minixception": ["jax", "jax-xla-convs", "jax-one-chunk", "jax-shifted-sums"],
    }


def test_rounds_run_every_system_once_per_round_round_after_round():
    todo = [("a.py", "a", ["jax", "tf-none"]), ("b.py", "b", ["jax"])]
    assert bench.schedule(todo, 2) == [
        (0, "a.py", "a", "jax"),
        (0, "a.py", "a", "tf-none"),
        (0, "b.py", "b", "jax"),
        (1, "a.py", "a", "jax"),
        (1, "a.py", "a", "tf-none"),
        (1, "b.py", "b", "jax"),
    ]


def _process(train, sha, peak=100.0, memory=1000.0, bitwise=True):
    return {
        "model": "m",
        "system": "jax",
        "train_images_per_s": train,
        "infer_images_per_s": [1.0],
        "gradcam_per_s": [2.0],
        "lrp_per_s": None,
        "compile_s": memory / 100,
        "train_peak_memory_mib": memory,
        "peak_memory_mib": memory + 1,
        "fp32_peak_gflops": peak,
        "repeats_bitwise": bitwise,
        "final_sha256": sha,
    }


def test_processes_of_one_system_pool_their_repeats_and_must_share_their_bits():
    a, b, c = (
        _process([1.0, 2.0], "x", 90.0, 1000.0),
        _process([3.0], "x", 110.0, 3000.0),
        _process([5.0], "x", 100.0, 2000.0),
    )
    row = bench.merge_runs([a, b, c])
    assert row["train_images_per_s"] == [1.0, 2.0, 3.0, 5.0] and row["lrp_per_s"] is None
    assert row["train_peak_memory_mib"] == 2000.0 and row["compile_s"] == 20.0
    assert row["fp32_peak_gflops"] == 110.0 and row["processes"] == 3
    assert row["repeats_bitwise"] is True
    assert bench.merge_runs([a, _process([3.0], "y")])["repeats_bitwise"] is False
    assert bench.merge_runs([a, _process([3.0], "x", bitwise=False)])["repeats_bitwise"] is False
    assert bench.merge_runs([a]) == a


def test_the_operation_count_includes_what_the_kernels_compute():
    # XLA counts no operations in a custom call: the machine-mode step, whose first
    # convolution is jaxrepro's kernel, counts fewer than the same step with XLA's
    # convolution there. The bench counts the XLA form, the same for both.
    config = tiny_config("convnet")
    keys = setup.stream_keys(config)
    tx = setup.build_optimizer(config)
    size = config.data.image_size
    images = np.zeros((config.batch_size, size, size, 3), np.uint8)
    labels = np.zeros((config.batch_size,), np.int32)

    def count(model):
        state = jax.device_get(setup.init_state(model, tx, keys["init"], size))
        step = steps.make_train_step(model, tx, {**steps.augmentation(config), "native": False})
        return bench_jax.step_flops(step.lower(state, images, labels, keys).compile()), state

    with_kernel, state = count(setup.build_model(config))
    with_xla, _ = count(setup.build_model(config).clone(first_conv=None))
    assert with_kernel < with_xla
    assert bench_jax.xla_form_flops(config, tx, state, (images, labels), keys) == with_xla

"""The benchmark CLI runs every kind of system end to end and writes a readable table.

Speed itself is never asserted here (2 shared CI cores); the figures belong to
`python -m jaxrepro.bench` runs reported in the README.
"""

from __future__ import annotations

import json

from conftest import run_cli


def test_bench_measures_jax_and_keras_side_by_side(tmp_path):
    out = tmp_path / "bench"
    run_cli("jaxrepro.bench", "--models", "convnet", "--systems", "jax", "jax-flax-pool",
            "tf-recipe", "--image-size", "80", "--batch-size", "8", "--steps", "2",
            "--repeats", "2", "--out", str(out), timeout=900)
    result = json.loads((out / "bench.json").read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"jax", "jax-flax-pool", "tf-recipe"}
    for r in rows.values():
        assert len(r["train_images_per_s"]) == 2 and min(r["train_images_per_s"]) > 0
        assert r["compile_s"] >= 0 and r["peak_memory_mib"] > 100
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
    table = (out / "bench.md").read_text()
    assert "jaxrepro/TF-deterministic" in table and "| convnet | tf-recipe |" in table
    assert (out / "bench.png").stat().st_size > 0


def test_bench_rejects_bad_settings(tmp_path):
    r = run_cli("jaxrepro.bench", "--models", "convnet", "--image-size", "40",
                "--out", str(tmp_path), check=False, timeout=120)
    assert r.returncode == 2 and "at least 80" in r.stderr
    r = run_cli("jaxrepro.bench", "--steps", "0", "--out", str(tmp_path), check=False,
                timeout=120)
    assert r.returncode == 2 and "--steps must be at least 1" in r.stderr
    r = run_cli("jaxrepro.bench", "--systems", "tf-fast", check=False, timeout=120)
    assert r.returncode == 2 and "tf-recipe" in r.stderr  # names the valid systems


def test_each_before_system_passes_its_own_switch(tmp_path):
    import argparse

    from jaxrepro import bench

    args = argparse.Namespace(image_size=80, batch_size=8, steps=2, repeats=2)
    switches = {"--flax-pool", "--xla-convs", "--one-chunk"}
    for system, switch in [("jax", None), ("jax-flax-pool", "--flax-pool"),
                           ("jax-xla-convs", "--xla-convs"), ("jax-one-chunk", "--one-chunk")]:
        cmd = bench.child_command(system, "minixception", args, tmp_path / "out.json")
        assert switches & set(cmd) == ({switch} if switch else set()), system
    assert set(bench.MINIXCEPTION_ONLY) <= set(bench.SYSTEMS)

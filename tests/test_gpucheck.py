"""The GPU check (`benchmarks/gpu_check.sh`, `jaxrepro.analysis.gpucheck`) and the GPU
fields of the environment fingerprint, tested without a GPU: the plan, the report,
the environment children get, a dry run of the script itself on the CPU, and the
fingerprint's readings from a fake driver and CUDA plugin."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest
from jax._src import xla_bridge

from jaxrepro import determinism, provenance
from jaxrepro.analysis import bench, gpucheck

ROOT = Path(__file__).resolve().parents[1]


def test_the_plan_runs_what_each_check_compares_and_skips_the_gpu_only_ones():
    dry = gpucheck.plan(["convnet", "minixception"], list(gpucheck.CHECKS), dry_run=True)
    names = [r.name for r in dry.runs]
    assert not any(r.cpu for r in dry.runs)  # a dry run's both sides would be the CPU
    assert [(s["what"], s["reason"]) for s in dry.skipped] == [
        ("c convnet", gpucheck.GPU_ONLY["c"]),
        ("c minixception", gpucheck.GPU_ONLY["c"]),
    ]
    for pair in dry.pairs:
        assert pair.a in names and pair.b in names and pair.a != pair.b
    assert {p.check for p in dry.pairs} == {"a", "b", "e"}

    real = gpucheck.plan(["convnet"], ["c"], dry_run=False)
    assert [(r.name, r.cpu) for r in real.runs] == [("convnet-det-1", False), ("convnet-cpu", True)]
    assert [(p.check, p.a, p.b) for p in real.pairs] == [("c", "convnet-det-1", "convnet-cpu")]

    # b alone still runs the one deterministic run it is compared with, not a second
    only_b = gpucheck.plan(["convnet"], ["b"], dry_run=False)
    assert [r.name for r in only_b.runs] == [
        "convnet-det-1",
        "convnet-nondet-1",
        "convnet-nondet-2",
    ]


def test_children_run_with_the_flags_their_check_needs(tmp_path):
    base = {"XLA_FLAGS": determinism.xla_flags("machine", "")}
    det = gpucheck.child_env(base, tmp_path)
    nondet = gpucheck.child_env(base, tmp_path, "gpu-nondeterministic")
    cpu = gpucheck.child_env(base, tmp_path, cpu=True)
    # what the child's own `determinism.apply` will set, from the environment it gets
    det_flags = determinism.xla_flags("machine", det["XLA_FLAGS"]).split()
    nondet_flags = determinism.xla_flags("machine", nondet["XLA_FLAGS"]).split()
    assert set(determinism.GPU_FLAGS) <= set(det_flags)
    assert set(determinism.GPU_NONDETERMINISTIC_FLAGS) <= set(nondet_flags)
    assert not set(determinism.GPU_FLAGS) & set(nondet_flags)  # the user's value wins
    assert cpu["JAX_PLATFORMS"] == "cpu" and "JAX_PLATFORMS" not in det
    assert det["JAXREPRO_DATA_DIR"] == str(tmp_path / "data")
    assert det["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # several processes on one GPU


def test_the_bench_measures_the_nondeterministic_mode_only_when_asked():
    assert "jax-gpu-nondet" not in bench.parse_args([]).systems  # on a CPU it is plain jax
    env = bench.child_environment("jax-gpu-nondet")
    assert set(determinism.GPU_NONDETERMINISTIC_FLAGS) <= set(env["XLA_FLAGS"].split())
    rows = [
        {"model": "convnet", "system": s, "train_images_per_s": [v]}
        for s, v in (("jax", 90.0), ("jax-gpu-nondet", 100.0))
    ]
    assert bench.ratios(rows)["convnet"]["jaxrepro/jax-gpu-nondet"] == pytest.approx(0.9)


def test_a_step_past_the_budget_is_skipped_or_stopped_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(gpucheck, "MIN_START_S", 0.5)
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    late = gpucheck.run_process(sleeper, os.environ, tmp_path / "a.log", gpucheck.Clock(0.1))
    assert late == {"status": "skipped", "reason": gpucheck.BUDGET_SPENT}
    stopped = gpucheck.run_process(sleeper, os.environ, tmp_path / "b.log", gpucheck.Clock(2.0))
    assert stopped["status"] == "stopped" and stopped["seconds"] < 30
    failing = [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"]
    bad = gpucheck.run_process(failing, os.environ, tmp_path / "c.log", gpucheck.Clock(60.0))
    assert (bad["status"], bad["rc"], bad["reason"].strip()) == ("error", 3, "boom")


def test_pairs_are_compared_in_priority_order_as_soon_as_their_runs_are_done(monkeypatch):
    """With one process at a time, a's runs train first and a's comparison needs only
    them: a budget that ends after a still leaves a complete row."""
    events = []

    def train(s, r):  # a training takes a while; a comparison is quick
        time.sleep(0.3)
        events.append(("train", r.name))
        s.result["runs"][r.name] = {"status": "done"}

    def compare(s, q):
        events.append(("compare", q.check))
        return {"check": q.check}

    monkeypatch.setattr(gpucheck, "train", train)
    monkeypatch.setattr(gpucheck, "compare", compare)
    p = gpucheck.plan(["convnet"], ["a", "b", "c"], dry_run=False)
    ordered = sorted(p.pairs, key=lambda q: gpucheck.PRIORITY.index(q.check))
    s = gpucheck.Session(Path("."), gpucheck.Clock(60), [], 1, {"runs": {}, "checks": []})
    gpucheck.run_stage(s, ordered, {r.name: r for r in p.runs})
    trains = [e[1] for e in events if e[0] == "train"]
    assert trains == [
        "convnet-det-1",
        "convnet-det-2",
        "convnet-cpu",
        "convnet-nondet-1",
        "convnet-nondet-2",
    ]
    assert [c["check"] for c in s.result["checks"]] == ["a", "c", "b", "b"]
    # a's comparison came before the last training: it did not wait for the other checks
    assert events.index(("compare", "a")) < events.index(("train", "convnet-nondet-2"))


def _different_report() -> dict:
    """A `jaxrepro.analysis.diff` report of two runs that part at step 3, whose probes
    differ at step 0 already (another device computing the same state)."""
    return {
        "verdict": "different",
        "first_divergence": {"step": 3},
        "layers": {
            "step": 0,
            "first_forward": "conv3",
            "first_gradient": "dense",
            "forward": {"conv3": {"equal": False}, "logits": {"equal": False, "max_ulp": 17}},
            "probed_steps": [{"step": 0, "state_equal": True}, {"step": 10, "state_equal": False}],
        },
        "checkpoint_growth": [
            {"step": 0, "max_ulp": 0},
            {"step": 20, "max_ulp": 9, "max_rel_diff": 0.5},
        ],
        "predictions": {"predictions_changed": 2},
        "environment_diff": {"backend": ["gpu", "cpu"], "device_kind": ["H200", "cpu"]},
    }


def test_a_different_pair_gives_its_step_layer_and_logit_ulps():
    s = gpucheck.summarize_diff(_different_report())
    assert s["verdict"] == "different" and s["initial_state_equal"] is True
    assert (s["first_divergent_step"], s["first_forward"], s["first_gradient"]) == (
        3,
        "conv3",
        "dense",
    )
    assert s["logits_ulp_step0"] == 17 and s["final_max_ulp"] == 9 and s["final_max_rel"] == 0.5
    assert s["predictions_changed"] == 2 and s["environment_diff"] == ["backend", "device_kind"]
    # probes equal at step 0, first differing at 10: the step-0 logits are bitwise equal
    later = _different_report()
    later["layers"]["step"] = 10
    assert gpucheck.summarize_diff(later)["logits_ulp_step0"] == 0
    assert gpucheck.summarize_diff({"verdict": "not comparable"}) == {"verdict": "not comparable"}


def _bench(det: float, nondet: float) -> dict:
    row = {"infer_images_per_s": [100.0, 110.0, 90.0], "repeats_bitwise": True}
    return {
        "rows": [
            {
                "model": "convnet",
                "system": "jax",
                "train_images_per_s": [det, det + 1, det - 1],
                **row,
            },
            {
                "model": "convnet",
                "system": "jax-gpu-nondet",
                "train_images_per_s": [nondet] * 3,
                **row,
            },
        ]
    }


def _result(dry_run: bool, checks: list[dict], bench: dict | None = None) -> dict:
    return {
        "provenance": provenance.record("test", []),
        "dry_run": dry_run,
        "settings": {"image_size": 80, "batch_size": 8, "steps": 4, "jobs": 1},
        "environment": {"backend": "gpu", "gpu": {"xla_gpu_flags": list(determinism.GPU_FLAGS)}},
        "checks": checks,
        "throughput": gpucheck.throughput(bench) if bench else [],
        "skipped": [],
        "errors": [],
    }


def test_the_goals_are_judged_on_measured_figures_only():
    same = {
        "check": "a",
        "model": "convnet",
        "label": "x",
        "status": "done",
        "verdict": "identical",
    }
    other = {**same, "verdict": "different"}
    ok = gpucheck.goals(_result(False, [same], _bench(95.0, 100.0)))
    assert ok[0].endswith("met") and "NOT" not in ok[0]
    assert "met (convnet 0.95x)" in ok[1]
    slow = gpucheck.goals(_result(False, [other], _bench(50.0, 100.0)))
    assert slow[0].endswith("NOT met") and "NOT met (convnet 0.50x)" in slow[1]
    assert gpucheck.goals(_result(False, [], None))[0].endswith("not measured")
    assert gpucheck.goals(_result(True, [same], _bench(95.0, 100.0))) == [
        "GPU goals: not measured (a dry run on the CPU)."
    ]
    text = gpucheck.markdown(_result(False, [other], _bench(50.0, 100.0)))
    assert "| a | convnet | x | NO |" in text and "| convnet | 50.0 | 100.0 | 0.50x |" in text
    assert "not a GPU result" in gpucheck.markdown(_result(True, [same]))


def test_without_a_gpu_only_a_dry_run_runs(tmp_path, capsys):
    assert gpucheck.main([str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "not a GPU" in err and "--dry-run" in err
    assert not (tmp_path / "out").exists()


def test_the_script_runs_dry_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.sh end to end on the CPU, as CI can: two runs, their diff,
    the GPU-only check listed as skipped, the files written."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHON": sys.executable, "JAXREPRO_WHEELS": str(tmp_path / "none")}
    r = subprocess.run(
        [str(ROOT / "benchmarks/gpu_check.sh"), str(out), "--dry-run", "--models", "convnet",
         "--checks", "a", "c", "--steps", "2", "--work", str(work)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["environment"]["backend"] == "cpu"
    (a,) = result["checks"]
    assert (a["check"], a["status"], a["verdict"]) == ("a", "done", "identical")
    assert a["initial_state_equal"] is True and a["logits_ulp_step0"] == 0
    assert result["skipped"] == [
        {"what": "c convnet", "status": "skipped", "reason": gpucheck.GPU_ONLY["c"]}
    ]
    table = (out / "gpu_check.md").read_text()
    assert "not a GPU result" in table and "| a | convnet | det 1 vs det 2 | yes |" in table
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/convnet-det-1.log", "runs/convnet-det-2/final.json"} <= names
    finals = [
        json.loads((work / "runs" / n / "final.json").read_text())
        for n in ("convnet-det-1", "convnet-det-2")
    ]
    assert finals[0]["final_state_sha256"] == finals[1]["final_state_sha256"]


# ------------------------------------------------------- the fingerprint's GPU fields


def test_on_a_cpu_the_fingerprint_records_the_gpu_flags_and_no_gpu():
    gpu = determinism.fingerprint()["gpu"]
    assert gpu["devices"] == [] and "driver" not in gpu
    assert set(determinism.GPU_FLAGS) <= set(gpu["xla_gpu_flags"])


def test_the_gpu_fields_come_from_the_driver_and_the_cuda_plugin(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H200, 580.159.04, 143771 MiB'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    def broken():
        raise RuntimeError("no GPU")

    versions = types.ModuleType("jax_cuda13_plugin._versions")
    versions.cuda_runtime_get_version = lambda: 13000
    versions.cudnn_get_version = lambda: 91400
    versions.cublas_get_version = broken
    monkeypatch.setitem(sys.modules, "jax_cuda13_plugin", types.ModuleType("jax_cuda13_plugin"))
    monkeypatch.setitem(sys.modules, "jax_cuda13_plugin._versions", versions)
    device = types.SimpleNamespace(
        platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0"
    )
    gpu = determinism.gpu_fingerprint(
        [device], "--xla_gpu_deterministic_ops=true --xla_cpu_max_isa=AVX"
    )
    assert gpu["xla_gpu_flags"] == ["--xla_gpu_deterministic_ops=true"]
    assert gpu["devices"] == [{"kind": "NVIDIA H200", "compute_capability": "9.0"}]
    assert gpu["driver"]["driver"] == "580.159.04"
    assert gpu["driver"]["gpus"] == [
        {"name": "NVIDIA H200", "driver": "580.159.04", "memory": "143771 MiB"}
    ]
    assert gpu["cuda"]["plugin"] == "jax_cuda13_plugin"
    assert (gpu["cuda"]["cuda_runtime"], gpu["cuda"]["cudnn"]) == (13000, 91400)
    assert gpu["cuda"]["cublas"] == "error: no GPU"  # recorded, not fatal
    assert "cusparse" not in gpu["cuda"]  # a function the plugin lacks is left out


# ------------------------------------------------------- guards for moved APIs


def test_backend_check_survives_jax_moving_its_private_names(monkeypatch):
    assert determinism.backend_started()  # this process has computed already
    monkeypatch.delattr(xla_bridge, "backends_are_initialized")
    assert determinism.backend_started()  # the older spelling: the _backends dict
    monkeypatch.setattr(xla_bridge, "_backends", {})
    assert not determinism.backend_started()
    monkeypatch.delattr(xla_bridge, "_backends")
    assert determinism.backend_started()  # unknown: assume started, refuse to change flags


def test_a_numpy_without_cpu_features_costs_the_portable_check_only(monkeypatch):
    real = importlib.import_module

    def no_features(name, *args):
        if name.endswith("_multiarray_umath"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_features)
    assert determinism._numpy_cpu_features() == {}
    monkeypatch.setattr(determinism, "__cpu_features__", {})
    with pytest.raises(determinism.ModeError, match="cannot check this CPU"):
        determinism.check_cpu("portable")
    determinism.check_cpu("machine")


def test_a_copy_without_git_names_the_commit_it_was_given(monkeypatch):
    def no_git(*args):
        raise OSError("not a checkout")

    monkeypatch.setattr(provenance, "_git", no_git)
    monkeypatch.delenv(provenance.COMMIT_VARIABLE, raising=False)
    assert "not a git checkout" in provenance.commit()
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "abc123def456")
    assert provenance.commit().startswith("abc123def456 (given by")


def test_the_flags_were_checked_against_the_locked_jaxlib():
    """Moving the lock's jaxlib means checking jaxrepro's XLA flags against it (XLA ends
    a process at a flag it does not know) and naming it here."""
    assert determinism._version("jaxlib") in determinism.FLAGS_CHECKED_WITH
    assert determinism.known_flags("--xla_cpu_no_such_flag=1") == "--xla_cpu_no_such_flag=1"


def test_a_real_xla_names_the_flags_it_does_not_know():
    flags = ["--xla_cpu_max_isa=AVX", "--xla_cpu_no_such_flag=1", "--xla_gpu_no_such_flag=2"]
    assert determinism.unknown_xla_flags(flags) == flags[1:]


def test_on_another_jaxlib_unknown_cpu_flags_are_dropped_and_recorded(monkeypatch, capsys):
    bogus = "--xla_cpu_no_such_flag=1"
    monkeypatch.setattr(determinism, "FLAGS_CHECKED_WITH", ())
    monkeypatch.setattr(determinism, "_dropped", [])
    monkeypatch.delenv(determinism.CHECKED_VARIABLE, raising=False)
    monkeypatch.setattr(determinism, "own_flags", lambda: {bogus, *determinism.GPU_FLAGS})
    flags = f"--xla_dump_to=/tmp/d {bogus} {' '.join(determinism.GPU_FLAGS)}"
    kept = determinism.known_flags(flags)
    assert kept.split() == ["--xla_dump_to=/tmp/d", *determinism.GPU_FLAGS]
    assert determinism.fingerprint()["xla_flags_dropped"] == [bogus]
    assert bogus in capsys.readouterr().err
    # a child (which inherits the variable) does not ask XLA again about the same flags,
    # and asks only about those its parent did not (another mode's, say)
    monkeypatch.setattr(determinism, "unknown_xla_flags", lambda f: pytest.fail("asked again"))
    assert determinism.known_flags(flags) == kept
    other = "--xla_cpu_other_unknown=1"
    monkeypatch.setattr(determinism, "own_flags", lambda: {bogus, other, *determinism.GPU_FLAGS})
    monkeypatch.setattr(determinism, "unknown_xla_flags", lambda f: f if f == [other] else 1 / 0)
    assert determinism.known_flags(f"{flags} {other}") == kept
    # a GPU determinism flag is never dropped
    monkeypatch.delenv(determinism.CHECKED_VARIABLE)
    monkeypatch.setattr(determinism, "unknown_xla_flags", lambda f: [determinism.GPU_FLAGS[0]])
    with pytest.raises(determinism.ModeError, match="GPU determinism flag"):
        determinism.known_flags(flags)

"""Determinism modes: `portable` bits are a function of the config and the lock file.

A process runs one mode (XLA reads its flags once), and this test process runs
`machine`, so every portable run here is a process of its own:

* the golden: both models' short runs in portable mode end in the SHA-256s below, on
  whatever x86-64 CPU runs the suite (CI machines are not all one CPU);
* `jaxrepro.analysis.variants` in both modes, all cores against one: portable keeps
  the bits and every explanation method's heatmaps, machine mode does not (so the
  check can fail); emulated CPUs are in `test_emulated_cpus.py`;
* one compiled train step called many times in one process (jax issue 39741).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import MODELS, ROOT, SHORT_RUN, run_cli, short_variants, tiny_spec, train_tiny
from PIL import Image

from jaxrepro import determinism
from jaxrepro.train import cli as train_cli
from jaxrepro.train import loop, rundir

# Final state SHA-256 of each model's SHORT run in portable mode.
GOLDEN = {
    "convnet": "d4397ea2c7f48f0395da431bf05b89d843198d89933f9fd70de173b6f3d16a6a",
    "minixception": "3981017ca37a4e89055508c7576e2ce3bcb9b9558e128d876e5a6201d224b1e8",
}
GOLDEN_COMMAND = (
    "python -m jaxrepro.analysis.train_configs /tmp/golden experiments/convnet.py:tiny "
    "experiments/minixception.py:tiny --config.determinism=portable "
    + " ".join(f"--config.{o}" for o in SHORT_RUN)
)


# -- the mode itself ---------------------------------------------------------------------


def test_an_unknown_mode_names_the_valid_ones():
    with pytest.raises(determinism.ModeError, match="valid modes: machine, portable"):
        determinism.check_mode("fast")


def test_the_mode_cannot_change_once_the_backend_runs(capsys):
    jax.devices()  # the backend runs, with machine mode's flags
    assert determinism.mode() == "machine" and determinism.backend_started()
    with pytest.raises(determinism.ModeError, match="JAXREPRO_DETERMINISM=portable"):
        determinism.apply("portable")
    # the training CLI: a clear error and exit status 2, never a run in the other mode
    code = train_cli.main([tiny_spec("convnet"), "--config.determinism=portable"])
    assert code == 2 and "can no longer change" in capsys.readouterr().err
    assert train_cli.main([tiny_spec("convnet"), "--config.determinism=fast"]) == 2


def test_the_environment_and_the_config_must_agree(monkeypatch):
    config = {"determinism": "machine"}
    assert determinism.apply_config(config) == "machine"
    monkeypatch.setenv(determinism.ENV_VARIABLE, "portable")
    with pytest.raises(determinism.ModeError, match="pass --config.determinism=portable"):
        determinism.apply_config(config)


def test_portable_flags_keep_the_users_own():
    flags = determinism.xla_flags("portable", "--xla_dump_to=/tmp/d --xla_cpu_max_isa=AVX")
    assert flags.split()[0] == "--xla_dump_to=/tmp/d"
    assert set(determinism.PORTABLE_FLAGS) <= set(flags.split())
    assert "--xla_cpu_experimental_ynn_fusion_type=dot,reduce" not in flags
    # from portable back to machine: none of portable's flags stay behind
    machine = determinism.xla_flags("machine", flags).split()
    assert set(machine) == {
        "--xla_dump_to=/tmp/d",
        *determinism.GPU_FLAGS,
        *determinism.MACHINE_FLAGS,
    }


def test_portable_names_the_cpu_feature_it_lacks(monkeypatch):
    monkeypatch.setattr(determinism, "__cpu_features__", {"AVX": False, "SSE42": True})
    with pytest.raises(determinism.ModeError, match="needs the CPU feature.* AVX"):
        determinism.check_cpu("portable")
    determinism.check_cpu("machine")  # machine mode asks nothing of the CPU
    monkeypatch.setattr(determinism, "X86", False)
    with pytest.raises(determinism.ModeError, match="x86-64 CPUs only"):
        determinism.check_cpu("portable")


def test_the_mode_is_recorded(tmp_path):
    train_tiny("convnet", tmp_path / "run", "num_epochs=1", "data.num_train=16")
    env = json.loads((tmp_path / "run" / "environment.jsonl").read_text().splitlines()[0])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert env["determinism"] == config["determinism"] == "machine"
    assert "AVX" in env["cpu"]["isa"]


# -- the golden ---------------------------------------------------------------------------


def test_portable_runs_end_in_the_golden_sha(portable_runs):
    got = {m: json.loads((portable_runs / m / "final.json").read_text()) for m in MODELS}
    env = json.loads((portable_runs / "convnet" / "environment.jsonl").read_text().splitlines()[0])
    assert env["determinism"] == "portable"
    moved = {
        m: got[m]["final_state_sha256"] for m in MODELS if got[m]["final_state_sha256"] != GOLDEN[m]
    }
    assert not moved, (
        f"portable mode's runs no longer end in the golden SHA-256 on this CPU "
        f"({env['cpu']['model']}, {env['threads']['affinity']} cores): {moved}. If a "
        f"deliberate change of the numerics moved them, run `{GOLDEN_COMMAND}`, put the "
        "printed SHA-256s in GOLDEN and say why in the commit and CHANGELOG.md; otherwise "
        "this machine computes other bits (`jaxrepro.analysis.diff` names where)."
    )


# -- other CPUs and core counts -----------------------------------------------------------


@pytest.fixture(scope="module")
def portable_out(tmp_path_factory):
    return tmp_path_factory.mktemp("portable")


@pytest.fixture(scope="module")
def native_rows(portable_out) -> list[dict]:
    """All cores against one, every explanation method."""
    return short_variants(
        portable_out / "native", ["default", "one-core"], "portable", explain_images=1
    )


@pytest.fixture(scope="module")
def portable_runs(native_rows, portable_out):
    return portable_out / "native" / "portable" / "default"


def test_portable_bits_and_explanations_on_one_core(native_rows):
    got = {r["experiment"]: (r["verdict"], r["explanations_differing"]) for r in native_rows}
    assert got == {m: ("identical", []) for m in MODELS}


def test_the_explain_cli_takes_the_runs_mode(portable_runs, tmp_path):
    """`python -m jaxrepro.explain` on a portable run, in a fresh process, explains in
    portable mode: its Grad-CAM of a validation image has the bits of the heatmap the
    training process made."""
    run = portable_runs / "convnet"
    pixels = loop.load_data(rundir.RunDir(run).read_config()).validation.images[0]
    Image.fromarray(pixels).save(tmp_path / "val0.png")
    out = tmp_path / "heatmaps"
    run_cli(
        "jaxrepro.explain",
        str(run),
        str(tmp_path / "val0.png"),
        "--class",
        "dog",
        "--out",
        str(out),
        "--no-progress",
    )
    with np.load(run / "explanations.npz", allow_pickle=False) as made:
        assert np.load(out / "val0.gradcam.npy").tobytes() == made["gradcam"][0].tobytes()


def test_portable_bits_do_not_depend_on_the_device_count(tmp_path):
    """With fixed micro-batches, one simulated device and two give the same portable bits
    (both models' short runs, each device count a process of its own)."""
    finals = {}
    for devices in (1, 2):
        out = tmp_path / f"devices{devices}"
        run_cli(
            "jaxrepro.analysis.train_configs",
            str(out),
            *(tiny_spec(m) for m in MODELS),
            *(f"--config.{o}" for o in SHORT_RUN),
            "--config.determinism=portable",
            f"--config.num_devices={devices}",
            "--config.microbatches=2",
            "--no-progress",
            env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        )
        finals[devices] = {
            m: (
                json.loads((out / m / "final.json").read_text())["final_state_sha256"],
                (out / m / "steps.jsonl").read_text(),  # every step's fingerprints
            )
            for m in MODELS
        }
    assert finals[1] == finals[2]


def test_machine_bits_change_with_the_core_count(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this check needs 2 cores (one core against several)")
    rows = short_variants(tmp_path, ["default", "one-core"], "machine")
    assert {(r["experiment"], r["verdict"]) for r in rows} == {(m, "different") for m in MODELS}
    assert all(r["first_divergent_step"] == 1 for r in rows)


# -- one compiled step, many calls --------------------------------------------------------


@pytest.mark.parametrize("mode", ["machine", "portable"])
def test_one_compiled_step_gives_the_same_bits_on_every_call(mode):
    r = subprocess.run(
        [sys.executable, "tests/repeat_step.py", mode, *(tiny_spec(m) for m in MODELS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, determinism.ENV_VARIABLE: mode},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert {m: (g["mode"], g["calls"], len(g["distinct"])) for m, g in got.items()} == {
        m: (mode, 40, 1) for m in MODELS
    }

"""Portable mode on other CPUs: `jaxrepro.analysis.variants` with `cpu:<model>` variants.

Each variant's process runs under `qemu-x86_64 -cpu MODEL` and compiles for that CPU, as
a process on such a machine would: about 7 minutes for both models' short runs, so the
emulated CPUs explain with Grad-CAM only (test_portable.py compares every method between
one core and all cores). QEMU 7.2 emulates up to AVX2: the AVX-512 machine is whatever
native CPU has it (the golden in test_portable.py).
"""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import MODELS, short_variants

from jaxrepro.analysis import variants

# Emulated CPUs: an Intel AVX2 one, an AMD AVX2 one, and an Intel AVX-512 model (QEMU 7.2
# runs it without AVX-512; a native AVX-512 CPU runs the golden).
EMULATED = ("cpu:Haswell", "cpu:EPYC-Rome", "cpu:Skylake-Server")


@pytest.fixture(scope="module")
def emulated_out(tmp_path_factory):
    return tmp_path_factory.mktemp("emulated")


@pytest.fixture(scope="module")
def emulated_rows(emulated_out) -> list[dict]:
    """The native CPU against emulated ones, with Grad-CAM (every method takes minutes
    to compile under emulation; they are all compared on one core and all cores)."""
    if shutil.which(variants.EMULATOR) is None:
        pytest.fail(f"{variants.EMULATOR} is needed: apt-get install -y qemu-user")
    return short_variants(
        emulated_out,
        ["default", *EMULATED],
        "portable",
        explain_images=1,
        explain_methods=["gradcam"],
    )


def test_portable_bits_and_gradcam_on_emulated_cpus(emulated_rows):
    got = {
        (r["experiment"], r["variant"]): (r["verdict"], r["explanations_differing"])
        for r in emulated_rows
    }
    assert got == {(m, v): ("identical", []) for m in MODELS for v in EMULATED}


def test_the_emulated_cpus_have_avx2_and_fma_but_no_avx512(emulated_rows, emulated_out):
    """Each emulated run recorded the CPU features it saw through CPUID (QEMU 7.2's)."""
    isa = {
        v: json.loads(
            (emulated_out / "portable" / v / "convnet" / "environment.jsonl")
            .read_text()
            .splitlines()[0]
        )["cpu"]["isa"]
        for v in ("default", *EMULATED)
    }
    for v in EMULATED:
        assert "AVX512F" not in isa[v] and {"AVX2", "FMA3"} <= set(isa[v])

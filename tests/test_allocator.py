"""`jaxrepro.allocator`: a jaxrepro command runs with transparent huge pages, with the
same bits as without, and a TensorFlow reference process runs without them; every XLA
compilation is followed by giving malloc's free memory back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from conftest import ROOT, records, tiny_spec

from jaxrepro import allocator
from jaxrepro.tfref import process

needs_glibc_thp = pytest.mark.skipif(
    not allocator.supported(), reason="needs Linux, glibc 2.35+ and THP not 'never'"
)


def test_the_tunable_is_added_once_and_a_users_choice_is_kept():
    assert allocator.with_tunable("") == "glibc.malloc.hugetlb=1"
    assert (
        allocator.with_tunable("glibc.malloc.arena_max=2")
        == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    )
    once = allocator.with_tunable("glibc.malloc.arena_max=2")
    assert allocator.with_tunable(once) == once
    assert allocator.with_tunable("glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"


def test_a_tensorflow_process_runs_without_the_setting_but_keeps_the_users_tunables():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "1"}
    tf_env = process.tf_side_environment(env)
    assert tf_env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and tf_env["A"] == "1"
    assert "GLIBC_TUNABLES" not in process.tf_side_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    )
    # the user's own hugetlb value is theirs, not jaxrepro's
    assert (
        process.tf_side_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"})["GLIBC_TUNABLES"]
        == "glibc.malloc.hugetlb=2"
    )


def test_the_kernel_mode_is_the_bracketed_word(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert allocator.kernel_mode(setting) == "madvise"
    assert allocator.kernel_mode(tmp_path / "missing") is None


def test_only_a_process_started_as_a_jaxrepro_command_is_replaced(monkeypatch):
    def main_module(spec_name: str | None):
        module = types.ModuleType("__main__")
        module.__spec__ = types.SimpleNamespace(name=spec_name) if spec_name else None
        return module

    monkeypatch.setitem(sys.modules, "__main__", main_module("jaxrepro.train.__main__"))
    assert allocator.started_as_command()
    monkeypatch.setitem(sys.modules, "__main__", main_module("ipykernel_launcher"))
    assert not allocator.started_as_command()
    monkeypatch.setitem(sys.modules, "__main__", main_module(None))
    monkeypatch.setattr(sys, "argv", ["/venv/bin/jaxrepro-train", "x.py"])
    assert allocator.started_as_command()
    monkeypatch.setattr(sys, "argv", ["/usr/bin/my-notebook"])
    assert not allocator.started_as_command()
    # Not a command: `ensure` returns instead of replacing the process.
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    allocator.ensure()


def _train(workdir: Path, tunables: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    subprocess.run(
        [sys.executable, "-m", "jaxrepro.train", tiny_spec("convnet"), "--workdir", str(workdir)]
        + ["--no-progress"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    environment = json.loads((workdir / "environment.jsonl").read_text().splitlines()[-1])
    return environment["memory"]


@needs_glibc_thp
def test_a_command_gives_itself_huge_pages_and_they_change_no_bit(tmp_path):
    # Started without the tunable, the command re-executes itself with it ...
    memory = _train(tmp_path / "huge", None)
    assert memory["glibc_tunables"] == "glibc.malloc.hugetlb=1"
    # ... and the user's "off" is kept; the two runs have the same bits.
    memory = _train(tmp_path / "small", "glibc.malloc.hugetlb=0")
    assert memory["glibc_tunables"] == "glibc.malloc.hugetlb=0"
    assert records(tmp_path / "huge") == records(tmp_path / "small")


def test_each_compilation_gives_mallocs_free_memory_back(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_malloc_trim", lambda: lambda pad: calls.append(pad))
    allocator.release_after_compiles()  # jaxrepro's import registered it; once is enough
    x = jnp.arange(7.0).block_until_ready()

    def fresh(x):  # a function never compiled before in this process
        return jnp.sin(x) * 3.25 + 0.125

    before = len(calls)
    jax.jit(fresh)(x).block_until_ready()
    after_compile = len(calls)
    assert after_compile > before and set(calls) == {0}
    jax.jit(fresh)(x).block_until_ready()  # cached: no compilation, nothing given back
    assert len(calls) == after_compile


@pytest.mark.skipif(allocator.glibc_version() is None, reason="needs glibc")
def test_giving_memory_back_calls_glibc():
    assert allocator.give_back_free_memory() is True

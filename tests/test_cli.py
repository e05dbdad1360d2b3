"""What every command-line tool shares, and every documented command's `--help`."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from jaxrepro import cli
from jaxrepro.errors import UserError


def test_split_overrides_keeps_order_and_strips_the_prefix():
    rest, overrides = cli.split_overrides(
        ["cfg.py", "--config.a=1", "--workdir", "w", "--config.b.c=x"]
    )
    assert rest == ["cfg.py", "--workdir", "w"] and overrides == ["a=1", "b.c=x"]
    assert cli.as_arguments(overrides) == ["--config.a=1", "--config.b.c=x"]


def test_guarded_turns_a_user_error_into_exit_2(capsys):
    @cli.guarded
    def main(argv=None):
        raise UserError("the file is missing; pass --out")

    assert main([]) == 2
    assert capsys.readouterr().err == "error: the file is missing; pass --out\n"

    @cli.guarded
    def broken(argv=None):
        raise KeyError("a bug keeps its traceback")

    with pytest.raises(KeyError):
        broken([])


def test_run_child_reports_the_failure_with_its_stderr():
    with pytest.raises(cli.ChildError) as e:
        cli.run_child("json.tool", ["--no-such-option-boom"], what="the probe")
    assert str(e.value).startswith("the probe exited 2:\n") and e.value.returncode == 2
    assert "--no-such-option-boom" in str(e.value)  # the child's own message
    assert "JSON" in cli.run_child("json.tool", ["--help"]).stdout


def test_a_child_limited_to_one_cpu_sees_one():
    code = "import os; print(len(os.sched_getaffinity(0)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        preexec_fn=cli._affinity(1),
        check=True,
    )
    assert out.stdout.strip() == "1"


def _readme_modules() -> list[str]:
    """Every `python -m MODULE` the README names."""
    text = (ROOT / "README.md").read_text()
    return sorted(set(re.findall(r"python -m (jaxrepro[\w.]*)", text)))


def test_the_readme_names_commands():
    assert "jaxrepro.train" in _readme_modules()


HELP_RUNNER = """
import contextlib, io, json, runpy, sys
out = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    buffer = io.StringIO()
    code = None
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    out[module] = [code, buffer.getvalue()]
print(json.dumps(out))
"""


def test_every_readme_command_runs_and_explains_itself():
    """`python -m MODULE --help` for every module the README names, run as `-m` runs
    them (runpy) in one fresh process: exit 0 and a usage line."""
    modules = _readme_modules()
    r = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    results = json.loads(r.stdout.splitlines()[-1])
    assert sorted(results) == modules
    for module, (code, text) in results.items():
        assert code in (0, None) and "usage:" in text, (module, code, text[-500:])

"""`python -m jaxrepro.analysis.kernels`: JAX against Keras op by op, on both TF kernel libraries.

One run of the tool (every op; oneDNN and Eigen, each in a TF process of its own), then
facts about it: what it covers, what is bit for bit equal (checked on the written
arrays' bytes, not only on the report), that the report says what the arrays show, and
the table.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest

from jaxrepro import cli
from jaxrepro.analysis import kernels
from jaxrepro.tfref import process, weights

KERNELS = ("onednn", "eigen")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kernels")
    buffer = io.StringIO()  # the CLI's stdout (capsys is per test, this fixture per module)
    with contextlib.redirect_stdout(buffer):
        code = kernels.main(["--tf-kernels", *KERNELS, "--out", str(out), "--keep-arrays"])
    assert code == 0
    return {
        "out": out,
        "stdout": buffer.getvalue(),
        "report": json.loads((out / "kernels.json").read_text()),
        "jax": weights.load(out / "jax.npz"),
        "keras": {k: weights.load(out / f"keras_{k}.npz") for k in KERNELS},
    }


def _ops(report: dict) -> dict[str, dict]:
    return {op["op"]: op for op in report["ops"]}


def _assert_bitwise(run: dict, key: str, library: str) -> None:
    """Same dtype, shape and bytes in both sides' files, and the report says so."""
    a, b = run["jax"][key], run["keras"][library][key]
    assert (a.dtype, a.shape) == (b.dtype, b.shape), key
    assert a.tobytes() == b.tobytes(), f"{key} ({library}) is not bitwise equal"
    op, name = key.split("/", 1)
    assert _ops(run["report"])[op]["outputs"][name]["diff"][library]["equal"] is True


def test_every_op_is_measured_on_both_libraries(run):
    report = run["report"]
    ops = _ops(report)
    assert list(ops) == [op.name for op in kernels.OPS]
    for op in kernels.OPS:
        outputs = ops[op.name]["outputs"]
        assert {f"d_{k}" for k in op.wrt} <= set(outputs)
        assert "y" in outputs or op.name == "rmsprop"
        for name, o in outputs.items():
            assert set(o["diff"]) == set(KERNELS), (op.name, name)
    reported = {f"{op['op']}/{name}" for op in report["ops"] for name in op["outputs"]}
    assert reported == set(run["jax"]) == set(run["keras"]["onednn"]) == set(run["keras"]["eigen"])
    for library in KERNELS:
        described = report["keras_runtime"][library]
        assert described["recipe"]["deterministic"] is True
        assert described["recipe"]["kernels"] == library
        assert described["onednn"] == process.KERNELS[library]
        assert described["jax_backend_started"] is False
    assert report["provenance"]["command"].startswith("python -m jaxrepro.analysis.kernels")
    # The JAX process ran the whole tool without loading either TF framework.
    assert "tensorflow" not in sys.modules and "keras" not in sys.modules


def test_the_report_says_what_the_arrays_show(run):
    for op in run["report"]["ops"]:
        for name, o in op["outputs"].items():
            key = f"{op['op']}/{name}"
            for library in KERNELS:
                same = run["jax"][key].tobytes() == run["keras"][library][key].tobytes()
                assert o["diff"][library]["equal"] is same, (key, library)


@pytest.mark.parametrize("library", KERNELS)
def test_rmsprop_and_the_loss_value_are_bitwise(run, library):
    for key in ("rmsprop/w1", "rmsprop/w2", "bce/y"):
        _assert_bitwise(run, key, library)


@pytest.mark.parametrize("library", KERNELS)
def test_max_pooling_is_bitwise_forward_and_backward(run, library):
    for key in ("maxpool2x2/y", "maxpool2x2/d_x", "maxpool3x3s2/y", "maxpool3x3s2/d_x"):
        _assert_bitwise(run, key, library)


def test_the_convolution_forward_is_bitwise_on_eigen(run):
    _assert_bitwise(run, "conv3x3/y", "eigen")


def test_first_difference_is_the_first_unequal_output_of_a_step(run):
    report = run["report"]
    ops = _ops(report)
    for model, per_library in report["first_difference"].items():
        order = [f"{o}/{n}" for o, n in kernels.step_order(model, ops)]
        for library, first in per_library.items():
            equal = [
                ops[k.split("/")[0]]["outputs"][k.split("/", 1)[1]]["diff"][library]["equal"]
                for k in order
            ]
            expected = next((k for k, e in zip(order, equal) if not e), None)
            assert first == expected, (model, library)


def test_the_table_has_a_row_per_op_and_output(run):
    md = (run["out"] / "kernels.md").read_text()
    assert md.strip() in run["stdout"]
    lines = md.splitlines()
    start = lines.index("| op | output | shape | " + " | ".join(KERNELS) + " |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(tuple(cell.strip() for cell in line.strip("|").split("|")))
    expected = [(op["op"], name) for op in run["report"]["ops"] for name in op["outputs"]]
    assert [r[:2] for r in rows] == expected
    ops = _ops(run["report"])
    for op, name, _, *cells in rows:
        for library, cell in zip(KERNELS, cells):
            assert (cell == "bitwise") is ops[op]["outputs"][name]["diff"][library]["equal"]


def test_an_unknown_kernel_library_is_a_user_error(tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse's own errors exit 2
        kernels.main(["--tf-kernels", "nonsense", "--out", str(tmp_path)])
    assert e.value.code == 2


def test_a_failing_tf_process_exits_1(tmp_path, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise cli.ChildError("the Keras process (eigen)", 1, "boom")

    monkeypatch.setattr(kernels, "run_keras", fail)
    assert kernels.main(["--tf-kernels", "eigen", "--out", str(tmp_path)]) == 1
    assert "boom" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # without --keep-arrays the exchange is temporary

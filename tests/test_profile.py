"""`python -m jaxrepro.analysis.profile`: XLA:CPU's trace of a training step, by layer.

The timings themselves are never asserted (shared CI cores); what is tested is that
the trace is read, that every instruction is found in the compiled module and put in
the right layer and pass, and that bad input is an error with exit status 2.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_spec

from jaxrepro import config as configlib
from jaxrepro import train
from jaxrepro.analysis import profile


@pytest.fixture(scope="module")
def tiny_convnet():
    """The tiny ConvNet's model, initial variables and a batch of its images."""
    config = configlib.resolve(tiny_spec("convnet"))
    model = train.build_model(config)
    keys = train.stream_keys(config)
    size = config.data.image_size
    state = train.init_state(model, train.build_optimizer(config), keys["init"], size)
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    return model, state.variables, images


def test_instructions_name_the_source_of_a_compiled_module():
    def f(x, k):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(jnp.maximum(y, 0.0))

    x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    hlo = profile.instructions(jax.jit(f).lower(x, k).compile().as_text())
    convs = [v for v in hlo.values() if v["opcode"] == "convolution"]
    assert len(convs) == 1 and convs[0]["op_name"].endswith("conv_general_dilated")
    assert all(name and " " not in name for name in hlo)


def test_convolutions_get_their_textbook_operation_count():
    # N=4, 20x20x8 in, 3x3 kernel, 16 out: forward and kernel gradient each sum 9*8
    # (resp. 18*18*4) products per output; the input gradient runs over the output
    # gradient padded by 2, its window's zeros counted.
    def loss(x, k):
        y = jax.lax.conv_general_dilated(
            x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum(y * y)

    x, k = jnp.ones((4, 20, 20, 8)), jnp.ones((3, 3, 8, 16))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, k).compile().as_text()
    hlo = profile.instructions(text)
    counts = sorted(v["gflop"] for v in hlo.values() if v["opcode"] == "convolution")
    forward = 2 * 4 * 18 * 18 * 16 * 9 * 8 / 1e9
    assert counts == pytest.approx([forward, forward, 2 * 4 * 20 * 20 * 8 * 9 * 16 / 1e9])
    assert all(v["gflop"] is None for v in hlo.values() if v["opcode"] != "convolution")
    assert profile.gflops(forward, 2.0) == pytest.approx(forward * 500)


def test_a_rate_above_the_peak_is_marked_as_a_missed_event():
    assert profile._rate(300.0, 200.0) == "300 (above peak)"
    assert (profile._rate(150.0, 200.0), profile._rate(None, 200.0)) == ("150", "-")


@pytest.mark.parametrize(
    "op_name, expected",
    [
        ("jit(step_fn)/jvp(ConvNet)/conv2/conv_general_dilated", ("conv2", "forward")),
        ("jit(step_fn)/transpose(jvp(ConvNet))/conv2/conv_general_dilated", ("conv2", "backward")),
        ("jit(step_fn)/transpose(jvp(ConvNet))/select_n", ("between layers", "backward")),
        ("jit(step_fn)/jvp(ConvNet)/jit(relu)/max", ("between layers", "forward")),
        ("jit(step_fn)/vmap()/gather", ("-", "outside the model")),
        ("", ("-", "no source (XLA's layout copies)")),
    ],
)
def test_each_instruction_gets_its_layer_and_pass(op_name, expected):
    assert profile.attribute(op_name, {"conv1", "conv2", "dense"}, "ConvNet") == expected


def test_the_profile_of_the_tiny_convnet_covers_every_layer_both_ways(tmp_path, capsys):
    out = tmp_path / "profile"
    spec = tiny_spec("convnet")
    assert profile.main([spec, "--steps", "1", "--top", "5", "--out", str(out)]) == 0
    result = json.loads((out / "profile.json").read_text())
    groups = {(g["layer"], g["pass"]): g for g in result["by_layer"]}
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        for pass_ in ("forward", "backward"):
            # conv1's forward pass is jaxrepro's kernel, a custom call (`first_conv.cc`).
            op = "ffi_call" if (layer, pass_) == ("conv1", "forward") else "conv_general_dilated"
            assert groups[layer, pass_]["primitives"].get(op, 0) > 0
            # a rate for XLA's convolutions, none for the kernel's custom call
            rate = groups[layer, pass_]["conv_gflops"]
            assert (rate is None) if op == "ffi_call" else (rate > 0)
    assert ("dense", "backward") in groups and ("-", "outside the model") in groups
    assert sum(g["share"] for g in result["by_layer"]) == pytest.approx(1.0)
    assert result["mode"] == "machine" and len(result["step_wall_ms"]) == 1
    assert result["fp32_peak_gflops"] > 0
    text = (out / "profile.md").read_text()
    assert (
        "| conv2 | backward |" in text
        and sum(line.startswith("| `") for line in text.splitlines()) == 5
    )
    assert text.strip() in capsys.readouterr().out


def test_the_profile_of_inference_is_the_forward_pass_alone(tmp_path):
    out = tmp_path / "infer"
    assert (
        profile.main([tiny_spec("convnet"), "--step", "infer", "--steps", "1", "--out", str(out)])
        == 0
    )
    result = json.loads((out / "profile.json").read_text())
    passes = {g["pass"] for g in result["by_layer"] if g["layer"] != "-"}
    assert result["step"] == "infer" and passes == {"forward"}
    layers = {g["layer"] for g in result["by_layer"]}
    assert {"conv1", "conv5", "dense"} <= layers


def test_conv_calls_find_every_convolution_with_its_input(tiny_convnet):
    model, variables, images = tiny_convnet
    calls = profile.conv_calls(model, variables, images)
    assert [c.layer for c in calls] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    size = images.shape[1]
    assert calls[0].input.shape == (*images.shape[:3], 3)
    assert calls[1].input.shape == (images.shape[0], (size - 2) // 2, (size - 2) // 2, 32)
    # the unbound module computes what the model's layer computes
    _, conv, params, x = calls[1]
    y = conv.apply({"params": params}, x)
    _, sown = model.apply(
        variables, images.astype(np.float32), train=False, mutable=["intermediates"]
    )
    relu = np.asarray(jnp.maximum(y, 0.0))
    assert np.count_nonzero(relu) > relu.size // 10  # not a trivial all-zero map
    np.testing.assert_array_equal(relu, np.asarray(sown["intermediates"]["conv2_out"][0]))


def test_convolutions_alone_and_the_ceiling_they_set(tmp_path, capsys):
    out = tmp_path / "alone"
    spec = tiny_spec("convnet")
    args = [spec, "--steps", "1", "--top", "0", "--convolutions-alone", "--out", str(out)]
    assert profile.main(args) == 0
    result = json.loads((out / "profile.json").read_text())
    rows = {(r["layer"], r["pass"]): r for r in result["convolutions_alone"]}
    both = {"forward", "kernel gradient"}
    assert {p for (layer, p) in rows if layer == "conv1"} == both  # its input is the image's
    assert {p for (layer, p) in rows if layer == "conv2"} == both | {"input gradient"}
    assert all(r["ms"] > 0 for r in rows.values())
    # conv2 of the tiny ConvNet: 80 px -> conv1 78 -> pool 39 -> conv2 37x37x64, 3x3x32
    batch = configlib.resolve(spec).batch_size
    want = 2 * batch * 37 * 37 * 64 * 9 * 32 / 1e9
    assert rows["conv2", "kernel gradient"]["gflop"] == pytest.approx(want)
    assert result["step_gflop"] > sum(r["gflop"] for r in rows.values()) / 2
    text = (out / "profile.md").read_text()
    assert "Each convolution alone" in text and "| conv2 |" in text
    total = sum(r["ms"] for r in rows.values())
    assert f"The convolutions alone: {total:.0f} ms per step" in text
    assert text.strip() in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "0"],
        ["--config.no_such_key=1"],
        ["--top", "-1"],
        ["--step", "predict"],
        ["--step", "infer", "--convolutions-alone"],
    ],
)
def test_bad_input_is_exit_status_2(tmp_path, args):
    try:
        code = profile.main([tiny_spec("convnet"), "--out", str(tmp_path), *args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2

"""`jaxrepro.analysis.decisions`: flipped ReLUs and pool windows, and aligned gradients.

A near-tie is built by hand: the ConvNet's first convolution passes the red channel
through, and two pixels of one pool-1 window differ by 2 ULP. The other side is the
same model on the same batch with one of them 2 ULP higher, so that the two forwards
are within rounding of each other everywhere and decide that one window differently,
which is what a framework difference does. The tests need no TensorFlow except the
last, which runs TF's pool gradients in a TF process of their own.
"""

from __future__ import annotations

import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro import models
from jaxrepro.analysis import compare
from jaxrepro.analysis import decisions as D
from jaxrepro.models.ops import pooling
from jaxrepro.models.spec import PoolPoint
from jaxrepro.tfref import process, weights
from jaxrepro.train import steps

CONVNET = models.get_spec("convnet").build(dropout_rate=0.0)
SMALL_XCEPTION = models.get_spec("minixception").module(
    dropout_rate=0.0, sizes=(8, 16), stem_features=8
)


def _grads(model, variables, x, y) -> dict[str, np.ndarray]:
    g = steps.loss_and_grads(
        model, variables["params"], variables.get("batch_stats", {}), jnp.asarray(x), y
    ).grads
    return weights.flatten(jax.device_get({"params": g}))


@pytest.fixture(scope="module")
def near_tie():
    """Our batch, the other side's (one pixel 2 ULP higher), and the weights."""
    rs = np.random.default_rng(0)
    x = rs.uniform(0, 100, (2, 80, 80, 3)).astype(np.float32)
    variables = jax.tree.map(np.asarray, CONVNET.init(jax.random.key(0), x, train=False))
    kernel = variables["params"]["conv1"]["kernel"].copy()
    kernel[..., 0] = 0.0
    kernel[1, 1, 0, 0] = 1.0  # conv1 channel 0 = the red pixel / 255, ReLU'd
    variables["params"]["conv1"]["kernel"] = kernel
    ulp = np.spacing(np.float32(200))
    x[0, 1, 1, 0], x[0, 1, 2, 0] = 200 + 2 * ulp, 200  # pool-1 window (0, 0), channel 0
    other = x.copy()
    other[0, 1, 2, 0] = 200 + 4 * ulp  # now the window's second pixel is the larger
    y = jnp.asarray([1.0, 0.0])
    return x, other, y, variables


def test_the_flipped_window_is_found_and_alignment_leaves_rounding(near_tie, tmp_path):
    x, other, y, variables = near_tie
    ours = _grads(CONVNET, variables, x, y)
    weights.save(tmp_path / "decisions.npz", D.training_forward(CONVNET, variables, other))
    weights.save(tmp_path / "gradients.npz", _grads(CONVNET, variables, other, y))
    jx = {
        "gradients": ours,
        "first_batch": (x, y),
        "initial_variables": variables,
        "decision_acts": D.training_forward(CONVNET, variables, x),
    }
    report = compare.decisions_report(CONVNET, jx, tmp_path)

    pools = {r["input"]: r for r in report["pools"]}
    assert pools["conv1_out"]["flipped"] == 1
    assert pools["conv1_out"]["flipped_margin_ulp_max"] == 2
    assert report["flipped_pool_windows"] == 1 and report["flipped_relu_elements"] == 0
    assert report["replay_rel_to_max"] == 0.0
    rows = {r["param"]: r for r in report["gradients"]}
    kernel = rows["params/conv1/kernel"]
    # The window's gradient moved by one pixel: far above rounding, and all of it is the
    # flipped decision; aligned, every gradient agrees to float32 rounding.
    assert kernel["measured_rel_to_max"] > 1e-4
    assert kernel["decisions_rel_to_max"] > 0.99 * kernel["measured_rel_to_max"]
    assert max(r["formula_rel_to_max"] for r in rows.values()) < 2e-6
    assert "conv1_out" in "\n".join(compare.format_decisions(report))


@pytest.mark.parametrize("model", [CONVNET, SMALL_XCEPTION], ids=["convnet", "minixception"])
def test_replaying_a_forwards_own_decisions_gives_its_gradient_bit_for_bit(model):
    size = 80 if model is CONVNET else 24
    x = jax.random.uniform(jax.random.key(1), (3, size, size, 3)) * 255
    y = jnp.asarray([0.0, 1.0, 1.0])
    variables = model.init(jax.random.key(2), x, train=False)
    acts = D.training_forward(model, variables, x)
    own = D.read(acts, D.points_of(model))
    chex.assert_trees_all_equal(
        D.aligned_gradients(model, variables, x, y, own),
        steps.loss_and_grads(
            model, variables["params"], variables.get("batch_stats", {}), x, y
        ).grads,
    )
    assert set(D.points_of(model).relus) <= set(acts)
    assert not D.compare(acts, acts, D.points_of(model))["pools"][0]["flipped"]


def test_decisions_that_do_not_fit_the_model_are_refused():
    x = jnp.zeros((1, 80, 80, 3))
    variables = CONVNET.init(jax.random.key(0), x, train=False)
    own = D.read(D.training_forward(CONVNET, variables, x), D.points_of(CONVNET))
    short = D.Decisions(own.masks[:-1], own.routes)
    with pytest.raises(ValueError, match="do not fit"):
        D.aligned_gradients(CONVNET, variables, x, jnp.zeros(1), short)


POINTS = {
    "2x2": (PoolPoint("x", (2, 2), (2, 2), "VALID"), pooling.max_pool_2x2),
    "3x3s2": (PoolPoint("x", (3, 3), (2, 2), "SAME"), pooling.max_pool_3x3_s2),
}


def _pool_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Pool inputs with exact ties (half-integers; + 0.0 drops signed zeros, whose max
    the two frameworks may pick either of) and upstream gradients."""
    rs = np.random.default_rng(seed)
    out = {}
    for name in POINTS:
        x = rs.standard_normal((2, 15, 16, 8)).astype(np.float32)
        x[0] = np.round(x[0] * 2) / 2 + np.float32(0.0)
        out[f"{name}_x"] = x
        ho, wo = (7, 8) if name == "2x2" else (8, 8)
        out[f"{name}_g"] = rs.standard_normal((2, ho, wo, 8)).astype(np.float32)
    return out


@pytest.mark.parametrize("name", sorted(POINTS))
def test_the_routed_pool_is_max_pooling_and_routes_as_select_and_scatter(name):
    point, op = POINTS[name]
    arrays = _pool_inputs()
    x, g = jnp.asarray(arrays[f"{name}_x"]), jnp.asarray(arrays[f"{name}_g"])
    y, vjp = jax.vjp(op, x)
    route = jnp.asarray(D.routing(np.asarray(x), point))
    routed = D._routed_pool(point)
    y2, vjp2 = jax.vjp(lambda v: routed(v, route), x)
    chex.assert_trees_all_equal(y2, y)
    chex.assert_trees_all_equal(vjp2(g), vjp(g))


TF_POOLS = """
import sys
import numpy as np
import tensorflow as tf

with np.load(sys.argv[1], allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
out = {}
for name, (k, s, padding) in {"2x2": (2, 2, "VALID"), "3x3s2": (3, 2, "SAME")}.items():
    x = tf.constant(arrays[name + "_x"])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.nn.max_pool2d(x, k, s, padding)
    out[name + "_y"] = y.numpy()
    out[name + "_dx"] = tape.gradient(y, x, output_gradients=arrays[name + "_g"]).numpy()
np.savez(sys.argv[2], **out)
"""


@pytest.mark.parametrize("kernels", sorted(process.KERNELS))
def test_max_pool_gradients_are_bitwise_equal_in_jax_and_tensorflow(kernels, tmp_path):
    arrays = _pool_inputs(1)
    np.savez(tmp_path / "in.npz", **arrays)
    subprocess.run(
        [sys.executable, "-c", TF_POOLS, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        env=process.child_environment(process.Recipe(deterministic=False, kernels=kernels)),
        check=True,
        timeout=300,
    )
    with np.load(tmp_path / "out.npz", allow_pickle=False) as tf_out:
        for name, (_, op) in POINTS.items():
            y, vjp = jax.vjp(op, jnp.asarray(arrays[f"{name}_x"]))
            (dx,) = vjp(jnp.asarray(arrays[f"{name}_g"]))
            chex.assert_trees_all_equal(np.asarray(y), tf_out[f"{name}_y"])
            chex.assert_trees_all_equal(np.asarray(dx), tf_out[f"{name}_dx"])

"""Op by op: does JAX (XLA:CPU) compute each layer with TensorFlow/Keras's bits?

    python -m jaxrepro.analysis.kernels [--tf-kernels onednn eigen] [--seed 0] [--out DIR]
                                        [--keep-arrays]

Every layer type of the paper's two models (`OPS`: rescaling, the convolutions, max
pooling, batch norm in both modes, ReLU, the residual add, global average pooling,
the dense head, the BCE loss on the logit and two Keras RMSprop updates) gets the same
float32 inputs on both sides, drawn with NumPy (`default_rng(seed)`, afresh for each
op), and an upstream gradient g of its output's shape (1 for the scalar loss, as in
training). The JAX side computes each op's output y and the vector-Jacobian product
with g w.r.t. each differentiable argument (`d_x`, `d_kernel`, ...), jitted (RMSprop:
one jit per update, as one per training step), with the building blocks jaxrepro's
models use in their default mode (the experiment config's `fast_convs=True` for the
mini Xception) at the experiments' batch size; the Keras side (`python -m jaxrepro.tfref
kernels`, see `jaxrepro.tfref.kernels`) builds the Keras layer, sets the same weights
and calls it eagerly under a GradientTape with `output_gradients=g`, as the matched
protocol (`jaxrepro.analysis.compare`) trains. Keras runs once per kernel library of
`--tf-kernels`, each in a fresh TF process under the paper's determinism recipe:
oneDNN (TF's default) and Eigen (TF_ENABLE_ONEDNN_OPTS=0).

Every output is compared with `jaxrepro.numerics.array_diff`: same bits first, then
max |JAX - Keras| / max |JAX|, the largest distance in ULP and the share of elements
that differ (`+0/-0`: equal values, other signs of zero). A gradient through a ReLU
also differs where the two forwards put an output on other sides of zero (the ReLU
passes g on one side only); `conv3x3`, without the ReLU, isolates the convolution's
own gradient. Since a model is a chain of these ops, the first output of a training
step (`TRAINING_STEPS`: forward in layer order, then the backward pass, then RMSprop)
that differs here is where JAX and Keras training the same model part.

Writes DIR/kernels.json (per op and output, per kernel library, the `ArrayDiff`) and
DIR/kernels.md (the table it prints); with `--keep-arrays` also DIR/inputs.npz (the
inputs, keys `<op>/<argument>`, plain arrays), DIR/jax.npz and DIR/keras_<kernels>.npz
(the outputs, keys `<op>/<output>`). Exit status 0 on success, 2 on a user error, 1 if
a TF process fails.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrepro import cli, determinism, provenance
from jaxrepro.models import convnet, minixception
from jaxrepro.models.layers import batch_norm
from jaxrepro.models.ops import convolutions, pooling
from jaxrepro.numerics import array_diff
from jaxrepro.tfref import process, weights
from jaxrepro.train import optim, steps

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Op:
    """One layer type, as both frameworks compute it.

    `inputs` draws the op's arguments; `forward` maps them (as jax arrays) to named
    outputs, of which "y" is the one differentiated, w.r.t. the arguments in `wrt`
    (outputs `d_<argument>`). An op without `wrt` is compared forward only. Forward and
    backward run as one jitted function, unless `jit` is False: then `forward` jits
    its own pieces.
    """

    name: str
    description: str  # what the JAX side computes
    keras: str  # its Keras counterpart (built by `jaxrepro.tfref.kernels`)
    inputs: Callable[[np.random.Generator], Arrays]
    forward: Callable[[Mapping[str, jax.Array]], dict[str, jax.Array]]
    wrt: tuple[str, ...] = ()
    jit: bool = True


# ------------------------------------------------------------------ inputs

BATCH = 32  # the experiments' batch size


def _normal(rng: np.random.Generator, shape, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    return (shift + scale * rng.standard_normal(shape)).astype(np.float32)


def _relu_output(rng: np.random.Generator, shape) -> np.ndarray:
    """Nonnegative, half of it exact zeros: what a ReLU hands on (ties for max pooling)."""
    return np.maximum(_normal(rng, shape), np.float32(0))


def _glorot(rng: np.random.Generator, shape) -> np.ndarray:
    """Keras's glorot_uniform draw for a kernel of `shape` (HWIO or [in, out])."""
    receptive = math.prod(shape[:-2])
    limit = math.sqrt(6.0 / (receptive * (shape[-2] + shape[-1])))
    return rng.uniform(-limit, limit, shape).astype(np.float32)


def _pixels(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(0, 256, shape).astype(np.float32)


def _conv_inputs(x: np.ndarray, rng: np.random.Generator, kernel, bias: bool) -> Arrays:
    a = {"x": x, "kernel": _glorot(rng, kernel)}
    if bias:
        a["bias"] = _normal(rng, kernel[-1:], 0.1)
    return a


def _separable_inputs(rng: np.random.Generator) -> Arrays:
    x = _relu_output(rng, (BATCH, 24, 24, 32))  # after batch norm and ReLU
    return {
        "x": x,
        "depthwise": _glorot(rng, (3, 3, 1, 32)),  # Flax layout; Keras [3, 3, 32, 1]
        "pointwise": _glorot(rng, (1, 1, 32, 64)),
    }


def _batch_norm_inputs(rng: np.random.Generator) -> Arrays:
    """Statistics and affine parameters away from their identity defaults."""
    c = 32
    return {
        "x": _normal(rng, (BATCH, 24, 24, c), 2.0, 0.5),
        "scale": _normal(rng, (c,), 0.2, 1.0),
        "bias": _normal(rng, (c,), 0.2),
        "mean": _normal(rng, (c,), 0.3),
        "var": rng.uniform(0.5, 2.0, (c,)).astype(np.float32),
    }


def _relu_inputs(rng: np.random.Generator) -> Arrays:
    """Normal values with exact +0.0 and -0.0 mixed in (ReLU's gradient at zero)."""
    shape = (BATCH, 24, 24, 32)
    x = _normal(rng, shape).ravel()
    x[::97] = np.float32(0.0)
    x[1::97] = np.float32(-0.0)
    return {"x": x.reshape(shape)}


def _rmsprop_inputs(rng: np.random.Generator) -> Arrays:
    return {
        "w": rng.uniform(-0.05, 0.05, (4096,)).astype(np.float32),
        "g1": _normal(rng, (4096,), 1e-2),
        "g2": _normal(rng, (4096,), 1e-2),
    }


# ------------------------------------------------------------------- JAX side


def _conv3x3(relu: bool) -> Callable:
    """The ConvNet's `nn.Conv(f, (3, 3), padding="VALID")` (XLA's convolution), with or
    without the ReLU that Keras's `activation="relu"` applies."""

    def forward(a):
        conv = nn.Conv(a["kernel"].shape[-1], (3, 3), padding="VALID")
        y = conv.apply({"params": {"kernel": a["kernel"], "bias": a["bias"]}}, a["x"])
        return {"y": nn.relu(y) if relu else y}

    return forward


def _stem(a):
    conv = nn.Conv(a["kernel"].shape[-1], (5, 5), padding="VALID", use_bias=False)
    return {"y": conv.apply({"params": {"kernel": a["kernel"]}}, a["x"])}


def _separable(fast: bool) -> Callable:
    def forward(a):
        module = minixception.SeparableConv(a["pointwise"].shape[-1], fast_convs=fast)
        params = {"depthwise": {"kernel": a["depthwise"]}, "pointwise": {"kernel": a["pointwise"]}}
        return {"y": module.apply({"params": params}, a["x"])}

    return forward


def _residual(a):
    # XceptionBlock's shortcut as `_impl` makes it with fast_convs=True.
    conv = nn.Conv(
        a["kernel"].shape[-1],
        (1, 1),
        strides=(2, 2),
        padding="SAME",
        use_bias=False,
        conv_general_dilated=convolutions.pointwise_conv,
    )
    return {"y": conv.apply({"params": {"kernel": a["kernel"]}}, a["x"])}


def _batch_norm(train: bool) -> Callable:
    def forward(a):
        variables = {
            "params": {"scale": a["scale"], "bias": a["bias"]},
            "batch_stats": {"mean": a["mean"], "var": a["var"]},
        }
        module = batch_norm(train, "bn")
        if not train:
            return {"y": module.apply(variables, a["x"])}
        y, updates = module.apply(variables, a["x"], mutable=["batch_stats"])
        stats = updates["batch_stats"]
        return {"y": y, "moving_mean": stats["mean"], "moving_var": stats["var"]}

    return forward


def _dense(a):
    params = {"kernel": a["kernel"], "bias": a["bias"]}
    return {"y": nn.Dense(a["kernel"].shape[-1]).apply({"params": params}, a["x"])}


def _rmsprop(a):
    """Two updates of `keras_rmsprop()` (its defaults: Keras's) from zero velocity, each
    jitted on its own as a training step is. Jitted together, XLA folds the constants
    of 0.9 * (0.1 * g1**2) into 0.09 * g1**2 in the second velocity: other bits."""
    tx = optim.keras_rmsprop()

    @jax.jit
    def update(w, state, g):
        u, state = tx.update(g, state)
        return optax.apply_updates(w, u), state

    w1, state = update(a["w"], tx.init(a["w"]), a["g1"])
    w2, _ = update(w1, state, a["g2"])
    return {"w1": w1, "w2": w2}


def _conv3x3_inputs(channels: int, filters: int) -> Callable[[np.random.Generator], Arrays]:
    """A ReLU output [BATCH, 26, 26, channels] (the ConvNet's conv3 input at 112 px) and
    a 3x3 kernel and bias."""

    def inputs(rng: np.random.Generator) -> Arrays:
        x = _relu_output(rng, (BATCH, 26, 26, channels))
        return _conv_inputs(x, rng, (3, 3, channels, filters), True)

    return inputs


OPS: tuple[Op, ...] = (
    Op(
        "rescale",
        "convnet.rescale: pixels 0..255 times float32(1/255)",
        "Rescaling(1/255)",
        lambda r: {"x": _pixels(r, (BATCH, 64, 64, 3))},
        lambda a: {"y": convnet.rescale(a["x"])},
    ),
    Op(
        "stem5x5",
        "the mini Xception's stem: nn.Conv(32, (5, 5), VALID, no bias), XLA's convolution",
        "Conv2D(32, 5, use_bias=False)",
        lambda r: _conv_inputs(
            _pixels(r, (BATCH, 44, 44, 3)) * np.float32(convnet.RESCALE), r, (5, 5, 3, 32), False
        ),
        _stem,
        wrt=("kernel",),  # the stem reads the images: training needs no d_x
    ),
    Op(
        "conv3x3_relu",
        "the ConvNet's conv3 (64 -> 128 channels): nn.Conv(128, (3, 3), VALID), "
        "lax.conv_general_dilated, then nn.relu",
        'Conv2D(128, 3, activation="relu")',
        _conv3x3_inputs(64, 128),
        _conv3x3(relu=True),
        wrt=("x", "kernel", "bias"),
    ),
    Op(
        "conv3x3",
        "the same convolution without the ReLU (its own gradient)",
        "Conv2D(128, 3)",
        _conv3x3_inputs(64, 128),
        _conv3x3(relu=False),
        wrt=("x", "kernel", "bias"),
    ),
    Op(
        "conv3x3_relu_in32",
        "conv3x3_relu with the ConvNet's conv2 channels (32 -> 64)",
        'Conv2D(64, 3, activation="relu")',
        _conv3x3_inputs(32, 64),
        _conv3x3(relu=True),
        wrt=("x", "kernel", "bias"),
    ),
    Op(
        "maxpool2x2",
        "pooling.max_pool_2x2 (odd size: VALID drops the last row and column)",
        "MaxPooling2D(2)",
        lambda r: {"x": _relu_output(r, (BATCH, 25, 25, 64))},
        lambda a: {"y": pooling.max_pool_2x2(a["x"])},
        wrt=("x",),
    ),
    Op(
        "maxpool3x3s2",
        "pooling.max_pool_3x3_s2 (odd size: SAME pads both sides)",
        'MaxPooling2D(3, strides=2, padding="same")',
        lambda r: {"x": _normal(r, (BATCH, 23, 23, 64))},
        lambda a: {"y": pooling.max_pool_3x3_s2(a["x"])},
        wrt=("x",),
    ),
    Op(
        "dense",
        "nn.Dense(1), lax.dot_general: the ConvNet's head at 112 px",
        "Dense(1)",
        lambda r: {
            "x": _relu_output(r, (BATCH, 2304)),
            "kernel": _glorot(r, (2304, 1)),
            "bias": _normal(r, (1,), 0.1),
        },
        _dense,
        wrt=("x", "kernel", "bias"),
    ),
    Op(
        "separable",
        "minixception.SeparableConv(64, fast_convs=False): XLA's convolutions",
        'SeparableConv2D(64, 3, padding="same", use_bias=False)',
        _separable_inputs,
        _separable(fast=False),
        wrt=("x", "depthwise", "pointwise"),
    ),
    Op(
        "separable_fast",
        "minixception.SeparableConv(64, fast_convs=True): shifted sums, patch kernel grad",
        'SeparableConv2D(64, 3, padding="same", use_bias=False)',
        _separable_inputs,
        _separable(fast=True),
        wrt=("x", "depthwise", "pointwise"),
    ),
    Op(
        "residual1x1s2",
        "XceptionBlock's shortcut: nn.Conv(64, (1, 1), strides 2, SAME, no bias), "
        "convolutions.pointwise_conv",
        'Conv2D(64, 1, strides=2, padding="same", use_bias=False)',
        lambda r: _conv_inputs(_normal(r, (BATCH, 24, 24, 32)), r, (1, 1, 32, 64), False),
        _residual,
        wrt=("x", "kernel"),
    ),
    Op(
        "batchnorm_train",
        "layers.batch_norm(train=True): batch statistics, moving averages updated",
        "BatchNormalization()(x, training=True)",
        _batch_norm_inputs,
        _batch_norm(train=True),
        wrt=("x", "scale", "bias"),
    ),
    Op(
        "batchnorm_inference",
        "layers.batch_norm(train=False): the moving statistics",
        "BatchNormalization()(x, training=False)",
        _batch_norm_inputs,
        _batch_norm(train=False),
        wrt=("x", "scale", "bias"),
    ),
    Op(
        "relu",
        "nn.relu (with exact +0.0 and -0.0 inputs)",
        'Activation("relu")',
        _relu_inputs,
        lambda a: {"y": nn.relu(a["x"])},
        wrt=("x",),
    ),
    Op(
        "add",
        "the residual add: x + residual",
        "Add()([x, residual])",
        lambda r: {
            "x": _normal(r, (BATCH, 12, 12, 64)),
            "residual": _normal(r, (BATCH, 12, 12, 64)),
        },
        lambda a: {"y": a["x"] + a["residual"]},
        wrt=("x", "residual"),
    ),
    Op(
        "gap",
        "jnp.mean(x, axis=(1, 2)): the mini Xception's head at 180 px",
        "GlobalAveragePooling2D()",
        lambda r: {"x": _normal(r, (BATCH, 6, 6, 512))},
        lambda a: {"y": jnp.mean(a["x"], axis=(1, 2))},
        wrt=("x",),
    ),
    Op(
        "bce",
        "jnp.mean(steps.bce_loss(logits, labels)): optax's sigmoid BCE",
        "reduce_mean(binary_crossentropy(labels[:, None], logits[:, None], from_logits=True))",
        lambda r: {
            "logits": _normal(r, (BATCH,), 3.0),
            "labels": r.integers(0, 2, (BATCH,)).astype(np.float32),
        },
        lambda a: {"y": jnp.mean(steps.bce_loss(a["logits"], a["labels"]))},
        wrt=("logits",),
    ),
    Op(
        "rmsprop",
        "two updates of optim.keras_rmsprop() from zero velocity, one jit each: w1, w2",
        "RMSprop().apply_gradients twice",
        _rmsprop_inputs,
        _rmsprop,
        jit=False,
    ),
)
OPS_BY_NAME = {op.name: op for op in OPS}

# The ops of a training step of each model, in forward order (an op measured at one
# shape stands for the model's layers of its type: conv3x3_relu_in32 for conv1 and
# conv2, conv3x3_relu for conv3 to conv5); the backward pass runs them in reverse,
# then RMSprop updates the weights. The mini Xception's are its default (fast_convs).
TRAINING_STEPS = {
    "convnet": (
        "rescale",
        "conv3x3_relu_in32",
        "maxpool2x2",
        "conv3x3_relu",
        "dense",
        "bce",
    ),
    "minixception": (
        "rescale",
        "stem5x5",
        "batchnorm_train",
        "relu",
        "separable_fast",
        "maxpool3x3s2",
        "residual1x1s2",
        "add",
        "gap",
        "dense",
        "bce",
    ),
}


def build_inputs(seed: int) -> dict[str, Arrays]:
    """Each op's arguments, and g where it is differentiated, from `default_rng(seed)`."""
    out = {}
    for op in OPS:
        rng = np.random.default_rng(seed)
        a = op.inputs(rng)
        if op.wrt:
            shape = jax.eval_shape(op.forward, a)["y"].shape
            a["g"] = _normal(rng, shape) if shape else np.float32(1.0)
        out[op.name] = a
    return out


def jax_outputs(op: Op, a: Arrays) -> Arrays:
    """`op`'s outputs in JAX: the forward's, then d_<argument> per `op.wrt`."""

    def run(a):
        args = {k: v for k, v in a.items() if k != "g"}
        if not op.wrt:
            return op.forward(args)

        def f(*diff):
            outs = op.forward({**args, **dict(zip(op.wrt, diff))})
            return outs.pop("y"), outs

        y, vjp, aux = jax.vjp(f, *(args[k] for k in op.wrt), has_aux=True)
        return {"y": y, **aux, **{f"d_{k}": d for k, d in zip(op.wrt, vjp(a["g"]))}}

    compute = jax.jit(run) if op.jit else run
    out = {k: np.asarray(v) for k, v in jax.device_get(compute(a)).items()}
    grads = [f"d_{k}" for k in op.wrt]
    rest = sorted(k for k in out if k not in {"y", *grads})
    return {k: out[k] for k in (["y"] if "y" in out else []) + rest + grads}


# -------------------------------------------------------------------- TF side


def run_keras(inputs: Path, out: Path, kernels: str) -> dict:
    """`python -m jaxrepro.tfref kernels` on `inputs` into `out` with TF's `kernels`;
    its JSON result."""
    r = cli.run_child(
        "jaxrepro.tfref",
        ["kernels", str(inputs), str(out), "--tf-kernels", kernels],
        env=process.child_environment(process.Recipe(deterministic=True, kernels=kernels)),
        what=f"the Keras process ({kernels})",
    )
    return json.loads(r.stdout)


# --------------------------------------------------------------------- report


def _flat(nested: Mapping[str, Arrays]) -> Arrays:
    return {f"{op}/{k}": v for op, arrays in nested.items() for k, v in arrays.items()}


def _by_op(flat: Mapping[str, np.ndarray]) -> dict[str, Arrays]:
    out: dict[str, Arrays] = {}
    for key, value in flat.items():
        op, name = key.split("/", 1)
        out.setdefault(op, {})[name] = value
    return out


def compare_op(op: Op, a: Arrays, jx: Arrays, keras: Mapping[str, Arrays]) -> dict[str, Any]:
    """kernels.json's entry of one op: what it is, its shapes, and per output and per
    kernel library the `ArrayDiff` of JAX against Keras."""
    for kernels, outs in keras.items():
        if set(outs) != set(jx):
            raise RuntimeError(f"{op.name}: Keras ({kernels}) {sorted(outs)}, JAX {sorted(jx)}")
    outputs = {
        name: {
            "shape": list(value.shape),
            "diff": {
                k: array_diff(value, outs[name], histogram=True).to_dict()
                for k, outs in keras.items()
            },
        }
        for name, value in jx.items()
    }
    return {
        "op": op.name,
        "description": op.description,
        "keras": op.keras,
        "inputs": {k: list(np.shape(v)) for k, v in a.items()},
        "outputs": outputs,
    }


def step_order(model: str, ops: Mapping[str, dict]) -> list[tuple[str, str]]:
    """(op, output) in the order a training step of `model` computes them."""
    chain = TRAINING_STEPS[model]
    forward = [(o, k) for o in chain for k in ops[o]["outputs"] if not k.startswith("d_")]
    backward = [(o, k) for o in reversed(chain) for k in ops[o]["outputs"] if k.startswith("d_")]
    return forward + backward + [("rmsprop", k) for k in ops["rmsprop"]["outputs"]]


def first_differences(ops: Mapping[str, dict], kernels: Sequence[str]) -> dict[str, dict]:
    """Per model and kernel library, the first "op/output" of a training step that is
    not bitwise equal (None: all are)."""
    out = {}
    for model in TRAINING_STEPS:
        order = step_order(model, ops)
        out[model] = {
            k: next(
                (f"{o}/{n}" for o, n in order if not ops[o]["outputs"][n]["diff"][k]["equal"]),
                None,
            )
            for k in kernels
        }
    return out


def measure(
    seed: int,
    kernels: Sequence[str],
    out: Path,
    made_by: dict | None = None,
    keep_arrays: bool = False,
) -> dict:
    """Run both sides, write kernels.json into `out` (and with `keep_arrays` the
    exchanged inputs.npz, jax.npz and keras_<k>.npz, about 100 MB each); the report."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kernels_", dir=out) as tmp:
        arrays = out if keep_arrays else Path(tmp)
        return _measure(seed, kernels, out, arrays, made_by)


def _measure(
    seed: int, kernels: Sequence[str], out: Path, arrays: Path, made_by: dict | None
) -> dict:
    inputs = build_inputs(seed)
    weights.save(arrays / "inputs.npz", _flat(inputs))
    runtimes, keras = {}, {}
    for k in kernels:
        result = run_keras(arrays / "inputs.npz", arrays / f"keras_{k}.npz", k)
        runtimes[k] = result.get("runtime")
        keras[k] = _by_op(weights.load(arrays / f"keras_{k}.npz"))
    jx = {op.name: jax_outputs(op, inputs[op.name]) for op in OPS}
    weights.save(arrays / "jax.npz", _flat(jx))
    one_sided = {k: sorted(set(jx) ^ set(v)) for k, v in keras.items() if set(v) != set(jx)}
    if one_sided:
        raise RuntimeError(f"ops on one side only: {one_sided}")
    ops = {
        op.name: compare_op(
            op, inputs[op.name], jx[op.name], {k: keras[k][op.name] for k in kernels}
        )
        for op in OPS
    }
    report = {
        "provenance": made_by,
        "seed": seed,
        "tf_kernels": list(kernels),
        "jax": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "determinism": determinism.mode(),
        },
        "keras_runtime": runtimes,
        "first_difference": first_differences(ops, kernels),
        "ops": list(ops.values()),
    }
    (out / "kernels.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _cell(d: dict) -> str:
    """`bitwise`, `+0/-0` (equal values, other signs of zero), or the difference."""
    if d["equal"]:
        return "bitwise"
    count = f"{d['num_different']}/{math.prod(d['shape'])}"
    if d["max_abs"] == 0:
        return f"+0/-0 ({count})"
    return f"{d['rel_to_max']:.2g} ({count}; {d['max_ulp']} ulp)"


def markdown(report: dict) -> str:
    """kernels.md: provenance, one row per (op, output), one column per kernel library."""
    kernels = report["tf_kernels"]
    tf = next(iter(report["keras_runtime"].values()), None) or {}
    j = report["jax"]
    lines = [
        "# JAX against TensorFlow/Keras, op by op",
        "",
        provenance.markdown(report["provenance"]) if report["provenance"] else "",
        f"JAX {j['jax']} ({j['backend']}, {j['determinism']} mode, jitted) against "
        f"TensorFlow {tf.get('tensorflow', '?')} / Keras {tf.get('keras', '?')} (eager, "
        f"determinism recipe), the same float32 inputs (seed {report['seed']}). A cell is "
        "`bitwise`, or max |JAX - Keras| / max |JAX| (differing elements / elements; "
        "largest distance in ULP).",
        "",
        "| op | output | shape | " + " | ".join(kernels) + " |",
        "|---|---|---|" + "---|" * len(kernels),
    ]
    for op in report["ops"]:
        for name, o in op["outputs"].items():
            shape = "x".join(map(str, o["shape"])) or "scalar"
            cells = " | ".join(_cell(o["diff"][k]) for k in kernels)
            lines.append(f"| {op['op']} | {name} | {shape} | {cells} |")
    lines += [
        "",
        "First to differ in a training step (forward in layer order, backward pass, RMSprop):",
        "",
    ]
    for model, per in report["first_difference"].items():
        chain = " -> ".join(TRAINING_STEPS[model])
        found = ", ".join(f"{k}: `{v}`" if v else f"{k}: none" for k, v in per.items())
        lines.append(f"- {model} ({chain}): {found}")
    lines += ["", "| op | JAX | Keras |", "|---|---|---|"]
    lines += [f"| {op['op']} | {op['description']} | `{op['keras']}` |" for op in report["ops"]]
    return "\n".join(lines) + "\n"


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 done, 2 a user error, 1 if a TF process fails."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.parser(prog="python -m jaxrepro.analysis.kernels", description=__doc__)
    parser.add_argument(
        "--tf-kernels",
        nargs="+",
        default=["onednn", "eigen"],
        choices=sorted(process.KERNELS),
        help="TF's CPU kernel libraries, one TF process each: onednn (TF's default) and/or "
        "eigen (oneDNN off); default: %(default)s",
    )
    parser.add_argument("--seed", type=int, default=0, help="NumPy seed of the inputs")
    parser.add_argument("--out", default="checkpoints/kernels", help="output directory")
    parser.add_argument(
        "--keep-arrays",
        action="store_true",
        help="keep the exchanged inputs and both sides' outputs (.npz, about 100 MB each)",
    )
    args = parser.parse_args(argv)
    kernels = list(dict.fromkeys(args.tf_kernels))
    out = Path(args.out)
    try:
        made_by = provenance.record("python -m jaxrepro.analysis.kernels", argv)
        report = measure(args.seed, kernels, out, made_by, args.keep_arrays)
    except cli.ChildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = markdown(report)
    (out / "kernels.md").write_text(text)
    print(text)
    print(f"written: {out / 'kernels.json'}, {out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step's or an inference batch's time goes, by XLA:CPU's own profiler.

    python -m jaxrepro.analysis.profile CONFIG_FILE [--step train|infer] [--steps 3]
                     [--top 25] [--convolutions-alone] [--out DIR] [--config.KEY=VALUE ...]

Compiles the config's training step (`--step train`, augmentation and optimizer
included) or its evaluation step on a batch (`--step infer`, what the bench's inference
runs), in its determinism mode on its data, runs it once to warm up, then `--steps`
times under `jax.profiler.trace`, and reads the trace back (`jax.profiler.ProfileData`).
XLA:CPU records one event per thunk, i.e. per compiled HLO instruction (a convolution,
a fusion, a copy); its time, from its start to its `end:` event, is summed per
instruction and divided by the steps. The compiled module's metadata names the source
of each instruction (`jit(step_fn)/transpose(jvp(ConvNet))/conv2/...`), which gives its
layer (the first path component that is a parameter of the model) and its pass
(`transpose(...)`: backward; otherwise forward, or outside the model: augmentation,
loss, optimizer, fingerprints). Thunks may overlap on the thread pool, so their sum can
exceed the step's wall time, which is measured separately without the profiler.

Each convolution instruction also gets its nominal operation count, from the module's
shapes: 2 x output elements x window positions x the kernel's input features, padding
included (`convolution_gflop`), and the tables give GFLOP/s of its thunk time: the
rate Eigen's kernels run at in each layer and pass, forward against both gradients.
A custom call (jaxrepro's kernels) gets none: XLA knows nothing of what it computes.
The process's fp32 peak (`bench_jax.fp32_peak_gflops`) is measured too, and a rate
above it is marked: that instruction's trace events did not cover its work (XLA:CPU
can close a convolution's event when it hands the work to the thread pool), so its
time, and its layer's, are too low.

`--convolutions-alone` also times each `nn.Conv` of the model by itself, on the
input it gets in the step: its forward pass (its bias added too: one more pass over
the output), and the gradient with respect to its kernel and (but for the first
convolution, whose input the step does not differentiate) its input, each jitted
alone and called `--steps` times after a warm-up (the median). Their sum is what the
step would take if it were its convolutions alone, each with the cores to itself;
with the step's operation count (`bench_jax.xla_form_flops`, as the bench counts)
that sum gives the fraction of the fp32 peak the step could reach with these
convolution kernels and nothing else: a ceiling, next to the step's own wall time.

Writes DIR/profile.md (by layer and pass, then the `--top` instructions) and
DIR/profile.json. The timings are the machine's and the load's; the table is a map of
where to look, not a benchmark (that is `jaxrepro.analysis.bench`).
"""

from __future__ import annotations

import collections
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from jax.profiler import ProfileData

from jaxrepro import cli, determinism, provenance
from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro.analysis import bench_jax
from jaxrepro.timing import timed
from jaxrepro.train import setup
from jaxrepro.train import steps as steplib
from jaxrepro.train.loop import load_data

# One HLO instruction of the compiled module's text: its name, its opcode and the
# op_name of its metadata (its source).
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = (?:\([^=]*?\)|\S+) (?P<opcode>[a-z][\w-]*)\("
    r"(?:.*?metadata=\{[^}]*?op_name=\"(?P<op_name>[^\"]*)\")?"
)


# An instruction's array result: its name, element type and dimensions.
_ARRAY = re.compile(r"^\s*(?:ROOT )?%?(?P<name>[\w.\-]+) = \w+\[(?P<dims>[\d,]*)\]")
_CONV_OPERANDS = re.compile(r" convolution\(%?(?P<lhs>[\w.\-]+), %?(?P<rhs>[\w.\-]+)\)")
_DIM_LABELS = re.compile(r"dim_labels=(?P<lhs>\w+)_(?P<rhs>\w+)->(?P<out>\w+)")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d)


def convolution_gflop(hlo_text: str) -> dict[str, float]:
    """Name -> nominal GFLOP of each convolution instruction of a compiled module's text:
    2 x output elements x the kernel's window positions x its input features (per
    group). Padding and dilation zeros count, as in the layer's textbook count; a
    convolution with batch groups (whose sums are shorter) is left out."""
    shapes, convolutions = {}, []
    for line in hlo_text.splitlines():
        m = _ARRAY.match(line)
        if not m:
            continue
        shapes[m["name"]] = _dims(m["dims"])
        if " convolution(" in line and "batch_group_count=" not in line:
            convolutions.append((m["name"], line))
    out = {}
    for name, line in convolutions:
        operands, labels = _CONV_OPERANDS.search(line), _DIM_LABELS.search(line)
        rhs = shapes.get(operands["rhs"]) if operands else None
        if rhs is None or labels is None or len(labels["rhs"]) != len(rhs):
            continue
        window = np.prod([n for d, n in zip(labels["rhs"], rhs) if d.isdigit()], dtype=float)
        features = rhs[labels["rhs"].index("i")]
        out[name] = float(2.0 * np.prod(shapes[name], dtype=float) * window * features / 1e9)
    return out


def instructions(hlo_text: str) -> dict[str, dict[str, Any]]:
    """Name -> {"opcode", "op_name", "gflop"} for every instruction of a compiled
    module's text; "gflop" (`convolution_gflop`) is None but for convolutions."""
    gflop = convolution_gflop(hlo_text)
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            out[m["name"]] = {
                "opcode": m["opcode"],
                "op_name": m["op_name"] or "",
                "gflop": gflop.get(m["name"]),
            }
    return out


def attribute(op_name: str, layers: set[str], model_name: str) -> tuple[str, str]:
    """(layer, pass) of an instruction from its op_name.

    The layer is the first path component that names a parameter of the model; an op
    of the model outside its parameterised layers (ReLU, pooling, flatten) is
    "between layers"; "-" is outside the model (augmentation, loss, optimizer,
    fingerprints) or without a source (layout copies XLA adds).
    """
    if not op_name:
        return "-", "no source (XLA's layout copies)"
    parts = op_name.split("/")
    pass_ = "backward" if "transpose(" in op_name else "forward"
    layer = next((p for p in parts if p in layers), None)
    if layer is not None:
        return layer, pass_
    if f"({model_name})" in op_name:
        return "between layers", pass_
    return "-", "outside the model"


def primitive(row: dict) -> str:
    """What an instruction computes: the last component of its source, else its opcode."""
    return row["op_name"].rsplit("/", 1)[-1] if row["op_name"] else row["opcode"]


def thunk_seconds(xspace: bytes, names: set[str]) -> dict[str, float]:
    """Summed time (s) of the trace's thunks per instruction name in `names`.

    A thunk's time runs from its event's start to its `end: NAME` event: an
    asynchronous one (a convolution handed to the thread pool) returns at once and ends
    later, so its own event's duration would count only the launch. Without `end:`
    events, the events' durations are summed.
    """
    starts: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    ends: dict[str, list[int]] = collections.defaultdict(list)
    for plane in ProfileData.from_serialized_xspace(xspace).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    starts[event.name].append((event.start_ns, event.duration_ns))
                elif event.name.startswith("end: ") and event.name[5:] in names:
                    ends[event.name[5:]].append(event.start_ns)
    total = {}
    for name, begun in starts.items():
        begun.sort()
        done = sorted(ends.get(name, ()))
        if len(done) == len(begun):
            total[name] = sum(max(e - b, d) for (b, d), e in zip(begun, done)) * 1e-9
        else:
            total[name] = sum(d for _, d in begun) * 1e-9
    return total


STEPS = ("train", "infer")


class ConvCall(NamedTuple):
    """One `nn.Conv` call of a forward pass (`conv_calls`)."""

    layer: str
    module: nn.Conv
    params: Any
    input: Any


def conv_calls(model: nn.Module, variables: Any, images: np.ndarray) -> list[ConvCall]:
    """Each `nn.Conv` call of `model`'s inference forward pass on `images`, in call
    order: the layer's path ("conv2", "block1/pointwise"), the module unbound (callable
    with `apply`), its parameters and the input as it gets it."""
    calls: list[ConvCall] = []

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Conv) and context.method_name == "__call__":
            calls.append(
                ConvCall(
                    "/".join(module.path),
                    module.clone(parent=None, name=module.name),
                    module.variables["params"],
                    args[0],
                )
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, images.astype(np.float32), train=False)
    return calls


def convolutions_alone(
    model: nn.Module, variables: Any, images: np.ndarray, calls: int
) -> list[dict]:
    """Each `nn.Conv` of `model` timed alone on its own input (see the module doc): per
    convolution and pass ("forward", "kernel gradient", "input gradient"; no input
    gradient for the first convolution), the median ms of `calls` calls after a
    warm-up, and the pass's nominal GFLOP (the same for all three)."""
    rows = []
    for index, (layer, conv, params, x) in enumerate(conv_calls(model, variables, images)):
        x = jax.device_put(np.asarray(x))

        def forward(p, x, conv=conv):
            return conv.apply({"params": p}, x)

        def kernel_gradient(p, x, g, forward=forward):
            return jax.vjp(lambda k: forward({**p, "kernel": k}, x), p["kernel"])[1](g)[0]

        def input_gradient(p, x, g, forward=forward):
            return jax.vjp(lambda x: forward(p, x), x)[1](g)[0]

        y = jax.jit(forward)(params, x)
        kh, kw, cin, _ = params["kernel"].shape
        g = jax.device_put(np.ones(y.shape, np.float32))
        passes = {
            "forward": (forward, (params, x)),
            "kernel gradient": (kernel_gradient, (params, x, g)),
            **({"input gradient": (input_gradient, (params, x, g))} if index else {}),
        }
        for pass_, (fn, args) in passes.items():
            fn = jax.jit(fn)
            jax.block_until_ready(fn(*args))  # compile and warm up
            seconds = timed(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)), calls)
            rows.append(
                {
                    "layer": layer,
                    "pass": pass_,
                    "ms": 1e3 * statistics.median(seconds),
                    "gflop": 2 * y.size * kh * kw * cin / 1e9,
                }
            )
    return rows


def profile(
    config_file: str,
    overrides: Sequence[str],
    steps: int,
    what: str = "train",
    alone: bool = False,
) -> dict:
    """Profile `steps` calls of the config's training step (`what="train"`) or of its
    evaluation step on one batch (`what="infer"`) in this process; with `alone` (a
    training step only), also each convolution by itself (`convolutions_alone`)."""
    if what not in STEPS:
        raise ValueError(f"what={what!r}: one of {STEPS}")
    if alone and what != "train":
        raise ValueError("convolutions alone are timed for a training step only")
    config = configlib.resolve(config_file, overrides)
    determinism.apply_config(config)  # before any JAX work
    data = load_data(config)
    model, tx = setup.build_model(config), setup.build_optimizer(config)
    keys = setup.stream_keys(config)
    state = setup.init_state(model, tx, keys["init"], config.data.image_size)
    n_train = len(data.train.labels)
    batches = [
        (data.train.images[i], data.train.labels[i])
        for i in (
            datalib.batch_at(keys["shuffle"], 0, b, config.batch_size, n_train)
            for b in range(steps + 1)
        )
    ]
    if what == "train":
        train_step = steplib.make_train_step(model, tx, steplib.augmentation(config))
        compiled = train_step.lower(state, *batches[0], keys).compile()

        def step(state, batch):
            return jax.block_until_ready(compiled(state, *batch, keys)[0])

    else:
        weights = np.ones(config.batch_size, np.float32)
        eval_step = steplib.make_eval_step(model)
        compiled = eval_step.lower(state.variables, *batches[0], weights).compile()

        def step(state, batch):
            jax.block_until_ready(compiled(state.variables, *batch, weights))
            return state

    layers = set(state.variables["params"])
    hlo = instructions(compiled.as_text())
    state = step(state, batches[0])  # warm-up
    wall = []
    for batch in batches[1:]:
        start = time.perf_counter()
        state = step(state, batch)
        wall.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for batch in batches[1:]:
                state = step(state, batch)
        (xplane,) = Path(trace_dir).rglob("*.xplane.pb")
        seconds = thunk_seconds(xplane.read_bytes(), set(hlo))
    rows = []
    for name, s in seconds.items():
        layer, pass_ = attribute(hlo[name]["op_name"], layers, type(model).__name__)
        rows.append(
            {
                "instruction": name,
                "opcode": hlo[name]["opcode"],
                "layer": layer,
                "pass": pass_,
                "ms_per_step": 1e3 * s / steps,
                "gflop": hlo[name]["gflop"],
                "op_name": hlo[name]["op_name"],
            }
        )
    rows.sort(key=lambda r: -r["ms_per_step"])
    extra = {}
    if alone:
        flops = bench_jax.xla_form_flops(config, tx, state, batches[0], keys)
        extra = {
            "convolutions_alone": convolutions_alone(
                model, state.variables, np.asarray(batches[0][0]), steps
            ),
            "step_gflop": None if flops is None else flops / 1e9,
        }
    return {
        "config": config_file,
        "model": config.model,
        "image_size": config.data.image_size,
        "batch_size": config.batch_size,
        "step": what,
        "steps": steps,
        "mode": determinism.mode(),
        "step_wall_ms": [1e3 * s for s in wall],
        "fp32_peak_gflops": bench_jax.fp32_peak_gflops(),
        "instructions": rows,
        **extra,
    }


def by_layer(rows: list[dict]) -> list[dict]:
    """Thunk time per (layer, pass), largest first, with its share of the total."""
    total = sum(r["ms_per_step"] for r in rows) or 1.0
    groups: dict[tuple[str, str], dict] = {}
    for r in rows:
        g = groups.setdefault(
            (r["layer"], r["pass"]),
            {
                "layer": r["layer"],
                "pass": r["pass"],
                "ms_per_step": 0.0,
                "primitives": {},
                "conv_gflop": 0.0,
                "conv_ms": 0.0,
            },
        )
        g["ms_per_step"] += r["ms_per_step"]
        if r.get("gflop") is not None:
            g["conv_gflop"] += r["gflop"]
            g["conv_ms"] += r["ms_per_step"]
        what = primitive(r)
        g["primitives"][what] = g["primitives"].get(what, 0.0) + r["ms_per_step"]
    out = sorted(groups.values(), key=lambda g: -g["ms_per_step"])
    for g in out:
        g["share"] = g["ms_per_step"] / total
        g["conv_gflops"] = gflops(g["conv_gflop"], g["conv_ms"])
    return out


def gflops(gflop: float | None, ms: float) -> float | None:
    """GFLOP/s of `gflop` computed in `ms` milliseconds (None without a count)."""
    return None if gflop is None or ms <= 0 else gflop / (ms / 1e3)


def _rate(value: float | None, peak: float) -> str:
    """A rate for the tables; above the fp32 peak it is marked (see the module doc)."""
    if value is None:
        return "-"
    return f"{value:.0f}" + (" (above peak)" if value > peak else "")


def table(result: dict, made_by: dict, top: int) -> str:
    """Markdown: the provenance, the time by layer and pass, the top instructions."""
    rows = result["instructions"]
    peak = result["fp32_peak_gflops"]
    thunks = sum(r["ms_per_step"] for r in rows)
    lines = [
        provenance.markdown(made_by),
        "",
        f"{result['model']}, {result['image_size']} px, batch {result['batch_size']}, "
        f"{result['mode']} mode, {result['step']} step, {result['steps']} calls profiled. "
        "Wall time per call "
        f"(without the profiler): median {statistics.median(result['step_wall_ms']):.0f} ms; "
        f"XLA thunks in the trace: {thunks:.0f} ms per step (thunks may overlap).",
        "",
        "| layer | pass | ms per step | share of thunk time | convolutions' GFLOP/s | "
        "largest parts (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for g in by_layer(rows):
        parts = sorted(g["primitives"].items(), key=lambda kv: -kv[1])[:4]
        largest = ", ".join(f"{k} {v:.1f}" for k, v in parts)
        lines.append(
            f"| {g['layer']} | {g['pass']} | {g['ms_per_step']:.1f} | {g['share']:.1%} | "
            f"{_rate(g['conv_gflops'], peak)} | {largest} |"
        )
    lines += [
        "",
        "Convolutions' GFLOP/s: their nominal operations (padding included) over their "
        "thunk time; a thunk that shares the cores with another runs slower than alone. "
        f"The fp32 peak of this process: {peak:.0f} GFLOP/s; a rate above it means the "
        "instruction's trace events missed part of its work, and its time is too low.",
        "",
        f"The {min(top, len(rows))} longest instructions:",
        "",
        "| instruction | opcode | layer | pass | ms per step | GFLOP/s | source (op_name) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows[:top]:
        rate = gflops(r.get("gflop"), r["ms_per_step"])
        lines.append(
            f"| `{r['instruction']}` | {r['opcode']} | {r['layer']} | {r['pass']} | "
            f"{r['ms_per_step']:.1f} | {_rate(rate, peak)} | `{r['op_name']}` |"
        )
    if "convolutions_alone" in result:
        lines += ["", *alone_table(result)]
    return "\n".join(lines)


ALONE_PASSES = ("forward", "kernel gradient", "input gradient")


def alone_table(result: dict) -> list[str]:
    """Markdown lines: each convolution alone, their sum, and the ceiling it sets."""
    peak, rows = result["fp32_peak_gflops"], result["convolutions_alone"]
    cells = {(r["layer"], r["pass"]): r for r in rows}
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    lines = [
        f"Each convolution alone (`--convolutions-alone`): jitted by itself on the input "
        f"it gets in the step, median of {result['steps']} calls after a warm-up.",
        "",
        "| layer | " + " | ".join(f"{p} ms | GFLOP/s" for p in ALONE_PASSES) + " |",
        "|---|" + "---|---|" * len(ALONE_PASSES),
    ]
    for layer in layers:
        parts = []
        for p in ALONE_PASSES:
            r = cells.get((layer, p))
            parts += (
                ["-", "-"]
                if r is None
                else [f"{r['ms']:.1f}", _rate(gflops(r["gflop"], r["ms"]), peak)]
            )
        lines.append(f"| {layer} | " + " | ".join(parts) + " |")
    total = sum(r["ms"] for r in rows)
    wall = statistics.median(result["step_wall_ms"])
    lines += [
        "",
        f"The convolutions alone: {total:.0f} ms per step; the step itself: {wall:.0f} ms "
        "(median wall time without the profiler).",
    ]
    if result.get("step_gflop"):
        ceiling = gflops(result["step_gflop"], total)
        actual = gflops(result["step_gflop"], wall)
        lines.append(
            f"The step's {result['step_gflop']:.1f} GFLOP (XLA's count, as the bench's) in "
            f"the convolutions' time alone would be {ceiling:.0f} GFLOP/s, "
            f"{ceiling / peak:.2f} of the fp32 peak ({peak:.0f}): the most this step can "
            "reach with these convolution kernels, were everything else free. In its own "
            f"wall time: {actual:.0f} GFLOP/s, {actual / peak:.2f}."
        )
    return lines


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: profile a config's training step, print and write the tables."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = cli.split_overrides(argv)
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.profile",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("config_file", metavar="CONFIG_FILE")
    parser.add_argument(
        "--step",
        choices=STEPS,
        default="train",
        help="the training step, or the evaluation step on one batch (default: %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=3, help="profiled calls of the step")
    parser.add_argument("--top", type=int, default=25, help="instructions listed one by one")
    parser.add_argument(
        "--convolutions-alone",
        action="store_true",
        help="also time each convolution by itself, forward and gradients, and the "
        "ceiling they set (training step only)",
    )
    parser.add_argument("--out", default="checkpoints/profile", help="output directory")
    args = parser.parse_args(rest)
    if args.steps < 1 or args.top < 0:
        parser.error("--steps must be at least 1 and --top at least 0")
    if args.convolutions_alone and args.step != "train":
        parser.error("--convolutions-alone needs --step train")
    made_by = provenance.record("python -m jaxrepro.analysis.profile", argv)
    result = profile(args.config_file, overrides, args.steps, args.step, args.convolutions_alone)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(result, made_by, args.top)
    (out / "profile.json").write_text(
        json.dumps(
            {"provenance": made_by, **result, "by_layer": by_layer(result["instructions"])},
            indent=1,
        )
        + "\n"
    )
    (out / "profile.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten: {out / 'profile.md'}, {out / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

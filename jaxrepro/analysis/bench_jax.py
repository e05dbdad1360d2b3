"""The JAX half of `python -m jaxrepro.analysis.bench`: one config, one system, this process.

    python -m jaxrepro.analysis.bench_jax CONFIG_FILE --json OUT [--steps 6] [--repeats 3]
                     [--flax-pool | --xla-pool | --xla-resample | --xla-first-conv |
                      --xla-convs | --one-chunk | --shifted-sums]
                     [--config.KEY=VALUE ...]

Compile time of the train step, one untimed step (as the TF side runs one), then
`--repeats` timed repeats of `--steps` training steps (each from the same initial
state on the same batches, as the trainer runs them: the loss and fingerprints read
back every step), inference, Grad-CAM and LRP heatmaps/s and the peak resident
memory (after training, and at the end); XLA's count of a training step's
floating-point operations (`xla_form_flops`: with the kernels in their XLA forms, whose
operations XLA counts) and this process's fp32 peak (`fp32_peak_gflops`), whose
quotient says how close training comes to what the cores can do. The switches run
one of jaxrepro's speed-ups the way it was before (`--flax-pool`: Flax's
select-and-scatter max-pool gradient; `--xla-pool`: the max pool, forward and
gradient, as XLA ops instead of jaxrepro's kernels; `--xla-resample`: the augmentation's
resampling as XLA ops instead of jaxrepro's kernel; `--xla-first-conv`: the first
convolution (over the image) as XLA's own instead of jaxrepro's kernel, other bits;
`--xla-convs`: XLA's own
depthwise and 1x1 convolutions; `--shifted-sums`: the depthwise convolution as XLA's
shifted sums instead of jaxrepro's kernels; `--one-chunk`: those, with the backward
pass over the whole batch at once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxrepro import cli, determinism, fingerprint, models
from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro.explain import gradcam, lrp
from jaxrepro.models.ops import convolutions, pooling
from jaxrepro.timing import peak_memory_mib, timed, usable_cpus
from jaxrepro.train import setup, steps
from jaxrepro.train.loop import load_data

SWITCHES = (
    "flax_pool",
    "xla_pool",
    "xla_resample",
    "xla_first_conv",
    "xla_convs",
    "one_chunk",
    "shifted_sums",
)
PEAK_MATMUL_SIZE = 2048


def fp32_peak_gflops(n: int = PEAK_MATMUL_SIZE, repeats: int = 5) -> float:
    """This process's fp32 peak: GFLOP/s of the fastest of `repeats` n x n x n products.

    A large square matrix product is the best case of every CPU kernel library, so it
    stands for what the cores can do (2 n^3 operations; the fastest call, as a peak).
    """
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    product = jax.jit(jnp.dot)
    jax.block_until_ready(product(a, b))  # compile outside the timed calls
    best = min(timed(lambda: jax.block_until_ready(product(a, b)), repeats))
    return 2 * n**3 / best / 1e9


def step_flops(compiled: jax.stages.Compiled) -> float | None:
    """XLA's count of the floating-point operations of one call of `compiled`."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per device
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def xla_form_flops(
    config: ml_collections.ConfigDict,
    tx: optax.GradientTransformation,
    initial: Any,
    batch: tuple[np.ndarray, np.ndarray],
    keys: Mapping[str, jax.Array],
) -> float | None:
    """XLA's count of the operations of the config's training step with every jaxrepro
    kernel in its XLA form (the portable mode's pooling, XLA's first convolution and
    resampling, the depthwise convolutions as shifted sums): XLA counts no operations
    in a custom call, so the step as it runs would not count what the kernels compute.
    The same arithmetic either way, so the same count on both sides of a comparison."""
    spec = models.get_spec(config["model"])
    model = setup.build_model(config, **dict(spec.portable_fields))
    if "first_conv" in {f.name for f in dataclasses.fields(model)}:
        model = model.clone(first_conv=None)
    native, convolutions.NATIVE = convolutions.NATIVE, False
    try:
        step_fn = steps.make_train_step(model, tx, {**steps.augmentation(config), "native": False})
        return step_flops(step_fn.lower(jax.device_put(initial), *batch, keys).compile())
    finally:
        convolutions.NATIVE = native


def measure(
    config_file: str,
    overrides: Sequence[str],
    steps_per_repeat: int,
    repeats: int,
    flax_pool: bool = False,
    xla_pool: bool = False,
    xla_resample: bool = False,
    xla_first_conv: bool = False,
    xla_convs: bool = False,
    one_chunk: bool = False,
    shifted_sums: bool = False,
) -> dict:
    """Measure jaxrepro's training, inference and explanations in this process."""
    if one_chunk or shifted_sums:
        convolutions.NATIVE = False  # the depthwise convolution as XLA ops
    if one_chunk:
        convolutions.CHUNK_BYTES = sys.maxsize  # every batch fits: one chunk
    config = configlib.resolve(
        config_file, [*overrides, *(["fast_convs=False"] if xla_convs else [])]
    )
    determinism.apply_config(config)  # before any JAX work
    data = load_data(config)
    # --xla-pool: the XLA forms the portable mode takes instead of jaxrepro's kernels.
    xla_forms = dict(models.get_spec(config["model"]).portable_fields) if xla_pool else {}
    model, tx = setup.build_model(config, **xla_forms), setup.build_optimizer(config)
    if flax_pool:
        model = model.clone(pool=pooling.REFERENCE[model.pool])
    if xla_first_conv:
        model = model.clone(first_conv=None)
    keys = setup.stream_keys(config)
    initial = jax.device_get(setup.init_state(model, tx, keys["init"], config.data.image_size))
    batch_size = config.batch_size
    n_train = len(data.train.labels)
    batches = [
        (data.train.images[i], data.train.labels[i])
        for i in (
            datalib.batch_at(keys["shuffle"], 0, b, batch_size, n_train)
            for b in range(steps_per_repeat)
        )
    ]

    augment = {**steps.augmentation(config), **({"native": False} if xla_resample else {})}
    step_fn = steps.make_train_step(model, tx, augment)
    start = time.perf_counter()
    compiled = step_fn.lower(jax.device_put(initial), *batches[0], keys).compile()
    compile_s = time.perf_counter() - start
    # One step outside the timed repeats, as the TF side's first `fit` call runs one:
    # the first execution allocates and touches every buffer for the first time.
    jax.block_until_ready(compiled(jax.device_put(initial), *batches[0], keys))
    finals = []

    def train_steps():
        state = jax.device_put(initial)  # every repeat: the same start, the same batches
        for images, labels in batches:  # as the trainer: the loss and fingerprints each step
            state, metrics, prints = compiled(state, images, labels, keys)
            float(metrics["loss"])
            fingerprint.to_hex(prints)
        finals.append(fingerprint.combine_hex(fingerprint.sha256_leaves(state.variables)))

    train_s = timed(train_steps, repeats)
    train_peak_memory = peak_memory_mib()  # training alone, as TF's row measures it
    variables = jax.device_put(initial).variables
    eval_step = steps.make_eval_step(model)
    ones = np.ones(batch_size, np.float32)

    def infer():
        for images, labels in batches:
            jax.block_until_ready(eval_step(variables, images, labels, ones))

    cam = jax.jit(lambda v, x: gradcam.gradcam(model, v, x))
    relevance = jax.jit(lambda v, x: lrp.heatmap(lrp.attribute(model, v, x)))
    explain_x = batches[0][0].astype(np.float32)

    def explain(fn):
        return lambda: jax.block_until_ready(fn(variables, explain_x))

    for warm in (infer, explain(cam), explain(relevance)):
        warm()  # compile outside the timed calls
    images = steps_per_repeat * batch_size
    timings = {
        "train_images_per_s": [images / s for s in train_s],
        "infer_images_per_s": [images / s for s in timed(infer, repeats)],
        "gradcam_per_s": [batch_size / s for s in timed(explain(cam), repeats)],
        "lrp_per_s": [batch_size / s for s in timed(explain(relevance), repeats)],
    }
    peak_memory = peak_memory_mib()  # before the peak's product allocates its matrices
    flops = xla_form_flops(config, tx, initial, batches[0], keys)  # after the peaks
    return {
        "compile_s": compile_s,
        "train_flops_per_image": None if flops is None else flops / batch_size,
        "fp32_peak_gflops": fp32_peak_gflops(),
        "fp32_peak_size": PEAK_MATMUL_SIZE,
        **timings,
        "repeats_bitwise": len(set(finals)) == 1,
        "final_sha256": finals[0],
        "train_peak_memory_mib": train_peak_memory,
        "peak_memory_mib": peak_memory,
        "runtime": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cpus": usable_cpus(),
            "packages": determinism.fingerprint().get("packages"),
        },
    }


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    rest, overrides = cli.split_overrides(sys.argv[1:] if argv is None else argv)
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.bench_jax", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("config_file")
    parser.add_argument("--json", required=True, help="where to write the result")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    for switch in SWITCHES:
        parser.add_argument(f"--{switch.replace('_', '-')}", action="store_true")
    args = parser.parse_args(rest)
    result = measure(
        args.config_file,
        overrides,
        args.steps,
        args.repeats,
        **{s: getattr(args, s) for s in SWITCHES},
    )
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

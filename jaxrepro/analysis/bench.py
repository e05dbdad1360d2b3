"""Speed and memory of jaxrepro next to the paper's Keras/TF runs, measured in one run.

    python -m jaxrepro.analysis.bench [CONFIG_FILE ...] [--systems ...] [--image-size 180]
                     [--batch-size 32] [--steps 6] [--repeats 3] [--rounds 1] [--out DIR]

CONFIG_FILEs default to experiments/convnet.py and experiments/minixception.py. Every
(config, system) is measured in a fresh process of its own, one after the other, on
the same data: the config's images (the paper's pipeline: uint8 images, flip / rotate
0.1 / zoom 0.2 augmentation inside the step, RMSprop), read by `jaxrepro.data` on both
sides. Systems:

  jax              jaxrepro as the config trains it (its determinism mode)
  jax-machine      jaxrepro in the machine mode (the same bits on this machine)
  jax-portable     jaxrepro in the portable mode (the same bits on every x86-64 CPU)
  jax-ynn          the same with XLA:CPU's YNNPACK fusions for elementwise ops too
                   (`jaxrepro.analysis.variants` "ynn")
  jax-ynn-convs    the same with XLA:CPU's default YNNPACK use, convolutions included
                   (`jaxrepro.analysis.variants` "ynn-convs"; other bits)
  jax-flax-pool    jaxrepro with Flax's own max-pool gradient (select-and-scatter), i.e.
                   without `jaxrepro.models.ops.pooling` (the same bits)
  jax-xla-pool     jaxrepro with the max pool, forward and gradient, as XLA ops instead
                   of jaxrepro's kernels (`pooling.cc`), as the portable mode runs it
                   (the same bits)
  jax-xla-resample jaxrepro with the augmentation's resampling as XLA ops (gathers)
                   instead of jaxrepro's kernel (`resample.cc`), as the portable mode
                   runs it (the same bits)
  jax-xla-first-conv jaxrepro with the first convolution (over the image's channels) as
                   XLA's own instead of jaxrepro's kernel (`first_conv.cc`; other
                   bits); only for a model with the `first_conv` option (both paper
                   models)
  jax-xla-convs    XLA's own depthwise and 1x1 convolutions (`--config.fast_convs=False`,
                   i.e. without `jaxrepro.models.ops.convolutions`; other bits); only for
                   a model with the `fast_convs` option (the mini Xception)
  jax-shifted-sums the depthwise convolution as XLA's shifted sums (the forward and
                   input gradient bits of jaxrepro's kernels, the tap gradients summed
                   in other orders), without `jaxrepro.native`; only for a
                   model with the `fast_convs` option
  jax-one-chunk    those shifted sums with the backward pass over the whole batch at
                   once, without their batch chunks (other bits); only for a model with
                   the `fast_convs` option
  jax-gpu-nondet   jaxrepro without its XLA:GPU determinism flags (`jaxrepro.analysis.
                   variants` "gpu-nondeterministic"): what determinism costs on a GPU.
                   Not in the default list: on a CPU it is the plain `jax` system
  tf-recipe        Keras model.fit under the paper's recipe (Listings 1, 2 and
                   enable_op_determinism), TF's oneDNN kernels, multi-threaded
  tf-none          Keras model.fit without the recipe (TF's default)
  tf-single        the recipe plus Listing 7 (one inter-op and one intra-op thread)
  tf-none-avx2     tf-none with oneDNN's kernels capped at AVX2 (`ONEDNN_MAX_CPU_ISA`):
                   TF as it runs on a CPU without AVX-512 (its Eigen code has none
                   anyway). Not in the default list

Per process (`jaxrepro.analysis.bench_jax`, `jaxrepro.tfref.bench`): compile time,
then `--repeats` timed repeats of `--steps` training steps (images/s, after
compilation), inference (images/s), Grad-CAM heatmaps/s (JAX: `jaxrepro.explain.gradcam`;
TF: the keras.io GradientTape recipe), LRP heatmaps/s (JAX only) and the process's peak
resident memory, once after training (the training peak) and once at the end. A JAX
process also counts the training step's operations (XLA's cost analysis) and measures
its fp32 peak (the fastest 2048^3 matrix product), and the table gives training's
GFLOP/s and their fraction of the highest peak the model's processes measured. Each
JAX repeat starts from the same initial state on the same batches, so the repeats must
end with the same bits; the table says whether they did. With `--rounds N` every
(config, system) is measured by N processes, round by round, and their repeats are
pooled: on a machine whose speed changes from one minute to the next, a slow spell
then falls on every system alike (and the N processes must end with the same bits).
The table gives the median and the spread (min-max) of the repeats, and the ratios of
the medians (`jaxrepro/TF-deterministic`, `jaxrepro/TF-default`, ...) per model for
training, inference and the training peak memory. Written to DIR/bench.json,
DIR/bench.md and DIR/bench.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

from jaxrepro import cli, models, provenance
from jaxrepro import config as configlib
from jaxrepro.analysis import variants
from jaxrepro.errors import UserError
from jaxrepro.tfref import process

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

DEFAULT_CONFIGS = ("experiments/convnet.py", "experiments/minixception.py")
SYSTEMS = {
    "jax": "jaxrepro in the config's determinism mode",
    "jax-machine": "jaxrepro, machine mode (same bits on this machine)",
    "jax-portable": "jaxrepro, portable mode (same bits on every x86-64 CPU)",
    "jax-ynn": "jaxrepro + YNNPACK fusions",
    "jax-ynn-convs": "jaxrepro with YNNPACK convolutions (before)",
    "jax-flax-pool": "jaxrepro with Flax's select-and-scatter max-pool gradient (before)",
    "jax-xla-pool": "jaxrepro with the max pool as XLA ops (before)",
    "jax-xla-resample": "jaxrepro with the augmentation's resampling as XLA ops (before)",
    "jax-xla-first-conv": "jaxrepro with the first convolution as XLA's (before)",
    "jax-xla-convs": "jaxrepro with XLA's own convolutions (before)",
    "jax-shifted-sums": "jaxrepro with the depthwise convolution as XLA shifted sums (before)",
    "jax-one-chunk": "jaxrepro with the depthwise backward pass unchunked (before)",
    "jax-gpu-nondet": "jaxrepro without the XLA:GPU determinism flags",
    "tf-recipe": "Keras/TF, determinism recipe",
    "tf-none": "Keras/TF default",
    "tf-single": "Keras/TF, recipe, single thread",
    "tf-none-avx2": "Keras/TF default, oneDNN capped at AVX2 (no AVX-512)",
}
# The child's switch for each "before" system that runs jaxrepro's own code another way.
CHILD_SWITCHES = {
    "jax-flax-pool": "--flax-pool",
    "jax-xla-pool": "--xla-pool",
    "jax-xla-resample": "--xla-resample",
    "jax-xla-first-conv": "--xla-first-conv",
    "jax-xla-convs": "--xla-convs",
    "jax-one-chunk": "--one-chunk",
    "jax-shifted-sums": "--shifted-sums",
}
# Systems that change the `fast_convs` convolutions only (a model spec's config option).
FAST_CONVS_ONLY = ("jax-xla-convs", "jax-one-chunk", "jax-shifted-sums")
# The determinism mode a JAX system runs in (the others: the config's).
JAX_MODES = {"jax-machine": "machine", "jax-portable": "portable"}
# The `jaxrepro.analysis.variants` variant each JAX system runs under.
JAX_VARIANTS = {
    "jax-ynn": "ynn",
    "jax-ynn-convs": "ynn-convs",
    "jax-gpu-nondet": "gpu-nondeterministic",
}
# Systems measured only when asked for by name (`--systems`).
NOT_BY_DEFAULT = ("jax-gpu-nondet", "tf-none-avx2")
TF_MODES = {"tf-recipe": "recipe", "tf-none": "none", "tf-single": "single", "tf-none-avx2": "none"}
# oneDNN's ISA cap per TF system: oneDNN generates its kernels for the CPU it finds
# unless `ONEDNN_MAX_CPU_ISA` names a lower ISA.
TF_ISA_CAPS = {"tf-none-avx2": "AVX2"}
# The TF baselines every JAX system is compared with.
RATIOS = {
    "tf-recipe": "TF-deterministic",
    "tf-none": "TF-default",
    "tf-single": "TF-single-thread",
    "tf-none-avx2": "TF-default-AVX2",
}


class BenchError(UserError, ValueError):
    """Settings the benchmark cannot run with."""


def data_overrides(image_size: int, batch_size: int, steps: int) -> list[str]:
    """Config overrides both sides load: enough training images for `steps` batches."""
    return [
        f"data.image_size={image_size}",
        f"data.num_train={max(steps, 1) * batch_size}",
        f"data.num_val={batch_size}",
        f"batch_size={batch_size}",
        f"eval_batch_size={batch_size}",
    ]


# --------------------------------------------------------------------- parent


def child_command(
    system: str, config_file: str, model: str, args: argparse.Namespace, out: Path
) -> tuple[str, list[str]]:
    """(module, arguments) of the process that measures `system` on `config_file` (a
    config of `model`) into `out`."""
    common = [
        config_file,
        "--steps",
        str(args.steps),
        "--repeats",
        str(args.repeats),
        "--json",
        str(out),
        *cli.as_arguments(data_overrides(args.image_size, args.batch_size, args.steps)),
    ]
    if system in TF_MODES:
        return "jaxrepro.tfref.bench", [
            *common,
            "--mode",
            TF_MODES[system],
            "--gradcam-layer",
            models.get_spec(model).keras_gradcam_layer,
        ]
    switch = CHILD_SWITCHES.get(system)
    mode = JAX_MODES.get(system)
    return "jaxrepro.analysis.bench_jax", [
        *common,
        *([switch] if switch else []),
        *([f"--config.determinism={mode}"] if mode else []),
    ]


def child_environment(system: str) -> dict[str, str]:
    """Environment of the measuring process (a TF one gets its recipe's)."""
    if system in TF_MODES:
        env = process.child_environment(process.MODES[TF_MODES[system]], dict(os.environ))
        if system in TF_ISA_CAPS:
            env["ONEDNN_MAX_CPU_ISA"] = TF_ISA_CAPS[system]
        return env
    variant = variants.VARIANTS[JAX_VARIANTS.get(system, "default")]
    return variants.variant_env(variant, os.environ)


def run_system(
    system: str, config_file: str, model: str, args: argparse.Namespace, out: Path
) -> dict:
    """Measure one system on one config in its own process; its JSON result."""
    module, child_args = child_command(system, config_file, model, args, out)
    cli.run_child(module, child_args, env=child_environment(system), what=f"{system} on {model}")
    return {"system": system, "model": model, **json.loads(out.read_text())}


def schedule(
    todo: list[tuple[str, str, list[str]]], rounds: int
) -> list[tuple[int, str, str, str]]:
    """(round, config file, model, system) in the order they run: every (config, system)
    once per round, round after round."""
    return [
        (r, config_file, model, system)
        for r in range(rounds)
        for config_file, model, systems in todo
        for system in systems
    ]


# A row's per-repeat measurements (pooled over processes) and its per-process figures
# (their median over processes; the fp32 peak: the highest).
POOLED = ("train_images_per_s", "infer_images_per_s", "gradcam_per_s", "lrp_per_s")
PER_PROCESS = ("compile_s", "train_peak_memory_mib", "peak_memory_mib")


def merge_runs(runs: list[dict]) -> dict:
    """One row from the processes that measured one (model, system): the repeats pooled,
    the per-process figures' medians, the highest fp32 peak, and `repeats_bitwise` only
    if every process repeated its bits and all ended with the same final SHA-256."""
    row = dict(runs[0])
    if len(runs) == 1:
        return row
    for key in POOLED:
        values = [r.get(key) for r in runs]
        row[key] = None if any(v is None for v in values) else [x for v in values for x in v]
    for key in PER_PROCESS:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    peaks = [r["fp32_peak_gflops"] for r in runs if r.get("fp32_peak_gflops")]
    if peaks:
        row["fp32_peak_gflops"] = max(peaks)
    if row.get("repeats_bitwise") is not None:
        row["repeats_bitwise"] = all(r["repeats_bitwise"] for r in runs) and (
            len({r["final_sha256"] for r in runs}) == 1
        )
    row["processes"] = len(runs)
    return row


def summary(values: list[float] | None) -> dict | None:
    """Median and range of repeated measurements."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# What the ratios compare: each measure's key in a row, and how it is summarised.
MEASURES = {
    "train": "train_images_per_s",
    "inference": "infer_images_per_s",
    "training peak memory": "train_peak_memory_mib",
}


def _median(row: dict, key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, list):
        return summary(value)["median"] if value else None
    return value


def ratios(rows: list[dict], measure: str = "train") -> dict[str, dict[str, float]]:
    """Per model: the median of `measure` (a key of `MEASURES`) of each JAX system over
    each TF baseline's, portable over machine mode, and jaxrepro over each of its
    "before" systems. For speed above 1 is faster; for memory below 1 is smaller."""
    key = MEASURES[measure]
    by = {(r["model"], r["system"]): v for r in rows if (v := _median(r, key)) is not None}
    out: dict[str, dict[str, float]] = {}

    def ratio(model: str, a: str, b: str, label: str) -> None:
        if (model, a) in by and (model, b) in by and by[model, b]:
            out.setdefault(model, {})[label] = by[model, a] / by[model, b]

    for model in dict.fromkeys(r["model"] for r in rows):
        for jax_system in ("jax", "jax-machine", "jax-portable", "jax-ynn"):
            name = "jaxrepro" if jax_system == "jax" else jax_system
            for tf_system, tf_name in RATIOS.items():
                ratio(model, jax_system, tf_system, f"{name}/{tf_name}")
        ratio(model, "jax-portable", "jax-machine", "portable/machine")
        for before in (*CHILD_SWITCHES, "jax-ynn-convs", "jax-gpu-nondet"):
            ratio(model, "jax", before, f"jaxrepro/{before}")
    return out


def flops_per_image(rows: list[dict]) -> dict[str, float]:
    """Per model: XLA's count of the operations of one training image, from the model's
    first JAX row (the same mathematics for every system, so GFLOP/s compare as img/s)."""
    out: dict[str, float] = {}
    for r in rows:
        if r.get("train_flops_per_image"):
            out.setdefault(r["model"], r["train_flops_per_image"])
    return out


def fraction_of_peak(rows: list[dict]) -> dict[tuple[str, str], dict[str, float]]:
    """Per (model, system): median training GFLOP/s and its fraction of the fp32 peak.

    The peak is what the cores can do: the fastest large matrix product any of the
    model's JAX processes measured (`bench_jax.fp32_peak_gflops`), the same for every row.
    A process's own product is no peak where its mode runs no kernel library (portable
    mode's is XLA's generated GEMM, about a twentieth of it).
    """
    flops = flops_per_image(rows)
    peaks: dict[str, float] = {}
    for r in rows:
        if r.get("fp32_peak_gflops"):
            peaks[r["model"]] = max(peaks.get(r["model"], 0.0), r["fp32_peak_gflops"])
    out = {}
    for r in rows:
        peak = peaks.get(r["model"])
        if r["model"] not in flops or not peak:
            continue
        gflops = summary(r["train_images_per_s"])["median"] * flops[r["model"]] / 1e9
        out[r["model"], r["system"]] = {
            "gflops": gflops,
            "peak_gflops": peak,
            "fraction": gflops / peak,
        }
    return out


def _memory(mib: float | None) -> str:
    return "-" if mib is None else f"{mib:.0f}"


def _cell(values: list[float] | None, spec: str = ".1f") -> str:
    s = summary(values)
    if s is None:
        return "-"
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def table(rows: list[dict], made_by: dict) -> str:
    """Markdown: the provenance, one row per (model, system), then the ratios."""
    lines = [
        provenance.markdown(made_by),
        "",
        "| model | system | train img/s | train GFLOP/s (of fp32 peak) | compile s | "
        "inference img/s | Grad-CAM /s | LRP /s | training peak MiB | peak MiB | "
        "repeats bitwise |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peak = fraction_of_peak(rows)
    for r in rows:
        bitwise = {True: "yes", False: "NO", None: "-"}[r.get("repeats_bitwise")]
        p = peak.get((r["model"], r["system"]))
        used = (
            "-"
            if p is None
            else f"{p['gflops']:.0f} ({p['fraction']:.2f} of {p['peak_gflops']:.0f})"
        )
        lines.append(
            f"| {r['model']} | {r['system']} | {_cell(r['train_images_per_s'])} | {used} | "
            f"{r['compile_s']:.1f} | {_cell(r['infer_images_per_s'])} | "
            f"{_cell(r.get('gradcam_per_s'))} | {_cell(r.get('lrp_per_s'))} | "
            f"{_memory(r.get('train_peak_memory_mib'))} | {r['peak_memory_mib']:.0f} | "
            f"{bitwise} |"
        )
    every = {m: ratios(rows, m) for m in MEASURES}
    lines += [
        "",
        "Ratios of medians (speed: above 1 is faster; training peak memory: below 1 is smaller):",
        "",
        "| model | ratio | " + " | ".join(MEASURES) + " |",
        "|---|---|" + "---|" * len(MEASURES),
    ]
    for model, train in every["train"].items():
        for label in train:
            cells = [every[m].get(model, {}).get(label) for m in MEASURES]
            lines.append(
                f"| {model} | {label} | "
                + " | ".join("-" if v is None else f"{v:.2f}x" for v in cells)
                + " |"
            )
    flops = flops_per_image(rows)
    sizes = sorted({r["fp32_peak_size"] for r in rows if r.get("fp32_peak_size")})
    if flops:
        lines += [
            "",
            "Training operations per image (XLA's count of the JAX step with "
            "jaxrepro's kernels in their XLA forms, augmentation included): "
            + ", ".join(f"{m} {f / 1e9:.2f} GFLOP" for m, f in flops.items())
            + ". The fp32 peak is the fastest "
            + "/".join(f"{n}^3" for n in sizes)
            + " matrix product any of the model's JAX processes measured.",
        ]
    return "\n".join(lines)


# The plot's rows: a measure per row, its key in the rows and its title.
PLOTTED = (("train_images_per_s", "training"), ("infer_images_per_s", "inference"))


def plot(rows: list[dict], path: Path) -> None:
    """Bar charts of training and inference images/s (median, range as error bars), a
    column per model."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(
        len(PLOTTED), len(models), figsize=(5 * len(models), 3.6 * len(PLOTTED)), squeeze=False
    )
    for (key, title), row_axes in zip(PLOTTED, axes):
        for ax, model in zip(row_axes, models):
            mine = [r for r in rows if r["model"] == model and r.get(key)]
            stats = [summary(r[key]) for r in mine]
            med = [s["median"] for s in stats]
            err = [
                [m - s["min"] for m, s in zip(med, stats)],
                [s["max"] - m for m, s in zip(med, stats)],
            ]
            colors = ["tab:blue" if r["system"].startswith("jax") else "tab:orange" for r in mine]
            ax.bar([r["system"] for r in mine], med, yerr=err, color=colors, capsize=3)
            ax.set_title(f"{model}: {title} throughput")
            ax.set_ylabel("images / s")
            ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.bench",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument(
        "configs",
        nargs="*",
        metavar="CONFIG_FILE",
        default=list(DEFAULT_CONFIGS),
        help="experiment configs (default: %(default)s)",
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=list(SYSTEMS),
        default=[s for s in SYSTEMS if s not in NOT_BY_DEFAULT],
    )
    parser.add_argument("--image-size", type=int, default=180)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="training steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per process")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="processes per (config, system), run round by round so that a slow spell of "
        "the machine falls on every system alike; their repeats are pooled",
    )
    parser.add_argument("--out", default="checkpoints/bench", help="output directory")
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "steps", "repeats", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(config file, model name, systems) per config, checked before anything runs."""
    out = []
    for config_file in args.configs:
        config = configlib.resolve(config_file)
        spec = models.get_spec(config.model)
        if args.image_size < spec.min_image_size:
            raise BenchError(
                f"{config_file}: the {config.model} needs --image-size of at "
                f"least {spec.min_image_size}"
            )
        fields = {f.name for f in dataclasses.fields(spec.module)}
        systems = [
            s
            for s in args.systems
            if (s not in FAST_CONVS_ONLY or "fast_convs" in spec.config_options)
            and (s != "jax-xla-first-conv" or "first_conv" in fields)
        ]
        out.append((config_file, config.model, systems))
    return out


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: measure every (config, system), print and write the table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    made_by = provenance.record("python -m jaxrepro.analysis.bench", argv)
    todo = plan(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for _, model, systems in todo:
        skipped = [s for s in args.systems if s not in systems]
        if skipped:
            print(
                f"skipping {', '.join(skipped)} on {model}: they change the fast_convs "
                "convolutions or the first_conv kernel, which this model does not have",
                file=sys.stderr,
                flush=True,
            )
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_, config_file, model, system in schedule(todo, args.rounds):
        print(
            f"measuring {system} on {model}"
            + (f" (round {round_ + 1} of {args.rounds})" if args.rounds > 1 else "")
            + " ...",
            file=sys.stderr,
            flush=True,
        )
        name = f"{model}_{system}" + (f"_round{round_ + 1}" if args.rounds > 1 else "")
        try:
            r = run_system(system, config_file, model, args, out / f"{name}.json")
        except cli.ChildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        runs.setdefault((model, system), []).append(r)
        print(
            f"  {summary(r['train_images_per_s'])['median']:.1f} train images/s, "
            f"compile {r['compile_s']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    rows = [merge_runs(r) for r in runs.values()]
    text = table(rows, made_by)
    settings = {
        k: getattr(args, k) for k in ("image_size", "batch_size", "steps", "repeats", "rounds")
    }
    (out / "bench.json").write_text(
        json.dumps(
            {
                "provenance": made_by,
                **settings,
                "rows": rows,
                "ratios": ratios(rows),
                "ratios_by_measure": {m: ratios(rows, m) for m in MEASURES},
                "fraction_of_peak": [
                    {"model": m, "system": s, **v} for (m, s), v in fraction_of_peak(rows).items()
                ],
            },
            indent=1,
        )
        + "\n"
    )
    (out / "bench.md").write_text(text + "\n")
    plot(rows, out / "bench.png")
    print(text)
    print(f"\nwritten: {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

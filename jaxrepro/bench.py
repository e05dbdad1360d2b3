"""Speed and memory of jaxrepro next to the paper's Keras/TF runs, measured in one run.

    python -m jaxrepro.bench [--models convnet minixception] [--systems ...]
                             [--image-size 180] [--batch-size 32] [--steps 6] [--repeats 3]
                             [--out DIR]

Every (model, system) is measured in a fresh process of its own, one after the other,
on the same data: the config's shapes images (the paper's pipeline: uint8 images,
flip / rotate 0.1 / zoom 0.2 augmentation inside the step, batch 32, RMSprop), read by
`jaxrepro.data` on both sides. Systems:

  jax              jaxrepro as it trains by default (`make_train_step`, deterministic)
  jax-ynn          the same with XLA:CPU's YNNPACK fusions for elementwise ops too
                   (`jaxrepro.variants` "ynn")
  jax-ynn-convs    the same with XLA:CPU's default YNNPACK use, convolutions included,
                   as before 2026-11-29 (`jaxrepro.variants` "ynn-convs"; other bits)
  jax-flax-pool    jaxrepro with Flax's own max-pool gradient (select-and-scatter), as
                   before `jaxrepro.models.pooling` (the same bits)
  jax-xla-convs    the mini Xception with XLA's own depthwise and 1x1 convolutions
                   (`--config.fast_convs=False`, as before
                   `jaxrepro.models.convolutions`; other bits). Skipped for the
                   ConvNet, whose default convolutions are XLA's.
  jax-one-chunk    the mini Xception with its depthwise backward pass over the whole
                   batch at once, as before the batch chunks of
                   `jaxrepro.models.convolutions` (other bits). Skipped for the ConvNet.
  tf-recipe        Keras model.fit under the paper's recipe (Listings 1, 2 and
                   enable_op_determinism), TF's oneDNN kernels, multi-threaded
  tf-none          Keras model.fit without the recipe (TF's default)
  tf-single        the recipe plus Listing 7 (one inter-op and one intra-op thread)

Per process: compile time (JAX: lowering and compiling the train step; TF: the first
`fit` call minus a steady call's share), then `--repeats` timed repeats of `--steps`
training steps (images/s, after compilation), inference (images/s, inference mode),
Grad-CAM heatmaps/s (JAX: `jaxrepro.explain.gradcam`; TF: the keras.io GradientTape
recipe), LRP heatmaps/s (JAX only) and the process's peak resident memory (it holds
the same data on both sides). Each JAX repeat starts from the same initial state on
the same batches, so the repeats must end with the same bits; the table says whether
they did. The table gives the median and the spread (min-max) of the repeats and the
ratios `jaxrepro/TF-deterministic` and `jaxrepro/TF-default` per model. Written to
DIR/bench.json, DIR/bench.md and DIR/bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("convnet", "minixception")
SYSTEMS = {
    "jax": "jaxrepro, deterministic (default)",
    "jax-ynn": "jaxrepro + YNNPACK fusions",
    "jax-ynn-convs": "jaxrepro with YNNPACK convolutions (before)",
    "jax-flax-pool": "jaxrepro with Flax's select-and-scatter max-pool gradient (before)",
    "jax-xla-convs": "jaxrepro with XLA's own convolutions (before)",
    "jax-one-chunk": "jaxrepro with the depthwise backward pass unchunked (before)",
    "tf-recipe": "Keras/TF, determinism recipe",
    "tf-none": "Keras/TF default",
    "tf-single": "Keras/TF, recipe, single thread",
}
# The child's switch for each "before" system that runs jaxrepro's own code another way.
CHILD_SWITCHES = {"jax-flax-pool": "--flax-pool", "jax-xla-convs": "--xla-convs",
                  "jax-one-chunk": "--one-chunk"}
# Systems that change the mini Xception's convolutions only.
MINIXCEPTION_ONLY = ("jax-xla-convs", "jax-one-chunk")
TF_MODES = {"tf-recipe": "recipe", "tf-none": "none", "tf-single": "single"}
# The ratios the issue asks for: jaxrepro over each TF baseline.
RATIOS = {"jaxrepro/TF-deterministic": "tf-recipe", "jaxrepro/TF-default": "tf-none"}


def data_overrides(image_size: int, batch_size: int, steps: int) -> list[str]:
    """Config overrides both sides load: enough training images for `steps` batches."""
    return [f"data.image_size={image_size}", f"data.num_train={max(steps, 1) * batch_size}",
            f"data.num_val={batch_size}", f"batch_size={batch_size}",
            f"eval_batch_size={batch_size}"]


def experiment_file(model: str) -> str:
    """The experiment config of `model` (both sides read the same file)."""
    return str(ROOT / "experiments" / f"{model}.py")


def peak_memory_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)  # bytes on macOS


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (which must block until done)."""
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t)
    return seconds


# ------------------------------------------------------------------ JAX side


def measure_jax(model_name: str, image_size: int, batch_size: int, steps: int,
                repeats: int, flax_pool: bool = False, xla_convs: bool = False,
                one_chunk: bool = False) -> dict:
    """Measure jaxrepro in this process (a fresh one, started by `run_system`).

    `flax_pool`: Flax's own max-pool gradient instead of `jaxrepro.models.pooling`'s;
    `xla_convs`: the mini Xception's XLA convolutions instead of
    `jaxrepro.models.convolutions`'; `one_chunk`: the depthwise backward pass over
    the whole batch at once (each the speed-up it brings, measured).
    """
    import jax  # noqa: PLC0415  (the parent process never starts JAX)
    import numpy as np  # noqa: PLC0415

    from jaxrepro import config as configlib  # noqa: PLC0415
    from jaxrepro import determinism, fingerprint, rng, train  # noqa: PLC0415
    from jaxrepro.data.order import epoch_order  # noqa: PLC0415
    from jaxrepro.explain import gradcam, lrp  # noqa: PLC0415

    from jaxrepro.models import convolutions, pooling  # noqa: PLC0415

    convnet = model_name == "convnet"
    if one_chunk:
        convolutions.CHUNK_BYTES = sys.maxsize  # every batch fits: one chunk
    config = configlib.resolve(experiment_file(model_name),
                               data_overrides(image_size, batch_size, steps)
                               + (["fast_convs=False"] if xla_convs and not convnet else []))
    data = train.load_data(config)
    model, tx = train.build_model(config), train.build_optimizer(config)
    if flax_pool:
        model = model.clone(pool=pooling.flax_max_pool_2x2 if convnet
                            else pooling.flax_max_pool_3x3_s2)
    keys = rng.stream_keys(config.seed)
    initial = jax.device_get(train.init_state(model, tx, keys["init"], image_size))
    order = np.asarray(epoch_order(keys["shuffle"], 0, len(data.train.labels)))
    batches = [(data.train.images[i], data.train.labels[i])
               for i in np.split(order[:steps * batch_size], steps)]

    step_fn = train.make_train_step(model, tx, config.augment)
    t = time.perf_counter()
    compiled = step_fn.lower(jax.device_put(initial), *batches[0], keys).compile()
    compile_s = time.perf_counter() - t
    finals = []

    def train_steps():
        state = jax.device_put(initial)  # every repeat: the same start, the same batches
        for images, labels in batches:  # as train.py: the loss and fingerprints each step
            state, metrics, prints = compiled(state, images, labels, keys)
            float(metrics["loss"])
            fingerprint.to_hex(prints)
        finals.append(fingerprint.combine_hex(fingerprint.sha256_leaves(
            {"params": state.params, "batch_stats": state.batch_stats})))

    train_s = timed(train_steps, repeats)

    state = jax.device_put(initial)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    eval_step = train.make_eval_step(model)
    weights = np.ones(batch_size, np.float32)

    def infer():
        for images, labels in batches:
            jax.block_until_ready(eval_step(state, images, labels, weights))

    cam = jax.jit(lambda v, x: gradcam.gradcam(model, v, x))
    relevance = jax.jit(lambda v, x: lrp.heatmap(lrp.attribute(model, v, x)))
    explain_x = batches[0][0].astype(np.float32)

    def explain(fn):
        return lambda: jax.block_until_ready(fn(variables, explain_x))

    for warm in (infer, explain(cam), explain(relevance)):
        warm()  # compile outside the timed calls
    return {
        "compile_s": compile_s,
        "train_images_per_s": [steps * batch_size / s for s in train_s],
        "infer_images_per_s": [steps * batch_size / s for s in timed(infer, repeats)],
        "gradcam_per_s": [batch_size / s for s in timed(explain(cam), repeats)],
        "lrp_per_s": [batch_size / s for s in timed(explain(relevance), repeats)],
        "repeats_bitwise": len(set(finals)) == 1,
        "final_sha256": finals[0],
        "peak_memory_mib": peak_memory_mib(),
        "runtime": {"jax": jax.__version__, "backend": jax.default_backend(),
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "cpus": len(os.sched_getaffinity(0)),
                    "packages": determinism.fingerprint().get("packages")},
    }


# --------------------------------------------------------------------- parent


def child_command(system: str, model: str, args: argparse.Namespace, out: Path) -> list[str]:
    """The command line that measures `system` on `model` into `out` (JSON)."""
    common = ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
              "--steps", str(args.steps), "--repeats", str(args.repeats), "--json", str(out)]
    if system in TF_MODES:
        return [sys.executable, "-m", "jaxrepro.tfref.bench", model, "--mode",
                TF_MODES[system], *common]
    switch = CHILD_SWITCHES.get(system)
    return [sys.executable, "-m", "jaxrepro.bench", "--child", model, *common,
            *([switch] if switch else [])]


def child_environment(system: str) -> dict[str, str]:
    """Environment of the measuring process (a TF one gets its recipe's)."""
    if system in TF_MODES:
        from jaxrepro.tfref import process  # noqa: PLC0415

        return process.child_environment(process.MODES[TF_MODES[system]], dict(os.environ))
    from jaxrepro import variants  # noqa: PLC0415

    variant = {"jax-ynn": "ynn", "jax-ynn-convs": "ynn-convs"}.get(system, "default")
    return variants.variant_env(variants.VARIANTS[variant], os.environ)


def run_system(system: str, model: str, args: argparse.Namespace, out: Path) -> dict:
    """Measure one system on one model in its own process; its JSON result."""
    r = subprocess.run(child_command(system, model, args, out), env=child_environment(system),
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{system} on {model} exited {r.returncode}:\n{r.stderr[-3000:]}")
    return {"system": system, "model": model, **json.loads(out.read_text())}


def summary(values: list[float] | None) -> dict | None:
    """Median and range of repeated measurements."""
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per model: jaxrepro's median training images/s over each TF baseline's."""
    by = {(r["model"], r["system"]): summary(r["train_images_per_s"])["median"] for r in rows}
    out: dict[str, dict[str, float]] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        for jax_system in ("jax", "jax-ynn"):
            for name, tf_system in RATIOS.items():
                if (model, jax_system) in by and (model, tf_system) in by:
                    label = name if jax_system == "jax" else name.replace("jaxrepro", "jax-ynn")
                    out.setdefault(model, {})[label] = by[model, jax_system] / by[model, tf_system]
        for before in ("jax-flax-pool", "jax-xla-convs", "jax-one-chunk", "jax-ynn-convs"):
            if (model, "jax") in by and (model, before) in by:
                out.setdefault(model, {})[f"jaxrepro/{before}"] = (
                    by[model, "jax"] / by[model, before])
    return out


def _cell(values: list[float] | None, spec: str = ".1f") -> str:
    s = summary(values)
    if s is None:
        return "-"
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def table(rows: list[dict], machine: str) -> str:
    """Markdown: one row per (model, system), then the ratios."""
    lines = [f"Measured on: {machine}", "",
             "| model | system | train img/s | compile s | inference img/s | Grad-CAM /s | "
             "LRP /s | peak MiB | repeats bitwise |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bitwise = {True: "yes", False: "NO", None: "-"}[r.get("repeats_bitwise")]
        lines.append(
            f"| {r['model']} | {r['system']} | {_cell(r['train_images_per_s'])} | "
            f"{r['compile_s']:.1f} | {_cell(r['infer_images_per_s'])} | "
            f"{_cell(r.get('gradcam_per_s'))} | {_cell(r.get('lrp_per_s'))} | "
            f"{r['peak_memory_mib']:.0f} | {bitwise} |")
    lines += ["", "| model | ratio (median train images/s) | value |", "|---|---|---|"]
    for model, values in ratios(rows).items():
        lines += [f"| {model} | {name} | {v:.2f}x |" for name, v in values.items()]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Bar chart of training images/s (median, range as error bars) per model."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        stats = [summary(r["train_images_per_s"]) for r in mine]
        med = [s["median"] for s in stats]
        err = [[m - s["min"] for m, s in zip(med, stats)], [s["max"] - m for m, s in zip(med, stats)]]
        colors = ["tab:blue" if r["system"].startswith("jax") else "tab:orange" for r in mine]
        ax.bar([r["system"] for r in mine], med, yerr=err, color=colors, capsize=3)
        ax.set_title(f"{model}: training throughput")
        ax.set_ylabel("images / s")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> str:
    """A one-line description of this machine's CPU."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {len(os.sched_getaffinity(0))} cores usable, CPU only"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxrepro.bench",
                                     description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--image-size", type=int, default=180)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="training steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="checkpoints/bench", help="output directory")
    parser.add_argument("--child", metavar="MODEL", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--flax-pool", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--xla-convs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one-chunk", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.child and "convnet" in args.models and args.image_size < 80:
        parser.error("the ConvNet needs --image-size of at least 80")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: measure every (model, system), print and write the table."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        import jaxrepro  # noqa: F401,PLC0415  (determinism settings before JAX starts)

        result = measure_jax(args.child, args.image_size, args.batch_size, args.steps,
                             args.repeats, flax_pool=args.flax_pool,
                             xla_convs=args.xla_convs, one_chunk=args.one_chunk)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        for system in args.systems:
            if system in MINIXCEPTION_ONLY and model == "convnet":
                print(f"skipping {system} on convnet: it changes the mini Xception's "
                      "convolutions only", file=sys.stderr, flush=True)
                continue
            print(f"measuring {system} on {model} ...", file=sys.stderr, flush=True)
            try:
                rows.append(run_system(system, model, args, out / f"{model}_{system}.json"))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            r = rows[-1]
            print(f"  {summary(r['train_images_per_s'])['median']:.1f} train images/s, "
                  f"compile {r['compile_s']:.1f} s", file=sys.stderr, flush=True)
    text = table(rows, machine())
    settings = {k: getattr(args, k) for k in ("image_size", "batch_size", "steps", "repeats")}
    (out / "bench.json").write_text(json.dumps({"machine": machine(), **settings, "rows": rows,
                                                "ratios": ratios(rows)}, indent=1) + "\n")
    (out / "bench.md").write_text(text + "\n")
    plot(rows, out / "bench.png")
    print(text)
    print(f"\nwritten: {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

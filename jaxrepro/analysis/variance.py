"""How much of a difference between two results comes from the seed, the framework,
the CPU code path, or nothing at all? Train K short runs per factor and measure.

    python -m jaxrepro.analysis.variance CONFIG_FILE [--k 3] [--steps 20] [--probe 8]
                     [--variants one-core,ynn] [--out DIR] [--config.KEY=VALUE ...]

Every run follows one protocol, the matched one (`jaxrepro.analysis.matched`): this
process builds the initial weights (`init` stream) and N training batches (`shuffle`
order, `augment` keys, augmented once) of a seed; a trainer in a fresh process of its
own (`python -m jaxrepro.analysis.matched` or `python -m jaxrepro.tfref matched`) takes
those weights and batches, runs N steps of Keras RMSprop with dropout off (so that two
frameworks can see exactly the same inputs), and writes its final weights. Then this
process evaluates every set of final weights the same way (JAX, inference mode):
validation accuracy and Grad-CAM heatmaps of P validation images. Only training
differs between runs, never evaluation.

Runs, seeds s0 = config.seed, s1 = s0 + 1, ...:

  seed        JAX, seeds s0 .. s(K-1)                      (all K*(K-1)/2 pairs)
  framework   Keras vs JAX on each seed s0 .. s(K-1)       (K pairs; the same init
              and batches, bit for bit; Keras under the paper's determinism recipe,
              on TF's default oneDNN kernels)
  framework, same kernels
              Keras on TF's Eigen kernels (oneDNN off, the library XLA:CPU calls for
              convolutions) vs JAX with its first convolution as XLA's (Eigen's)
              instead of jaxrepro's kernel (`matched.eigen_convolutions`), on each
              seed                                        (K pairs): the part of the
              framework effect that is not the kernel library
  code path   JAX on s0 under each of --variants (another XLA:CPU code path or core
              count, see `jaxrepro.analysis.variants`) vs JAX on s0   (one pair per variant)
  rerun JAX   JAX on s0 again, K-1 more processes, vs the first   (K-1 pairs)
  rerun TF    Keras on s0 again, K-1 more processes, vs the first (K-1 pairs)

Per pair: whether every final weight is bitwise equal; the parameters' relative
difference ||a - b|| / ||a|| over all trainable parameters; the difference of the
validation accuracies; the RMSE between the two runs' Grad-CAM heatmaps (values in
[0, 1], mean over the P images). The table gives the median and maximum per factor;
DIR/variance.json has every pair, DIR/variance.png shows them. Exit 0 on success, 2 on
a user error, 1 if a trainer process fails.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import matplotlib
import numpy as np

from jaxrepro import cli, provenance
from jaxrepro import config as configlib
from jaxrepro.analysis import matched
from jaxrepro.analysis import variants as variantslib
from jaxrepro.analysis.compare import tf_environment
from jaxrepro.errors import UserError
from jaxrepro.explain import gradcam as gradcamlib
from jaxrepro.numerics import array_diff
from jaxrepro.tfref import weights
from jaxrepro.train import setup, steps
from jaxrepro.train.loop import load_data

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

FACTORS = (
    "seed",
    "framework",
    "framework, same kernels",
    "code path",
    "rerun JAX",
    "rerun TF",
)
DEFAULT_VARIANTS = "one-core,ynn"


class VarianceError(UserError, RuntimeError):
    """The decomposition cannot run as asked (a user error: exit 2)."""


@dataclass(frozen=True)
class Run:
    """One training: which trainer, on which seed's inputs, in which process variant."""

    name: str
    trainer: str  # "jax" | "keras"
    seed: int
    variant: str = "default"  # JAX only: a `variants` name
    # "eigen": Keras on TF's Eigen kernels, JAX with Eigen's first convolution;
    # "default": Keras on oneDNN, JAX with jaxrepro's.
    kernels: str = "default"


def plan(seed: int, k: int, variant_names: Sequence[str]) -> tuple[list[Run], dict]:
    """The runs to train and, per factor, the pairs of run names to compare."""
    seeds = [seed + i for i in range(k)]
    runs = [Run(f"jax-s{s}", "jax", s) for s in seeds]
    runs += [Run(f"keras-s{s}", "keras", s) for s in seeds]
    runs += [Run(f"jax-eigen-s{s}", "jax", s, kernels="eigen") for s in seeds]
    runs += [Run(f"keras-eigen-s{s}", "keras", s, kernels="eigen") for s in seeds]
    runs += [Run(f"jax-s{seed}-rerun{j}", "jax", seed) for j in range(1, k)]
    runs += [Run(f"keras-s{seed}-rerun{j}", "keras", seed) for j in range(1, k)]
    runs += [Run(f"jax-s{seed}-{v}", "jax", seed, v) for v in variant_names]
    pairs = {
        "seed": [(f"jax-s{a}", f"jax-s{b}") for i, a in enumerate(seeds) for b in seeds[i + 1 :]],
        "framework": [(f"jax-s{s}", f"keras-s{s}") for s in seeds],
        "framework, same kernels": [(f"jax-eigen-s{s}", f"keras-eigen-s{s}") for s in seeds],
        "code path": [(f"jax-s{seed}", f"jax-s{seed}-{v}") for v in variant_names],
        "rerun JAX": [(f"jax-s{seed}", f"jax-s{seed}-rerun{j}") for j in range(1, k)],
        "rerun TF": [(f"keras-s{seed}", f"keras-s{seed}-rerun{j}") for j in range(1, k)],
    }
    return runs, pairs


# ------------------------------------------------------------------ trainers


def write_inputs(config, num_steps: int, probe: int, directory: Path) -> None:
    """A seed's initial weights and batches, as the trainers read them."""
    matched.write_exchange(
        matched.matched_inputs(config, num_steps, probe), directory, validation=False
    )


def train_run(
    run: Run, config_file: str, overrides: Sequence[str], exchange: Path, out: Path
) -> None:
    """Train `run` in a fresh process; its final weights end up in `out/final.npz`."""
    seed_dir = exchange / f"s{run.seed}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if run.trainer == "keras":
        model = configlib.resolve(config_file, overrides).model
        kernels = "onednn" if run.kernels == "default" else run.kernels
        cli.run_child(
            "jaxrepro.tfref",
            [
                "matched",
                model,
                str(seed_dir / "init.npz"),
                str(seed_dir / "inputs.npz"),
                str(seed_dir / "layers.json"),
                str(out / "keras"),
                "--tf-kernels",
                kernels,
            ],
            env=tf_environment(kernels),
            what=f"Keras run {run.name}",
        )
        last = sorted((out / "keras").glob("weights_*.npz"))[-1]
        shutil.copyfile(last, out / "final.npz")
        return
    variant = variantslib.get_variant(run.variant)
    cli.run_child(
        "jaxrepro.analysis.matched",
        [
            str(seed_dir),
            str(out),
            config_file,
            *cli.as_arguments(overrides),
            f"--config.seed={run.seed}",
            *(["--eigen"] if run.kernels == "eigen" else []),
        ],
        env=variantslib.variant_env(variant, os.environ),
        cpus=variant.cpus,
        prefix=variant.prefix,
        what=f"JAX run {run.name}",
    )


# ----------------------------------------------------------------- measures


def evaluate(
    model,
    final: dict,
    probe: np.ndarray,
    val_images: np.ndarray,
    val_labels: np.ndarray,
    batch_size: int,
) -> dict:
    """Validation accuracy and Grad-CAM heatmaps of one run's final weights."""
    variables = weights.unflatten(final)
    variables.setdefault("batch_stats", {})
    accuracy = (
        steps.evaluate(
            steps.make_eval_step(model), variables, val_images, val_labels, batch_size
        ).accuracy
        if len(val_labels)
        else None
    )
    maps = gradcamlib.gradcam(model, variables, jnp.asarray(probe))
    return {"val_accuracy": accuracy, "gradcam": np.asarray(maps, np.float64)}


def pair_measures(a: dict, b: dict) -> dict[str, Any]:
    """How far two runs ended apart (see the module docstring)."""
    wa, wb = a["weights"], b["weights"]
    if set(wa) != set(wb):
        raise RuntimeError(f"weights of one run only: {sorted(set(wa) ^ set(wb))}")
    bitwise = all(array_diff(wa[n], wb[n]).equal for n in wa)
    names = [n for n in wa if n.startswith("params/")]
    diff = np.sqrt(sum(np.sum((np.float64(wa[n]) - np.float64(wb[n])) ** 2) for n in names))
    norm = np.sqrt(sum(np.sum(np.float64(wa[n]) ** 2) for n in names))
    rmse = np.sqrt(np.mean((a["gradcam"] - b["gradcam"]) ** 2, axis=(1, 2)))
    acc_a, acc_b = a["val_accuracy"], b["val_accuracy"]
    return {
        "bitwise": bool(bitwise),
        "param_rel_diff": float(diff / norm) if norm > 0 else float(diff),
        "accuracy_diff": None if acc_a is None else abs(acc_a - acc_b),
        "gradcam_rmse": float(np.mean(rmse)),
    }


def summarize(pairs: list[dict]) -> dict[str, Any]:
    """Median and maximum of each measure over a factor's pairs."""
    out: dict[str, Any] = {"pairs": len(pairs), "bitwise_pairs": sum(p["bitwise"] for p in pairs)}
    for key in ("param_rel_diff", "accuracy_diff", "gradcam_rmse"):
        values = [p[key] for p in pairs if p[key] is not None]
        out[key] = (
            {"median": float(np.median(values)), "max": float(np.max(values))} if values else None
        )
    return out


def table(factors: dict[str, dict]) -> str:
    """The Markdown table of `summarize` per factor."""

    def cell(m):
        return "-" if m is None else f"{m['median']:.3g} / {m['max']:.3g}"

    lines = [
        "| factor that changes | pairs | bitwise equal | parameters, rel. diff | "
        "val accuracy, abs. diff | Grad-CAM RMSE |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in factors.items():
        lines.append(
            f"| {name} | {f['pairs']} | {f['bitwise_pairs']}/{f['pairs']} | "
            f"{cell(f['param_rel_diff'])} | {cell(f['accuracy_diff'])} | "
            f"{cell(f['gradcam_rmse'])} |"
        )
    lines.append("\n(median / max over the pairs)")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """One panel per measure, one column of points per factor (log scale, 0 drawn low)."""
    names = list(report["factors"])
    keys = (
        ("param_rel_diff", "parameters: ||a-b|| / ||a||"),
        ("gradcam_rmse", "Grad-CAM RMSE"),
        ("accuracy_diff", "|val accuracy a - b|"),
    )
    floor = 1e-12
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, (key, label) in zip(axes, keys):
        for x, name in enumerate(names):
            values = [p[key] for p in report["pairs"][name] if p[key] is not None]
            shown = [max(v, floor) for v in values]
            ax.scatter([x] * len(shown), shown, color="C3" if name.startswith("rerun") else "C0")
            for v, s in zip(values, shown):
                if v == 0:
                    ax.annotate("0", (x, s), textcoords="offset points", xytext=(6, -3))
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", rotation_mode="anchor")
        ax.set_title(label)
        ax.axhline(floor, color="grey", lw=0.5)
    fig.suptitle(
        f"{report['model']} {report['image_size']} px, {report['steps']} steps, "
        f"K={report['k']}: what changes the result (0 drawn at {floor:g})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def decompose(
    config_file: str,
    overrides: Sequence[str],
    k: int,
    num_steps: int,
    probe: int,
    variant_names: Sequence[str],
    out: Path,
    progress: bool = True,
    made_by: dict | None = None,
) -> dict:
    """Train every run of `plan`, measure every pair; write variance.{json,md,png}
    (`made_by`: the provenance the files carry)."""
    if k < 2:
        raise VarianceError("--k must be at least 2 (a factor needs two runs)")
    if num_steps < 1:
        raise VarianceError("--steps must be at least 1")
    for name in variant_names:
        variantslib.get_variant(name)  # unknown names and a missing emulator fail here
    if "default" in variant_names:
        raise VarianceError(
            "the code path factor compares each variant with the default: "
            "give other variants than 'default'"
        )
    config = configlib.resolve(config_file, overrides)
    runs, pair_names = plan(config.seed, k, variant_names)
    out.mkdir(parents=True, exist_ok=True)
    exchange = out / "inputs"
    seeds = sorted({r.seed for r in runs})
    for s in seeds:
        write_inputs(
            configlib.resolve(config_file, [*overrides, f"seed={s}"]),
            num_steps,
            probe,
            exchange / f"s{s}",
        )
    for i, run in enumerate(runs, 1):
        if progress:
            print(f"[{i}/{len(runs)}] training {run.name}", file=sys.stderr, flush=True)
        train_run(run, config_file, overrides, exchange, out / "runs" / run.name)

    split = load_data(config).validation
    model = setup.build_model(config, dropout_rate=0.0)
    with np.load(exchange / f"s{config.seed}" / "inputs.npz", allow_pickle=False) as d:
        probe_images = d["probe_images"]
    results = {}
    for run in runs:
        final = weights.load(out / "runs" / run.name / "final.npz")
        results[run.name] = {
            "weights": final,
            **evaluate(
                model,
                final,
                probe_images,
                np.asarray(split.images),
                np.asarray(split.labels),
                config.eval_batch_size,
            ),
        }
    pairs = {
        factor: [{"a": a, "b": b, **pair_measures(results[a], results[b])} for a, b in names]
        for factor, names in pair_names.items()
    }
    pairs = {f: p for f, p in pairs.items() if p}
    report = {
        "provenance": made_by,
        "model": config.model,
        "experiment": config.experiment,
        "seed": config.seed,
        "image_size": config.data.image_size,
        "batch_size": config.batch_size,
        "steps": num_steps,
        "k": k,
        "probe_images": int(probe_images.shape[0]),
        "variants": list(variant_names),
        "overrides": list(overrides),
        "protocol": "matched: dropout off, batches augmented once by JAX, Keras RMSprop "
        "defaults; every run evaluated by JAX",
        "accuracy": {name: r["val_accuracy"] for name, r in results.items()},
        "factors": {f: summarize(p) for f, p in pairs.items()},
        "pairs": pairs,
    }
    (out / "variance.json").write_text(json.dumps(report, indent=1) + "\n")
    head = provenance.markdown(made_by) + "\n" if made_by else ""
    (out / "variance.md").write_text(head + table(report["factors"]) + "\n")
    plot(report, out / "variance.png")
    return report


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 done, 2 a user error, 1 if a trainer process fails."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = cli.split_overrides(argv)
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.variance",
        description=__doc__,
        epilog="Variants:\n"
        + "\n".join(
            f"  {k:20s} {v.description}" for k, v in variantslib.VARIANTS.items() if k != "default"
        ),
    )
    parser.add_argument(
        "config_file",
        help="experiment config, e.g. experiments/convnet.py (Python; it is executed)",
    )
    parser.add_argument("--k", type=int, default=3, help="runs per factor (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument(
        "--probe",
        type=int,
        default=8,
        help="validation images whose Grad-CAM heatmaps are compared",
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="code-path variants for the 'code path' factor, comma-separated "
        "(default: %(default)s; '' for none)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("checkpoints/variance"),
        help="output directory (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    args = parser.parse_args(rest)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        report = decompose(
            args.config_file,
            overrides,
            args.k,
            args.steps,
            args.probe,
            names,
            args.out,
            progress=not args.no_progress,
            made_by=provenance.record("python -m jaxrepro.analysis.variance", argv),
        )
    except cli.ChildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(report["factors"]))
    print(
        f"\nwritten: {args.out / 'variance.json'}, {args.out / 'variance.md'}, "
        f"{args.out / 'variance.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

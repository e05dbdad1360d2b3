"""How much of a difference between two results comes from the seed, the framework,
the CPU code path, or nothing at all? Train K short runs per factor and measure.

    python -m jaxrepro.variance CONFIG_FILE [--k 3] [--steps 20] [--probe 8]
                                [--variants one-core,ynn] [--out DIR] [--config.KEY=VALUE ...]

Issue 5's variance decomposition. Every run follows one protocol, the matched one of
`python -m jaxrepro.compare`: the JAX process builds the initial weights (`init`
stream) and N training batches (`shuffle` order, `augment` keys, augmented once) of a
seed; a trainer in a fresh process of its own takes those weights and batches, runs N
steps of Keras RMSprop with dropout off (so that two frameworks can see exactly the same
inputs), and writes its final weights. Then this process evaluates every set of final
weights the same way (JAX, inference mode): validation accuracy and Grad-CAM heatmaps
of P validation images. Only training differs between runs, never evaluation.

Runs, seeds s0 = config.seed, s1 = s0 + 1, ...:

  seed        JAX, seeds s0 .. s(K-1)                      (all K*(K-1)/2 pairs)
  framework   Keras vs JAX on each seed s0 .. s(K-1)       (K pairs; the same init
              and batches, bit for bit; Keras under the paper's determinism recipe)
  code path   JAX on s0 under each of --variants (another XLA:CPU code path or core
              count, see `jaxrepro.variants`) vs JAX on s0   (one pair per variant)
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

import argparse
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jaxrepro  # noqa: F401  (applies the determinism settings before jax starts)
import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro import compare as comparelib
from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro import models
from jaxrepro import variants as variantslib
from jaxrepro.explain import gradcam as gradcamlib
from jaxrepro.tfref import weights
from jaxrepro.train import build_optimizer, load_data, model_options

ROOT = Path(__file__).resolve().parents[1]
FACTORS = ("seed", "framework", "code path", "rerun JAX", "rerun TF")
DEFAULT_VARIANTS = "one-core,ynn"


class VarianceError(RuntimeError):
    """The decomposition cannot run as asked (a user error: exit 2)."""


@dataclass(frozen=True)
class Run:
    """One training: which trainer, on which seed's inputs, in which process variant."""

    name: str
    trainer: str          # "jax" | "keras"
    seed: int
    variant: str = "default"


def plan(seed: int, k: int, variant_names: Sequence[str]) -> tuple[list[Run], dict]:
    """The runs to train and, per factor, the pairs of run names to compare."""
    seeds = [seed + i for i in range(k)]
    runs = [Run(f"jax-s{s}", "jax", s) for s in seeds]
    runs += [Run(f"keras-s{s}", "keras", s) for s in seeds]
    runs += [Run(f"jax-s{seed}-rerun{j}", "jax", seed) for j in range(1, k)]
    runs += [Run(f"keras-s{seed}-rerun{j}", "keras", seed) for j in range(1, k)]
    runs += [Run(f"jax-s{seed}-{v}", "jax", seed, v) for v in variant_names]
    pairs = {
        "seed": [(f"jax-s{a}", f"jax-s{b}") for i, a in enumerate(seeds) for b in seeds[i + 1:]],
        "framework": [(f"jax-s{s}", f"keras-s{s}") for s in seeds],
        "code path": [(f"jax-s{seed}", f"jax-s{seed}-{v}") for v in variant_names],
        "rerun JAX": [(f"jax-s{seed}", f"jax-s{seed}-rerun{j}") for j in range(1, k)],
        "rerun TF": [(f"keras-s{seed}", f"keras-s{seed}-rerun{j}") for j in range(1, k)],
    }
    return runs, pairs


# ------------------------------------------------------------------ trainers


def write_inputs(config, steps: int, probe: int, directory: Path) -> None:
    """A seed's initial weights and batches, as the trainers read them."""
    inputs = comparelib.matched_inputs(config, steps, probe)
    _, state = inputs.pop("model"), inputs.pop("state")
    directory.mkdir(parents=True, exist_ok=True)
    weights.save(directory / "init.npz", weights.flatten(jax.device_get(
        {"params": state.params, "batch_stats": state.batch_stats})))
    with open(directory / "inputs.npz", "wb") as f:
        np.savez(f, train_images=inputs["train_images"], train_labels=inputs["train_labels"],
                 probe_images=inputs["probe_images"])


def train_jax(config, init: Path, inputs: Path, out: Path) -> None:
    """The JAX trainer (run in a child process): N matched steps, final weights to `out`."""
    model = models.get_model(config.model, dropout_rate=0.0, **model_options(config))
    tx = build_optimizer(config)
    variables = weights.unflatten(weights.load(init))
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    opt_state = tx.init(params)
    step = comparelib.matched_step(model, tx)
    with np.load(inputs, allow_pickle=False) as data:
        xs, ys = data["train_images"], data["train_labels"]
    losses = []
    for k in range(xs.shape[0]):
        loss, _, params, batch_stats, opt_state = step(params, batch_stats, opt_state,
                                                       xs[k], ys[k])
        losses.append(float(loss))
    final = {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}
    weights.save(out / "final.npz", weights.flatten(jax.device_get(final)))
    (out / "losses.json").write_text(json.dumps(losses) + "\n")


def _run_process(cmd: list[str], env: dict[str, str], cpus: int | None, what: str) -> None:
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                       preexec_fn=variantslib._limit_cpus(cpus))
    if r.returncode != 0:
        raise RuntimeError(f"{what} exited {r.returncode}:\n{r.stderr[-3000:]}")


def train_run(run: Run, config_file: str, overrides: Sequence[str], exchange: Path,
              out: Path) -> None:
    """Train `run` in a fresh process; its final weights end up in `out/final.npz`."""
    seed_dir = exchange / f"s{run.seed}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if run.trainer == "keras":
        cmd = [sys.executable, "-m", "jaxrepro.tfref", "matched", _model_name(config_file,
               overrides), str(seed_dir / "init.npz"), str(seed_dir / "inputs.npz"),
               str(out / "keras")]
        _run_process(cmd, comparelib.tf_environment(), None, f"Keras run {run.name}")
        last = sorted((out / "keras").glob("weights_*.npz"))[-1]
        shutil.copyfile(last, out / "final.npz")
        return
    variant = variantslib.VARIANTS[run.variant]
    cmd = [sys.executable, "-m", "jaxrepro.variance", "--child", str(seed_dir), str(out),
           config_file, *(f"--config.{o}" for o in overrides), f"--config.seed={run.seed}"]
    _run_process(cmd, variantslib.variant_env(variant, os.environ), variant.cpus,
                 f"JAX run {run.name}")


def _model_name(config_file: str, overrides: Sequence[str]) -> str:
    return configlib.resolve(config_file, overrides).model


# ----------------------------------------------------------------- measures


def evaluate(model, final: dict, probe: np.ndarray, val_images: np.ndarray,
             val_labels: np.ndarray, batch_size: int) -> dict:
    """Validation accuracy and Grad-CAM heatmaps of one run's final weights."""
    variables = weights.unflatten(final)
    variables.setdefault("batch_stats", {})
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    correct = 0
    for s in range(0, len(val_labels), batch_size):
        z = forward(variables, jnp.asarray(val_images[s:s + batch_size], jnp.float32))
        correct += int(np.sum((np.asarray(z) > 0) == (val_labels[s:s + batch_size] > 0)))
    maps = gradcamlib.gradcam(model, variables, jnp.asarray(probe))
    return {"val_accuracy": correct / len(val_labels) if len(val_labels) else None,
            "gradcam": np.asarray(maps, np.float64)}


def pair_measures(a: dict, b: dict) -> dict[str, Any]:
    """How far two runs ended apart (see the module docstring)."""
    wa, wb = a["weights"], b["weights"]
    if set(wa) != set(wb):
        raise RuntimeError(f"weights of one run only: {sorted(set(wa) ^ set(wb))}")
    bitwise = all(np.array_equal(wa[n].view(np.uint8), wb[n].view(np.uint8)) for n in wa)
    names = [n for n in wa if n.startswith("params/")]
    diff = np.sqrt(sum(np.sum((np.float64(wa[n]) - np.float64(wb[n])) ** 2) for n in names))
    norm = np.sqrt(sum(np.sum(np.float64(wa[n]) ** 2) for n in names))
    rmse = np.sqrt(np.mean((a["gradcam"] - b["gradcam"]) ** 2, axis=(1, 2)))
    acc_a, acc_b = a["val_accuracy"], b["val_accuracy"]
    return {"bitwise": bool(bitwise),
            "param_rel_diff": float(diff / norm) if norm > 0 else float(diff),
            "accuracy_diff": None if acc_a is None else abs(acc_a - acc_b),
            "gradcam_rmse": float(np.mean(rmse))}


def summarize(pairs: list[dict]) -> dict[str, Any]:
    """Median and maximum of each measure over a factor's pairs."""
    out: dict[str, Any] = {"pairs": len(pairs),
                           "bitwise_pairs": sum(p["bitwise"] for p in pairs)}
    for key in ("param_rel_diff", "accuracy_diff", "gradcam_rmse"):
        values = [p[key] for p in pairs if p[key] is not None]
        out[key] = ({"median": float(np.median(values)), "max": float(np.max(values))}
                    if values else None)
    return out


def table(factors: dict[str, dict]) -> str:
    """The Markdown table of `summarize` per factor."""
    def cell(m):
        return "-" if m is None else f"{m['median']:.3g} / {m['max']:.3g}"

    lines = ["| factor that changes | pairs | bitwise equal | parameters, rel. diff | "
             "val accuracy, abs. diff | Grad-CAM RMSE |",
             "|---|---|---|---|---|---|"]
    for name, f in factors.items():
        lines.append(f"| {name} | {f['pairs']} | {f['bitwise_pairs']}/{f['pairs']} | "
                     f"{cell(f['param_rel_diff'])} | {cell(f['accuracy_diff'])} | "
                     f"{cell(f['gradcam_rmse'])} |")
    lines.append("\n(median / max over the pairs)")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """One panel per measure, one column of points per factor (log scale, 0 drawn low)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = list(report["factors"])
    keys = (("param_rel_diff", "parameters: ||a-b|| / ||a||"),
            ("gradcam_rmse", "Grad-CAM RMSE"), ("accuracy_diff", "|val accuracy a - b|"))
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
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_title(label)
        ax.axhline(floor, color="grey", lw=0.5)
    fig.suptitle(f"{report['model']} {report['image_size']} px, {report['steps']} steps, "
                 f"K={report['k']}: what changes the result (0 drawn at {floor:g})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------- main


def decompose(config_file: str, overrides: Sequence[str], k: int, steps: int, probe: int,
              variant_names: Sequence[str], out: Path, progress: bool = True) -> dict:
    """Train every run of `plan`, measure every pair; write variance.{json,md,png}."""
    if k < 2:
        raise VarianceError("--k must be at least 2 (a factor needs two runs)")
    if steps < 1:
        raise VarianceError("--steps must be at least 1")
    unknown = [v for v in variant_names if v not in variantslib.VARIANTS or v == "default"]
    if unknown:
        raise VarianceError(f"unknown variant(s) {unknown}; valid: "
                            f"{[v for v in variantslib.VARIANTS if v != 'default']}")
    config = configlib.resolve(config_file, overrides)
    runs, pair_names = plan(config.seed, k, variant_names)
    out.mkdir(parents=True, exist_ok=True)
    exchange = out / "inputs"
    seeds = sorted({r.seed for r in runs})
    for s in seeds:
        write_inputs(configlib.resolve(config_file, [*overrides, f"seed={s}"]), steps, probe,
                     exchange / f"s{s}")
    for i, run in enumerate(runs, 1):
        if progress:
            print(f"[{i}/{len(runs)}] training {run.name}", file=sys.stderr, flush=True)
        train_run(run, config_file, overrides, exchange, out / "runs" / run.name)

    split = load_data(config).validation
    model = models.get_model(config.model, dropout_rate=0.0, **model_options(config))
    with np.load(exchange / f"s{config.seed}" / "inputs.npz", allow_pickle=False) as d:
        probe_images = d["probe_images"]
    results = {}
    for run in runs:
        final = weights.load(out / "runs" / run.name / "final.npz")
        results[run.name] = {"weights": final, **evaluate(
            model, final, probe_images, np.asarray(split.images), np.asarray(split.labels),
            config.eval_batch_size)}
    pairs = {factor: [{"a": a, "b": b, **pair_measures(results[a], results[b])}
                      for a, b in names] for factor, names in pair_names.items()}
    pairs = {f: p for f, p in pairs.items() if p}
    report = {
        "model": config.model, "experiment": config.experiment, "seed": config.seed,
        "image_size": config.data.image_size, "batch_size": config.batch_size,
        "steps": steps, "k": k, "probe_images": int(probe_images.shape[0]),
        "variants": list(variant_names), "overrides": list(overrides),
        "protocol": "matched: dropout off, batches augmented once by JAX, Keras RMSprop "
                    "defaults; every run evaluated by JAX",
        "accuracy": {name: r["val_accuracy"] for name, r in results.items()},
        "factors": {f: summarize(p) for f, p in pairs.items()},
        "pairs": pairs,
    }
    (out / "variance.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "variance.md").write_text(table(report["factors"]) + "\n")
    plot(report, out / "variance.png")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    if rest[:1] == ["--child"]:  # a JAX trainer: --child SEED_DIR OUT CONFIG_FILE
        seed_dir, out, config_file = map(Path, rest[1:4])
        train_jax(configlib.resolve(config_file, overrides), seed_dir / "init.npz",
                  seed_dir / "inputs.npz", out)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m jaxrepro.variance", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Variants:\n" + "\n".join(f"  {k:20s} {v.description}"
                                          for k, v in variantslib.VARIANTS.items()
                                          if k != "default"))
    parser.add_argument("config_file", help="experiment config, e.g. experiments/convnet.py "
                        "(Python; it is executed)")
    parser.add_argument("--k", type=int, default=3, help="runs per factor (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--probe", type=int, default=8,
                        help="validation images whose Grad-CAM heatmaps are compared")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="code-path variants for the 'code path' factor, comma-separated "
                        "(default: %(default)s; '' for none)")
    parser.add_argument("--out", type=Path, default=Path("checkpoints/variance"),
                        help="output directory (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    args = parser.parse_args(rest)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        if not Path(args.config_file).exists():
            raise VarianceError(f"config file {args.config_file} does not exist")
        report = decompose(args.config_file, overrides, args.k, args.steps, args.probe, names,
                           args.out, progress=not args.no_progress)
    except (configlib.ConfigError, VarianceError, datalib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table(report["factors"]))
    print(f"\nwritten: {args.out / 'variance.json'}, {args.out / 'variance.md'}, "
          f"{args.out / 'variance.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

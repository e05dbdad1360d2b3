"""The same model, weights and batches in JAX and in Keras: where do the numbers part?

    python -m jaxrepro.analysis.compare CONFIG_FILE --against tensorflow [--steps N]
                     [--out DIR] [--probe P] [--keep-exchange] [--config.KEY=VALUE ...]

Both frameworks start from the same initial weights and train on the same augmented
batches (the matched protocol, `jaxrepro.analysis.matched`: dropout off, BCE on the
logit, Keras RMSprop's defaults against `jaxrepro.train.optim.keras_rmsprop`); the
Keras half runs in its own process (`python -m jaxrepro.tfref matched`) under the
paper's determinism recipe. What differs is the framework's numerics only. Reported
(every figure an `ArrayDiff` of `jaxrepro.numerics`):

  forward     per sown activation and the logits of P validation images (inference
              mode, initial weights): max ULP, max relative difference (elementwise,
              |a-b|/max(|a|,|b|)), and max |a-b| / max |a| of the layer
  backward    per parameter, the gradient of the mean loss of step 1 (batch norm in
              training mode)
  trajectory  per step: each framework's loss, and the largest difference of the
              parameters (step 0 must be exactly 0: the same initial bits)
  gradcam     Grad-CAM of the P images explaining the logit, Keras (keras.io recipe)
              vs `jaxrepro.explain.gradcam`, at step 0 and after N steps (each
              framework its own weights): RMSE, Spearman rank correlation and the
              overlap of the top 10% pixels

Writes DIR/compare.json and DIR/trajectory.png and prints a table. Exit status 0 on
success, 2 on a user error (unknown config key, --against other than tensorflow),
1 if the Keras process fails.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

from jaxrepro import cli, models, provenance
from jaxrepro import config as configlib
from jaxrepro.analysis import matched
from jaxrepro.errors import UserError
from jaxrepro.explain import gradcam as gradcamlib
from jaxrepro.numerics import array_diff, spearman, top_overlap
from jaxrepro.tfref import process, weights
from jaxrepro.train import probe as probelib
from jaxrepro.train import setup, steps

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

AGAINST = ("tensorflow",)


class CompareError(UserError, RuntimeError):
    """The comparison cannot run as asked (a user error: exit 2)."""


def stats(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """How far two arrays of one shape are apart, as float32 (an `ArrayDiff`'s brief)."""
    try:
        return {
            "shape": list(np.shape(a)),
            **array_diff(np.asarray(a, np.float32), np.asarray(b, np.float32)).brief(),
        }
    except ValueError as e:
        raise CompareError(str(e)) from None


def heatmap_agreement(jax_maps: np.ndarray, keras_maps: np.ndarray) -> dict[str, Any]:
    """RMSE, Spearman and top-10% overlap per image, averaged (maps [P, H, W])."""
    rmse = [
        float(np.sqrt(np.mean((np.float64(a) - np.float64(b)) ** 2)))
        for a, b in zip(jax_maps, keras_maps)
    ]
    rho = [spearman(a, b) for a, b in zip(jax_maps, keras_maps)]
    defined = [r for r in rho if r is not None]
    top = [top_overlap(a, b) for a, b in zip(jax_maps, keras_maps)]
    return {
        "images": len(rmse),
        "rmse_mean": float(np.mean(rmse)),
        "rmse_max": max(rmse),
        "spearman_mean": float(np.mean(defined)) if defined else None,
        "spearman_min": min(defined) if defined else None,
        "spearman_undefined": len(rho) - len(defined),
        "top10_overlap_mean": float(np.mean(top)),
        "top10_overlap_min": min(top),
        "max_abs": float(np.max(np.abs(np.float64(jax_maps) - np.float64(keras_maps)))),
    }


# ---------------------------------------------------------------- JAX side


def run_jax(inputs: matched.MatchedInputs, tx: optax.GradientTransformation) -> dict:
    """The JAX half: forward probe, step-1 gradients, N steps, Grad-CAM, accuracy."""
    model, probe = inputs.model, jnp.asarray(inputs.probe_images)

    @jax.jit
    def forward(variables, x):
        logits, s = model.apply(variables, x, train=False, mutable=["intermediates"])
        return logits, models.flat_intermediates(s["intermediates"])

    step = matched.matched_step(model, tx)

    def gradcam(variables):
        a, g, _ = gradcamlib.last_conv_gradient(model, variables, probe, sign=1.0)
        low = gradcamlib.normalise_max(gradcamlib.cam(a, g))
        full = gradcamlib.heatmap_from(a, g, tuple(probe.shape[1:3]))
        return np.asarray(low), np.asarray(full)

    state = inputs.state
    logits, acts = forward(state.variables, probe)
    acts = {**acts, "logits": logits}
    order = probelib.forward_order(model, state.variables, probe)
    out: dict[str, Any] = {"forward": {k: np.asarray(acts[k]) for k in order}, "gradcam": {}}
    out["gradcam"]["start_lowres"], out["gradcam"]["start"] = gradcam(state.variables)
    out["weights"] = [weights.flatten(jax.device_get(state.variables))]
    losses = []
    for k in range(inputs.train_images.shape[0]):
        state, loss, grads = step(state, inputs.train_images[k], inputs.train_labels[k])
        if k == 0:
            out["gradients"] = weights.flatten(jax.device_get({"params": grads}))
        losses.append(float(loss))
        out["weights"].append(weights.flatten(jax.device_get(state.variables)))
    out["losses"] = losses
    out["gradcam"]["end_lowres"], out["gradcam"]["end"] = gradcam(state.variables)
    out["val_accuracy"] = (
        steps.evaluate(
            steps.make_eval_step(model), state.variables, inputs.val_images, inputs.val_labels, 100
        ).accuracy
        if len(inputs.val_labels)
        else None
    )
    return out


# ----------------------------------------------------------------- TF side


def tf_environment() -> dict[str, str]:
    """The Keras child's environment: a clean TF process under the paper's recipe."""
    return process.child_environment(process.Recipe(deterministic=True))


def run_keras(model_name: str, exchange: Path, out: Path, timeout: int | None = None) -> dict:
    """Run `python -m jaxrepro.tfref matched` on the exchange into `out`; its JSON result."""
    r = cli.run_child(
        "jaxrepro.tfref",
        [
            "matched",
            model_name,
            str(exchange / "init.npz"),
            str(exchange / "inputs.npz"),
            str(exchange / "layers.json"),
            str(out),
        ],
        env=tf_environment(),
        timeout=timeout,
        what="the Keras process",
    )
    return json.loads(r.stdout)


# ----------------------------------------------------------------- report


def _max_over(rows: list[dict], key: str) -> float:
    return max((r[key] for r in rows), default=0.0)


def build_report(config, num_steps: int, jx: dict, keras_dir: Path, keras_result: dict) -> dict:
    """compare.json's content from both halves' outputs."""
    kf = weights.load(keras_dir / "forward.npz")
    if set(kf) != set(jx["forward"]):
        raise RuntimeError(f"activations of one side only: {sorted(set(kf) ^ set(jx['forward']))}")
    forward = [{"layer": name, **stats(value, kf[name])} for name, value in jx["forward"].items()]

    kg = weights.load(keras_dir / "gradients.npz")
    if set(kg) != set(jx["gradients"]):
        raise RuntimeError(f"gradient names differ: {sorted(set(kg) ^ set(jx['gradients']))}")
    backward = [
        {"param": name, **stats(jx["gradients"][name], kg[name])} for name in jx["gradients"]
    ]

    with np.load(keras_dir / "trajectory.npz", allow_pickle=False) as t:
        keras_losses = [float(v) for v in t["loss"]]
    trajectory = []
    for k in range(num_steps + 1):
        kw = weights.load(keras_dir / f"weights_{k:03d}.npz")
        jw = jx["weights"][k]
        if set(kw) != set(jw):
            raise RuntimeError(f"weight names differ at step {k}: {sorted(set(kw) ^ set(jw))}")
        leaves = {name: stats(jw[name], kw[name]) for name in jw}
        params = [v for n, v in leaves.items() if n.startswith("params/")]
        bstats = [v for n, v in leaves.items() if n.startswith("batch_stats/")]
        trajectory.append(
            {
                "step": k,
                "loss_jax": jx["losses"][k - 1] if k else None,
                "loss_keras": keras_losses[k - 1] if k else None,
                "all_bitwise": all(v["equal"] for v in leaves.values()),
                "params_bitwise": all(v["equal"] for v in params),
                "params_max_ulp": max((v["max_ulp"] for v in params), default=0),
                "params_max_rel": _max_over(params, "max_rel"),
                "params_rel_to_max": _max_over(params, "rel_to_max"),
                "worst_leaf": max(
                    (n for n in leaves if n.startswith("params/")),
                    key=lambda n: leaves[n]["rel_to_max"],
                ),
                "batch_stats_rel_to_max": _max_over(bstats, "rel_to_max") if bstats else None,
            }
        )

    kc = weights.load(keras_dir / "gradcam.npz")
    gradcam = {}
    for when in ("start", "end"):
        gradcam[when] = heatmap_agreement(jx["gradcam"][when], kc[when])
        gradcam[when]["lowres_max_abs"] = float(
            np.max(
                np.abs(
                    np.float64(jx["gradcam"][f"{when}_lowres"]) - np.float64(kc[f"{when}_lowres"])
                )
            )
        )
        gradcam[when]["lowres_shape"] = list(kc[f"{when}_lowres"].shape[1:])

    return {
        "model": config.model,
        "experiment": config.experiment,
        "seed": config.seed,
        "image_size": config.data.image_size,
        "batch_size": config.batch_size,
        "steps": num_steps,
        "probe_images": int(jx["forward"]["logits"].shape[0]),
        "against": "tensorflow",
        "dropout": "off on both sides (Flax dropout_rate=0, Keras Dropout rate set to 0)",
        "initial_weights_bitwise": trajectory[0]["all_bitwise"],
        "forward": forward,
        "backward": backward,
        "trajectory": trajectory,
        "gradcam": gradcam,
        "val_accuracy": {"jax": jx["val_accuracy"], "keras": keras_result.get("val_accuracy")},
        "keras_runtime": keras_result.get("runtime"),
        "jax": {"jax": jax.__version__, "backend": jax.default_backend()},
    }


def _g(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}" if isinstance(x, float) else str(x)


def _l(x: float | None) -> str:
    return "-" if x is None else f"{x:.8f}"


def format_text(report: dict) -> str:
    """The readable table printed on stdout."""
    lines = [
        f"JAX vs Keras: {report['model']} at {report['image_size']} px, seed "
        f"{report['seed']}, batch {report['batch_size']}, {report['steps']} steps; "
        f"dropout off; initial weights bitwise equal: {report['initial_weights_bitwise']}",
        "",
        f"forward (inference, {report['probe_images']} validation images, step 0)",
        f"  {'activation':24s} {'max ULP':>12s} {'max rel':>10s} {'|d|/max|a|':>10s}",
    ]
    for r in report["forward"]:
        lines.append(
            f"  {r['layer']:24s} {r['max_ulp']:12d} {r['max_rel']:10.3g} {r['rel_to_max']:10.3g}"
        )
    lines += [
        "",
        "backward (gradient of step 1's mean loss, batch norm in training mode)",
        f"  {'parameter':34s} {'max ULP':>12s} {'max rel':>10s} {'|d|/max|a|':>10s}",
    ]
    for r in report["backward"]:
        lines.append(
            f"  {r['param']:34s} {r['max_ulp']:12d} {r['max_rel']:10.3g} {r['rel_to_max']:10.3g}"
        )
    lines += [
        "",
        "trajectory (Keras RMSprop defaults on both sides; parameters after the step)",
        f"  {'step':>4s} {'loss JAX':>12s} {'loss Keras':>12s} {'max ULP':>12s} "
        f"{'max rel':>10s} {'|d|/max|a|':>10s}",
    ]
    for r in report["trajectory"]:
        lines.append(
            f"  {r['step']:4d} {_l(r['loss_jax']):>12s} {_l(r['loss_keras']):>12s} "
            f"{r['params_max_ulp']:12d} {r['params_max_rel']:10.3g} "
            f"{r['params_rel_to_max']:10.3g}"
        )
    va = report["val_accuracy"]
    lines += [
        f"  validation accuracy after {report['steps']} steps: JAX {_g(va['jax'])}, "
        f"Keras {_g(va['keras'])}",
        "",
        "Grad-CAM (explaining the logit; each framework's own weights)",
        f"  {'when':6s} {'RMSE':>10s} {'Spearman':>10s} {'top-10%':>8s} {'max |d|':>10s}  A's size",
    ]
    for when, g in report["gradcam"].items():
        lines.append(
            f"  {when:6s} {g['rmse_mean']:10.3g} {_g(g['spearman_mean']):>10s} "
            f"{g['top10_overlap_mean']:8.3f} {g['max_abs']:10.3g}  "
            f"{'x'.join(map(str, g['lowres_shape']))}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Loss of each framework and the parameter difference per step."""
    t = report["trajectory"]
    steps = [r["step"] for r in t[1:]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, [r["loss_jax"] for r in t[1:]], "o-", label="JAX")
    ax1.plot(steps, [r["loss_keras"] for r in t[1:]], "x--", label="Keras")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (before the step's update)")
    ax1.legend()
    for key, label in (
        ("params_rel_to_max", "max |d| / max |w| (per leaf)"),
        ("params_max_rel", "max elementwise relative"),
    ):
        ax2.plot([r["step"] for r in t], [max(r[key], 1e-12) for r in t], "o-", label=label)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("parameter difference JAX vs Keras (0 shown as 1e-12)")
    ax2.legend()
    fig.suptitle(
        f"{report['model']} {report['image_size']} px: JAX vs Keras, same init and batches"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(
    config,
    num_steps: int,
    out: Path,
    probe: int = 8,
    keep_exchange: bool = False,
    made_by: dict | None = None,
) -> dict:
    """Run both halves, write compare.json (with `made_by`, the provenance) and
    trajectory.png into `out`; the report."""
    if num_steps < 1:
        raise CompareError("--steps must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    exchange = out / "exchange"
    if exchange.exists():
        shutil.rmtree(exchange)
    inputs = matched.matched_inputs(config, num_steps, probe)
    matched.write_exchange(inputs, exchange)
    keras_result = run_keras(config.model, exchange, exchange / "keras")
    jx = run_jax(inputs, setup.build_optimizer(config))
    report = build_report(config, num_steps, jx, exchange / "keras", keras_result)
    report = {"provenance": made_by, **report}
    (out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "trajectory.png")
    if keep_exchange:  # the JAX half's arrays next to the Keras ones, for inspection
        (exchange / "jax").mkdir()
        for name in ("forward", "gradients", "gradcam"):
            weights.save(exchange / "jax" / f"{name}.npz", jx[name])
        for k, w in enumerate(jx["weights"]):
            weights.save(exchange / "jax" / f"weights_{k:03d}.npz", w)
        np.save(exchange / "jax" / "losses.npy", np.asarray(jx["losses"], np.float32))
    else:
        shutil.rmtree(exchange)
    return report


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 done, 2 a user error, 1 if the Keras process fails."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = cli.split_overrides(argv)
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.compare",
        description=__doc__,
    )
    parser.add_argument("config_file")
    parser.add_argument("--against", required=True, help="the other framework: tensorflow")
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--out", default="compare_out", help="output directory")
    parser.add_argument(
        "--probe", type=int, default=8, help="validation images for the forward probe and Grad-CAM"
    )
    parser.add_argument(
        "--keep-exchange", action="store_true", help="keep the exchanged .npz files in OUT/exchange"
    )
    args = parser.parse_args(rest)
    if args.against not in AGAINST:
        raise CompareError(f"--against {args.against!r}: only {AGAINST} is supported")
    config = configlib.resolve(args.config_file, overrides)
    try:
        made_by = provenance.record("python -m jaxrepro.analysis.compare", argv)
        report = compare(
            config, args.steps, Path(args.out), args.probe, args.keep_exchange, made_by
        )
    except cli.ChildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_text(report))
    print(f"\nwritten: {Path(args.out) / 'compare.json'}, {Path(args.out) / 'trajectory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

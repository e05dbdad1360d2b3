"""The same model, weights and batches in JAX and in Keras: where do the numbers part?

    python -m jaxrepro.analysis.compare CONFIG_FILE --against tensorflow [--steps N]
                     [--tf-kernels onednn|eigen] [--out DIR] [--probe P] [--keep-exchange]
                     [--config.KEY=VALUE ...]

Both frameworks start from the same initial weights and train on the same augmented
batches (the matched protocol, `jaxrepro.analysis.matched`: dropout off, BCE on the
logit, Keras RMSprop's defaults against `jaxrepro.train.optim.keras_rmsprop`); the
Keras half runs in its own process (`python -m jaxrepro.tfref matched`) under the
paper's determinism recipe, on TF's default oneDNN kernels or, with `--tf-kernels
eigen`, on its Eigen kernels (oneDNN off), the library XLA:CPU also calls for
convolutions; then the JAX half runs its first convolution as XLA's (Eigen's) too,
not as jaxrepro's kernel (`matched.eigen_convolutions`), so that both sides run the same
kernel library. What differs is the framework's numerics only. Reported
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
  decisions   step 1's forward on both sides (`jaxrepro.analysis.decisions`): per
              ReLU the elements that pass on one side only, per max pool the windows
              that route their gradient to another input (with the margin in ULP), and
              per parameter the step-1 gradient gap as measured and recomputed on the
              JAX side with Keras's ReLU masks and pool routing. What remains aligned
              is the formulas' difference; the rest is flipped decisions
  bitwise     how far the two stay bit for bit equal: forward layers, gradients, steps

Writes DIR/compare.json, DIR/trajectory.png and DIR/compare.md (the printed tables under
the command, commit and machine) and prints the tables. Exit status 0 on
success, 2 on a user error (unknown config key, --against other than tensorflow),
1 if the Keras process fails.
"""

from __future__ import annotations

import dataclasses
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

from jaxrepro import cli, determinism, models, provenance
from jaxrepro import config as configlib
from jaxrepro.analysis import decisions as decisionslib
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
    first_x, first_y = inputs.train_images[0], inputs.train_labels[0]
    decision_acts = decisionslib.training_forward(model, state.variables, first_x)
    logits, acts = forward(state.variables, probe)
    acts = {**acts, "logits": logits}
    order = probelib.forward_order(model, state.variables, probe)
    out: dict[str, Any] = {
        "forward": {k: np.asarray(acts[k]) for k in order},
        "gradcam": {},
        "decision_acts": decision_acts,
        "first_batch": (first_x, first_y),
        "initial_variables": state.variables,
    }
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


def tf_environment(kernels: str = "onednn") -> dict[str, str]:
    """The Keras child's environment: a clean TF process under the paper's recipe,
    computing with `kernels` (`process.KERNELS`)."""
    return process.child_environment(process.Recipe(deterministic=True, kernels=kernels))


def run_keras(
    model_name: str,
    exchange: Path,
    out: Path,
    timeout: int | None = None,
    kernels: str = "onednn",
) -> dict:
    """Run `python -m jaxrepro.tfref matched` on the exchange into `out` with TF's
    `kernels`; its JSON result."""
    r = cli.run_child(
        "jaxrepro.tfref",
        [
            "matched",
            model_name,
            str(exchange / "init.npz"),
            str(exchange / "inputs.npz"),
            str(exchange / "layers.json"),
            str(out),
            "--tf-kernels",
            kernels,
        ],
        env=tf_environment(kernels),
        timeout=timeout,
        what="the Keras process",
    )
    return json.loads(r.stdout)


# ----------------------------------------------------------------- report


def decisions_report(model, jx: dict, keras_dir: Path) -> dict[str, Any]:
    """compare.json's `decisions`: where step 1's forwards decide differently, and the
    step-1 gradient gap before and after the JAX side takes Keras's decisions."""
    points = decisionslib.points_of(model)
    kd = weights.load(keras_dir / "decisions.npz")
    kg = weights.load(keras_dir / "gradients.npz")
    x, y = jx["first_batch"]
    variables = jx["initial_variables"]

    def aligned(acts) -> dict[str, np.ndarray]:
        d = decisionslib.read(acts, points)
        g = decisionslib.aligned_gradients(model, variables, x, y, d)
        return weights.flatten(jax.device_get({"params": g}))

    to_keras, replayed = aligned(kd), aligned(jx["decision_acts"])
    rows = []
    for name, measured_grad in jx["gradients"].items():
        measured, formula = stats(measured_grad, kg[name]), stats(to_keras[name], kg[name])
        rows.append(
            {
                "param": name,
                "measured_rel_to_max": measured["rel_to_max"],
                "measured_max_ulp": measured["max_ulp"],
                "formula_rel_to_max": formula["rel_to_max"],
                "formula_max_ulp": formula["max_ulp"],
                "formula_bitwise": formula["equal"],
                "decisions_rel_to_max": max(measured["rel_to_max"] - formula["rel_to_max"], 0.0),
            }
        )
    section = decisionslib.compare(jx["decision_acts"], kd, points)
    return {
        "batch": f"step 1's training batch ({len(y)} images), initial weights, training mode",
        **section,
        "flipped_relu_elements": sum(r["flipped"] for r in section["relus"]),
        "flipped_pool_windows": sum(r["flipped"] for r in section["pools"]),
        # The replay with JAX's own decisions against JAX's measured gradient: 0 when
        # replaying decisions changes nothing but the decisions.
        "replay_rel_to_max": max(
            stats(replayed[n], g)["rel_to_max"] for n, g in jx["gradients"].items()
        ),
        "gradients": rows,
    }


def bitwise_reach(forward: list[dict], backward: list[dict], trajectory: list[dict]) -> dict:
    """How far JAX and Keras stay bit for bit equal: the leading forward layers, the
    step-1 gradients, and the leading training steps."""
    equal_layers = next((i for i, r in enumerate(forward) if not r["equal"]), len(forward))
    steps_equal = next(
        (r["step"] - 1 for r in trajectory[1:] if not r["all_bitwise"]), len(trajectory) - 1
    )
    return {
        "forward_layers_equal": equal_layers,
        "forward_layers": len(forward),
        "forward_first_differing": forward[equal_layers]["layer"]
        if equal_layers < len(forward)
        else None,
        "gradients_equal": all(r["equal"] for r in backward),
        "gradients_differing": [r["param"] for r in backward if not r["equal"]],
        "steps_equal": steps_equal,
        "steps": len(trajectory) - 1,
    }


def _max_over(rows: list[dict], key: str) -> float:
    return max((r[key] for r in rows), default=0.0)


def build_report(
    config, num_steps: int, jx: dict, keras_dir: Path, keras_result: dict, model=None
) -> dict:
    """compare.json's content from both halves' outputs (`model`: the compared module,
    for the decisions section; None leaves it out)."""
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
        "tf_kernels": keras_result.get("runtime", {}).get("recipe", {}).get("kernels"),
        "dropout": "off on both sides (Flax dropout_rate=0, Keras Dropout rate set to 0)",
        "initial_weights_bitwise": trajectory[0]["all_bitwise"],
        "forward": forward,
        "backward": backward,
        "trajectory": trajectory,
        "gradcam": gradcam,
        "bitwise": bitwise_reach(forward, backward, trajectory),
        "decisions": None if model is None else decisions_report(model, jx, keras_dir),
        "val_accuracy": {"jax": jx["val_accuracy"], "keras": keras_result.get("val_accuracy")},
        "keras_runtime": keras_result.get("runtime"),
        "jax": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "determinism": determinism.mode(),
        },
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
        f"dropout off; JAX in {report['jax']['determinism']} mode, TF on "
        f"{report['tf_kernels']} kernels; initial weights bitwise equal: "
        f"{report['initial_weights_bitwise']}",
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
    lines += format_decisions(report.get("decisions"))
    b = report["bitwise"]
    lines += [
        "",
        f"bitwise equal: forward {b['forward_layers_equal']} of {b['forward_layers']} layers"
        + (
            f" (first differing: {b['forward_first_differing']})"
            if b["forward_first_differing"]
            else ""
        )
        + f"; step-1 gradients {'all' if b['gradients_equal'] else 'not all'}"
        + f"; {b['steps_equal']} of {b['steps']} training steps",
    ]
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


def format_decisions(d: dict | None) -> list[str]:
    """The decisions section as table lines (none without the section)."""
    if d is None:
        return []
    lines = [
        "",
        f"decisions ({d['batch']}): where the two forwards decide differently",
        f"  {'ReLU output':26s} {'elements':>10s} {'flipped':>8s} {'largest crossing':>17s}",
    ]
    for r in d["relus"]:
        lines.append(
            f"  {r['activation']:26s} {r['elements']:10d} {r['flipped']:8d} "
            f"{r['flipped_max_abs']:17.3g}"
        )
    lines.append(
        f"  {'pool input':26s} {'windows':>10s} {'flipped':>8s} {'flip ULP':>9s} "
        f"{'ties':>6s} {'closest ULP':>11s}"
    )
    for r in d["pools"]:
        lines.append(
            f"  {r['input']:26s} {r['windows']:10d} {r['flipped']:8d} "
            f"{_g(r['flipped_margin_ulp_max']):>9s} {r['exact_ties']:6d} "
            f"{_g(r['closest_margin_ulp']):>11s}"
        )
    lines += [
        "  step-1 gradient gap, |d|/max|a|: as measured = formulas + flipped decisions",
        f"  {'parameter':42s} {'measured':>10s} {'formulas':>10s} {'decisions':>10s}",
    ]
    for r in d["gradients"]:
        lines.append(
            f"  {r['param']:42s} {r['measured_rel_to_max']:10.3g} "
            f"{r['formula_rel_to_max']:10.3g} {r['decisions_rel_to_max']:10.3g}"
        )
    lines.append(
        "  (formulas: the JAX gradient recomputed with Keras's ReLU masks and pool routing; "
        f"replaying JAX's own decisions moves it {d['replay_rel_to_max']:.3g})"
    )
    return lines


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
    tf_kernels: str = "onednn",
) -> dict:
    """Run both halves, write compare.json (with `made_by`, the provenance),
    trajectory.png and compare.md into `out`; the report."""
    if num_steps < 1:
        raise CompareError("--steps must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    exchange = out / "exchange"
    if exchange.exists():
        shutil.rmtree(exchange)
    inputs = matched.matched_inputs(config, num_steps, probe)
    if tf_kernels == "eigen":
        inputs = dataclasses.replace(inputs, model=matched.eigen_convolutions(inputs.model))
    matched.write_exchange(inputs, exchange)
    keras_result = run_keras(config.model, exchange, exchange / "keras", kernels=tf_kernels)
    jx = run_jax(inputs, setup.build_optimizer(config))
    report = build_report(
        config, num_steps, jx, exchange / "keras", keras_result, model=inputs.model
    )
    report = {"provenance": made_by, **report}
    (out / "compare.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out / "trajectory.png")
    head = provenance.markdown(made_by) + "\n" if made_by else ""
    (out / "compare.md").write_text(f"{head}```\n{format_text(report)}\n```\n")
    if keep_exchange:  # the JAX half's arrays next to the Keras ones, for inspection
        (exchange / "jax").mkdir()
        for name in ("forward", "gradients", "gradcam"):
            weights.save(exchange / "jax" / f"{name}.npz", jx[name])
        weights.save(exchange / "jax" / "decisions.npz", jx["decision_acts"])
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
    parser.add_argument(
        "--tf-kernels",
        default="onednn",
        choices=sorted(process.KERNELS),
        help="TF's CPU kernels: onednn (TF's default) or eigen (oneDNN off); default: %(default)s",
    )
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
            config,
            args.steps,
            Path(args.out),
            args.probe,
            args.keep_exchange,
            made_by,
            args.tf_kernels,
        )
    except cli.ChildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_text(report))
    written = ", ".join(
        str(Path(args.out) / f) for f in ("compare.json", "compare.md", "trajectory.png")
    )
    print(f"\nwritten: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

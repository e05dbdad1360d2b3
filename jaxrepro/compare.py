"""The same model, weights and batches in JAX and in Keras: where do the numbers part?

    python -m jaxrepro.compare CONFIG_FILE --against tensorflow [--steps N] [--out DIR]
                               [--probe P] [--keep-exchange] [--config.KEY=VALUE ...]

Issue 5's matched comparison. The JAX side builds everything once, as `train.py` would:
the initial weights of the config's seed (`init` stream), and the first N training
batches (`epoch_order` of the `shuffle` stream, `augment_batch` with the step keys of
the `augment` stream). The augmentation runs here, once, jitted on its own (inside
train.py's fused step a pixel may round differently in the last bit; both frameworks
get exactly these bits). Both frameworks then start from those weights and see those
batches, as float32 arrays in an `.npz`; the Keras half runs in its own process
(`python -m jaxrepro.tfref matched`, see `jaxrepro.tfref.matched`), under the paper's
determinism recipe. Dropout is off on both sides (Flax dropout_rate=0; the Keras
Dropout layer's rate set to 0), so training mode only means batch statistics in
batch norm; the loss is BCE on the logit on both sides; the optimizer is Keras
RMSprop's defaults (`keras.optimizers.RMSprop()` vs `jaxrepro.optim.keras_rmsprop`).
What differs is the framework's numerics only. Reported:

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

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import jaxrepro  # noqa: F401  (applies the determinism settings before jax starts)
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro import models, rng
from jaxrepro.data.augment import augment_batch
from jaxrepro.data.order import epoch_order
from jaxrepro.diff import ulp_distance
from jaxrepro.explain import gradcam as gradcamlib
from jaxrepro.tfref import process, weights
from jaxrepro.train import bce_loss, build_optimizer, init_state, load_data, model_options

AGAINST = ("tensorflow",)
TOP_FRACTION = 0.1
ROOT = Path(__file__).resolve().parents[1]


class CompareError(RuntimeError):
    """The comparison cannot run as asked (a user error: exit 2)."""


# ------------------------------------------------------------------- numbers


def stats(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """How far two float32 arrays of one shape are apart.

    max_ulp: largest ULP distance; max_rel: largest |a-b| / max(|a|, |b|) elementwise
    (0 where both are 0; near-zero values make it large); rel_to_max: largest |a-b|
    over the largest |a| of the array (the scale-aware figure); bitwise: same bits.
    """
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape:
        raise CompareError(f"shapes differ: {a.shape} vs {b.shape}")
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(fa - fb)
    scale = np.maximum(np.abs(fa), np.abs(fb))
    rel = np.divide(diff, scale, out=np.zeros_like(diff), where=scale > 0)
    top = float(np.max(np.abs(fa))) if a.size else 0.0
    return {"shape": list(a.shape), "bitwise": bool(np.array_equal(a.view(np.uint32),
                                                                   b.view(np.uint32))),
            "max_ulp": int(ulp_distance(a, b).max()) if a.size else 0,
            "max_abs": float(diff.max()) if a.size else 0.0,
            "max_rel": float(rel.max()) if a.size else 0.0,
            "rel_to_max": float(diff.max() / top) if top > 0 else float(diff.max(initial=0.0))}


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank."""
    x = np.asarray(x, np.float64).ravel()
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    r = np.empty(x.size, np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    for s, e in zip(starts, ends):
        r[order[s:e]] = (s + e + 1) / 2.0  # average of ranks s+1 .. e
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); None if a map is constant."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt(np.sum(ra * ra) * np.sum(rb * rb))
    return float(np.sum(ra * rb) / denom) if denom > 0 else None


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """|top-k(a) & top-k(b)| / k for k = fraction of the pixels (ties: lower index first)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    k = max(1, int(round(fraction * a.size)))
    ta = np.argsort(-a, kind="stable")[:k]
    tb = np.argsort(-b, kind="stable")[:k]
    return len(np.intersect1d(ta, tb)) / k


def heatmap_agreement(jax_maps: np.ndarray, keras_maps: np.ndarray) -> dict[str, Any]:
    """RMSE, Spearman and top-10% overlap per image, averaged (maps [P, H, W])."""
    rmse = [float(np.sqrt(np.mean((np.float64(a) - np.float64(b)) ** 2)))
            for a, b in zip(jax_maps, keras_maps)]
    rho = [spearman(a, b) for a, b in zip(jax_maps, keras_maps)]
    defined = [r for r in rho if r is not None]
    top = [top_overlap(a, b) for a, b in zip(jax_maps, keras_maps)]
    return {"images": len(rmse), "rmse_mean": float(np.mean(rmse)), "rmse_max": max(rmse),
            "spearman_mean": float(np.mean(defined)) if defined else None,
            "spearman_min": min(defined) if defined else None,
            "spearman_undefined": len(rho) - len(defined),
            "top10_overlap_mean": float(np.mean(top)), "top10_overlap_min": min(top),
            "max_abs": float(np.max(np.abs(np.float64(jax_maps) - np.float64(keras_maps))))}


# ---------------------------------------------------------------- JAX side


def matched_inputs(config: ml_collections.ConfigDict, steps: int, probe: int) -> dict:
    """Initial variables, N augmented batches, probe and validation images of `config`."""
    data = load_data(config)
    n_train, bs = len(data.train.labels), config.batch_size
    steps_per_epoch = n_train // bs
    if steps_per_epoch == 0:
        raise CompareError(f"batch_size {bs} is larger than the {n_train} training examples")
    keys = rng.stream_keys(config.seed, {k: v for k, v in config.rng.items() if v >= 0})
    a = config.augment
    augment = jax.jit(lambda key, x: augment_batch(key, x, flip=a.flip, rotation=a.rotation,
                                                   zoom=a.zoom))
    xs, ys = [], []
    for step in range(steps):
        epoch, batch = divmod(step, steps_per_epoch)
        idx = np.asarray(epoch_order(keys["shuffle"], epoch, n_train)[batch * bs:(batch + 1) * bs])
        x = augment(rng.step_key(keys["augment"], step),
                    jnp.asarray(data.train.images[idx], jnp.float32))
        xs.append(np.asarray(jax.device_get(x), np.float32))
        ys.append(np.asarray(data.train.labels[idx], np.float32))
    model = models.get_model(config.model, dropout_rate=0.0, **model_options(config))
    state = init_state(model, build_optimizer(config), keys["init"], config.data.image_size)
    n_probe = min(probe, len(data.validation.labels))
    return {"model": model, "state": state,
            "train_images": np.stack(xs), "train_labels": np.stack(ys),
            "probe_images": data.validation.images[:n_probe].astype(np.float32),
            "val_images": np.asarray(data.validation.images, np.uint8),
            "val_labels": np.asarray(data.validation.labels)}


def forward_order(model) -> list[str]:
    """The sown activations in the order the forward pass computes them, then 'logits'."""
    if isinstance(model, models.MiniXception):
        names = ["stem_out"]
        for i in range(1, len(model.sizes) + 1):
            names += [f"block{i}/{n}" for n in ("act_a", "sepconv_a_out", "act_b",
                                                "sepconv_b_out", "pool_out", "residual_out")]
            names.append(f"block{i}_out")
        return names + ["gap_out", "logits"]
    return list(model.INTERMEDIATES) + ["logits"]


def _variables(params, batch_stats) -> dict:
    return {"params": params, "batch_stats": batch_stats}


def matched_step(model, tx: optax.GradientTransformation) -> Callable:
    """The jitted training step both halves mirror: dropout off, batches pre-augmented.

    `(params, batch_stats, opt_state, x, y) -> (loss, grads, params, batch_stats,
    opt_state)`; the loss is the mean BCE on the logit, batch norm in training mode.
    """

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updates = model.apply(_variables(p, batch_stats), x, train=True,
                                          mutable=["batch_stats"])
            return jnp.mean(bce_loss(logits, y)), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        deltas, opt_state = tx.update(grads, opt_state, params)
        return (loss, grads, optax.apply_updates(params, deltas),
                updates.get("batch_stats", {}), opt_state)

    return step


def run_jax(model, state, tx: optax.GradientTransformation, inputs: dict) -> dict:
    """The JAX half: forward probe, step-1 gradients, N steps, Grad-CAM, accuracy."""
    probe = jnp.asarray(inputs["probe_images"])

    @jax.jit
    def forward(variables, x):
        logits, s = model.apply(variables, x, train=False, mutable=["intermediates"])
        return logits, models.flat_intermediates(s["intermediates"])

    step = matched_step(model, tx)

    def gradcam(variables):
        a, g, _ = gradcamlib.last_conv_gradient(model, variables, probe, sign=1.0)
        low = gradcamlib.normalise_max(gradcamlib.cam(a, g))
        full = gradcamlib.heatmap_from(a, g, tuple(probe.shape[1:3]))
        return np.asarray(low), np.asarray(full)

    params, batch_stats, opt_state = state.params, state.batch_stats, state.opt_state
    logits, acts = forward(_variables(params, batch_stats), probe)
    acts = {**acts, "logits": logits}
    out: dict[str, Any] = {"forward": {k: np.asarray(acts[k]) for k in forward_order(model)}}
    out["gradcam"] = {}
    out["gradcam"]["start_lowres"], out["gradcam"]["start"] = gradcam(
        _variables(params, batch_stats))
    flat = lambda p, b: weights.flatten(jax.device_get(_variables(p, b)))  # noqa: E731
    out["weights"] = [flat(params, batch_stats)]
    losses = []
    for k in range(inputs["train_images"].shape[0]):
        loss, grads, params, batch_stats, opt_state = step(
            params, batch_stats, opt_state, inputs["train_images"][k], inputs["train_labels"][k])
        if k == 0:
            out["gradients"] = weights.flatten(jax.device_get({"params": grads}))
        losses.append(float(loss))
        out["weights"].append(flat(params, batch_stats))
    out["losses"] = losses
    out["gradcam"]["end_lowres"], out["gradcam"]["end"] = gradcam(
        _variables(params, batch_stats))
    vx, vy = inputs["val_images"], inputs["val_labels"]
    correct = 0
    for s in range(0, len(vy), 100):
        z, _ = forward(_variables(params, batch_stats), jnp.asarray(vx[s:s + 100], jnp.float32))
        correct += int(np.sum((np.asarray(z) > 0) == (vy[s:s + 100] > 0)))
    out["val_accuracy"] = correct / len(vy) if len(vy) else None
    return out


# ----------------------------------------------------------------- TF side


def tf_environment() -> dict[str, str]:
    """The Keras child's environment: a clean TF process under the paper's recipe."""
    return process.child_environment(process.Recipe(deterministic=True))


def run_keras(model_name: str, exchange: Path, timeout: int | None = None) -> dict:
    """Run `python -m jaxrepro.tfref matched` on the exchange files; its JSON result."""
    cmd = [sys.executable, "-m", "jaxrepro.tfref", "matched", model_name,
           str(exchange / "init.npz"), str(exchange / "inputs.npz"), str(exchange / "keras")]
    r = subprocess.run(cmd, cwd=ROOT, env=tf_environment(), capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"the Keras process exited {r.returncode}:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


# ----------------------------------------------------------------- report


def _max_over(rows: list[dict], key: str) -> float:
    return max((r[key] for r in rows), default=0.0)


def build_report(config, steps: int, jx: dict, keras_dir: Path, keras_result: dict) -> dict:
    """compare.json's content from both halves' outputs."""
    kf = weights.load(keras_dir / "forward.npz")
    if set(kf) != set(jx["forward"]):
        raise RuntimeError("activations of one side only: "
                           f"{sorted(set(kf) ^ set(jx['forward']))}")
    forward = [{"layer": name, **stats(value, kf[name])} for name, value in jx["forward"].items()]

    kg = weights.load(keras_dir / "gradients.npz")
    if set(kg) != set(jx["gradients"]):
        raise RuntimeError(f"gradient names differ: {sorted(set(kg) ^ set(jx['gradients']))}")
    backward = [{"param": name, **stats(jx["gradients"][name], kg[name])}
                for name in jx["gradients"]]

    with np.load(keras_dir / "trajectory.npz", allow_pickle=False) as t:
        keras_losses = [float(v) for v in t["loss"]]
    trajectory = []
    for k in range(steps + 1):
        kw = weights.load(keras_dir / f"weights_{k:03d}.npz")
        jw = jx["weights"][k]
        if set(kw) != set(jw):
            raise RuntimeError(f"weight names differ at step {k}: {sorted(set(kw) ^ set(jw))}")
        leaves = {name: stats(jw[name], kw[name]) for name in jw}
        params = [v for n, v in leaves.items() if n.startswith("params/")]
        bstats = [v for n, v in leaves.items() if n.startswith("batch_stats/")]
        trajectory.append({
            "step": k,
            "loss_jax": jx["losses"][k - 1] if k else None,
            "loss_keras": keras_losses[k - 1] if k else None,
            "all_bitwise": all(v["bitwise"] for v in leaves.values()),
            "params_bitwise": all(v["bitwise"] for v in params),
            "params_max_ulp": max((v["max_ulp"] for v in params), default=0),
            "params_max_rel": _max_over(params, "max_rel"),
            "params_rel_to_max": _max_over(params, "rel_to_max"),
            "worst_leaf": max((n for n in leaves if n.startswith("params/")),
                              key=lambda n: leaves[n]["rel_to_max"]),
            "batch_stats_rel_to_max": _max_over(bstats, "rel_to_max") if bstats else None,
        })

    kc = weights.load(keras_dir / "gradcam.npz")
    gradcam = {}
    for when in ("start", "end"):
        gradcam[when] = heatmap_agreement(jx["gradcam"][when], kc[when])
        gradcam[when]["lowres_max_abs"] = float(np.max(np.abs(
            np.float64(jx["gradcam"][f"{when}_lowres"]) - np.float64(kc[f"{when}_lowres"]))))
        gradcam[when]["lowres_shape"] = list(kc[f"{when}_lowres"].shape[1:])

    return {
        "model": config.model, "experiment": config.experiment, "seed": config.seed,
        "image_size": config.data.image_size, "batch_size": config.batch_size, "steps": steps,
        "probe_images": int(jx["forward"]["logits"].shape[0]),
        "against": "tensorflow", "dropout": "off on both sides (Flax dropout_rate=0, "
                                            "Keras Dropout rate set to 0)",
        "initial_weights_bitwise": trajectory[0]["all_bitwise"],
        "forward": forward, "backward": backward, "trajectory": trajectory, "gradcam": gradcam,
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
    lines = [f"JAX vs Keras: {report['model']} at {report['image_size']} px, seed "
             f"{report['seed']}, batch {report['batch_size']}, {report['steps']} steps; "
             f"dropout off; initial weights bitwise equal: {report['initial_weights_bitwise']}",
             "", f"forward (inference, {report['probe_images']} validation images, step 0)",
             f"  {'activation':24s} {'max ULP':>12s} {'max rel':>10s} {'|d|/max|a|':>10s}"]
    for r in report["forward"]:
        lines.append(f"  {r['layer']:24s} {r['max_ulp']:12d} {r['max_rel']:10.3g} "
                     f"{r['rel_to_max']:10.3g}")
    lines += ["", "backward (gradient of step 1's mean loss, batch norm in training mode)",
              f"  {'parameter':34s} {'max ULP':>12s} {'max rel':>10s} {'|d|/max|a|':>10s}"]
    for r in report["backward"]:
        lines.append(f"  {r['param']:34s} {r['max_ulp']:12d} {r['max_rel']:10.3g} "
                     f"{r['rel_to_max']:10.3g}")
    lines += ["", "trajectory (Keras RMSprop defaults on both sides; parameters after the step)",
              f"  {'step':>4s} {'loss JAX':>12s} {'loss Keras':>12s} {'max ULP':>12s} "
              f"{'max rel':>10s} {'|d|/max|a|':>10s}"]
    for r in report["trajectory"]:
        lines.append(f"  {r['step']:4d} {_l(r['loss_jax']):>12s} {_l(r['loss_keras']):>12s} "
                     f"{r['params_max_ulp']:12d} {r['params_max_rel']:10.3g} "
                     f"{r['params_rel_to_max']:10.3g}")
    va = report["val_accuracy"]
    lines += [f"  validation accuracy after {report['steps']} steps: JAX {_g(va['jax'])}, "
              f"Keras {_g(va['keras'])}", "",
              "Grad-CAM (explaining the logit; each framework's own weights)",
              f"  {'when':6s} {'RMSE':>10s} {'Spearman':>10s} {'top-10%':>8s} "
              f"{'max |d|':>10s}  A's size"]
    for when, g in report["gradcam"].items():
        lines.append(f"  {when:6s} {g['rmse_mean']:10.3g} {_g(g['spearman_mean']):>10s} "
                     f"{g['top10_overlap_mean']:8.3f} {g['max_abs']:10.3g}  "
                     f"{'x'.join(map(str, g['lowres_shape']))}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Loss of each framework and the parameter difference per step."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    t = report["trajectory"]
    steps = [r["step"] for r in t[1:]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(steps, [r["loss_jax"] for r in t[1:]], "o-", label="JAX")
    ax1.plot(steps, [r["loss_keras"] for r in t[1:]], "x--", label="Keras")
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (before the step's update)")
    ax1.legend()
    for key, label in (("params_rel_to_max", "max |d| / max |w| (per leaf)"),
                       ("params_max_rel", "max elementwise relative")):
        ax2.plot([r["step"] for r in t], [max(r[key], 1e-12) for r in t], "o-", label=label)
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("parameter difference JAX vs Keras (0 shown as 1e-12)")
    ax2.legend()
    fig.suptitle(f"{report['model']} {report['image_size']} px: JAX vs Keras, same init "
                 "and batches")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(config, steps: int, out: Path, probe: int = 8, keep_exchange: bool = False) -> dict:
    """Run both halves, write compare.json and trajectory.png into `out`; the report."""
    if steps < 1:
        raise CompareError("--steps must be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    exchange = out / "exchange"
    if exchange.exists():
        shutil.rmtree(exchange)
    exchange.mkdir()
    inputs = matched_inputs(config, steps, probe)
    model, state = inputs.pop("model"), inputs.pop("state")
    weights.save(exchange / "init.npz",
                 weights.flatten(jax.device_get(_variables(state.params, state.batch_stats))))
    with open(exchange / "inputs.npz", "wb") as f:
        np.savez(f, **inputs)
    keras_result = run_keras(config.model, exchange)
    jx = run_jax(model, state, build_optimizer(config), inputs)
    report = build_report(config, steps, jx, exchange / "keras", keras_result)
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    parser = argparse.ArgumentParser(prog="python -m jaxrepro.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config_file")
    parser.add_argument("--against", required=True, help="the other framework: tensorflow")
    parser.add_argument("--steps", type=int, default=10, help="training steps (default 10)")
    parser.add_argument("--out", default="compare_out", help="output directory")
    parser.add_argument("--probe", type=int, default=8,
                        help="validation images for the forward probe and Grad-CAM")
    parser.add_argument("--keep-exchange", action="store_true",
                        help="keep the exchanged .npz files in OUT/exchange")
    args = parser.parse_args(rest)
    try:
        if args.against not in AGAINST:
            raise CompareError(f"--against {args.against!r}: only {AGAINST} is supported")
        config = configlib.resolve(args.config_file, overrides)
        report = compare(config, args.steps, Path(args.out), args.probe, args.keep_exchange)
    except (configlib.ConfigError, CompareError, datalib.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_text(report))
    print(f"\nwritten: {Path(args.out) / 'compare.json'}, {Path(args.out) / 'trajectory.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

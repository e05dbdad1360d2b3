"""Compare two runs or checkpoints: are they bitwise identical, and if not, where do they part?

    python -m jaxrepro.diff A B [--json] [--plot PATH]

A and B are run directories (`checkpoints/<experiment>/<run>`) or checkpoint
directories (`<run>/checkpoints/<step>`). The report gives
  * a verdict and a per-leaf comparison of the latest (or named) checkpoints: how
    many elements differ, by how much, in ULPs (with a histogram);
  * the first training step whose recorded fingerprint differs, how many leaves
    differ at each step after it, and max ULP at every common checkpoint;
  * the first layer whose forward activation, and the first whose gradient, differs
    on the probe batch stored with each checkpoint (at the earliest common
    checkpoint where they differ) -- hardware computing a layer differently shows up
    here with identical parameters;
  * both models evaluated on A's validation split here: accuracies and how many
    predictions change;
  * the fields of the environment fingerprint that differ, so the likely cause stands
    next to the effect.
Exit status: 0 identical, 1 different, 2 not comparable or error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxrepro.records import read_jsonl

# ULP-distance histogram bins: [lo, hi) per bin.
ULP_BINS = ((0, 1), (1, 2), (2, 4), (4, 16), (16, 256), (256, 65536), (65536, 2**63))


class DiffError(RuntimeError):
    """Inputs that cannot be compared (missing, damaged or of another structure)."""


# ------------------------------------------------------------------- numbers


def ordered_bits(x: np.ndarray) -> np.ndarray:
    """Float32 bit patterns mapped to int64 so that adjacent floats differ by 1.

    -0.0 and +0.0 both map to 0; positive floats keep their bit pattern; negative
    floats map to minus the pattern of their magnitude.
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.int32).astype(np.int64)
    magnitude = bits & 0x7FFFFFFF
    return np.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Number of float32 values between a and b, elementwise (int64).

    NaN against anything (including NaN) is reported as -1: no distance exists.
    +0 and -0 are 0 ULP apart although their bits differ.
    """
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    d = np.abs(ordered_bits(a) - ordered_bits(b))
    return np.where(np.isnan(a) | np.isnan(b), -1, d)


def compare_leaf(a: np.ndarray, b: np.ndarray) -> dict:
    """Bitwise equality and size of the difference of two arrays of one shape."""
    a, b = np.asarray(a), np.asarray(b)
    a_bytes = np.ascontiguousarray(a).view(np.uint8)
    b_bytes = np.ascontiguousarray(b).view(np.uint8)
    if a.dtype != b.dtype or a.shape != b.shape:
        raise DiffError(f"dtype/shape {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
    differs = (a_bytes.reshape(a.size, -1) != b_bytes.reshape(b.size, -1)).any(axis=1) \
        if a.size else np.zeros(0, bool)
    n = int(differs.sum())
    out = {"equal": n == 0, "shape": list(a.shape), "dtype": str(a.dtype),
           "num_different": n, "fraction_different": n / a.size if a.size else 0.0}
    if n and np.issubdtype(a.dtype, np.floating):
        fa, fb = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        absdiff = np.abs(fa - fb)
        scale = np.maximum(np.abs(fa), np.abs(fb))
        rel = np.divide(absdiff, scale, out=np.zeros_like(absdiff), where=scale > 0)
        out["max_abs_diff"] = float(np.nanmax(absdiff)) if np.isfinite(absdiff).any() else None
        out["max_rel_diff"] = float(np.nanmax(rel)) if np.isfinite(rel).any() else None
        if a.dtype == np.float32:
            ulps = ulp_distance(a, b).ravel()
            out["nan_mismatches"] = int((ulps < 0).sum())
            ulps = ulps[ulps >= 0]
            out["max_ulp"] = int(ulps.max()) if ulps.size else None
            out["ulp_histogram"] = {f"[{lo},{hi})" if hi < 2**63 else f">={lo}":
                                    int(((ulps >= lo) & (ulps < hi)).sum()) for lo, hi in ULP_BINS}
    elif n:
        out["max_abs_diff"] = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    return out


# --------------------------------------------------------------------- inputs


@dataclass
class Side:
    """One side of a comparison: a run directory and one of its checkpoints."""

    run: Path
    step: int | None

    @property
    def label(self) -> str:
        return f"{self.run}" + (f" @ step {self.step}" if self.step is not None else "")


def locate(path: str | Path) -> Side:
    """Resolve a run directory or a checkpoint step directory."""
    from jaxrepro import runs  # noqa: PLC0415  (imports jax)

    try:
        return Side(*runs.locate(path))
    except runs.RunNotFound as e:
        raise DiffError(str(e)) from None


def _manager(run: Path):
    from jaxrepro import checkpoint as ckpt  # noqa: PLC0415  (imports jax)

    return ckpt.manager(run / "checkpoints", max_to_keep=None)


def checkpoint_steps(run: Path) -> list[int]:
    """The finalised checkpoint steps of a run."""
    return sorted(int(s) for s in _manager(run).all_steps())


def load_state(side: Side, step: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """The verified leaves ('params.conv1.kernel' -> array) of a side's checkpoint."""
    from jaxrepro import checkpoint as ckpt  # noqa: PLC0415  (imports jax)
    from jaxrepro.fingerprint import path_name  # noqa: PLC0415
    import jax  # noqa: PLC0415

    mngr = _manager(side.run)
    step = step if step is not None else side.step
    step = step if step is not None else ckpt.latest_step(mngr)
    if step is None:
        raise DiffError(f"{side.run} has no checkpoint")
    if step not in mngr.all_steps():
        raise DiffError(f"{side.run} has no checkpoint at step {step}; it has "
                        f"{sorted(mngr.all_steps())}")
    try:
        state, _ = ckpt.restore(mngr, step, None)
    except ckpt.CheckpointError as e:
        raise DiffError(str(e)) from e
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return step, {path_name(p): np.asarray(v) for p, v in flat}


def load_probe(run: Path, step: int) -> tuple[dict, dict] | None:
    """The verified probe of checkpoint `step` and its layer order, or None if it has none."""
    from jaxrepro import checkpoint as ckpt  # noqa: PLC0415
    from jaxrepro.probe import flat_gradients  # noqa: PLC0415

    if not (run / "checkpoints" / str(step) / "probe").is_dir():
        return None
    try:
        probe, meta = ckpt.restore_probe(_manager(run), step)
    except ckpt.CheckpointError as e:
        raise DiffError(str(e)) from e
    order = meta.get("probe_order") or {}
    probe["gradients"] = flat_gradients(probe["gradients"])
    return probe, order


def first_divergent_step(steps_a: list[dict], steps_b: list[dict]) -> dict:
    """The first logged step whose state fingerprint differs, and how it spread."""
    common = min(len(steps_a), len(steps_b))
    for i in range(common):
        ra, rb = steps_a[i], steps_b[i]
        if ra.get("step") != rb.get("step"):
            return {"step": None, "reason": f"step records out of line at index {i}"}
        if ra["state"] != rb["state"]:
            leaves_a, leaves_b = ra.get("leaves", {}), rb.get("leaves", {})
            per_step = []
            for sa, sb in zip(steps_a[i:common], steps_b[i:common]):
                la, lb = sa.get("leaves", {}), sb.get("leaves", {})
                per_step.append({"step": sa["step"], "leaves_different": sum(
                    la.get(k) != lb.get(k) for k in set(la) | set(lb)),
                    "loss_a": sa.get("loss"), "loss_b": sb.get("loss")})
            return {"step": ra["step"],
                    "leaves": sorted(k for k in set(leaves_a) | set(leaves_b)
                                     if leaves_a.get(k) != leaves_b.get(k)),
                    "growth": per_step}
    return {"step": None, "compared_steps": common,
            "reason": "no logged step differs" if common else "no step records"}


def _brief(r: dict) -> dict:
    """The headline numbers of a `compare_leaf` result."""
    return {k: r.get(k) for k in ("equal", "fraction_different", "max_ulp", "max_rel_diff",
                                  "max_abs_diff")}


def _state_record_equal(steps_a: list[dict], steps_b: list[dict], step: int) -> bool | None:
    """Whether both runs logged the same state fingerprint at `step` (None: not logged)."""
    ra = next((r for r in steps_a if r.get("step") == step), None)
    rb = next((r for r in steps_b if r.get("step") == step), None)
    return None if ra is None or rb is None else ra["state"] == rb["state"]


def compare_probes(pa: dict, order: dict, pb: dict) -> dict:
    """Layer by layer: activations in forward order, gradients in backward order.

    Names the first forward activation (or the logits) and the first gradient whose
    bits differ; the per-layer numbers say by how much.
    """
    from jaxrepro.probe import gradient_order  # noqa: PLC0415

    names = list(order.get("activations") or sorted(pa["activations"]))
    forward: dict[str, dict] = {}
    for name in names + ["logits"]:
        a = pa["logits"] if name == "logits" else pa["activations"].get(name)
        b = pb["logits"] if name == "logits" else pb["activations"].get(name)
        if a is None or b is None or np.shape(a) != np.shape(b):
            forward[name] = {"equal": False, "note": "missing on one side or other shape"}
        else:
            forward[name] = _brief(compare_leaf(a, b))
    grad_names = gradient_order(list(order.get("layers") or []),
                                sorted(set(pa["gradients"]) | set(pb["gradients"])))
    gradients: dict[str, dict] = {}
    for name in grad_names:
        a, b = pa["gradients"].get(name), pb["gradients"].get(name)
        if a is None or b is None or np.shape(a) != np.shape(b):
            gradients[name] = {"equal": False, "note": "missing on one side or other shape"}
        else:
            gradients[name] = _brief(compare_leaf(a, b))
    return {"first_forward": next((k for k, r in forward.items() if not r["equal"]), None),
            "first_gradient": next((k for k, r in gradients.items() if not r["equal"]), None),
            "forward": forward, "gradients": gradients}


def layer_localisation(a: Path, b: Path, steps: list[int], steps_a: list[dict],
                       steps_b: list[dict]) -> dict:
    """Probe comparison at each common checkpoint step; the earliest that differs leads.

    `state_equal` (from the step fingerprints) tells how to read it: with equal states,
    a differing layer is computed differently by the two environments; with states
    that already differ, the layers differ because the parameters do.
    """
    per_step = []
    for step in steps:
        got_a, got_b = load_probe(a, step), load_probe(b, step)
        if got_a is None or got_b is None:
            continue
        cmp = compare_probes(got_a[0], got_a[1], got_b[0])
        per_step.append({"step": step,
                         "state_equal": _state_record_equal(steps_a, steps_b, step), **cmp})
    if not per_step:
        return {"step": None, "reason": "no common checkpoint holds a probe on both sides"}
    lead = next((r for r in per_step if r["first_forward"] or r["first_gradient"]), None)
    summary = [{k: r[k] for k in ("step", "state_equal", "first_forward", "first_gradient")}
               for r in per_step]
    if lead is None:
        return {"step": None, "probed_steps": summary,
                "reason": "the probes of all common checkpoints are identical"}
    quiet = [r["step"] for r in per_step if r["step"] < lead["step"] and r["state_equal"]]
    note = None
    if quiet and lead["state_equal"] is False:
        note = (f"at checkpoint {quiet[-1]} the states and probes are identical, yet the states "
                "part later: the difference arises outside the forward and backward pass of "
                "the probe (e.g. the optimizer update, batch-norm running statistics, "
                "augmentation, data order)")
    return {**lead, "probed_steps": summary, "note": note}


def checkpoint_growth(a: Side, b: Side, steps: list[int]) -> list[dict]:
    """Per common checkpoint step: leaves that differ, max ULP and max relative difference."""
    growth = []
    for step in steps:
        _, la = load_state(a, step)
        _, lb = load_state(b, step)
        if set(la) != set(lb) or any(la[k].shape != lb[k].shape for k in la):
            continue
        rs = [compare_leaf(la[k], lb[k]) for k in sorted(la)]
        ulps = [r["max_ulp"] for r in rs if r.get("max_ulp") is not None]
        rels = [r["max_rel_diff"] for r in rs if r.get("max_rel_diff") is not None]
        growth.append({"step": step, "leaves_different": sum(not r["equal"] for r in rs),
                       "max_ulp": max(ulps, default=0), "max_rel_diff": max(rels, default=0.0)})
    return growth


def predictions_diff(a: Side, b: Side) -> dict:
    """Both checkpoints evaluated on A's validation split, on this machine.

    Accuracy of each, how many images change their predicted class, and whether the
    logits are bitwise equal. Evaluating both on one device isolates the weights from
    the device that trained them.
    """
    from jaxrepro import runs, train  # noqa: PLC0415
    from jaxrepro.data import DataError  # noqa: PLC0415

    try:
        ma, mb = runs.load(a.run, a.step), runs.load(b.run, b.step)
        data = train.load_data(ma.config)
    except (DataError, runs.RunNotFound) as e:
        return {"skipped": str(e)}
    val = data.validation
    logits = []
    step_a = train.make_eval_step(ma.model)
    for m in (ma, mb):  # one compiled program when both runs use the same model
        step = step_a if m.model == ma.model else train.make_eval_step(m.model)
        n, bs = len(val.labels), int(ma.config.eval_batch_size)
        out = []
        for start in range(0, n, bs):
            idx = np.minimum(np.arange(start, start + bs), n - 1)
            _, _, lg = step(m.state, val.images[idx], val.labels[idx], np.ones(bs, np.float32))
            out.append(np.asarray(lg)[: n - start])
        logits.append(np.concatenate(out)[:n])
    la, lb = logits
    pred_a, pred_b = la > 0, lb > 0
    labels = np.asarray(val.labels) > 0
    return {"num_images": int(len(labels)),
            "accuracy_a": float(np.mean(pred_a == labels)),
            "accuracy_b": float(np.mean(pred_b == labels)),
            "predictions_changed": int(np.sum(pred_a != pred_b)),
            "logits": _brief(compare_leaf(la.astype(np.float32), lb.astype(np.float32)))}


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def environment_diff(a: Path, b: Path) -> dict[str, list]:
    """Fields of the (latest) environment fingerprints that differ: name -> [a, b]."""
    ea, eb = read_jsonl(a / "environment.jsonl"), read_jsonl(b / "environment.jsonl")
    if not ea or not eb:
        return {}
    fa = _flatten({k: v for k, v in ea[-1].items() if k != "start_step"})
    fb = _flatten({k: v for k, v in eb[-1].items() if k != "start_step"})
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


# --------------------------------------------------------------------- report


def fork_relation(a: Path, b: Path) -> dict | None:
    """If one run was forked from the other (fork.json), from which step and with what."""
    for child, parent, name in ((b, a, "B"), (a, b, "A")):
        path = child / "fork.json"
        if path.exists():
            info = json.loads(path.read_text())
            if Path(info["parent"]).resolve() == parent.resolve():
                return {"child": name, **info}
    return None


def diff(a: str | Path, b: str | Path, *, predictions: bool = True) -> dict:
    """The full comparison of two runs or checkpoints, as a JSON-able dict.

    `predictions=False` skips evaluating both models on the validation split (which
    needs the data set on this machine).
    """
    side_a, side_b = locate(a), locate(b)
    step_a, leaves_a = load_state(side_a)
    step_b, leaves_b = load_state(side_b)
    side_a.step, side_b.step = step_a, step_b
    report: dict[str, Any] = {"a": side_a.label, "b": side_b.label,
                              "step_a": step_a, "step_b": step_b}
    only_a, only_b = sorted(set(leaves_a) - set(leaves_b)), sorted(set(leaves_b) - set(leaves_a))
    mismatched = sorted(k for k in set(leaves_a) & set(leaves_b)
                        if (leaves_a[k].shape, leaves_a[k].dtype) !=
                        (leaves_b[k].shape, leaves_b[k].dtype))
    if only_a or only_b or mismatched:
        report.update(verdict="not comparable", only_in_a=only_a, only_in_b=only_b,
                      shape_or_dtype_differs={k: [f"{leaves_a[k].dtype}{list(leaves_a[k].shape)}",
                                                  f"{leaves_b[k].dtype}{list(leaves_b[k].shape)}"]
                                              for k in mismatched})
        return report
    report["leaves"] = {k: compare_leaf(leaves_a[k], leaves_b[k]) for k in sorted(leaves_a)}
    identical = all(r["equal"] for r in report["leaves"].values())
    report["verdict"] = "identical" if identical else "different"
    steps_a, steps_b = read_jsonl(side_a.run / "steps.jsonl"), read_jsonl(side_b.run / "steps.jsonl")
    report["first_divergence"] = first_divergent_step(steps_a, steps_b)
    report["fork"] = fork_relation(side_a.run, side_b.run)
    common = sorted(set(checkpoint_steps(side_a.run)) & set(checkpoint_steps(side_b.run)))
    report["common_checkpoints"] = common
    report["checkpoint_growth"] = checkpoint_growth(side_a, side_b, common)
    report["layers"] = layer_localisation(side_a.run, side_b.run, common, steps_a, steps_b)
    if predictions:
        report["predictions"] = predictions_diff(side_a, side_b)
    report["environment_diff"] = environment_diff(side_a.run, side_b.run)
    return report


def _describe_change(a: Any, b: Any) -> str:
    """A short account of how a fingerprint field changed (flag lists by token)."""
    if isinstance(a, str) and isinstance(b, str) and (" " in a or " " in b):
        ta, tb = a.split(), b.split()
        only_a = [t for t in ta if t not in tb] or ["nothing"]
        only_b = [t for t in tb if t not in ta] or ["nothing"]
        return f"only in A: {' '.join(only_a)}; only in B: {' '.join(only_b)}"
    if isinstance(a, list) and isinstance(b, list):
        return (f"only in A: {[v for v in a if v not in b][:8]}; "
                f"only in B: {[v for v in b if v not in a][:8]}")
    return f"{json.dumps(a)[:60]} vs {json.dumps(b)[:60]}"


def format_text(report: dict) -> str:
    """A readable rendering of `diff()`'s report."""
    lines = [f"A: {report['a']}", f"B: {report['b']}", f"verdict: {report['verdict']}"]
    if report["step_a"] != report["step_b"]:
        lines.append(f"note: comparing checkpoints of different steps "
                     f"({report['step_a']} vs {report['step_b']})")
    if report["verdict"] == "not comparable":
        for key in ("only_in_a", "only_in_b"):
            names = report[key]
            if names:
                more = f" ... and {len(names) - 12} more (--json lists all)" if len(names) > 12 else ""
                lines.append(f"{len(names)} leaves {key.replace('_', ' ')}: "
                             f"{', '.join(names[:12])}{more}")
        for k, (sa, sb) in report["shape_or_dtype_differs"].items():
            lines.append(f"shape/dtype differs: {k}: {sa} vs {sb}")
        return "\n".join(lines)
    leaves = report["leaves"]
    n_diff = sum(not r["equal"] for r in leaves.values())
    lines.append(f"leaves: {len(leaves)} compared, {n_diff} differ")
    if n_diff:
        lines.append(f"{'leaf':44s} {'differ':>9s} {'frac':>7s} {'max abs':>10s} "
                     f"{'max rel':>10s} {'max ulp':>9s}")
        for k, r in leaves.items():
            if r["equal"]:
                continue
            lines.append(f"{k:44s} {r['num_different']:9d} {r['fraction_different']:7.3f} "
                         f"{r.get('max_abs_diff') or 0:10.3e} {r.get('max_rel_diff') or 0:10.3e} "
                         f"{r.get('max_ulp') if r.get('max_ulp') is not None else '-':>9}")
    fd = report["first_divergence"]
    if fd.get("step") is not None:
        lines.append(f"first divergent step: {fd['step']} (the states after step {fd['step'] - 1} "
                     f"are identical; the update of step {fd['step']} differs in "
                     f"{len(fd['leaves'])} leaves: {', '.join(fd['leaves'][:4])}"
                     f"{' ...' if len(fd['leaves']) > 4 else ''})" if fd["step"] > 0 else
                     f"first divergent step: 0 (the initial states differ: "
                     f"{len(fd['leaves'])} leaves)")
    else:
        lines.append(f"first divergent step: none ({fd.get('reason')})")
    fork = report.get("fork")
    if fork:
        lines.append(f"{fork['child']} was forked from the other run at step {fork['step']}"
                     f" (config changes: {', '.join(fork['config_changes']) or 'none'})")
    lines += _format_layers(report.get("layers") or {})
    growth = report.get("checkpoint_growth") or []
    if any(g["leaves_different"] for g in growth):
        lines.append("common checkpoints (step: leaves differing, max ulp, max rel): " + "; ".join(
            f"{g['step']}: {g['leaves_different']}, {g['max_ulp']}, {g['max_rel_diff']:.1e}"
            for g in growth))
    pred = report.get("predictions")
    if pred and "skipped" in pred:
        lines.append(f"predictions: not compared ({pred['skipped']})")
    elif pred:
        lines.append(f"validation ({pred['num_images']} images, evaluated here): accuracy "
                     f"A {pred['accuracy_a']:.4f}, B {pred['accuracy_b']:.4f}; "
                     f"{pred['predictions_changed']} predictions change; logits "
                     + ("bitwise equal" if pred["logits"]["equal"] else
                        f"differ (max {pred['logits']['max_ulp']} ulp)"))
    env = report["environment_diff"]
    if env:
        lines.append("environment differs in:")
        lines += [f"  {k}: {_describe_change(va, vb)}" for k, (va, vb) in env.items()]
    else:
        lines.append("environment: same fingerprint")
    return "\n".join(lines)


def _format_layers(layers: dict) -> list[str]:
    """Text lines for `layer_localisation`'s result."""
    if layers.get("step") is None:
        return [f"layers: no probe differs ({layers.get('reason')})"] if layers else []
    step, ff, fg = layers["step"], layers["first_forward"], layers["first_gradient"]
    lines = [f"layers, probed at checkpoint {step}:"]
    if layers.get("state_equal"):
        lines.append("  the two states are identical here, so a differing layer is computed "
                     "differently by the two environments")
    elif layers.get("state_equal") is False:
        lines.append("  the states already differ here, so the layers differ with the parameters")
    if layers.get("note"):
        lines.append(f"  note: {layers['note']}")
    for kind, first, table in (("forward", ff, layers["forward"]),
                               ("gradient", fg, layers["gradients"])):
        if first is None:
            lines.append(f"  {kind}: all layers identical")
            continue
        r = table[first]
        n_diff = sum(not v["equal"] for v in table.values())
        lines.append(f"  first {kind} layer that differs: {first} (max {r.get('max_ulp')} ulp, "
                     f"max rel {r.get('max_rel_diff') or 0:.1e}); {n_diff} of {len(table)} differ")
    return lines


def plot_growth(report: dict, path: Path) -> None:
    """How the difference grew: leaves per step, the two losses, max ULP per checkpoint."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    growth = report.get("first_divergence", {}).get("growth") or []
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    steps = [g["step"] for g in growth]
    ax1.plot(steps, [g["leaves_different"] for g in growth], "o-")
    ax1.set_xlabel("step")
    ax1.set_ylabel("leaves whose fingerprint differs")
    ax2.plot(steps, [g["loss_a"] for g in growth], "o-", label="A")
    ax2.plot(steps, [g["loss_b"] for g in growth], "s--", label="B")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.legend()
    ckpts = report.get("checkpoint_growth") or []
    cs = [g["step"] for g in ckpts]
    ax3.semilogy(cs, [max(g["max_ulp"], 0.5) for g in ckpts], "o-", label="max ULP distance")
    ax3.semilogy(cs, [max(g["max_rel_diff"], 1e-12) for g in ckpts], "s--",
                 label="max relative difference")
    ax3.set_xlabel("checkpoint step")
    ax3.set_title("parameters at common checkpoints (floored: 0.5 ulp, 1e-12)", fontsize=9)
    ax3.legend()
    fig.suptitle(f"A: {report['a']}   B: {report['b']}   first divergent step "
                 f"{report.get('first_divergence', {}).get('step')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 identical, 1 different, 2 not comparable or error."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxrepro.diff", description=__doc__.split("\n\n")[0],
        epilog="A and B: run directories or <run>/checkpoints/<step>. "
               "Exit status 0 identical, 1 different, 2 not comparable or error.")
    parser.add_argument("a", help="run directory, or <run>/checkpoints/<step>")
    parser.add_argument("b", help="the other run or checkpoint (this machine's or another's)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG of the divergence per step")
    parser.add_argument("--no-predictions", action="store_true",
                        help="skip evaluating both models on A's validation split (it needs "
                             "the data set on this machine)")
    args = parser.parse_args(argv)
    try:
        report = diff(args.a, args.b, predictions=not args.no_predictions)
    except DiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_text(report))
    if args.plot and report["verdict"] == "different":
        plot_growth(report, args.plot)
    return {"identical": 0, "different": 1}.get(report["verdict"], 2)


if __name__ == "__main__":
    sys.exit(main())

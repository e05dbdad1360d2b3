"""Compare two runs or checkpoints: are they bitwise identical, and if not, where do they part?

    python -m jaxrepro.analysis.diff A B [--json] [--plot PATH] [--no-predictions]

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

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import matplotlib
import numpy as np

from jaxrepro import cli, models
from jaxrepro.errors import UserError
from jaxrepro.fingerprint import path_name
from jaxrepro.numerics import array_diff
from jaxrepro.records import read_jsonl
from jaxrepro.train import checkpoint as ckpt
from jaxrepro.train import rundir, steps
from jaxrepro.train.loop import load_data
from jaxrepro.train.probe import flat_gradients, gradient_order
from jaxrepro.train.rundir import RunDir

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402


class DiffError(UserError, RuntimeError):
    """Inputs that cannot be compared (missing, damaged or of another structure)."""


def compare_leaf(a: np.ndarray, b: np.ndarray) -> dict:
    """Bitwise equality and size of the difference of two arrays of one shape (a dict)."""
    try:
        return array_diff(a, b, histogram=True).to_dict()
    except ValueError as e:
        raise DiffError(str(e)) from None


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
    return Side(*rundir.locate(path))


def checkpoint_steps(run: Path) -> list[int]:
    """The finalised checkpoint steps of a run."""
    return sorted(int(s) for s in RunDir(run).manager().all_steps())


def load_state(side: Side, step: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
    """The verified leaves ('params.conv1.kernel' -> array) of a side's checkpoint."""
    step = rundir.checkpoint_step(side.run, step if step is not None else side.step)
    state, _ = ckpt.restore(RunDir(side.run).manager(), step, None)
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    return step, {path_name(p): np.asarray(v) for p, v in flat}


def load_probe(run: Path, step: int) -> tuple[dict, dict] | None:
    """The verified probe of checkpoint `step` and its layer order, or None if it has none."""
    if not (RunDir(run).checkpoints / str(step) / "probe").is_dir():
        return None
    probe, meta = ckpt.restore_probe(RunDir(run).manager(), step)
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
                per_step.append(
                    {
                        "step": sa["step"],
                        "leaves_different": sum(la.get(k) != lb.get(k) for k in set(la) | set(lb)),
                        "loss_a": sa.get("loss"),
                        "loss_b": sb.get("loss"),
                    }
                )
            return {
                "step": ra["step"],
                "leaves": sorted(
                    k for k in set(leaves_a) | set(leaves_b) if leaves_a.get(k) != leaves_b.get(k)
                ),
                "growth": per_step,
            }
    return {
        "step": None,
        "compared_steps": common,
        "reason": "no logged step differs" if common else "no step records",
    }


def _brief(a: np.ndarray, b: np.ndarray) -> dict:
    """The headline numbers of how two arrays differ."""
    return array_diff(a, b).brief()


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
    names = list(order.get("activations") or sorted(pa["activations"]))
    forward: dict[str, dict] = {}
    for name in names + ["logits"]:
        a = pa["logits"] if name == "logits" else pa["activations"].get(name)
        b = pb["logits"] if name == "logits" else pb["activations"].get(name)
        if a is None or b is None or np.shape(a) != np.shape(b):
            forward[name] = {"equal": False, "note": "missing on one side or other shape"}
        else:
            forward[name] = _brief(a, b)
    grad_names = gradient_order(
        list(order.get("layers") or []), sorted(set(pa["gradients"]) | set(pb["gradients"]))
    )
    gradients: dict[str, dict] = {}
    for name in grad_names:
        a, b = pa["gradients"].get(name), pb["gradients"].get(name)
        if a is None or b is None or np.shape(a) != np.shape(b):
            gradients[name] = {"equal": False, "note": "missing on one side or other shape"}
        else:
            gradients[name] = _brief(a, b)
    return {
        "first_forward": next((k for k, r in forward.items() if not r["equal"]), None),
        "first_gradient": next((k for k, r in gradients.items() if not r["equal"]), None),
        "forward": forward,
        "gradients": gradients,
    }


def layer_localisation(
    a: Path, b: Path, steps: list[int], steps_a: list[dict], steps_b: list[dict]
) -> dict:
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
        per_step.append(
            {"step": step, "state_equal": _state_record_equal(steps_a, steps_b, step), **cmp}
        )
    if not per_step:
        return {"step": None, "reason": "no common checkpoint holds a probe on both sides"}
    lead = next((r for r in per_step if r["first_forward"] or r["first_gradient"]), None)
    summary = [
        {k: r[k] for k in ("step", "state_equal", "first_forward", "first_gradient")}
        for r in per_step
    ]
    if lead is None:
        return {
            "step": None,
            "probed_steps": summary,
            "reason": "the probes of all common checkpoints are identical",
        }
    quiet = [r["step"] for r in per_step if r["step"] < lead["step"] and r["state_equal"]]
    note = None
    if quiet and lead["state_equal"] is False:
        note = (
            f"at checkpoint {quiet[-1]} the states and probes are identical, yet the states "
            "part later: the difference arises outside the forward and backward pass of "
            "the probe (e.g. the optimizer update, batch-norm running statistics, "
            "augmentation, data order)"
        )
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
        rels = [r["max_rel"] for r in rs if r.get("max_rel") is not None]
        growth.append(
            {
                "step": step,
                "leaves_different": sum(not r["equal"] for r in rs),
                "max_ulp": max(ulps, default=0),
                "max_rel_diff": max(rels, default=0.0),
            }
        )
    return growth


def predictions_diff(a: Side, b: Side) -> dict:
    """Both checkpoints evaluated on A's validation split, on this machine, in this
    process's determinism mode (the runs may have been trained in two modes).

    Accuracy of each, how many images change their predicted class, and whether the
    logits are bitwise equal. Evaluating both on one device isolates the weights from
    the device that trained them.
    """
    model = RunDir(a.run).read_config().model
    if models.get_spec(model).pretrained:
        return {"skipped": f"{model} is an imported ImageNet network: no validation split"}
    ma, mb = (rundir.load(s.run, s.step, take_mode=False) for s in (a, b))
    try:
        val = load_data(ma.config).validation
    except UserError as e:  # the data set is not prepared on this machine
        return {"skipped": str(e)}
    logits = []
    step_a = steps.make_eval_step(ma.model)
    for m in (ma, mb):  # one compiled program when both runs use the same model
        step = step_a if m.model == ma.model else steps.make_eval_step(m.model)
        logits.append(
            steps.evaluate(
                step, m.variables, val.images, val.labels, int(ma.config.eval_batch_size)
            ).logits
        )
    la, lb = logits
    pred_a, pred_b = la > 0, lb > 0
    labels = np.asarray(val.labels) > 0
    return {
        "num_images": int(len(labels)),
        "accuracy_a": float(np.mean(pred_a == labels)),
        "accuracy_b": float(np.mean(pred_b == labels)),
        "predictions_changed": int(np.sum(pred_a != pred_b)),
        "logits": _brief(la.astype(np.float32), lb.astype(np.float32)),
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def environment_diff(a: Path, b: Path) -> dict[str, list]:
    """Fields of the (latest) environment fingerprints that differ: name -> [a, b]."""
    ea, eb = read_jsonl(RunDir(a).environment), read_jsonl(RunDir(b).environment)
    if not ea or not eb:
        return {}
    fa = _flatten({k: v for k, v in ea[-1].items() if k != "start_step"})
    fb = _flatten({k: v for k, v in eb[-1].items() if k != "start_step"})
    return {k: [fa.get(k), fb.get(k)] for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


# --------------------------------------------------------------------- report


def fork_relation(a: Path, b: Path) -> dict | None:
    """If one run was forked from the other (fork.json), from which step and with what."""
    for child, parent, name in ((b, a, "B"), (a, b, "A")):
        path = RunDir(child).fork
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
    report: dict[str, Any] = {
        "a": side_a.label,
        "b": side_b.label,
        "step_a": step_a,
        "step_b": step_b,
    }
    only_a, only_b = sorted(set(leaves_a) - set(leaves_b)), sorted(set(leaves_b) - set(leaves_a))
    mismatched = sorted(
        k
        for k in set(leaves_a) & set(leaves_b)
        if (leaves_a[k].shape, leaves_a[k].dtype) != (leaves_b[k].shape, leaves_b[k].dtype)
    )
    if only_a or only_b or mismatched:
        report.update(
            verdict="not comparable",
            only_in_a=only_a,
            only_in_b=only_b,
            shape_or_dtype_differs={
                k: [
                    f"{leaves_a[k].dtype}{list(leaves_a[k].shape)}",
                    f"{leaves_b[k].dtype}{list(leaves_b[k].shape)}",
                ]
                for k in mismatched
            },
        )
        return report
    report["leaves"] = {k: compare_leaf(leaves_a[k], leaves_b[k]) for k in sorted(leaves_a)}
    identical = all(r["equal"] for r in report["leaves"].values())
    report["verdict"] = "identical" if identical else "different"
    steps_a, steps_b = read_jsonl(RunDir(side_a.run).steps), read_jsonl(RunDir(side_b.run).steps)
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
        return (
            f"only in A: {[v for v in a if v not in b][:8]}; "
            f"only in B: {[v for v in b if v not in a][:8]}"
        )
    return f"{json.dumps(a)[:60]} vs {json.dumps(b)[:60]}"


def format_text(report: dict) -> str:
    """A readable rendering of `diff()`'s report."""
    lines = [f"A: {report['a']}", f"B: {report['b']}", f"verdict: {report['verdict']}"]
    if report["step_a"] != report["step_b"]:
        lines.append(
            f"note: comparing checkpoints of different steps "
            f"({report['step_a']} vs {report['step_b']})"
        )
    if report["verdict"] == "not comparable":
        for key in ("only_in_a", "only_in_b"):
            names = report[key]
            if names:
                more = (
                    f" ... and {len(names) - 12} more (--json lists all)" if len(names) > 12 else ""
                )
                lines.append(
                    f"{len(names)} leaves {key.replace('_', ' ')}: {', '.join(names[:12])}{more}"
                )
        for k, (sa, sb) in report["shape_or_dtype_differs"].items():
            lines.append(f"shape/dtype differs: {k}: {sa} vs {sb}")
        return "\n".join(lines)
    leaves = report["leaves"]
    n_diff = sum(not r["equal"] for r in leaves.values())
    lines.append(f"leaves: {len(leaves)} compared, {n_diff} differ")
    if n_diff:
        lines.append(
            f"{'leaf':44s} {'differ':>9s} {'frac':>7s} {'max abs':>10s} "
            f"{'max rel':>10s} {'max ulp':>9s}"
        )
        for k, r in leaves.items():
            if r["equal"]:
                continue
            lines.append(
                f"{k:44s} {r['num_different']:9d} {r['fraction_different']:7.3f} "
                f"{r.get('max_abs') or 0:10.3e} {r.get('max_rel') or 0:10.3e} "
                f"{r.get('max_ulp') if r.get('max_ulp') is not None else '-':>9}"
            )
    fd = report["first_divergence"]
    if fd.get("step") is not None:
        lines.append(
            f"first divergent step: {fd['step']} (the states after step {fd['step'] - 1} "
            f"are identical; the update of step {fd['step']} differs in "
            f"{len(fd['leaves'])} leaves: {', '.join(fd['leaves'][:4])}"
            f"{' ...' if len(fd['leaves']) > 4 else ''})"
            if fd["step"] > 0
            else f"first divergent step: 0 (the initial states differ: {len(fd['leaves'])} leaves)"
        )
    else:
        lines.append(f"first divergent step: none ({fd.get('reason')})")
    fork = report.get("fork")
    if fork:
        lines.append(
            f"{fork['child']} was forked from the other run at step {fork['step']}"
            f" (config changes: {', '.join(fork['config_changes']) or 'none'})"
        )
    lines += _format_layers(report.get("layers") or {})
    growth = report.get("checkpoint_growth") or []
    if any(g["leaves_different"] for g in growth):
        lines.append(
            "common checkpoints (step: leaves differing, max ulp, max rel): "
            + "; ".join(
                f"{g['step']}: {g['leaves_different']}, {g['max_ulp']}, {g['max_rel_diff']:.1e}"
                for g in growth
            )
        )
    pred = report.get("predictions")
    if pred and "skipped" in pred:
        lines.append(f"predictions: not compared ({pred['skipped']})")
    elif pred:
        lines.append(
            f"validation ({pred['num_images']} images, evaluated here): accuracy "
            f"A {pred['accuracy_a']:.4f}, B {pred['accuracy_b']:.4f}; "
            f"{pred['predictions_changed']} predictions change; logits "
            + (
                "bitwise equal"
                if pred["logits"]["equal"]
                else f"differ (max {pred['logits']['max_ulp']} ulp)"
            )
        )
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
        lines.append(
            "  the two states are identical here, so a differing layer is computed "
            "differently by the two environments"
        )
    elif layers.get("state_equal") is False:
        lines.append("  the states already differ here, so the layers differ with the parameters")
    if layers.get("note"):
        lines.append(f"  note: {layers['note']}")
    for kind, first, table in (
        ("forward", ff, layers["forward"]),
        ("gradient", fg, layers["gradients"]),
    ):
        if first is None:
            lines.append(f"  {kind}: all layers identical")
            continue
        r = table[first]
        n_diff = sum(not v["equal"] for v in table.values())
        lines.append(
            f"  first {kind} layer that differs: {first} (max {r.get('max_ulp')} ulp, "
            f"max rel {r.get('max_rel') or 0:.1e}); {n_diff} of {len(table)} differ"
        )
    return lines


def plot_growth(report: dict, path: Path) -> None:
    """How the difference grew: leaves per step, the two losses, max ULP per checkpoint."""
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
    ax3.semilogy(
        cs, [max(g["max_rel_diff"], 1e-12) for g in ckpts], "s--", label="max relative difference"
    )
    ax3.set_xlabel("checkpoint step")
    ax3.set_title("parameters at common checkpoints (floored: 0.5 ulp, 1e-12)", fontsize=9)
    ax3.legend()
    fig.suptitle(
        f"A: {report['a']}   B: {report['b']}   first divergent step "
        f"{report.get('first_divergence', {}).get('step')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 identical, 1 different, 2 not comparable or error."""
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.diff",
        description=__doc__.split("\n\n")[0],
        epilog="A and B: run directories or <run>/checkpoints/<step>. "
        "Exit status 0 identical, 1 different, 2 not comparable or error.",
    )
    parser.add_argument("a", help="run directory, or <run>/checkpoints/<step>")
    parser.add_argument("b", help="the other run or checkpoint (this machine's or another's)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG of the divergence per step")
    parser.add_argument(
        "--no-predictions",
        action="store_true",
        help="skip evaluating both models on A's validation split (it needs "
        "the data set on this machine)",
    )
    args = parser.parse_args(argv)
    report = diff(args.a, args.b, predictions=not args.no_predictions)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_text(report))
    if args.plot and report["verdict"] == "different":
        plot_growth(report, args.plot)
    return {"identical": 0, "different": 1}.get(report["verdict"], 2)


if __name__ == "__main__":
    sys.exit(main())

"""Compare two runs or checkpoints: are they bitwise identical, and if not, where do they part?

    python -m jaxrepro.diff A B [--json] [--plot PATH]

A and B are run directories (`checkpoints/<experiment>/<run>`) or checkpoint
directories (`<run>/checkpoints/<step>`). The report gives a verdict, a per-leaf
comparison of the latest (or named) checkpoints (how many elements differ, by how
much, in ULPs), the first training step whose recorded fingerprint differs, and the
fields of the environment fingerprint that differ, so the likely cause stands next
to the effect. Exit status: 0 identical, 1 different, 2 not comparable or error.
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
    path = Path(path)
    if not path.exists():
        raise DiffError(f"{path} does not exist")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return Side(run=path.parent.parent, step=int(path.name))
    if (path / "checkpoints").is_dir() or (path / "config.json").exists():
        return Side(run=path, step=None)
    raise DiffError(f"{path} is neither a run directory (with config.json and checkpoints/) "
                    "nor a checkpoint directory (<run>/checkpoints/<step>)")


def load_state(side: Side) -> tuple[int, dict[str, np.ndarray]]:
    """The verified leaves ('params.conv1.kernel' -> array) of a side's checkpoint."""
    from jaxrepro import checkpoint as ckpt  # noqa: PLC0415  (imports jax)
    from jaxrepro.fingerprint import path_name  # noqa: PLC0415
    import jax  # noqa: PLC0415

    mngr = ckpt.manager(side.run / "checkpoints", max_to_keep=None)
    step = side.step if side.step is not None else ckpt.latest_step(mngr)
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


def diff(a: str | Path, b: str | Path) -> dict:
    """The full comparison of two runs or checkpoints, as a JSON-able dict."""
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
    report["first_divergence"] = first_divergent_step(
        read_jsonl(side_a.run / "steps.jsonl"), read_jsonl(side_b.run / "steps.jsonl"))
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
        lines.append(f"first divergent step: {fd['step']} (leaves: "
                     f"{', '.join(fd['leaves'][:6])}{' ...' if len(fd['leaves']) > 6 else ''})")
    else:
        lines.append(f"first divergent step: none ({fd.get('reason')})")
    env = report["environment_diff"]
    if env:
        lines.append("environment differs in:")
        lines += [f"  {k}: {_describe_change(va, vb)}" for k, (va, vb) in env.items()]
    else:
        lines.append("environment: same fingerprint")
    return "\n".join(lines)


def plot_growth(report: dict, path: Path) -> None:
    """Leaves that differ and the two losses per step, from the first divergence on."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    growth = report.get("first_divergence", {}).get("growth") or []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [g["step"] for g in growth]
    ax1.plot(steps, [g["leaves_different"] for g in growth], "o-")
    ax1.set_xlabel("step")
    ax1.set_ylabel("leaves whose fingerprint differs")
    ax2.plot(steps, [g["loss_a"] for g in growth], "o-", label="A")
    ax2.plot(steps, [g["loss_b"] for g in growth], "s--", label="B")
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.legend()
    fig.suptitle(f"divergence from step {report.get('first_divergence', {}).get('step')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: 0 identical, 1 different, 2 not comparable or error."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxrepro.diff", description=__doc__.split("\n\n")[0],
        epilog="A and B: run directories or <run>/checkpoints/<step>. "
               "Exit status 0 identical, 1 different, 2 not comparable or error.")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--plot", type=Path, help="write a PNG of the divergence per step")
    args = parser.parse_args(argv)
    try:
        report = diff(args.a, args.b)
    except DiffError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_text(report))
    if args.plot and report["verdict"] == "different":
        plot_growth(report, args.plot)
    return {"identical": 0, "different": 1}.get(report["verdict"], 2)


if __name__ == "__main__":
    sys.exit(main())

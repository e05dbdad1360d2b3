"""The GPU check: determinism run to run, without the flags, GPU against CPU, and what
determinism costs, in one command that writes one JSON and one Markdown table.

    python -m jaxrepro.analysis.gpucheck OUT [--dry-run] [--models convnet minixception]
                     [--checks a b c d e] [--image-size 180] [--batch-size 32]
                     [--steps 20] [--budget-s 420] [--jobs N] [--work DIR]

`benchmarks/gpu_check.sh OUT` runs this on the GPU machine, after installing the
wheels `benchmarks/gpu_wheels.sh` fetched. Checks, per model, all from the same config
and seed:

  a  run to run: two fresh training processes with jaxrepro's flags. Bitwise equal? If
     not, the first divergent step and layer (`jaxrepro.analysis.diff`).
  b  the same without the XLA:GPU determinism flags (variant "gpu-nondeterministic"),
     and how far such a run ends from the deterministic one.
  c  GPU against CPU (`JAX_PLATFORMS=cpu`, the same config): the first divergent step
     and layer, the ULP distance of the probe logits at step 0 (from the same initial
     state on both), and the final distance.
  d  throughput of the deterministic and the non-deterministic mode
     (`jaxrepro.analysis.bench`, systems jax and jax-gpu-nondet) and their ratio.
  e  data-parallel invariant mode (`--config.microbatches=4`) on one GPU: run to run.

`--dry-run` runs every step on the CPU, by default at a small size, to test the check
itself. The checks that need a GPU (c) are skipped and listed as such; nothing a dry run
writes is a GPU result, and its files say so. Without `--dry-run`, a JAX backend that
is not a GPU is an error (exit 2).

Every run and comparison is a process of its own: one that fails is recorded with the
end of its log and the others go on (exit 1 at the end). A step that would start after
the time budget is skipped and listed. Written: OUT/gpu_check.json, OUT/gpu_check.md,
OUT/bench.json and OUT/bench.md (check d), and OUT/logs.tar.gz (each child's log and
each diff's JSON). The run directories, with their checkpoints, stay in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jaxrepro import cli, provenance
from jaxrepro.analysis import bench, variants
from jaxrepro.errors import UserError

CONFIGS = {"convnet": "experiments/convnet.py", "minixception": "experiments/minixception.py"}
CHECKS = {
    "a": "run to run, jaxrepro's flags",
    "b": "without the determinism flags",
    "c": "GPU against CPU",
    "d": "throughput, deterministic against not",
    "e": "data-parallel invariant mode, run to run",
}
GPU_ONLY = {"c": "needs a GPU: in a dry run both sides would be the CPU"}
# The order the checks run in when the budget may not reach them all: the issue's
# (a, b, c, d, e if time allows), with c before b, because c says what a GPU user most
# needs to know after a (how far a GPU run is from a CPU run).
PRIORITY = "acbde"
INVARIANT_MICROBATCHES = 4
# Sizes: the (180 px, batch 32, 20 steps) on a GPU; in a dry run, the smallest
# the ConvNet takes and few steps, so that the whole check runs in minutes on 2 cores.
SIZES = {False: (180, 32, 20), True: (80, 8, 4)}
# The time budget: on a GPU it leaves the 8 minutes' rest to the start, the wheels and
# the writing; a dry run on 2 cores takes about 15 minutes.
BUDGET_S = {False: 420.0, True: 1800.0}
BENCH_REPEATS = 3
BENCH_STEPS = 10  # timed training steps per repeat (at most; fewer if --steps is less)
BUDGET_SPENT = "time budget spent"
MIN_START_S = 15.0  # a step is not started with less time than this left
TAIL_CHARS = 2000


class GpuCheckError(UserError, RuntimeError):
    """A GPU check that cannot run here (no GPU without --dry-run, bad settings)."""


@dataclass(frozen=True)
class Run:
    """One training process: a model under a variant, on the default backend or the CPU."""

    name: str
    model: str
    variant: str = "default"
    cpu: bool = False  # JAX_PLATFORMS=cpu (check c's other side)
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pair:
    """One comparison of two runs, for one check."""

    check: str
    model: str
    label: str
    a: str
    b: str


@dataclass
class Plan:
    """What a check will do: its training runs, the pairs it compares, what it skips."""

    runs: list[Run] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def plan(models: Sequence[str], checks: Sequence[str], dry_run: bool) -> Plan:
    """The runs and comparisons of `checks` for `models`, model by model (`check` runs
    them in the order of `PRIORITY`); what a dry run cannot do goes to `skipped`."""
    p = Plan()
    runs: dict[str, Run] = {}

    def run(r: Run) -> str:
        runs.setdefault(r.name, r)
        return r.name

    for model in models:
        det = [run(Run(f"{model}-det-{i}", model)) for i in ((1, 2) if "a" in checks else (1,))]
        if "a" in checks:
            p.pairs.append(Pair("a", model, "det 1 vs det 2", *det))
        if "c" in checks:
            if dry_run:
                p.skipped.append(
                    {"what": f"c {model}", "status": "skipped", "reason": GPU_ONLY["c"]}
                )
            else:
                cpu = run(Run(f"{model}-cpu", model, cpu=True))
                p.pairs.append(Pair("c", model, "GPU vs CPU", det[0], cpu))
        if "b" in checks:
            nondet = [
                run(Run(f"{model}-nondet-{i}", model, variant="gpu-nondeterministic"))
                for i in (1, 2)
            ]
            p.pairs.append(Pair("b", model, "nondet 1 vs nondet 2", *nondet))
            p.pairs.append(Pair("b", model, "det 1 vs nondet 1", det[0], nondet[0]))
        if "e" in checks:
            micro = (f"microbatches={INVARIANT_MICROBATCHES}",)
            inv = [run(Run(f"{model}-invariant-{i}", model, overrides=micro)) for i in (1, 2)]
            p.pairs.append(Pair("e", model, "invariant 1 vs invariant 2", *inv))
    needed = {n for pair in p.pairs for n in (pair.a, pair.b)}
    p.runs = [r for name, r in runs.items() if name in needed]
    return p


def train_overrides(image_size: int, batch_size: int, steps: int) -> list[str]:
    """One epoch of `steps` batches, one validation batch, checkpoints (with their diff
    probes) at step 0, half way and at the end."""
    return [
        f"data.image_size={image_size}",
        f"data.num_train={steps * batch_size}",
        f"data.num_val={batch_size}",
        f"batch_size={batch_size}",
        f"eval_batch_size={batch_size}",
        "num_epochs=1",
        f"checkpoint_every_steps={max(1, steps // 2)}",
        "diff_probe_examples=1",
    ]


def child_env(
    base: Mapping[str, str], work: Path, variant: str = "default", cpu: bool = False
) -> dict[str, str]:
    """A child's environment: the check's data directory, GPU memory taken as needed
    (several processes share the GPU), a variant's flags, the CPU backend if asked."""
    env = {
        **base,
        "JAXREPRO_DATA_DIR": str(work / "data"),
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "PYTHONUNBUFFERED": "1",
    }
    env = variants.variant_env(variants.get_variant(variant), env)
    if cpu:
        env["JAX_PLATFORMS"] = "cpu"
    return env


@dataclass
class Clock:
    """The time budget: steps start only while enough of it is left."""

    budget_s: float
    start: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)


def run_process(
    command: Sequence[str],
    env: Mapping[str, str],
    log: Path,
    clock: Clock,
    stdout: Path | None = None,
    ok: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    """Run one child within the budget, its stderr (and its stdout, unless `stdout`
    names a file for it) in `log`; what happened. Exit codes in `ok` count as done."""
    if clock.left() < MIN_START_S:
        return {"status": "skipped", "reason": BUDGET_SPENT}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as err, (stdout or log).open("a") as out_file:
        try:
            rc = subprocess.run(
                list(command),
                env=dict(env),
                stdout=out_file,
                stderr=err,
                timeout=clock.left(),
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.monotonic() - start, 1)
    if rc is None:
        return {"status": "stopped", "seconds": seconds, "reason": BUDGET_SPENT}
    out = {"status": "done" if rc in ok else "error", "rc": rc, "seconds": seconds}
    if out["status"] == "error":
        out["reason"] = log.read_text(errors="replace")[-TAIL_CHARS:]
    return out


def train_command(r: Run, overrides: Sequence[str], work: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jaxrepro.train",
        CONFIGS[r.model],
        "--workdir",
        str(work / "runs" / r.name),
        "--overwrite",
        *cli.as_arguments([*overrides, *r.overrides]),
    ]


def summarize_diff(report: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a `jaxrepro.analysis.diff` report that the table shows."""
    if report.get("verdict") == "not comparable":
        return {"verdict": "not comparable"}
    layers = report.get("layers") or {}
    probed = {r["step"]: r for r in layers.get("probed_steps", [])}
    if layers.get("step") == 0:
        logits_ulp = (layers.get("forward") or {}).get("logits", {}).get("max_ulp")
    elif 0 in probed:
        logits_ulp = 0  # step 0's probes are bitwise equal, the logits among them
    else:
        logits_ulp = None
    growth = report.get("checkpoint_growth") or [{}]
    return {
        "verdict": report.get("verdict"),
        "initial_state_equal": probed.get(0, {}).get("state_equal"),
        "first_divergent_step": (report.get("first_divergence") or {}).get("step"),
        "first_layer_step": layers.get("step"),
        "first_forward": layers.get("first_forward"),
        "first_gradient": layers.get("first_gradient"),
        "logits_ulp_step0": logits_ulp,
        "final_max_ulp": growth[-1].get("max_ulp"),
        "final_max_rel": growth[-1].get("max_rel_diff"),
        "predictions_changed": (report.get("predictions") or {}).get("predictions_changed"),
        "environment_diff": sorted(report.get("environment_diff") or {}),
    }


def throughput(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per model, from a bench.json of systems jax and jax-gpu-nondet: the median
    training and inference images/s of each, and deterministic over non-deterministic."""
    out = []
    rows = {(r["model"], r["system"]): r for r in report.get("rows", [])}
    for model in dict.fromkeys(r["model"] for r in report.get("rows", [])):
        det, non = rows.get((model, "jax")), rows.get((model, "jax-gpu-nondet"))
        entry: dict[str, Any] = {"model": model}
        for name, r in (("deterministic", det), ("nondeterministic", non)):
            if r:
                entry[name] = {
                    "train_images_per_s": bench.summary(r["train_images_per_s"])["median"],
                    "infer_images_per_s": bench.summary(r["infer_images_per_s"])["median"],
                    "repeats_bitwise": r.get("repeats_bitwise"),
                }
        if det and non:
            entry["train_ratio"] = (
                entry["deterministic"]["train_images_per_s"]
                / entry["nondeterministic"]["train_images_per_s"]
            )
        out.append(entry)
    return out


# --------------------------------------------------------------------- the report


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    return f"{v:{spec}}" if spec else str(v)


def last_line(text: str | None) -> str:
    """The last non-empty line of a log tail (where a traceback names its error)."""
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "-"


def goals(result: Mapping[str, Any]) -> list[str]:
    """The issue's goals, each met, not met, or not measured."""
    if result["dry_run"]:
        return ["GPU goals: not measured (a dry run on the CPU)."]
    a = [c for c in result["checks"] if c["check"] == "a"]
    bitwise = [c.get("verdict") == "identical" for c in a if c["status"] == "done"]
    lines = [
        "bitwise run to run on the GPU, every model: "
        + ("not measured" if not bitwise else "met" if all(bitwise) else "NOT met")
    ]
    ratios = [t["train_ratio"] for t in result["throughput"] if "train_ratio" in t]
    lines.append(
        "deterministic mode at most 10% slower: "
        + ("not measured" if not ratios else "met" if min(ratios) >= 0.9 else "NOT met")
        + "".join(
            f" ({t['model']} {t['train_ratio']:.2f}x)"
            for t in result["throughput"]
            if "train_ratio" in t
        )
    )
    return lines


def markdown(result: Mapping[str, Any]) -> str:
    """gpu_check.md: provenance, where it ran, one row per comparison, throughput."""
    env = result.get("environment") or {}
    gpu = env.get("gpu") or {}
    s = result["settings"]
    lines = [provenance.markdown(result["provenance"]), ""]
    if result["dry_run"]:
        lines += [
            "**Dry run on the CPU: not a GPU result.** Every step ran on the CPU backend; "
            "the checks that need a GPU were skipped (below).",
            "",
        ]
    driver = (gpu.get("driver") or {}).get("driver")
    cuda = gpu.get("cuda") or {}
    lines += [
        f"Backend: {env.get('backend', '-')}, {env.get('device_kind', '-')} "
        f"x{env.get('device_count', '-')}; jax {(env.get('packages') or {}).get('jax', '-')}, "
        f"Python {env.get('python', '-')}"
        + (f"; driver {driver}" if driver else "")
        + (f"; CUDA runtime {cuda.get('cuda_runtime')}, cuDNN {cuda.get('cudnn')}" if cuda else ""),
        "",
        "XLA GPU flags of the deterministic runs: "
        f"`{' '.join(gpu.get('xla_gpu_flags', [])) or '-'}`",
        "",
        f"Settings: {s['image_size']}x{s['image_size']}, batch {s['batch_size']}, "
        f"{s['steps']} steps, seed of the experiment configs.",
        "",
        "| check | model | compared | bitwise | first divergent step | first layer "
        "(forward / gradient, at step) | logits ULP at step 0 | final max ULP | final max rel "
        "| predictions changed | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        if c["status"] != "done":
            lines.append(
                f"| {c['check']} | {c['model']} | {c['label']} | {c['status']} "
                "| - | - | - | - | - | - | - |"
            )
            continue
        layer = (
            f"{c['first_forward'] or '-'} / {c['first_gradient'] or '-'}, "
            f"at {c['first_layer_step']}"
            if c.get("first_layer_step") is not None
            else "-"
        )
        lines.append(
            f"| {c['check']} | {c['model']} | {c['label']} | "
            f"{_fmt(c.get('verdict') == 'identical')} | {_fmt(c.get('first_divergent_step'))} | "
            f"{layer} | {_fmt(c.get('logits_ulp_step0'))} | {_fmt(c.get('final_max_ulp'))} | "
            f"{_fmt(c.get('final_max_rel'), '.2e')} | {_fmt(c.get('predictions_changed'))} | "
            f"{_fmt(c.get('seconds'))} |"
        )
    if result["throughput"]:
        lines += [
            "",
            "| model | deterministic train img/s | non-deterministic train img/s | ratio "
            "| deterministic inference img/s | non-deterministic inference img/s |",
            "|---|---|---|---|---|---|",
        ]
        for t in result["throughput"]:
            d, n = t.get("deterministic", {}), t.get("nondeterministic", {})
            lines.append(
                f"| {t['model']} | {_fmt(d.get('train_images_per_s'), '.1f')} | "
                f"{_fmt(n.get('train_images_per_s'), '.1f')} | "
                f"{_fmt(t.get('train_ratio'), '.2f')}x | "
                f"{_fmt(d.get('infer_images_per_s'), '.1f')} | "
                f"{_fmt(n.get('infer_images_per_s'), '.1f')} |"
            )
    lines += ["", "Goals:", *(f"- {g}" for g in goals(result))]
    notes = [f"- {k['what']}: {k['status']}, {k['reason']}" for k in result["skipped"]] + [
        f"- {e['what']}: {e['status']}, {last_line(e.get('reason'))}" for e in result["errors"]
    ]
    if notes:
        lines += ["", "Skipped and failed steps (logs.tar.gz holds the logs):", *notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- the check


def probe(work: Path, clock: Clock) -> tuple[dict | None, dict]:
    """This machine's environment fingerprint, from a child (the driver itself never
    starts a JAX backend, so it holds no GPU memory)."""
    log = work / "logs" / "environment.log"
    code = (
        "import json, jaxrepro\nfrom jaxrepro import determinism\n"
        "print('FINGERPRINT ' + json.dumps(determinism.fingerprint()))"
    )
    status = run_process([sys.executable, "-c", code], child_env(os.environ, work), log, clock)
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("FINGERPRINT "):
            return json.loads(line.removeprefix("FINGERPRINT ")), status
    return None, status


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.gpucheck",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("out", type=Path, help="where the JSON, the table and the logs go")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, to test the check")
    parser.add_argument(
        "--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="default: both"
    )
    parser.add_argument(
        "--checks", nargs="+", choices=list(CHECKS), default=list(CHECKS), help="default: all"
    )
    parser.add_argument("--image-size", type=int, help="default 180 (dry run: 80)")
    parser.add_argument("--batch-size", type=int, help="default 32 (dry run: 8)")
    parser.add_argument("--steps", type=int, help="training steps per run; default 20 (dry run: 4)")
    parser.add_argument(
        "--budget-s", type=float, help="time budget in seconds; default 420 (dry run: 1800)"
    )
    parser.add_argument(
        "--jobs", type=int, help="processes at once; default 4 on a GPU, 1 in a dry run"
    )
    parser.add_argument(
        "--work", type=Path, help="run directories (default: a new folder under $TMPDIR)"
    )
    args = parser.parse_args(argv)
    size, batch, steps = SIZES[args.dry_run]
    args.image_size = args.image_size or size
    args.batch_size = args.batch_size or batch
    args.steps = args.steps or steps
    args.jobs = args.jobs or (1 if args.dry_run else 4)
    args.budget_s = args.budget_s or BUDGET_S[args.dry_run]
    for name in ("image_size", "batch_size", "steps", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_size < 78:
        parser.error("--image-size must be at least 78 (the ConvNet's smallest input)")
    if "e" in args.checks and args.batch_size % INVARIANT_MICROBATCHES:
        parser.error(f"check e needs a batch size divisible by {INVARIANT_MICROBATCHES}")
    return args


@dataclass
class Session:
    """What the steps of one check share: where they write, the budget, the settings,
    and the result they fill in."""

    work: Path
    clock: Clock
    overrides: list[str]
    jobs: int
    result: dict[str, Any]

    def log(self, name: str) -> Path:
        return self.work / "logs" / f"{name}.log"


def train(s: Session, r: Run) -> None:
    """One training process, recorded in the result."""
    print(f"training {r.name} ...", file=sys.stderr, flush=True)
    env = child_env(os.environ, s.work, r.variant, r.cpu)
    got = run_process(train_command(r, s.overrides, s.work), env, s.log(r.name), s.clock)
    s.result["runs"][r.name] = {"variant": r.variant, "cpu": r.cpu, **got}
    print(f"  {r.name}: {got['status']} {got.get('seconds', '')}", file=sys.stderr, flush=True)


def run_stage(s: Session, pairs: Sequence[Pair], runs: Mapping[str, Run]) -> None:
    """Train the runs of `pairs` in the pairs' order, `s.jobs` at a time, and compare
    each pair as soon as its two runs are done: if the budget runs out, the first pairs
    are complete. Comparisons have a pool of their own, so one waiting for its runs
    never holds up a training. The very first run of the check trains alone: it
    prepares the data set the others read."""
    names = list(dict.fromkeys(x for q in pairs for x in (q.a, q.b)))
    if names and not s.result["runs"]:
        train(s, runs[names[0]])
    with ThreadPoolExecutor(s.jobs) as trainers, ThreadPoolExecutor(s.jobs) as comparers:
        trained = {
            n: trainers.submit(train, s, runs[n]) for n in names if n not in s.result["runs"]
        }

        def compare_when_trained(pair: Pair) -> dict[str, Any]:
            wait([trained[n] for n in (pair.a, pair.b) if n in trained])
            return compare(s, pair)

        rows = [comparers.submit(compare_when_trained, q) for q in pairs]
        s.result["checks"] += [f.result() for f in rows]


def compare(s: Session, pair: Pair) -> dict[str, Any]:
    """One pair through `jaxrepro.analysis.diff`; the table's row."""
    row = {"check": pair.check, "model": pair.model, "label": pair.label}
    bad = [n for n in (pair.a, pair.b) if s.result["runs"][n]["status"] != "done"]
    if bad:
        return {**row, "status": "skipped", "reason": f"run {bad[0]} did not finish"}
    name = f"{pair.check}-{pair.a}-vs-{pair.b}"
    report_path = s.work / "diffs" / f"{name}.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    runs = [str(s.work / "runs" / n) for n in (pair.a, pair.b)]
    command = [sys.executable, "-m", "jaxrepro.analysis.diff", *runs, "--json"]
    # diff's exit status: 0 identical, 1 different (both findings), 2 an error.
    env = child_env(os.environ, s.work)
    got = run_process(command, env, s.log(name), s.clock, report_path, ok=(0, 1))
    if got["status"] == "done":
        got.update(summarize_diff(json.loads(report_path.read_text())))
    return {**row, **got}


def measure_throughput(
    s: Session, models: Sequence[str], image_size: int, batch_size: int, steps: int
) -> None:
    """Check d: `jaxrepro.analysis.bench` with and without the determinism flags."""
    settings = {
        "image-size": image_size,
        "batch-size": batch_size,
        "steps": min(steps, BENCH_STEPS),
        "repeats": BENCH_REPEATS,
    }
    command = [
        sys.executable,
        "-m",
        "jaxrepro.analysis.bench",
        *(CONFIGS[m] for m in models),
        "--systems",
        "jax",
        "jax-gpu-nondet",
        "--out",
        str(s.work / "bench"),
        *(a for k, v in settings.items() for a in (f"--{k}", str(v))),
    ]
    print("measuring throughput ...", file=sys.stderr, flush=True)
    got = run_process(command, child_env(os.environ, s.work), s.log("bench"), s.clock)
    bench_json = s.work / "bench" / "bench.json"
    if got["status"] == "done" and bench_json.exists():
        s.result["throughput"] = throughput(json.loads(bench_json.read_text()))
    s.result["bench"] = got


def check(args: argparse.Namespace, made_by: dict) -> dict[str, Any]:
    """Run the whole check; the result that gpu_check.json holds. Stages in the issue's
    order of priority: a, b and c (their runs side by side), then d, then e."""
    clock = Clock(args.budget_s)
    work = args.work or Path(tempfile.mkdtemp(prefix="jaxrepro-gpucheck-"))
    work.mkdir(parents=True, exist_ok=True)
    env, status = probe(work, clock)
    if env is None:
        raise GpuCheckError(f"cannot start jaxrepro here: {status.get('reason', status)}")
    if not args.dry_run and env["backend"] != "gpu":
        raise GpuCheckError(
            f"the JAX backend here is {env['backend']!r}, not a GPU; --dry-run runs the "
            "check on the CPU"
        )
    p = plan(args.models, args.checks, args.dry_run)
    result: dict[str, Any] = {
        "provenance": made_by,
        "dry_run": args.dry_run,
        "settings": {k: getattr(args, k) for k in ("image_size", "batch_size", "steps", "jobs")},
        "environment": env,
        "runs": {},
        "checks": [],
        "throughput": [],
        "skipped": list(p.skipped),
        "errors": [],
        "work": str(work),
    }
    s = Session(
        work,
        clock,
        train_overrides(args.image_size, args.batch_size, args.steps),
        args.jobs,
        result,
    )
    runs = {r.name: r for r in p.runs}
    ordered = sorted(p.pairs, key=lambda q: PRIORITY.index(q.check))
    run_stage(s, [q for q in ordered if q.check != "e"], runs)
    if "d" in args.checks:  # alone, so that nothing else runs while it times
        measure_throughput(s, args.models, args.image_size, args.batch_size, args.steps)
    run_stage(s, [q for q in ordered if q.check == "e"], runs)
    failures = [
        *((f"run {n}", r) for n, r in result["runs"].items()),
        *((f"{c['check']} {c['model']} {c['label']}", c) for c in result["checks"]),
        *([("d (bench)", result["bench"])] if "bench" in result else []),
    ]
    for what, r in failures:
        if r["status"] == "error":
            result["errors"].append({"what": what, **r})
        elif r.get("reason") == BUDGET_SPENT:
            result["skipped"].append({"what": what, "status": r["status"], "reason": BUDGET_SPENT})
    result["seconds"] = round(clock.budget_s - clock.left(), 1)
    return result


def write(result: Mapping[str, Any], out: Path) -> list[Path]:
    """gpu_check.json, gpu_check.md, the bench's files and logs.tar.gz, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(result["work"])
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(result))
    written = [out / "gpu_check.json", out / "gpu_check.md"]
    for name in ("bench.json", "bench.md"):
        if (work / "bench" / name).exists():
            (out / name).write_bytes((work / "bench" / name).read_bytes())
            written.append(out / name)
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for folder in ("logs", "diffs"):
            if (work / folder).exists():
                tar.add(work / folder, arcname=folder)
        for run in sorted((work / "runs").glob("*")) if (work / "runs").exists() else []:
            for name in ("environment.jsonl", "config.json", "final.json", "report.md"):
                if (run / name).exists():
                    tar.add(run / name, arcname=f"runs/{run.name}/{name}")
    written.append(out / "logs.tar.gz")
    return written


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: run the check, write and print the table; 1 if a step failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    made_by = provenance.record("python -m jaxrepro.analysis.gpucheck", argv)
    result = check(args, made_by)
    written = write(result, args.out)
    print(markdown(result))
    print("written: " + ", ".join(str(p) for p in written))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

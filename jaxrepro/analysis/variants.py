"""Train one experiment under several CPU "device variants" and diff each against the first.

    python -m jaxrepro.analysis.variants CONFIG_FILE... [--variants default,one-core,cpu:Haswell]
                                         [--modes machine,portable] [--explain N]
                                         [--out DIR] [--config.KEY=VALUE ...]

Cross-device differences can be produced on one CPU machine: another XLA:CPU code
path, another number of cores, op-by-op execution, or another CPU altogether:
`cpu:<model>` runs the process under `qemu-x86_64 -cpu <model>` (Debian package
`qemu-user`), an emulated CPU of that model's vendor, ISA and cache sizes (QEMU 7.2
emulates up to AVX2, so an AVX-512 model runs without AVX-512). Each variant trains the
configs in a process of its own (XLA reads its flags once, at start), for each
determinism mode, into DIR/<mode>/<variant>/<experiment>; then `jaxrepro.analysis.diff`
compares every variant with the first one. The table says which variants keep the bits
(and, with --explain, the heatmaps), where the others first part (step and layer), and
how far apart they end. Written to DIR/variants.md and DIR/variants.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from jaxrepro import cli, determinism, provenance
from jaxrepro import config as configlib
from jaxrepro import data as datalib
from jaxrepro.analysis import diff as difflib
from jaxrepro.analysis import train_configs
from jaxrepro.errors import UserError


@dataclass(frozen=True)
class Variant:
    """How one variant's training process differs from a plain run."""

    description: str
    xla_flags: str = ""  # appended to XLA_FLAGS
    env: Mapping[str, str] = field(default_factory=dict)
    cpus: int | None = None  # restrict the process to its first N CPUs
    prefix: tuple[str, ...] = ()  # the command the interpreter runs under (an emulator)


VARIANTS: dict[str, Variant] = {
    "default": Variant("jaxrepro's defaults"),
    "ynn": Variant(
        "XLA:CPU YNNPACK fusions for elementwise ops too (jaxrepro's default "
        "is dots and reductions)",
        xla_flags="--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    ),
    # A sign-prefixed list keeps XLA's own default list, convolutions in YNNPACK (the
    # `+dot` entry leaves both models' steps' bits as with no flag at all, measured).
    "ynn-convs": Variant(
        "XLA:CPU's default YNNPACK use, convolutions included",
        xla_flags="--xla_cpu_experimental_ynn_fusion_type=+dot",
    ),
    # XLA:GPU's default: its fastest kernels, some of them racy (atomics in scatter and
    # reductions, autotuned convolution algorithms). The flags are parsed on every
    # backend and change nothing on a CPU.
    "gpu-nondeterministic": Variant(
        "XLA:GPU without jaxrepro's determinism flags (no effect on a CPU)",
        xla_flags=" ".join(determinism.GPU_NONDETERMINISTIC_FLAGS),
    ),
    "avx2": Variant(
        "XLA:CPU code generated for AVX2 (with FMA) instead of AVX",
        xla_flags="--xla_cpu_max_isa=AVX2",
    ),
    "eigen-single-thread": Variant(
        "Eigen kernels single-threaded", xla_flags="--xla_cpu_multi_thread_eigen=false"
    ),
    "one-core": Variant(
        "the process may use one CPU core (affinity), so XLA's intra-op thread pool has one thread",
        cpus=1,
    ),
    "no-jit": Variant(
        "op-by-op execution (JAX_DISABLE_JIT=1): no fusion across ops", env={"JAX_DISABLE_JIT": "1"}
    ),
}


EMULATOR = "qemu-x86_64"
CPU_PREFIX = "cpu:"


class VariantError(UserError, ValueError):
    """A variant list that cannot run."""


def emulated_cpus() -> list[str]:
    """The CPU models `qemu-x86_64 -cpu` knows (VariantError if it is not installed)."""
    if shutil.which(EMULATOR) is None:
        raise VariantError(
            f"{EMULATOR} is not installed: the cpu:<model> variants run the "
            "process on an emulated CPU; install it with "
            "`apt-get install qemu-user` (Debian, Ubuntu)"
        )
    # `-cpu help` prints the list and exits 1 (QEMU 7.2)
    listing = subprocess.run(
        [EMULATOR, "-cpu", "help"], capture_output=True, text=True, check=False, timeout=60
    ).stdout
    return [
        line.split()[1]
        for line in listing.splitlines()
        if line.startswith("x86 ") and len(line.split()) > 1
    ]


def get_variant(name: str) -> Variant:
    """The variant called `name`: a `VARIANTS` entry or `cpu:<qemu CPU model>`."""
    if name.startswith(CPU_PREFIX):
        model = name[len(CPU_PREFIX) :]
        known = emulated_cpus()
        if model not in known:
            raise VariantError(
                f"unknown CPU model {model!r} for {EMULATOR}; e.g. "
                f"{', '.join(m for m in known if '-' not in m)}"
            )
        return Variant(
            f"the process on an emulated {model} CPU ({EMULATOR} -cpu {model})",
            prefix=(EMULATOR, "-cpu", model),
        )
    if name not in VARIANTS:
        raise VariantError(
            f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}, "
            f"{CPU_PREFIX}<model> (an emulated CPU, e.g. cpu:Haswell)"
        )
    return VARIANTS[name]


def variant_env(variant: Variant, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a variant's process, from `base` (usually os.environ)."""
    env = {**base, **variant.env}
    if variant.xla_flags:
        # A flag the variant sets replaces any value of it in `base` (the parent's
        # XLA_FLAGS already hold jaxrepro's own): XLA would otherwise apply both, and
        # a sign-prefixed list such as `+dot` would edit jaxrepro's list, not XLA's.
        named = {f.split("=")[0] for f in variant.xla_flags.split()}
        kept = [f for f in base.get("XLA_FLAGS", "").split() if f.split("=")[0] not in named]
        env["XLA_FLAGS"] = " ".join([*kept, *variant.xla_flags.split()])
    return env


def run_variant(
    name: str,
    config_files: Sequence[str],
    overrides: Sequence[str],
    out: Path,
    progress: bool,
    explain_images: int = 0,
    explain_methods: Sequence[str] = (),
) -> None:
    """Train every config under variant `name` into `out/<experiment>`, in one process
    (`jaxrepro.analysis.train_configs`: the start-up is paid once). The child takes its
    determinism mode from the configs (and `overrides`), never from this process's
    `$JAXREPRO_DETERMINISM`."""
    variant = get_variant(name)
    env = variant_env(variant, os.environ)
    env.pop(determinism.ENV_VARIABLE, None)
    cli.run_child(
        "jaxrepro.analysis.train_configs",
        [
            str(out),
            *config_files,
            *cli.as_arguments(overrides),
            *([f"--explain={explain_images}"] if explain_images else []),
            *([f"--explain-methods={','.join(explain_methods)}"] if explain_methods else []),
            *([] if progress else ["--no-progress"]),
        ],
        prefix=variant.prefix,
        env=env,
        cpus=variant.cpus,
        capture=False,
        what=f"variant {name}",
    )


def explanations_differing(a: Path, b: Path) -> list[str] | None:
    """The methods whose heatmaps (`train_configs.EXPLANATIONS`) differ in any bit
    between runs `a` and `b`; None if either run has none."""
    fa, fb = a / train_configs.EXPLANATIONS, b / train_configs.EXPLANATIONS
    if not (fa.exists() and fb.exists()):
        return None
    with np.load(fa, allow_pickle=False) as ea, np.load(fb, allow_pickle=False) as eb:
        methods = sorted(set(ea.files) | set(eb.files))
        return [
            m
            for m in methods
            if m not in ea.files
            or m not in eb.files
            or ea[m].shape != eb[m].shape
            or ea[m].tobytes() != eb[m].tobytes()
        ]


def summarize(
    name: str, report: dict, experiment: str = "", mode: str = "", explanations=None
) -> dict:
    """One row of the table from a diff report against the baseline (and the methods
    whose explanations differ, from `explanations_differing`)."""
    layers = report.get("layers") or {}
    pred = report.get("predictions") or {}
    growth = report.get("checkpoint_growth") or []
    return {
        "mode": mode,
        "experiment": experiment,
        "variant": name,
        "description": get_variant(name).description,
        "verdict": report["verdict"],
        "first_divergent_step": (report.get("first_divergence") or {}).get("step"),
        "first_divergent_leaves": (report.get("first_divergence") or {}).get("leaves"),
        "probe_step": layers.get("step"),
        "state_equal_at_probe": layers.get("state_equal"),
        "first_forward_layer": layers.get("first_forward"),
        "first_gradient_layer": layers.get("first_gradient"),
        "final_max_ulp": growth[-1]["max_ulp"] if growth else None,
        "final_max_rel_diff": growth[-1]["max_rel_diff"] if growth else None,
        "val_accuracy": pred.get("accuracy_b"),
        "predictions_changed": pred.get("predictions_changed"),
        "explanations_differing": explanations,
    }


def _cell(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], baseline: str) -> str:
    """A Markdown table of `summarize` rows."""
    lines = [
        f"| mode | experiment | variant | bits vs {baseline} | first divergent step | first "
        "layer that differs (forward / gradient @ checkpoint) | final max ULP | val acc | "
        "predictions changed | explanations |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = "-"
        if r["probe_step"] is not None:
            where = (
                f"{r['first_forward_layer'] or 'none'} / "
                f"{r['first_gradient_layer'] or 'none'} @ {r['probe_step']}"
                + (" (states already differ)" if r["state_equal_at_probe"] is False else "")
            )
        step = _cell(r["first_divergent_step"])
        if r.get("first_divergent_leaves"):
            leaves = r["first_divergent_leaves"]
            step += f" ({len(leaves)} leaves, e.g. {leaves[0]})"
        differing = r.get("explanations_differing")
        explained = (
            "-"
            if differing is None
            else ("identical" if not differing else "differ: " + ", ".join(differing))
        )
        lines.append(
            f"| {r['mode']} | {r['experiment']} | {r['variant']} | {r['verdict']} | {step} | "
            f"{where} | {_cell(r['final_max_ulp'])} | {_cell(r['val_accuracy'], '.4f')} | "
            f"{_cell(r['predictions_changed'])} | {explained} |"
        )
    return "\n".join(lines)


def check_names(names: Sequence[str]) -> None:
    """Raise VariantError unless there are two or more names, all known."""
    if len(names) < 2:
        raise VariantError(
            f"give two or more variants; valid variants: {', '.join(VARIANTS)}, {CPU_PREFIX}<model>"
        )
    for name in names:
        get_variant(name)


def compare_variants(
    config_files: Sequence[str],
    overrides: Sequence[str],
    names: Sequence[str],
    out: Path,
    modes: Sequence[str | None] = (None,),
    progress: bool = True,
    made_by: dict | None = None,
    explain_images: int = 0,
    jobs: int = 1,
    explain_methods: Sequence[str] = (),
) -> list[dict]:
    """Train every config under every variant in every mode (None: the configs' own)
    into `out/<mode>/<variant>/<experiment>`, diff each against the first variant of its
    mode; write variants.md and variants.json (with `made_by`, the provenance); the rows.

    `explain_images`: every run also explains that many validation images with every
    method (or `explain_methods`), and the rows say which methods' heatmaps differ from
    the baseline's. `jobs`: how many variants' processes run at once (the bits do not
    depend on it; an emulated CPU's process mostly waits on one core)."""
    check_names(names)
    rows = []
    for mode in modes:
        mode_overrides = [*overrides, *([f"determinism={mode}"] if mode else [])]
        configs = [configlib.resolve(f, mode_overrides) for f in config_files]
        experiments = [c.experiment for c in configs]
        for c in configs:  # ready before the variants' processes start side by side
            datalib.prepare_config_data(c.data)
        label = mode or configlib.resolve(config_files[0], overrides).get("determinism", "")
        base = out / label
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            running = []
            for name in names:
                print(
                    f"== {label}, variant {name}: {get_variant(name).description}", file=sys.stderr
                )
                running.append(
                    pool.submit(
                        run_variant,
                        name,
                        config_files,
                        mode_overrides,
                        base / name,
                        progress,
                        explain_images,
                        explain_methods,
                    )
                )
            for done in running:
                done.result()
        rows += [
            summarize(
                name,
                difflib.diff(base / names[0] / e, base / name / e),
                e,
                label,
                explanations_differing(base / names[0] / e, base / name / e),
            )
            for e in experiments
            for name in names[1:]
        ]
    head = provenance.markdown(made_by) + "\n" if made_by else ""
    (out / "variants.md").write_text(head + table(rows, names[0]) + "\n")
    (out / "variants.json").write_text(
        json.dumps(
            {
                "provenance": made_by,
                "baseline": names[0],
                "config_files": list(config_files),
                "overrides": list(overrides),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    return rows


@cli.guarded
def main(argv: Sequence[str] | None = None) -> int:
    """CLI; exit 0 when every variant ran (whatever their bits), 2 on errors."""
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = cli.split_overrides(argv)
    parser = cli.parser(
        prog="python -m jaxrepro.analysis.variants",
        description=__doc__.split("\n\n")[0],
        epilog="Variants:\n"
        + "\n".join(f"  {k:20s} {v.description}" for k, v in VARIANTS.items())
        + f"\n  {CPU_PREFIX + '<model>':20s} the process on an emulated CPU (qemu-x86_64 -cpu "
        "<model>; `qemu-x86_64 -cpu help` lists the models)"
        + "\n\n--config.KEY=VALUE overrides go to every run. Each variant trains the whole "
        "config (no-jit and emulated CPUs are many times slower), so a short run is usually "
        "what you want:\n"
        "  python -m jaxrepro.analysis.variants experiments/convnet.py:tiny "
        "experiments/minixception.py:tiny \\\n"
        "    --variants default,one-core,cpu:Haswell --modes machine,portable --out /tmp/v",
    )
    parser.add_argument(
        "configs",
        nargs="+",
        metavar="CONFIG_FILE",
        help="experiment configs, e.g. experiments/convnet.py (Python; "
        "executed); every variant trains them all in one process",
    )
    parser.add_argument(
        "--variants",
        default="default,ynn,one-core,no-jit",
        help="comma-separated; the first is the baseline (default: %(default)s)",
    )
    parser.add_argument(
        "--modes",
        default="",
        help="comma-separated determinism modes to run every variant in "
        "(default: the configs' own)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("checkpoints/variants"),
        help="directory for the runs and the table (default: %(default)s)",
    )
    parser.add_argument(
        "--explain",
        type=int,
        default=0,
        metavar="N",
        help="every run also explains its first N validation images with every method; "
        "the table says which methods' heatmaps differ",
    )
    parser.add_argument(
        "--explain-methods",
        default="",
        help="comma-separated methods for --explain (default: all)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N variants' processes at once (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(rest)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()] or [None]
    check_names(names)
    for mode in modes:
        if mode is not None:
            determinism.check_mode(mode)
    explain_methods = [m.strip() for m in args.explain_methods.split(",") if m.strip()]
    train_configs.check_methods(explain_methods)
    for config_file in args.configs:  # a bad file or key fails here, not in a child
        configlib.resolve(config_file, overrides)
    made_by = provenance.record("python -m jaxrepro.analysis.variants", argv)
    rows = compare_variants(
        args.configs,
        overrides,
        names,
        args.out,
        modes,
        not args.no_progress,
        made_by,
        args.explain,
        args.jobs,
        explain_methods,
    )
    print(table(rows, names[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

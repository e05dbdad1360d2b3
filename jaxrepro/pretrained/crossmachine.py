"""The paper's cross-machine claim for the ImageNet networks, measured on CPU variants.

    python -m jaxrepro.pretrained variants RUN IMAGE... [--variants default,one-core,cpu:EPYC-Rome]
                                           [--modes machine,portable] [--methods gradcam]
                                           [--out DIR]

The paper reports its pretrained networks' inference as the same on all five machines,
while its Table 1 shows probabilities that part from the fifth decimal. Here the same
imported network, weights and images run under each CPU variant of
`jaxrepro.analysis.variants` (other XLA:CPU code paths, one core, an emulated CPU under
`qemu-x86_64 -cpu MODEL`), each in a process of its own and in each determinism mode
(`predict`: logits, probabilities and heatmaps to an `.npz`); then every variant is
compared with the first, bit for bit. The table (DIR/crossmachine.md, .json) says which
arrays keep their bits, the largest probability difference and whether the top-5 lists
agree, like the paper's Table 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from jaxrepro import cli, determinism, models, numerics, provenance
from jaxrepro.analysis import variants as variantlib
from jaxrepro.errors import UserError
from jaxrepro.explain import METHODS, explain
from jaxrepro.explain.inputs import read_image
from jaxrepro.explain.prediction import logits
from jaxrepro.models import imagenet
from jaxrepro.train import rundir

PREDICTIONS = "predictions.npz"


def predict(
    run: str | Path, images: Sequence[str | Path], out: str | Path, methods: Sequence[str]
) -> None:
    """Logits, float32 probabilities and each method's heatmaps of `images` (one at a
    time, as the explain CLI) to `out` (.npz), in this process's determinism mode (in
    portable mode with its convolutions and dense products)."""
    trained = rundir.load(run, take_mode=False)
    # the model as this process's mode builds it, whatever mode the import recorded
    mode_config = {**trained.config.to_dict(), "determinism": determinism.mode()}
    model = models.get_spec(trained.config.model).build(mode_config)
    size = trained.image_size
    batch = np.stack([read_image(p, size).pixels for p in images]).astype(np.float32)
    rows = np.stack([np.asarray(logits(model, trained.variables, x[None]))[0] for x in batch])
    arrays: dict[str, np.ndarray] = {"logits": rows, "probabilities": imagenet.softmax(rows)}
    top = np.argmax(rows, axis=1)
    for method in methods:
        arrays[method] = np.stack(
            [
                np.asarray(explain(method, model, trained.variables, x[None], target=int(t)))[0]
                for x, t in zip(batch, top)
            ]
        )
    np.savez(out, **arrays)


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Bitwise and ULP comparison of two variants' predictions (one table row)."""
    with np.load(a, allow_pickle=False) as pa, np.load(b, allow_pickle=False) as pb:
        row: dict[str, Any] = {}
        for name in pa.files:
            d = numerics.array_diff(pa[name], pb[name])
            row[name] = {"equal": d.equal, "max_abs": d.max_abs, "max_ulp": d.max_ulp}
        pa_top = np.argsort(-pa["probabilities"], axis=1, kind="stable")[:, :5]
        pb_top = np.argsort(-pb["probabilities"], axis=1, kind="stable")[:, :5]
        row["top5_equal"] = bool(np.array_equal(pa_top, pb_top))
        row["max_probability_difference"] = float(
            np.abs(pa["probabilities"].astype(np.float64) - pb["probabilities"]).max()
        )
    return row


def table(rows: list[dict], baseline: str) -> str:
    """The Markdown table of `rows` against `baseline`."""
    arrays = [k for k in rows[0]["diff"] if isinstance(rows[0]["diff"][k], dict)] if rows else []
    head = ["mode", "variant", *(f"{k} bits" for k in arrays), "max |dp|", "top-5 equal"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        d = r["diff"]
        cells = [
            r["mode"],
            r["variant"],
            *("equal" if d[k]["equal"] else f"differ ({d[k]['max_ulp']} ulp)" for k in arrays),
            f"{d['max_probability_difference']:.3g}",
            "yes" if d["top5_equal"] else "no",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return f"Baseline: variant {baseline} of each mode.\n\n" + "\n".join(lines)


def run_variants(
    run: str | Path,
    images: Sequence[str],
    names: Sequence[str],
    modes: Sequence[str],
    methods: Sequence[str],
    out: Path,
    jobs: int = 1,
    made_by: dict | None = None,
) -> list[dict]:
    """Predict under every variant and mode into OUT/<mode>/<variant>/, compare, write
    the table; the rows."""
    variantlib.check_names(names)

    def one(mode: str, name: str) -> None:
        variant = variantlib.get_variant(name)
        env = variantlib.variant_env(variant, os.environ)
        env[determinism.ENV_VARIABLE] = mode
        where = out / mode / name
        where.mkdir(parents=True, exist_ok=True)
        cli.run_child(
            "jaxrepro.pretrained",
            [
                "predict",
                str(run),
                *map(str, images),
                "--out",
                str(where / PREDICTIONS),
                *([f"--methods={','.join(methods)}"] if methods else []),
            ],
            prefix=variant.prefix,
            env=env,
            cpus=variant.cpus,
            what=f"variant {name} ({mode})",
        )

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for future in [pool.submit(one, m, n) for m in modes for n in names]:
            future.result()
    rows = [
        {
            "mode": mode,
            "variant": name,
            "diff": compare(out / mode / names[0] / PREDICTIONS, out / mode / name / PREDICTIONS),
        }
        for mode in modes
        for name in names[1:]
    ]
    head = provenance.markdown(made_by) + "\n" if made_by else ""
    (out / "crossmachine.md").write_text(head + table(rows, names[0]) + "\n")
    record = {"provenance": made_by, "run": str(run), "images": list(map(str, images))}
    (out / "crossmachine.json").write_text(
        json.dumps({**record, "baseline": names[0], "rows": rows}, indent=2) + "\n"
    )
    return rows


class CrossMachineError(UserError, ValueError):
    """Arguments the cross-machine measurement cannot run with."""


def check_methods(methods: Sequence[str]) -> None:
    """Raise CrossMachineError unless every method is a known one."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CrossMachineError(f"unknown methods {unknown}; valid: {sorted(METHODS)}")


def main_predict(args: Any) -> int:
    """The `predict` subcommand (a variant's process)."""
    methods = [m for m in args.methods.split(",") if m]
    check_methods(methods)
    predict(args.run, args.images, args.out, methods)
    return 0


def main_variants(args: Any, argv: Sequence[str]) -> int:
    """The `variants` subcommand."""
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    methods = [m for m in args.methods.split(",") if m]
    check_methods(methods)
    for mode in modes:
        if mode not in ("machine", "portable"):
            raise CrossMachineError(f"unknown mode {mode!r}; valid: machine, portable")
    rows = run_variants(
        args.run,
        args.images,
        names,
        modes,
        methods,
        args.out,
        args.jobs,
        provenance.record("python -m jaxrepro.pretrained", argv),
    )
    print((args.out / "crossmachine.md").read_text())
    return 0 if rows is not None else 1

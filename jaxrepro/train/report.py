"""A readable report of one run: curves (PNG) and a Markdown summary.

The curves follow the paper's figures of training and validation accuracy and loss
per epoch. The summary puts the final metrics next to what proves the run's
bits: the final state SHA-256, the data and epoch-order fingerprints and the
environment the run ran in. Two runs with the same bits print the same hashes.
"""

from __future__ import annotations

import json
from pathlib import Path

# The figure without pyplot: files only, no display, and a third of pyplot's import time
# (which every training process pays).
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from jaxrepro.records import read_jsonl
from jaxrepro.train.rundir import RunDir


def plot_curves(epochs: list[dict], title: str, path: Path) -> None:
    """Training/validation accuracy and loss per epoch, side by side."""
    x = [r["epoch"] for r in epochs]
    fig = Figure(figsize=(10, 4))
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, key, label in ((ax_acc, "accuracy", "Accuracy"), (ax_loss, "loss", "Loss")):
        ax.plot(x, [r[f"train_{key}"] for r in epochs], "o-", label=f"Training {key}")
        ax.plot(x, [r[f"val_{key}"] for r in epochs], "s--", label=f"Validation {key}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write(workdir: str | Path) -> Path:
    """Write curves.png and report.md into a run directory; returns the report path."""
    run = RunDir(workdir)
    config = json.loads(run.config.read_text())
    final = json.loads(run.final.read_text())
    epochs = read_jsonl(run.metrics)
    envs = read_jsonl(run.environment)
    timing = read_jsonl(run.timing)
    data = json.loads(run.data.read_text())
    name = config["experiment"]
    if config["model"] != name:
        name += f" ({config['model']})"
    title = f"{name}, seed {config['seed']}"
    if epochs:
        plot_curves(epochs, title, run.curves)

    lines = [f"# Run report: {title}", ""]
    if epochs:
        last = epochs[-1]
        lines += [
            "## Final metrics",
            "",
            f"- epochs: {last['epoch']}, steps: {final['step']}",
            f"- training accuracy {last['train_accuracy']:.4f}, loss {last['train_loss']:.4f}",
            f"- validation accuracy {last['val_accuracy']:.4f}, loss {last['val_loss']:.4f}",
            "",
            "![curves](curves.png)",
            "",
            "| epoch | train loss | train acc | val loss | val acc | state fingerprint |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_accuracy']:.4f} | "
            f"{r['val_loss']:.4f} | {r['val_accuracy']:.4f} | `{r['state'][:16]}` |"
            for r in epochs
        ]
        lines.append("")
    pc = final.get("param_count", {})
    lines += [
        "## Bits",
        "",
        "Two runs are bitwise identical when these hashes agree "
        "(`final.json` lists one SHA-256 per leaf).",
        "",
        f"- final state SHA-256 (params, batch stats, optimizer): `{final['final_state_sha256']}`",
        f"- last per-step fingerprint: `{final['last_step_fingerprint']}`",
        f"- config SHA-256: `{final['config_hash']}`",
        f"- training data: `{data['train']}`",
        f"- validation data: `{data['validation']}`",
        f"- epoch order ({config['num_epochs']} epochs): `{data['epoch_order']}`",
        f"- parameters: {pc.get('trainable', '?'):,} trainable, {pc.get('total', '?'):,} in total",
        "",
    ]
    if timing:
        ips = [t["images_per_second"] for t in timing]
        lines += [
            "## Speed (wall clock; not part of the bits)",
            "",
            f"- training images/s per epoch: {', '.join(f'{v:.1f}' for v in ips)} "
            "(the first epoch includes compilation)",
            "",
        ]
    if envs:
        env = envs[-1]
        lines += [
            "## Environment",
            "",
            f"- Python {env['python']}, {env['platform']}",
            f"- backend {env['backend']}, device {env['device_kind']} "
            f"x{env['device_count']}, CPU {env['cpu']['model']} "
            f"({env['cpu']['machine']}, {len(env['cpu']['flags'])} flags)",
            f"- threads: {env['threads']}",
            f"- XLA_FLAGS: `{env['xla_flags']}`",
            f"- JAX config: {env['jax_config']}",
            "- packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()),
            f"- started {len(envs)} time(s), at steps {[e['start_step'] for e in envs]}",
            "",
        ]
    run.report.write_text("\n".join(lines))
    return run.report

"""The package's structure: layers import downwards only, no cycles, no hidden imports.

Layers, bottom up: the core (determinism, rng, config, fingerprint, records, numerics,
cli, errors, timing, native), then data and models (side by side), training, explanations,
analysis, and the pretrained networks' import (which uses them all). `tfref` (the
TensorFlow side) imports only the core, the data pipeline and itself
(tests/test_tfref.py). Read from the source, as imports are written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "jaxrepro"
LAYERS = {"data": 1, "models": 1, "train": 2, "explain": 3, "analysis": 4, "pretrained": 5}
# Function-level imports are allowed only where a process must not load a framework yet:
# TensorFlow on the TF side (after its recipe is applied), JAX before its XLA flags are set.
LAZY_ALLOWED = {
    "jaxrepro/determinism.py": {"jax", "jax._src"},
    "jaxrepro/allocator.py": {"jax.monitoring"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(jaxrepro module imported, whether at module level) of one file."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    top |= {id(n) for node in tree.body if isinstance(node, ast.If) for n in node.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = []
            for a in node.names:
                full = f"{node.module}.{a.name}"
                names.append(full if full in MODULES else node.module)
        else:
            continue
        out += [(n, id(node) in top) for n in names]
    return out


def internal(name: str) -> bool:
    return name == "jaxrepro" or name.startswith("jaxrepro.")


def layer(name: str) -> tuple[str, int]:
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1], LAYERS[parts[1]]
    if len(parts) > 1 and parts[1] == "tfref":
        return "tfref", 0
    return "core", 0


GRAPH = {
    name: sorted({n for n, _ in imports(path) if internal(n) and n != name})
    for name, path in MODULES.items()
}


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in GRAPH.get(node, []):
            if state.get(nxt) == 1:
                raise AssertionError(
                    "import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt])
                )
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in GRAPH:
        if name not in state:
            visit(name)


def test_layers_import_downwards_only():
    offenders = []
    for name, targets in GRAPH.items():
        own, rank = layer(name)
        for target in targets:
            other, other_rank = layer(target)
            if own == "tfref" or other == own or other == "core":
                continue
            if other == "tfref":
                # JAX-side tools may use the neutral exchange modules, never the TF side
                if target.split(".")[-1] not in ("weights", "transfer", "process"):
                    offenders.append(f"{name} -> {target}")
            elif other_rank >= rank:
                offenders.append(f"{name} -> {target}")
    assert offenders == []


def test_the_core_imports_no_layer_above_it():
    core = [n for n in GRAPH if layer(n)[0] == "core"]
    assert {"jaxrepro.numerics", "jaxrepro.cli", "jaxrepro.determinism"} <= set(core)
    above = [f"{n} -> {t}" for n in core for t in GRAPH[n] if layer(t)[0] != "core"]
    assert above == []


def test_no_module_imports_a_main():
    assert [f"{n} -> {t}" for n, ts in GRAPH.items() for t in ts if t.endswith("__main__")] == []


def test_imports_are_at_module_level_except_where_a_framework_must_wait():
    lazy = []
    for name, path in MODULES.items():
        rel = str(path.relative_to(ROOT))
        if layer(name)[0] == "tfref":
            continue  # the TF side imports TensorFlow after applying its recipe
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if module not in LAZY_ALLOWED.get(rel, set()):
                    lazy.append(f"{rel}:{node.lineno}: {module}")
    assert lazy == []


@pytest.mark.parametrize(
    "name", ["jaxrepro.train", "jaxrepro.analysis.diff", "jaxrepro.explain.gradcam"]
)
def test_the_checker_sees_real_edges(name):
    """Controls: the graph above is not empty by accident."""
    assert GRAPH[name], name
    assert "jaxrepro.train.steps" in GRAPH["jaxrepro.train.parallel"]
    assert "jaxrepro.models" in GRAPH["jaxrepro.explain.gradcam"]

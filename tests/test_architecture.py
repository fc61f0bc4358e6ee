"""The layout rules of issue 15, checked on the source (no TensorFlow): no import cycles between the
project's modules, and no module reaching into another one's private (underscore) names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "shared"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(path): ast.parse(path.read_text(encoding="utf-8")) for path in PACKAGE.rglob("*.py")}


def _imported(node: ast.AST, known: set[str]) -> list[tuple[str, str | None]]:
    """(module, name or None) pairs an import statement brings in, for the project's modules."""
    found = []
    if isinstance(node, ast.Import):
        found = [(alias.name, None) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        for alias in node.names:
            submodule = f"{node.module}.{alias.name}"
            found.append((submodule, None) if submodule in known else (node.module, alias.name))
    return [(module, name) for module, name in found if module in known]


def _top_level_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Modules imported when the module is imported (not those imported inside functions, on call)."""
    modules = set()
    for node in tree.body:
        for inner in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            modules |= {module for module, _ in _imported(inner, known)}
    return modules


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycles_between_modules():
    modules = _modules()
    known = set(modules)
    # a package's __init__ importing its own submodules is how a package exposes them, not a cycle
    graph = {name: {m for m in _top_level_imports(tree, known) if not name.startswith(m + ".")}
             for name, tree in modules.items()}
    assert _cycles(graph) == []


def test_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


# Existing uses, to go when the owners of tflite.py / augment.py give these a public name (issue 15).
def test_no_module_uses_another_modules_private_names():
    modules = _modules()
    known = set(modules)
    reaching = []
    for name, tree in modules.items():
        aliases = {}
        for node in ast.walk(tree):
            for module, imported in _imported(node, known):
                if imported and imported.startswith("_") and not imported.startswith("__") and module != name:
                    reaching.append(f"{name}: from {module} import {imported}")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    full = alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                    if full in known and full != name:
                        aliases[alias.asname or alias.name.split(".")[-1]] = full
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                reaching.append(f"{name}: {aliases[node.value.id]}.{node.attr}")
    assert sorted(reaching) == []


@pytest.mark.slow
def test_training_leaves_the_callers_config_unchanged(tmp_path):
    import copy

    from shared.config import load_config
    from shared.lifecycle import train

    from conftest import tiny_tree

    config = load_config(tree=tiny_tree(tmp_path / "runs", train={"epochs": 1}, data={"synthetic_train": 64}))
    before = copy.deepcopy(config)
    run = train(config)
    assert config == before
    recorded = run.config_dict()["model"]  # the run's own copy has every hyperparameter resolved
    assert set(recorded) - {"name", "path"} > set(config.model.hparams)

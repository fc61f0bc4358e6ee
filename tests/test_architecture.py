"""The layout rules, checked on the source (no TensorFlow): no import cycles between the project's modules, not
even through imports inside functions; no module reaching into another one's private (underscore) names; a
generic module never names a task (what is particular to a task lives in its package); no module over 600 lines;
and the Task interface is abstract."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "shared"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=1)  # parsed once for the tests below, which only read the trees
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


def _all_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Modules imported anywhere in the module, inside functions too (imported on call)."""
    return {module for node in ast.walk(tree) for module, _ in _imported(node, known)}


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


def test_no_import_cycles_counting_imports_inside_functions():
    """An import inside a function must not hide a cycle: lower modules take what they need (a built model,
    a config) from their callers instead of importing the modules above them."""
    modules = _modules()
    known = set(modules)
    graph = {name: {m for m in _all_imports(tree, known) if m != name and not name.startswith(m + ".")}
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


TASK_NAMES = ("classification", "detection", "deblur")
TASK_PACKAGES = tuple(f"shared.{name}" for name in TASK_NAMES)
# The registry lists the tasks by name; the config schema declares the YAML keys users write (`task:` and its
# choices, the `detection:` and `deblur:` sections).
NAMING_TASKS = {"shared.tasks", "shared.config_schema"}


def _task_mentions(name: str, tree: ast.Module) -> list[str]:
    """Where a module names a task: a string that is a task's name (not a docstring), an attribute named after
    one (`config.detection`), an import of a task package."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in TASK_NAMES and id(node) not in docstrings:
            found.append(f"{name}:{node.lineno} {node.value!r}")
        elif isinstance(node, ast.Attribute) and node.attr in TASK_NAMES:
            found.append(f"{name}:{node.lineno} .{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{name}:{node.lineno} import {module}" for module in imported
                      if module.startswith(TASK_PACKAGES)]
    return sorted(found)


def test_generic_modules_never_name_a_task():
    """What is particular to a task (what a prediction is, what the loop ingests, which metric judges a round)
    is the task's (its package, its Task class); the generic layer asks the Task, never which task it has."""
    mentions = [mention for name, tree in _modules().items()
                if not name.startswith(TASK_PACKAGES) and name not in NAMING_TASKS
                for mention in _task_mentions(name, tree)]
    assert mentions == []


def test_task_mention_check_finds_each_kind():
    tree = ast.parse('"""A detection docstring."""\nfrom shared.detection import boxes\n'
                     'if task == "deblur" or config.classification:\n    pass\n')
    assert _task_mentions("m", tree) == ["m:2 import shared.detection", "m:3 'deblur'", "m:3 .classification"]


MAX_MODULE_LINES = 600


def test_no_module_is_over_600_lines():
    """A module that grows past this does several jobs: split it along its own sections."""
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in PACKAGE.rglob("*.py")}
    assert {path: lines for path, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}


def test_task_is_abstract_and_a_task_missing_a_hook_fails_at_construction():
    from shared.config import load_config
    from shared.task import Task
    from shared.tasks import TASKS

    config = load_config(tree={})
    with pytest.raises(TypeError):
        Task(config)

    class Partial(Task):  # evaluate, export and the rest missing
        name = "partial"
        commands = frozenset({"train"})

        def datasets(self, folder, replicas=1, start_epoch=0):
            raise AssertionError

    with pytest.raises(TypeError, match="abstract"):
        Partial(config)

    class Unnamed(TASKS["deblur"]):  # every hook, but no name to be chosen by
        name = ""

    with pytest.raises(TypeError, match="does not set name"):
        Unnamed(config)
    for name, task_class in TASKS.items():
        task = task_class(config)
        assert task.name == name and task.config is config and task.commands
        assert task.bound(config).config is config and type(task.bound(config)) is task_class


@pytest.mark.slow
def test_training_leaves_the_callers_config_unchanged(tmp_path, one_conv_model):
    import copy

    from shared.config import load_config
    from shared.lifecycle import train

    from conftest import tiny_tree

    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1}, data={"synthetic_train": 64})
    config = load_config(tree={**tree, "model": one_conv_model})
    before = copy.deepcopy(config)
    run = train(config)
    assert config == before
    recorded = run.config_dict()["model"]  # the run's own copy has every hyperparameter resolved
    assert set(recorded) - {"name", "path"} > set(config.model.hparams)

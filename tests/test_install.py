"""What a fresh `pip install -e .` gives: every third-party import is declared in pyproject.toml, an optional
one missing is a one-line error naming its extra, and the Keras internals we patch are a tested version."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import types
import zipfile
from importlib.metadata import packages_distributions

import pytest
import tensorflow as tf

from conftest import REPO
from shared.errors import UserError

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

SKIPPED_PARTS = {"build", "dist", "runs", "venv", ".venv"}


def _distribution(spec: str) -> str:
    """'tensorflow-datasets>=4.9,<5' -> 'tensorflow-datasets' (PEP 503 normalized)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", spec.strip(), maxsplit=1)[0]).lower()


def _imports(tree: ast.Module):
    """(line, top-level module, guarded) for each absolute import; guarded: inside try/except ImportError."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                handler.type is None or re.search(r"\b(ImportError|ModuleNotFoundError)\b", ast.unparse(handler.type))
                for handler in node.handlers):
            guarded |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            yield node.lineno, name.split(".")[0], id(node) in guarded


def test_every_third_party_import_is_declared():
    """shared/ and models/ may import core dependencies only; scripts/, tests/ and imports guarded by
    `except ImportError` may also use an extra. A module merely present on this machine does not count."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {_distribution(spec) for spec in project["dependencies"]}
    extras = {_distribution(spec) for specs in project["optional-dependencies"].values() for spec in specs}
    installed = packages_distributions()
    local = {path.name for path in REPO.iterdir() if path.is_dir()} | {path.stem for path in REPO.glob("*.py")}
    problems = []
    for path in sorted(REPO.rglob("*.py")):
        relative = path.relative_to(REPO)
        if any(part.startswith(".") or part in SKIPPED_PARTS for part in relative.parts):
            continue
        siblings = {other.stem for other in path.parent.glob("*.py")}
        for line, module, guarded in _imports(ast.parse(path.read_text(), str(relative))):
            if module in sys.stdlib_module_names or module in local | siblings or module == "__future__":
                continue
            allowed = core | extras if guarded or relative.parts[0] in ("scripts", "tests") else core
            # Not installed here (an extra): its distribution is taken to share its name.
            candidates = {_distribution(name) for name in installed.get(module, [module])}
            if not candidates & allowed:
                problems.append(f"{relative}:{line} imports {module} ({', '.join(sorted(candidates))})")
    assert not problems, "undeclared in pyproject.toml:\n" + "\n".join(problems)


def test_the_test_extra_installs_the_devkit_reader():
    """CI installs `.[test]`; the meta.mat test needs scipy from the devkit extra."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ilsvrc-canon[devkit]" in extras["test"] and any(_distribution(s) == "scipy" for s in extras["devkit"])


def test_fit_on_jax_without_jax_names_the_extra(tmp_path):
    """JAX absent (blocked in the child's sys.modules): one line naming the extra, exit 2, no traceback."""
    script = REPO / "scripts" / "fit_on_jax.py"
    code = (f"import runpy, sys; sys.modules['jax'] = None; sys.argv = [{str(script)!r}, 'x.yaml', '--out', 'out']; "
            f"runpy.run_path({str(script)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "KERAS_BACKEND": "jax"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        'error: KERAS_BACKEND=jax needs JAX: pip install -e ".[jax]" (or run with KERAS_BACKEND=tensorflow)']


def test_devkit_meta_mat_without_scipy_names_the_extra(tmp_path, monkeypatch):
    from shared.data import ilsvrc

    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy.io raises ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    (tmp_path / "meta.mat").write_bytes(b"not read")
    with pytest.raises(UserError, match=re.escape('pip install -e ".[devkit]"')) as caught:
        ilsvrc._read_synsets(tmp_path / "meta.mat")
    assert "\n" not in str(caught.value)


def _multi_worker_placement():
    """A Placement that patch_multi_worker_build takes for multi-worker, without starting a cluster."""
    from shared.distribute import Placement

    strategy = object.__new__(tf.distribute.MultiWorkerMirroredStrategy)  # isinstance only; never used
    return Placement(strategy=strategy, replicas=2, is_chief=True, description="test")


def test_multi_worker_patch_refuses_an_untested_keras(monkeypatch):
    import keras

    from shared import distribute

    monkeypatch.setattr(keras, "__version__", "3.16.0")
    model = types.SimpleNamespace()
    with pytest.raises(UserError) as caught:
        distribute.patch_multi_worker_build(model, _multi_worker_placement())
    message = str(caught.value)
    assert "Keras 3.16.0 is installed" in message and "3.15" in message and "\n" not in message
    assert not hasattr(model, "_maybe_symbolic_build")  # nothing patched


def test_multi_worker_patch_applies_on_the_tested_keras(monkeypatch):
    import keras
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer

    from shared import distribute

    monkeypatch.setattr(keras, "__version__", f"{distribute.TESTED_KERAS[-1]}.7")
    # the patch replaces this module function; restore it after the test
    monkeypatch.setattr(keras_tf_trainer, "_collective_all_reduce_multi_worker",
                        keras_tf_trainer._collective_all_reduce_multi_worker)
    model = types.SimpleNamespace()
    distribute.patch_multi_worker_build(model, _multi_worker_placement())
    assert hasattr(model, "_maybe_symbolic_build")
    assert keras_tf_trainer._collective_all_reduce_multi_worker(None) is False


@pytest.mark.slow
def test_a_built_wheel_carries_the_imagenet_class_names(tmp_path):
    """The names file is package data: a wheel built from the sources (what `pip install .` installs)
    holds it byte for byte, so decode_predictions and the plots have names on a fresh install."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "shared", source / "shared", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--quiet", "--wheel-dir", str(tmp_path / "wheel")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("shared/data/imagenet_class_names.tsv")
    assert shipped == (REPO / "shared" / "data" / "imagenet_class_names.tsv").read_bytes()

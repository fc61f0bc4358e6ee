"""Odd but legal input is kept verbatim (Unicode notes, names and paths, under a C locale too); bad
input is one line before any folder exists (names that would climb out of the runs root, file names
that are not UTF-8)."""

import ast
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared import runner
from shared.config import load_config
from shared.errors import UserError
from shared.modelzoo import MODELS_DIR, model_dir
from shared.names import check_plain_name

from conftest import REPO, TINY_MODEL, tiny_tree

NOTES = ('Émoji 😀 漢字 テスト, עברית مرحبا, "quotes": colons # hash\n'
         "second line: - dash\n\n  indented")
C_LOCALE = {"LANG": "C", "LC_ALL": "C"}
# Python turns on UTF-8 mode under a C locale; these switch that off too, as on an old or strict CI image.
STRICT_C_LOCALE = {**C_LOCALE, "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def python(*args, env: dict, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, cwd=cwd,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env})


@pytest.fixture
def unicode_setup(tmp_path):
    """A config whose run.dir and model.path hold Unicode, on a tiny synthetic task (the one-convolution
    TINY_MODEL: the paths are what is checked, not the model)."""
    runs = tmp_path / "läufe 実行 😀"
    model = tmp_path / "модель ✓"
    model.mkdir()
    (model / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(runs, train={"epochs": 1, "batch_size": 16},
                     data={"synthetic_train": 32, "synthetic_test": 16})
    tree["model"] = {"name": "tiny", "path": str(model)}
    del tree["run"]["notes"]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree, allow_unicode=True), encoding="utf-8")
    return config, runs


def the_run(runs: Path) -> Path:
    (run,) = (runs / "tiny").iterdir()
    return run


@pytest.mark.slow
def test_unicode_notes_run_dir_and_model_path_survive_a_c_locale(unicode_setup):
    config, runs = unicode_setup
    result = python("-m", "shared.runner", "--config", config, "--notes", NOTES, env=C_LOCALE)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-2000:]
    run = the_run(runs)
    assert NOTES.strip() in (run / "notes.md").read_text(encoding="utf-8")
    stored = (run / "config.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(stored)["run"]["notes"] == NOTES
    assert "😀 漢字" in stored  # readable, not \U0001F600 escapes
    # A stricter locale (no UTF-8 mode: the locale's encoding is ASCII) still reads the run store.
    listed = python("-m", "shared.runs", "list", "--dir", runs, env=STRICT_C_LOCALE)
    assert listed.returncode == 0, listed.stderr.decode("utf-8", "replace")
    assert f"tiny/{run.name}" in listed.stdout.decode()


def test_unicode_names_print_under_an_ascii_locale(tmp_path):
    """Outside UTF-8 mode stdout is ASCII: a Unicode model name in `runs list` is escaped, not a crash."""
    version = tmp_path / "runs" / "modèle_😀" / "v0001"
    version.mkdir(parents=True)
    (version / "config.yaml").write_text("model: {name: x}\n", encoding="utf-8")
    listed = python("-m", "shared.runs", "list", "--dir", tmp_path / "runs", env=STRICT_C_LOCALE)
    assert listed.returncode == 0, listed.stderr.decode("utf-8", "replace")
    (row,) = [line for line in listed.stdout.splitlines() if line.endswith(b"/v0001  unknown  -")]
    assert row.startswith(b"mod\\")  # the non-ASCII part escaped


def test_command_line_notes_are_decoded_without_utf8_mode():
    """Outside UTF-8 mode, argv arrives as surrogate escapes of its UTF-8 bytes; --notes is text again."""
    code = ("import sys; from shared.runner import _yaml_string; from shared.config import load_config; "
            "c = load_config(None, ['run.notes=' + _yaml_string(sys.argv[1])]); "
            "sys.stdout.buffer.write(c.run.notes.encode('utf-8')); sys.stdout.buffer.write(c.dump().encode('utf-8'))")
    result = python("-c", code, NOTES, env=STRICT_C_LOCALE)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")
    out = result.stdout.decode("utf-8")
    assert out.startswith(NOTES) and yaml.safe_load(out[len(NOTES):])["run"]["notes"] == NOTES


@pytest.mark.parametrize("notes", ["😀", "漢字", "שלום: \"x\"\nline", "tab\there", "\u2028\x85\ufeff", "1e5",
                                   "null"])
def test_notes_round_trip_through_the_set_override(notes):
    config = load_config(tree={}, overrides=[f"run.notes={runner._yaml_string(notes)}"])
    assert config.run.notes == notes
    assert yaml.safe_load(config.dump())["run"]["notes"] == notes


def test_undecodable_notes_are_one_line_before_any_folder(tmp_path, capsys, unicode_setup):
    config, runs = unicode_setup
    undecodable = os.fsdecode(b"caf\xe9")  # Latin-1 bytes on the command line of a UTF-8 machine
    code = runner.main(["--config", str(config), "--notes", undecodable])
    err = capsys.readouterr().err
    assert code == 2 and "run.notes" in err and "not valid UTF-8" in err and "Traceback" not in err
    assert not runs.exists()


@pytest.mark.parametrize("value, problem", [
    ("../x", "separator"), ("a/b", "separator"), ("a\\b", "separator"), ("/abs/path", "separator"),
    ("..", "relative folder"), (".", "relative folder"), (".hidden", "dot"), ("a\x00b", "NUL"), ("", "empty"),
    ("x\n", "control character"), (" x", "space"), ("a" * 256, "255 bytes"), (7, "not text"),
])
def test_bad_names_are_refused_everywhere_a_name_becomes_a_folder(tmp_path, value, problem):
    with pytest.raises(UserError, match=problem):
        check_plain_name("model.name", value)
    with pytest.raises(UserError, match=f"model.name.*{problem}"):
        load_config(tree={"model": {"name": value}, "run": {"dir": str(tmp_path / "runs")}})
    with pytest.raises(UserError, match=f"model.name.*{problem}"):  # a model.path does not make it a path
        load_config(tree={"model": {"name": value, "path": str(MODELS_DIR / "resnet")}})
    if isinstance(value, str):
        with pytest.raises(UserError, match=f"tune.study.*{problem}"):
            load_config(tree={"tune": {"study": value}})
        with pytest.raises(UserError, match=problem):
            model_dir(value)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("value", ["resnet", "a..b", "v1.2-final", "模型_ünï 😀"])
def test_plain_names_with_any_letters_are_fine(value):
    assert check_plain_name("model.name", value) == value
    assert load_config(tree={"model": {"name": value}, "tune": {"study": value}}).model.name == value


def test_export_and_study_names_are_checked_too(tmp_path):
    from shared.export import target_folder
    from shared.runs import Run
    from shared.tuning.storage import study_name

    for bad in ("x\n", "../x", ".."):  # "x\n" passed the export regex: $ matches before a final newline
        with pytest.raises(UserError, match="export --name"):
            target_folder(Run(tmp_path / "run"), tmp_path / "exports", bad, None, 5)
    # the default study name ends in the file's stem
    config = dataclasses.replace(load_config(tree={}), source_file=str(tmp_path / "x\n.yaml"))
    with pytest.raises(UserError, match="tune.study is 'resnet-x\\\\n'.*control character"):
        study_name(config)
    assert not (tmp_path / "exports").exists()


@pytest.mark.parametrize("override", ["run.dir=a\x00b", "data.path=/data\x00x",
                                      f"data.path={os.fsdecode(b'/data/caf' + bytes([0xe9]))}"])
def test_paths_that_no_file_system_or_config_file_holds_are_one_line(override):
    with pytest.raises(UserError, match="NUL|not valid UTF-8"):
        load_config(tree={}, overrides=[override])


# ---------------------------------------------------------------- file names on disk


def test_folder_dataset_reads_files_named_in_any_bytes(tmp_path):
    import tensorflow as tf

    from shared.data import find_undecodable, sources
    from test_data import make_folder_dataset

    root = make_folder_dataset(tmp_path / "imgs", classes=("cat", "猫 ü"), per_class=2)
    odd = os.fsencode(root / "train" / "cat") + b"/\xff\xfe.jpg"  # not UTF-8
    shutil.copy(root / "train" / "cat" / "0.JPEG", odd)
    config = load_config(tree={"data": {"source": "folder", "path": str(root), "test_split": "val"}}).data
    source = sources.load(config)
    assert source.class_names == ["cat", "猫 ü"] and source.num_train == 5
    sizes = [int(tf.strings.length(tf.io.read_file(path))) for path, _ in source.train]
    assert len(sizes) == 5 and min(sizes) > 0  # every file read, the odd one too
    with open(odd, "wb") as broken:
        broken.write(b"not an image")
    assert find_undecodable(source) == [os.fsdecode(odd)]  # named, not a crash


def test_a_class_folder_not_named_in_utf8_is_one_line(tmp_path):
    from shared.data import sources
    from test_data import make_folder_dataset

    root = make_folder_dataset(tmp_path / "imgs", per_class=1)
    os.rename(root / "train" / "cat", os.fsencode(root / "train") + b"/ch\xe2t")
    config = load_config(tree={"data": {"source": "folder", "path": str(root), "test_split": "val"}}).data
    with pytest.raises(UserError, match=r"class folder .*ch\\udce2t.* is not named in UTF-8"):
        sources.load(config)
    os.rename(os.fsencode(root / "train") + b"/ch\xe2t", root / "train" / "two\nlines")
    with pytest.raises(UserError, match=r"class folder .*two\\nlines' has a control character"):
        sources.load(config)  # labels.txt holds one class name per line


# ---------------------------------------------------------------- text files


def test_every_text_file_in_shared_names_its_encoding():
    """read_text, write_text and open in text mode say encoding="utf-8": the locale's default is ASCII on
    some CI machines and would garble or refuse Unicode notes, labels and configs."""
    missing = []
    for path in sorted((REPO / "shared").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name not in ("read_text", "write_text", "open") or any(k.arg == "encoding" for k in node.keywords):
                continue
            if isinstance(func, ast.Attribute) and getattr(func.value, "id", None) in ("os", "gzip", "tarfile",
                                                                                       "Image", "h5py", "tf"):
                continue  # not a text file (os.open is a descriptor, the rest are binary formats)
            mode_args = node.args[1:2] if isinstance(func, ast.Name) else node.args[:1] if name == "open" else []
            modes = [a.value for a in mode_args if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            if not any("b" in str(mode) for mode in modes):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, f"text files opened without encoding='utf-8': {missing}"

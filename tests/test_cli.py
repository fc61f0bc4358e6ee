"""The command line on bad input: one line naming the problem and the fix, non-zero exit, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared import runner

from conftest import REPO, tiny_tree
from test_data import make_folder_dataset


def run_cli(capsys, *argv):
    code = runner.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(tmp_path, tree) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("change, fragments", [
    (lambda t: t["train"].update(batchsize=3), ["unknown config key train.batchsize", "did you mean train.batch_size"]),
    (lambda t: t["train"].update(epochs="many"), ["train.epochs", "must be int"]),
    (lambda t: t["model"].update(name="resnt"), ["unknown model 'resnt'", "did you mean resnet"]),
    (lambda t: t["model"].update(depth=19), ["ResNet depth 19 is not in Table 1", "choose one of"]),
    (lambda t: t["model"].update(dpth=18), ["unknown config key model.dpth", "did you mean model.depth"]),
    (lambda t: t["data"].update(source="folder", path="/nonexistent/imagenet"), ["folder dataset not found"]),
])
def test_bad_configs(tmp_path, capsys, change, fragments):
    tree = tiny_tree(tmp_path / "runs")
    change(tree)
    code, _, err = run_cli(capsys, "--config", write_config(tmp_path, tree))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "runs" / "resnet").exists()  # nothing half-written


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--config", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "config file not found", "nope.yaml")


def test_bad_set_override(tmp_path, capsys):
    path = write_config(tmp_path, tiny_tree(tmp_path / "runs"))
    code, _, err = run_cli(capsys, "--config", path, "--set", "train.epochs")
    assert_one_line_error(code, err, "not key=value")


def test_nonexistent_run_for_test(tmp_path, capsys):
    code, _, err = run_cli(capsys, "test", "--run", tmp_path / "runs" / "resnet" / "v7")
    assert_one_line_error(code, err, "no run at", "shared.runs list")


@pytest.mark.slow
def test_corrupt_image_in_a_folder_dataset_names_the_file(tmp_path, capsys, one_conv_model):
    root = make_folder_dataset(tmp_path / "imgs", per_class=3)
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated, not a real JPEG")
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1, "batch_size": 4})
    tree["data"] = {"source": "folder", "path": str(root), "test_split": "val", "image_size": 16}
    tree["model"] = one_conv_model  # the data is what is checked: the smallest model
    code, _, err = run_cli(capsys, "--config", write_config(tmp_path, tree))
    assert_one_line_error(code, err, "corrupt or unreadable image", str(bad), "marked failed")
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert yaml.safe_load((run_dir / "status.json").read_text())["status"] == "failed"


def test_real_process_prints_one_line_and_exit_code(tmp_path):
    """The same through a real `python -m shared.runner` process (what a user types)."""
    result = subprocess.run([sys.executable, "-m", "shared.runner", "--config", str(tmp_path / "missing.yaml")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert "error: config file not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_then_test_from_the_command_line(tmp_path, capsys, one_conv_model):
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1})
    tree["model"] = one_conv_model  # the command's plumbing and printing are checked, not the model
    path = write_config(tmp_path, tree)
    code, out, err = run_cli(capsys, "--config", path, "--notes", "cli: smoke", "--set", "data.synthetic_train=64",
                             "--set", "data.val_fraction=0.25")
    assert code == 0, err
    assert "test top-1" in out and "48 training / 16 validation / 64 test images" in out
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert "cli: smoke" in (run_dir / "notes.md").read_text()
    assert "val_top1" in (run_dir / "metrics.csv").read_text().splitlines()[0]  # validated every epoch
    # the summary line, then the worst classes, then the closing line (what the folder holds, what comes next)
    recorded, closing = out.rsplit(f"\n{run_dir}: ", 1)[1].strip().rsplit("\n", 1)
    assert recorded.splitlines()[0].startswith("test top-1 ") and "worst 4 classes by F1" in recorded
    assert closing.startswith(f"run folder {run_dir}: curves.png") and f"test --run {run_dir}" in closing
    code, out, err = run_cli(capsys, "test", "--run", run_dir)
    assert code == 0 and out.strip() == recorded


@pytest.mark.slow
def test_corrupt_images_are_skipped_named_once_and_counted_once(tmp_path, capsys, one_conv_model):
    root = make_folder_dataset(tmp_path / "imgs", per_class=3)
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a real JPEG")
    (root / "train" / "cat" / "text.png").write_text("not an image\n")
    (root / "val" / "cat" / "empty.png").write_bytes(b"")
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 4, "batch_size": 4})
    tree["data"] = {"source": "folder", "path": str(root), "test_split": "val", "image_size": 16,
                    "on_corrupt": "skip"}
    tree["model"] = one_conv_model  # the data is what is checked: the smallest model
    code, out, err = run_cli(capsys, "--config", write_config(tmp_path, tree))
    assert code == 0, err
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    metrics = yaml.safe_load((run_dir / "test_metrics.json").read_text())
    # read in each of 4 epochs, each counted and named once
    assert metrics["skipped_train_images"] == 2 and metrics["skipped_test_images"] == 1
    assert metrics["examples"] == 9
    train_line = next(line for line in out.splitlines() if line.startswith("skipped 2 unreadable training images"))
    assert "broken.jpg" in train_line and "text.png" in train_line and "skipped.txt" in train_line
    assert any(line.startswith("skipped 1 unreadable test image") and "empty.png" in line for line in out.splitlines())
    recorded = sorted((run_dir / "skipped.txt").read_text().splitlines())  # split, file, why
    convert = "convert it to PNG or JPEG"
    assert recorded == sorted([
        f"train\t{root / 'train' / 'dog' / 'broken.jpg'}\tdoes not decode (Invalid JPEG data, size 31)",
        f"train\t{root / 'train' / 'cat' / 'text.png'}\tis not an image format that is read; {convert}",
        f"test\t{root / 'val' / 'cat' / 'empty.png'}\tis empty (0 bytes); remove it or {convert}"])
    code, out, err = run_cli(capsys, "test", "--run", str(run_dir))  # a re-test reads no training images
    assert code == 0, err
    assert "training image" not in out and "skipped 1 unreadable test image" in out
    assert sorted((run_dir / "skipped.txt").read_text().splitlines()) == recorded  # kept as training wrote it


@pytest.mark.parametrize("extra, fragments", [
    (["--set", "train.lr.base=.nan"], ["train.lr.base (from --set) is nan", "must be > 0"]),
    (["--set", "data.std=[1, .inf, 1]"], ["data.std", "each item must be > 0"]),
    (["--set", "model.name=../x"], ["model.name", "path separator"]),
    (["--set", "model.name=.."], ["model.name", "relative folder"]),
    (["--notes", os.fsdecode(b"caf\xe9")], ["run.notes", "not valid UTF-8"]),
])
def test_bad_input_is_one_line_and_creates_no_folder(tmp_path, capsys, extra, fragments):
    runs = tmp_path / "area" / "runs"
    code, _, err = run_cli(capsys, "--config", write_config(tmp_path, tiny_tree(runs)), *extra)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "area").exists()  # no runs root, no folder beside it


def test_a_runs_root_that_is_a_file_is_one_line_before_tensorflow(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder", encoding="utf-8")
    for runs in (blocker, blocker / "deeper"):
        code, _, err = run_cli(capsys, "--config", write_config(tmp_path, tiny_tree(runs)))
        assert_one_line_error(code, err, "run.dir", "is a file, not a folder")
    assert blocker.read_text(encoding="utf-8") == "not a folder"


@pytest.mark.parametrize("command", ["lr-sweep", "find-batch", "preview", "distill"])
def test_a_command_refuses_a_task_it_does_not_support_in_one_line(tmp_path, capsys, command):
    teacher = tmp_path / "runs" / "resnet" / "v0001"
    teacher.mkdir(parents=True)
    (teacher / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet"}}))
    extra = ["--teacher", teacher] if command == "distill" else []
    code, _, err = run_cli(capsys, command, "--config", REPO / "models" / "resnet" / "detect.yaml", *extra)
    assert_one_line_error(code, err, f"{command} supports task classification, not detection")


@pytest.mark.parametrize("command", ["size", "test", "export"])
def test_a_run_command_goes_by_the_runs_task(tmp_path, capsys, command):
    run_dir = tmp_path / "runs" / "resnet" / "v0001"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"task": "detection", "model": {"name": "resnet"}}))
    extra = ["--format", "saved_model", "--export-dir", tmp_path / "exports"] if command == "export" else []
    code, _, err = run_cli(capsys, command, "--run", run_dir, *extra)
    # supported: the run's missing checkpoint is what stops it, not the command's task check
    assert_one_line_error(code, err, "has no checkpoint")


def test_test_with_a_classifier_needs_a_deblurring_run(tmp_path, capsys):
    folders = []
    for version in ("v0001", "v0002"):
        folder = tmp_path / "runs" / "resnet" / version
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "resnet"}}))
        folders.append(folder)
    code, _, err = run_cli(capsys, "test", "--run", folders[0], "--classifier", folders[1])
    assert_one_line_error(code, err, "--classifier applies to deblur runs", "is a classification run")

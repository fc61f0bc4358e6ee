import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared import runs
from shared.config import load_config
from shared.errors import UserError
from shared.lifecycle import test as evaluate
from shared.lifecycle import train

from conftest import tiny_tree


ALLOCATE = "import sys; from pathlib import Path; from shared.runs import allocate; " \
           "print(' '.join(allocate(Path(sys.argv[1]), 'resnet').name for _ in range(10)))"


def test_concurrent_allocation_never_shares_a_folder(tmp_path):
    # Four processes racing for versions in the same folder.
    workers = [subprocess.Popen([sys.executable, "-c", ALLOCATE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    names = [name for worker in workers for name in worker.communicate(timeout=60)[0].split()]
    assert all(worker.returncode == 0 for worker in workers)
    assert len(names) == len(set(names)) == 40
    assert sorted(names) == [f"v{i:04d}" for i in range(1, 41)]  # zero-padded: ls order is numeric order


def test_snapshot_holds_everything_about_the_run(trained_run):
    run, source = trained_run
    files = {p.name for p in run.path.iterdir()}
    assert {"model.py", "notes.md", "config.yaml", "environment.json", "status.json", "metrics.csv",
            "test_metrics.json", "checkpoints", "logs"} <= files
    assert (run.path / "model.py").read_text() == (source / "model.py").read_text()
    assert run.status()["status"] == "finished"
    assert run.last_checkpoint().name == "epoch-0002.keras"
    config = yaml.safe_load((run.path / "config.yaml").read_text())
    assert config["model"] == {"name": "resnet", "path": str(source), "depth": 18, "width": 4, "small_input": True,
                               "conv_bias": False, "padding": "same", "stride_in_3x3": False, "bn_epsilon": 1.001e-5}
    assert config["data"]["num_classes"] == 4 and config["train"]["epochs"] == 2
    notes = (run.path / "notes.md").read_text()
    assert "a tiny test run" in notes and "He, Zhang, Ren, Sun" in notes  # run notes, then the model's notes
    environment = json.loads((run.path / "environment.json").read_text())
    assert environment["packages"]["tensorflow"].startswith("2.21") and "commit" in environment["git"]
    rows = (run.path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and "lr" in rows[0] and len(rows) == 3
    metrics = run.test_metrics()
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0 and metrics["examples"] == 64


def test_synthetic_data_is_learnable(trained_run):
    run, _ = trained_run
    assert run.test_metrics()["top1"] > 0.5  # chance is 0.25 with 4 classes


def test_test_runner_reproduces_the_recorded_metric_after_the_model_source_changed(trained_run):
    run, source = trained_run
    recorded = run.test_metrics()
    original = (source / "model.py").read_text()
    try:
        # The live source moves on: a different architecture that the checkpoint no longer fits.
        (source / "model.py").write_text(original.replace("BOTTLENECK_EXPANSION = 4", "BOTTLENECK_EXPANSION = 2")
                                         .replace('18: ("basic", (2, 2, 2, 2))', '18: ("basic", (1, 1, 1, 1))'))
        again = evaluate(run.path)
    finally:
        (source / "model.py").write_text(original)
    assert again["top1"] == recorded["top1"] and again["top5"] == recorded["top5"]
    assert again["loss"] == pytest.approx(recorded["loss"], rel=1e-6)


def test_open_run_accepts_short_versions_and_rejects_missing(trained_run):
    run, _ = trained_run
    assert runs.open_run(run.path.parent / "v1").path == run.path
    with pytest.raises(UserError, match="no run at"):
        runs.open_run(run.path.parent / "v9")


def test_checkpoints_and_versions_sort_by_number_not_as_text(tmp_path):
    """Four padded digits run out at 9999: the last checkpoint is epoch-10000, the last run v10000."""
    run = runs.Run(tmp_path / "resnet" / "v0001")
    run.checkpoint_dir.mkdir(parents=True)
    for name in ("epoch-0002.keras", "epoch-9999.keras", "epoch-10000.keras", "epoch-x.keras",
                 ".partial-0a1b2c3d4e5f-epoch-10001.keras"):
        (run.checkpoint_dir / name).write_bytes(b"x")
    assert [p.name for p in run.checkpoints()] == ["epoch-0002.keras", "epoch-9999.keras", "epoch-10000.keras"]
    assert run.last_checkpoint().name == "epoch-10000.keras" and run.checkpoint("last").name == "epoch-10000.keras"
    for version in ("v9999", "v10000", "v0002"):
        (tmp_path / "resnet" / version).mkdir()
    assert [r.version for r in runs.all_runs(tmp_path)] == ["v0001", "v0002", "v9999", "v10000"]


def test_list_shows_only_differing_keys(tmp_path):
    root = tmp_path / "runs"
    for epochs in (1, 2):
        path = runs.allocate(root, "resnet")
        tree = tiny_tree(root, train={"epochs": epochs})
        (path / "config.yaml").write_text(load_config(tree=tree).dump())
        runs.Run(path).set_status("finished")
        runs.Run(path).write_json("test_metrics.json", {"top1": 0.5 * epochs})
    text = runs.table(runs.all_runs(root))
    header, first, second = text.splitlines()
    assert header.split() == ["run", "status", "top1", "train.epochs", "notes"]
    assert first.split() == ["resnet/v0001", "finished", "0.5000", "1", "a", "tiny", "test", "run"]
    assert second.split() == ["resnet/v0002", "finished", "1.0000", "2", "a", "tiny", "test", "run"]


def list_root(tmp_path):
    """Three runs that differ in five keys, with notes of their own (one long, one of two lines, one none)."""
    root = tmp_path / "runs"
    notes = ["baseline", "deeper and longer, to see whether depth 34 pays off on this data at all",
             "line one\nline two"]
    for i, note in enumerate(notes):
        path = runs.allocate(root, "resnet")
        tree = tiny_tree(root, train={"epochs": i + 1, "lr": {"base": 0.1 / (i + 1)}}, run={"notes": note})
        tree["model"]["depth"] = (18, 34, 18)[i]
        tree["data"].update(image_size=16 + i, synthetic_train=256 + i)
        (path / "config.yaml").write_text(load_config(tree=tree).dump())
        runs.Run(path).set_status("finished")
    return root


def test_list_fits_the_width_names_the_keys_left_out_and_shows_notes(tmp_path):
    found = runs.all_runs(list_root(tmp_path))
    whole = runs.table(found).splitlines()
    assert whole[0].split() == ["run", "status", "top1", "model.depth", "train.epochs", "train.lr.base",
                                "data.image_size", "data.synthetic_train", "notes"]
    assert whole[2].endswith("whether depth 34 pays off on this data at all") and whole[3].endswith("line one")
    narrow = runs.table(found, width=80).splitlines()
    assert all(len(line) <= 80 for line in narrow) and len(narrow) == 5
    assert narrow[0].split()[:4] == ["run", "status", "top1", "model.depth"] and narrow[0].split()[-1] == "notes"
    assert narrow[1].endswith("baseline") and narrow[2].endswith("...") and "deeper and" in narrow[2]
    shown = set(narrow[0].split())
    left_out = [key for key in whole[0].split() if key not in shown]
    assert left_out and narrow[4].startswith(f"{len(left_out)} more differing key(s), not shown: {left_out[0]}")


def test_list_columns_chooses_the_columns(tmp_path, capsys):
    root = list_root(tmp_path)
    assert runs.main(["list", "--dir", str(root), "--columns", "run,train.lr.base,data.source,notes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "train.lr.base", "data.source", "notes"]
    assert lines[1].split() == ["resnet/v0001", "0.1", "synthetic", "baseline"] and len(lines) == 4
    assert runs.main(["list", "--dir", str(root), "--columns", "run,train.lr.bsae"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --columns names 'train.lr.bsae', which is neither a column (run, status, "
                          "top1, views, notes)")
    assert "\n" not in err


def test_diff_prints_a_unified_diff_without_a_terminal(tmp_path, capsys):
    root = tmp_path / "runs"
    for text, epochs in (("x = 1\n", 1), ("x = 2\n", 2)):
        path = runs.allocate(root, "resnet")
        (path / "model.py").write_text(text)
        (path / "config.yaml").write_text(load_config(tree={"train": {"epochs": epochs}}).dump())
        (path / "notes.md").write_text("same\n")
    assert runs.main(["diff", str(root / "resnet" / "v1"), str(root / "resnet" / "v2")]) == 0
    out = capsys.readouterr().out
    assert "-x = 1" in out and "+x = 2" in out and "-  epochs: 1" in out and "+  epochs: 2" in out
    assert "notes.md" not in out  # identical files add nothing


@pytest.mark.slow
def test_failed_run_is_marked_failed(tmp_path, one_conv_model):
    # A model that builds but breaks inside fit: the run folder must say failed, not look finished.
    model = Path(one_conv_model["path"]) / "model.py"
    text = model.read_text()
    model.write_text(text.replace(
        '    return keras.Model(inputs, outputs, name="tiny")',
        '    outputs = keras.layers.Lambda(lambda t: t[:, :1])(outputs)  # labels now fall outside the output\n'
        '    return keras.Model(inputs, outputs, name="tiny")'))
    assert "Lambda" in model.read_text()
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1})
    tree["model"] = one_conv_model  # what is checked is the status, not the model
    with pytest.raises(Exception):  # noqa: B017 (any failure inside fit: the status is what is tested)
        train(load_config(tree=tree))
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["error"]


@pytest.mark.slow
def test_training_with_mixup_uses_the_soft_label_loss(tmp_path, one_conv_model):
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1})
    tree["model"] = one_conv_model  # what is checked is the loss on mixed labels, not the model
    tree["data"]["batch_augment"] = [{"MixUp": {"alpha": 0.2}}]
    tree["data"]["val_fraction"] = 0.25
    run = train(load_config(tree=tree), draw=False)  # the figures are drawn by evaluate (test --run) below
    header = (run.path / "metrics.csv").read_text().splitlines()[0]
    assert "val_top1" in header and run.status()["status"] == "finished"
    assert evaluate(run)["top1"] == run.test_metrics()["top1"]


@pytest.mark.parametrize("damage", ["damaged", "missing"])
def test_resume_never_retrains_from_epoch_0_over_a_runs_epochs(trained_run, tmp_path, damage):
    # A finished run has no backup left; with its status.json damaged or gone, nothing says it finished.
    from shared.lifecycle import resume

    run_dir = tmp_path / "resnet" / "v0001"
    shutil.copytree(trained_run[0].path, run_dir)
    if damage == "damaged":
        (run_dir / "status.json").write_text('{"status": "fini')
    else:
        (run_dir / "status.json").unlink()
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    metrics = (run_dir / "metrics.csv").read_text()
    with pytest.raises(UserError, match=r"has checkpoints, metrics rows, test metrics but no committed backup "
                                        r"to resume from \(status: unknown\)") as refused:
        resume(run_dir)
    assert "\n" not in str(refused.value)
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == before
    assert (run_dir / "metrics.csv").read_text() == metrics
    assert runs.lock_holder(runs.Run(run_dir)) is None  # refused: the lock is let go at once


def test_list_shows_a_running_run_without_a_live_process_as_crashed(tmp_path):
    run = runs.Run(runs.allocate(tmp_path / "runs", "resnet"))
    (run.path / "config.yaml").write_text(load_config(tree=tiny_tree(tmp_path / "runs")).dump())
    run.set_status("running")  # as a SIGKILLed run leaves it: no process holds its lock
    assert runs.table([run]).splitlines()[1].split()[:2] == ["resnet/v0001", "crashed"]
    runs.lock_run(run)
    try:
        assert runs.table([run]).splitlines()[1].split()[:2] == ["resnet/v0001", "running"]
    finally:
        runs.unlock_run(run)


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_a_damaged_config_yaml_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    from shared import runner

    run = runs.Run(runs.allocate(tmp_path / "runs", "resnet"))
    lines = load_config(tree=tiny_tree(tmp_path / "runs")).dump().splitlines()
    lines[4] = "  depth: [18"  # an unclosed flow sequence: PyYAML's parser error
    (run.path / "config.yaml").write_text("\n".join(lines) + "\n")
    code = runner.main(["test", "--run", str(run.path)])
    line = assert_one_line_error(code, capsys.readouterr().err, f"{run.path / 'config.yaml'} is damaged at line ")
    assert "fix that line or restore the file from a copy" in line
    (run.path / "config.yaml").write_bytes(b"model: \xff\n")
    assert_one_line_error(runner.main(["test", "--run", str(run.path)]), capsys.readouterr().err,
                          "config.yaml is damaged: not UTF-8 text")
    (run.path / "config.yaml").write_text("just text\n")
    assert_one_line_error(runner.main(["test", "--run", str(run.path)]), capsys.readouterr().err,
                          "config.yaml is damaged: it holds str, not the run's config sections")
    assert runs.table([run]).splitlines()[1].split()[0] == "resnet/v0001"  # listed all the same


def test_test_of_a_run_that_failed_before_a_checkpoint_says_so_first(tmp_path, capsys):
    """Its images are gone as well: the missing checkpoint is what `test --run` names, not the images."""
    from shared import runner

    tree = tiny_tree(tmp_path / "runs")
    tree["data"] = {"source": "folder", "path": str(tmp_path / "gone"), "test_fraction": 0.2}
    run = runs.Run(runs.allocate(tmp_path / "runs", "resnet"))
    run.checkpoint_dir.mkdir()
    (run.path / "config.yaml").write_text(load_config(tree=tree).dump())
    run.set_status("failed", error="corrupt or unreadable image(s): cat/1.png\nmore")
    code = runner.main(["test", "--run", str(run.path)])
    assert_one_line_error(code, capsys.readouterr().err, "has no checkpoint: it failed before its first epoch "
                          "ended (corrupt or unreadable image(s): cat/1.png); fix that, then resume it "
                          f"(python -m shared.runner --resume {run.path})")

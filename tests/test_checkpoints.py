"""Checkpoints a user wants: only the newest N epoch checkpoints kept, checkpoints/best.keras by a monitored
metric (and `test --checkpoint best`), early stopping whose patience survives `--resume`, and a finished run
continued for more epochs in a new run folder. Toy Keras fits check the callbacks; tiny runs the lifecycle."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import forked
from conftest import KILLING_RUNNER, REPO, TINY_MODEL, tiny_tree

STEPS = 2  # 64 training images (of 80, 0.2 validation) in batches of 32


def tiny_run_tree(tmp_path: Path, validation: bool = True, **train) -> dict:
    model = tmp_path / "tiny_model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "model.py").write_text(TINY_MODEL)
    data = {"synthetic_train": 80, "synthetic_test": 32, **({"val_fraction": 0.2} if validation else {})}
    tree = tiny_tree(tmp_path / "runs", data=data,
                     train={"epochs": 3, "batch_size": 32, "verbose": 0, "lr": {"base": 0.05}, **train})
    tree["model"] = {"name": "tiny", "path": str(model)}
    return tree


def train_tree(tree: dict, **kwargs):
    """The run of `tree`, without its figures: no test here looks at them."""
    from shared.config import load_config
    from shared.lifecycle import train

    return train(load_config(tree=tree), argv=["pytest"], draw=False, **kwargs)


def killed_at(point: str, tmp_path: Path, tree: dict) -> Path:
    """Train `tree` in a subprocess SIGKILLed at `point` (conftest's KILLING_RUNNER: FILE:before|after:N);
    returns the run folder it left."""
    import os
    import signal
    import sys

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    killed = forked.run([sys.executable, "-c", KILLING_RUNNER, "--config", str(config)], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env={**os.environ, "KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    return run_dir


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def runner(*args: str) -> int:
    from shared import runner as runner_module

    return runner_module.main(list(args))


def run_folders(runs_dir: Path) -> list[str]:
    return sorted(p.name for p in runs_dir.glob("*/v*"))


# ---------------------------------------------------------------- the callbacks on a toy fit


def toy_model():
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.05), "mse")
    return model


def toy_data():
    generator = np.random.default_rng(0)
    x = generator.normal(size=(32, 2))
    return x, x @ np.array([1.0, -2.0]) + generator.normal(scale=0.5, size=32)


def test_keep_checkpoints_deletes_only_older_epoch_checkpoints(tmp_path):
    import keras

    from shared.checkpoints import EpochCheckpoint

    (tmp_path / "best.keras").write_bytes(b"best")
    (tmp_path / "interrupted.keras").write_bytes(b"interrupted")
    kept = []

    class Probe(keras.callbacks.Callback):  # what is on disk after each epoch
        def on_epoch_end(self, epoch, logs=None):
            kept.append(sorted(p.name for p in tmp_path.glob("epoch-*.keras")))

    x, y = toy_data()
    toy_model().fit(x, y, epochs=4, verbose=0, callbacks=[EpochCheckpoint(tmp_path, keep=2), Probe()])
    assert kept == [["epoch-0001.keras"], ["epoch-0001.keras", "epoch-0002.keras"],
                    ["epoch-0002.keras", "epoch-0003.keras"], ["epoch-0003.keras", "epoch-0004.keras"]]
    assert (tmp_path / "best.keras").read_bytes() == b"best"  # other names are never pruned
    assert (tmp_path / "interrupted.keras").read_bytes() == b"interrupted"


def test_keep_checkpoints_counts_epochs_past_four_digits_by_number(tmp_path):
    """epoch-10000.keras sorts before epoch-9999.keras as text: keeping the newest must not delete it."""
    from shared.checkpoints import EpochCheckpoint

    x, y = toy_data()
    toy_model().fit(x, y, epochs=3, verbose=0, callbacks=[EpochCheckpoint(tmp_path, epoch_offset=9998, keep=2)])
    assert sorted(p.name for p in tmp_path.glob("epoch-*.keras")) == ["epoch-10000.keras", "epoch-10001.keras"]


def test_best_checkpoint_is_the_best_epochs_checkpoint(tmp_path):
    from shared.checkpoints import BestCheckpoint, EpochCheckpoint

    x, y = toy_data()
    checkpoint = EpochCheckpoint(tmp_path)
    best = BestCheckpoint(checkpoint, "val_loss")
    history = toy_model().fit(x, y, epochs=5, verbose=0, validation_split=0.25, callbacks=[checkpoint, best])
    losses = history.history["val_loss"]
    epoch = int(np.argmin(losses)) + 1
    assert best.record() == {"monitor": "val_loss", "mode": "min", "value": pytest.approx(min(losses)),
                             "epoch": epoch, "checkpoint": "checkpoints/best.keras"}
    assert (tmp_path / "best.keras").read_bytes() == (tmp_path / f"epoch-{epoch:04d}.keras").read_bytes()
    assert not list(tmp_path.glob(".partial-*"))


def test_monitor_mode_auto_maximizes_accuracies_and_minimizes_losses():
    from shared.checkpoints import monitor_mode

    assert [monitor_mode(name) for name in ("val_top1", "top5", "val_accuracy", "val_psnr", "val_loss", "loss")] \
        == ["max", "max", "max", "max", "min", "min"]
    assert monitor_mode("val_top1", "min") == "min"


def test_early_stopping_patience_survives_a_resume(tmp_path):
    """A flat loss: Keras' EarlyStopping would count from 0 again after a restart and stop two epochs late."""
    import keras

    from shared.checkpoints import AtomicBackupAndRestore, ResumableEarlyStopping

    x, y = toy_data()

    def fit(epochs: int, backup: Path) -> int:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.0), "mse")  # rate 0: the loss never improves
        stopper = ResumableEarlyStopping(monitor="loss", patience=3, mode="min")
        history = model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, shuffle=False,
                            callbacks=[stopper, AtomicBackupAndRestore(backup, stateful=[stopper])])
        return stopper.stopped_epoch, len(history.epoch)

    assert fit(10, tmp_path / "straight") == (3, 4)
    assert fit(2, tmp_path / "cut") == (0, 2)  # cut after epoch 2, its count at 1
    assert fit(10, tmp_path / "cut") == (3, 2)  # the same stop: epochs 3 and 4 only


# ---------------------------------------------------------------- runs


@pytest.mark.slow
def test_keep_checkpoints_and_best_in_a_run(tmp_path, capsys):
    tree = tiny_run_tree(tmp_path, epochs=3, keep_checkpoints=1, best={"monitor": "val_loss"})
    run = train_tree(tree)
    assert sorted(p.name for p in run.checkpoint_dir.iterdir()) == ["best.keras", "epoch-0003.keras"]
    losses = [float(row["val_loss"]) for row in rows(run.path)]
    metrics = run.test_metrics()
    assert metrics["checkpoint"] == "checkpoints/epoch-0003.keras"  # the final test is of the last one
    assert metrics["best"] == {"monitor": "val_loss", "mode": "min", "value": pytest.approx(min(losses), rel=1e-5),
                               "epoch": int(np.argmin(losses)) + 1, "checkpoint": "checkpoints/best.keras"}
    assert run.status()["best"] == metrics["best"] and run.status()["status"] == "finished"
    assert run.checkpoint("last") == run.checkpoint_dir / "epoch-0003.keras"
    assert run.checkpoint("best") == run.checkpoint_dir / "best.keras"

    capsys.readouterr()
    assert runner("test", "--run", str(run.path), "--checkpoint", "best") == 0
    shown = capsys.readouterr().out
    from shared.lifecycle import test as evaluate

    best = evaluate(run, "best")
    assert f"best.keras: test top-1 {best['top1']:.4f}" in shown
    assert evaluate(run, "checkpoints/epoch-0003.keras")["top1"] == metrics["top1"]  # a path, in the run


@pytest.mark.slow
def test_early_stop_ends_a_run_normally_and_survives_a_resume(tmp_path, capsys):
    """`lr` is constant, so with patience 2 a run stops after epoch 3 of 6 and best.keras (lr, max) stays epoch
    1's; a run interrupted before epoch 3 resumes counting and stops at the same epoch, with the same best."""
    import keras

    from shared.lifecycle import resume

    settings = {"epochs": 6, "early_stopping": {"monitor": "lr", "patience": 2, "mode": "max"},
                "best": {"monitor": "lr", "mode": "max"}}
    straight = train_tree(tiny_run_tree(tmp_path / "straight", **settings))
    assert "stopped early after epoch 3 of 6: lr did not improve" in capsys.readouterr().out
    metrics = straight.test_metrics()
    assert metrics["stopped_early"] == {"epoch": 3, "of": 6, "monitor": "lr", "patience": 2}
    assert metrics["checkpoint"] == "checkpoints/epoch-0003.keras" and len(rows(straight.path)) == 3
    assert straight.status()["status"] == "finished" and straight.status()["stopped_early"]["epoch"] == 3
    assert metrics["best"]["epoch"] == 1

    class StopAtEpoch3(keras.callbacks.Callback):  # Ctrl-C as epoch 3 starts: 2 epochs committed
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_tree(tiny_run_tree(tmp_path / "cut", **settings), callbacks=[StopAtEpoch3()])
    (cut,) = (tmp_path / "cut" / "runs" / "tiny").iterdir()
    assert json.loads((cut / "status.json").read_text())["status"] == "interrupted"
    run = resume(cut)
    again = run.test_metrics()
    assert again["stopped_early"] == metrics["stopped_early"] and again["best"]["epoch"] == 1
    assert [int(row["epoch"]) for row in rows(run.path)] == [0, 1, 2]


@pytest.mark.slow
def test_early_stop_ends_every_phase_of_a_finetune_all_run(tmp_path, capsys):
    source = train_tree(tiny_run_tree(tmp_path / "source", epochs=1))
    tree = tiny_run_tree(tmp_path, epochs=6, early_stopping={"monitor": "lr", "patience": 1, "mode": "max"})
    tree["init"] = {"from_run": str(source.path), "mode": "finetune_all", "head_epochs": 3}
    run = train_tree(tree)
    assert run.test_metrics()["stopped_early"]["epoch"] == 2  # in the head phase: the second never starts
    assert len(rows(run.path)) == 2 and run.last_checkpoint().name == "epoch-0002.keras"


@pytest.mark.slow
def test_continue_a_finished_run_in_a_new_folder(tmp_path, capsys):
    """The schedule goes on from the source's epoch (a step at epoch 2 divides the rate by 10 in epoch 3),
    and so does the optimizer's step count; the source run is not changed."""
    import keras

    from shared.runs import open_run

    tree = tiny_run_tree(tmp_path, epochs=2, lr={"base": 0.05, "schedule": "step", "milestones": [2]})
    source = train_tree(tree)
    before = sorted(p.name for p in source.path.rglob("*"))
    capsys.readouterr()
    assert runner("--resume", str(source.path), "--set", "train.epochs=3") == 0
    run = open_run(source.path.parent / "v0002")
    assert f"{run.path}: test top-1 {run.test_metrics()['top1']:.4f}  top-5" in capsys.readouterr().out
    assert sorted(p.name for p in source.path.rglob("*")) == before and source.status()["status"] == "finished"
    assert run.status()["continued_from"] == {"run": str(source.path), "epoch": 2,
                                              "checkpoint": str(source.checkpoint_dir / "epoch-0002.keras")}
    assert f"continued from {source.path} after epoch 2" in (run.path / "notes.md").read_text()
    assert run.config_dict()["train"]["epochs"] == 3
    history = rows(run.path)  # the source's rows, then the new epoch's
    assert [row["epoch"] for row in history] == ["0", "1", "2"]
    assert history[:2] == rows(source.path)
    assert float(history[2]["lr"]) == pytest.approx(0.005)  # from 0, the step schedule would give 0.05
    assert [p.name for p in run.checkpoints()] == ["epoch-0003.keras"]
    model = keras.saving.load_model(run.last_checkpoint(), compile=True)
    assert int(model.optimizer.iterations.numpy()) == 3 * STEPS
    assert run.test_metrics()["checkpoint"] == "checkpoints/epoch-0003.keras"


@pytest.mark.slow
def test_an_interrupted_continuation_resumes_in_its_own_folder(tmp_path):
    """Ctrl-C in the first continued epoch: the new run's backup already holds the source's state (epoch 2),
    so --resume goes on from there, not from epoch 0 and not from the source."""
    import keras

    from shared.lifecycle import continue_run, resume

    source = train_tree(tiny_run_tree(tmp_path, epochs=2, lr={"base": 0.05, "schedule": "step", "milestones": [2]}))

    class CtrlC(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        continue_run(source.path, 4, argv=["pytest"], callbacks=[CtrlC()])
    continued = source.path.parent / "v0002"
    assert json.loads((continued / "status.json").read_text())["status"] == "interrupted"
    run = resume(continued)
    assert run.status()["status"] == "finished" and run.status()["continued_from"]["epoch"] == 2
    assert [row["epoch"] for row in rows(run.path)] == ["0", "1", "2", "3"]
    assert [float(row["lr"]) for row in rows(run.path)][2:] == pytest.approx([0.005, 0.005])
    model = keras.saving.load_model(run.last_checkpoint(), compile=True)
    assert int(model.optimizer.iterations.numpy()) == 4 * STEPS
    assert sorted(p.name for p in source.path.parent.iterdir()) == ["v0001", "v0002"]


@pytest.mark.slow
def test_a_continued_folder_run_keeps_the_recorded_split(tmp_path):
    """A split-less image folder: the continued run records the source's split (not a new one of the folder as
    it is now), so its re-test uses the same images."""
    from PIL import Image

    from shared.lifecycle import continue_run

    rng = np.random.default_rng(0)
    for index, name in enumerate(("cat", "dog")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(60 + 100 * index + rng.integers(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    tree = tiny_run_tree(tmp_path, validation=False, epochs=1, batch_size=4)
    tree["data"] = {"source": "folder", "path": str(tmp_path / "images"), "image_size": 16, "channels": 3,
                    "test_fraction": 0.3}
    source = train_tree(tree)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "cat" / "added-later.png")
    run = continue_run(source.path, 2, argv=["pytest"])
    recorded = sorted(p.relative_to(source.path) for p in (source.path / "split").iterdir())
    assert recorded and sorted(p.relative_to(run.path) for p in (run.path / "split").iterdir()) == recorded
    for path in recorded:
        assert (run.path / path).read_bytes() == (source.path / path).read_bytes()
    from shared.lifecycle import test as evaluate

    assert evaluate(run)["examples"] == source.test_metrics()["examples"]  # the re-test reads the run's split


@pytest.mark.slow
def test_best_keras_only_ever_holds_a_committed_epoch(tmp_path, capsys):
    """Every epoch's rate is lower, so each is the best so far. Killed after epoch 2's copy is written but
    before its backup commits, best.keras is still epoch 1's (the resume redoes epoch 2); the resume then
    ends with the last epoch's and no staged copy left."""
    from shared.checkpoints import backup_state

    run_dir = killed_at(".best-epoch-0002.keras:after:1", tmp_path, tiny_run_tree(
        tmp_path, epochs=3, lr={"base": 0.05, "schedule": "exponential", "gamma": 0.5},
        best={"monitor": "lr", "mode": "min"}))
    checkpoints = run_dir / "checkpoints"
    assert backup_state(run_dir / "backup" / "phase-1")["epoch"] == 1
    assert (checkpoints / ".best-epoch-0002.keras").is_file()
    assert (checkpoints / "best.keras").read_bytes() == (checkpoints / "epoch-0001.keras").read_bytes()

    assert runner("--resume", str(run_dir)) == 0, capsys.readouterr().err  # in this process: only a kill needs its own
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.keras", "epoch-0001.keras", "epoch-0002.keras",
                                                             "epoch-0003.keras"]
    assert (checkpoints / "best.keras").read_bytes() == (checkpoints / "epoch-0003.keras").read_bytes()
    assert json.loads((run_dir / "test_metrics.json").read_text())["best"]["epoch"] == 3


@pytest.mark.slow
def test_a_run_killed_after_its_early_stop_is_not_trained_further(tmp_path, capsys):
    """Killed once the stopping epoch's backup is committed (while it tests): the resume trains nothing more,
    tests and records the stop at that epoch."""
    run_dir = killed_at("training_metadata.json:after:3", tmp_path, tiny_run_tree(
        tmp_path, epochs=6, early_stopping={"monitor": "lr", "patience": 2, "mode": "max"}))
    capsys.readouterr()
    code = runner("--resume", str(run_dir))  # in this process: only the kill needs one of its own
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "stopped early after epoch 3 of 6" in out
    assert len(rows(run_dir)) == 3 and sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == \
        "epoch-0003.keras"
    assert json.loads((run_dir / "test_metrics.json").read_text())["stopped_early"]["epoch"] == 3


# ---------------------------------------------------------------- bad input


def test_a_monitor_the_run_will_not_log_is_refused_before_a_folder_exists(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_run_tree(tmp_path, best={"monitor": "val_top2"})))
    assert runner("--config", str(config)) == 2
    err = capsys.readouterr().err
    assert "train.best.monitor is 'val_top2', which this run will not log (in " in err
    assert "; it logs: loss, lr, top1, top5, val_loss, val_top1, val_top5" in err
    assert len(err.strip().splitlines()) == 1
    assert run_folders(tmp_path / "runs") == []

    config.write_text(yaml.safe_dump(tiny_run_tree(tmp_path, validation=False,
                                                   early_stopping={"monitor": "val_top1"})))
    assert runner("--config", str(config)) == 2
    err = capsys.readouterr().err
    assert "train.early_stopping.monitor is 'val_top1', which this run will not log" in err
    assert "loss, lr, top1, top5; val_* metrics need data.val_fraction" in err
    assert run_folders(tmp_path / "runs") == []


def test_checkpoint_best_of_a_run_without_one_is_refused(trained_run, capsys):
    run, _ = trained_run
    assert runner("test", "--run", str(run.path), "--checkpoint", "best") == 2
    err = capsys.readouterr().err
    assert f"run {run.path} has no checkpoints/best.keras; set train.best.monitor" in err
    assert runner("test", "--run", str(run.path), "--checkpoint", "nowhere.keras") == 2
    assert "checkpoint nowhere.keras not found" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("train.lr.base=0.1", "--resume RUN --set takes only train.epochs=N"),
    ("train.epochs=many", "--resume RUN --set takes only train.epochs=N"),
    ("train.epochs=2", "has trained 2 epochs; train.epochs=2 must be more"),
    ("train.epochs=1", "has trained 2 epochs; train.epochs=1 must be more"),
])
def test_continuing_a_finished_run_takes_only_more_epochs(trained_run, capsys, setting, message):
    run, _ = trained_run
    before = run_folders(run.path.parents[1])
    assert runner("--resume", str(run.path), "--set", setting) == 2
    assert message in capsys.readouterr().err
    assert run_folders(run.path.parents[1]) == before


def test_continuing_an_unfinished_run_is_refused(trained_run, tmp_path, capsys):
    run, _ = trained_run
    copy = tmp_path / "runs" / "resnet" / "v0001"
    shutil.copytree(run.path, copy)
    status = json.loads((copy / "status.json").read_text())
    (copy / "status.json").write_text(json.dumps({**status, "status": "interrupted"}))
    assert runner("--resume", str(copy), "--set", "train.epochs=5") == 2
    err = capsys.readouterr().err
    assert f"run {copy} is interrupted, not finished" in err and "resume this one without --set" in err
    assert run_folders(tmp_path / "runs") == ["v0001"]


def test_continuing_a_distillation_run_is_refused(trained_run, tmp_path, capsys):
    run, _ = trained_run
    copy = tmp_path / "runs" / "resnet" / "v0001"
    shutil.copytree(run.path, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config.setdefault("distill", {})["teacher"] = str(run.path)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert runner("--resume", str(copy), "--set", "train.epochs=5") == 2
    assert f"run {copy} is a distillation run" in capsys.readouterr().err
    assert run_folders(tmp_path / "runs") == ["v0001"]


def test_prune_script_never_deletes_best_or_interrupted(tmp_path):
    root = tmp_path / "runs"
    folder = root / "tiny" / "v0001" / "checkpoints"
    folder.mkdir(parents=True)
    (root / ".runs_root").touch()
    for name in ("epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras", "best.keras", "interrupted.keras"):
        (folder / name).write_bytes(b"x")
    result = subprocess.run(["bash", str(REPO / "scripts" / "prune_checkpoints.sh"), str(root)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["best.keras", "epoch-0003.keras", "interrupted.keras"]


def test_a_checkpoint_save_after_a_model_build_makes_no_reference_objects(tmp_path, monkeypatch):
    """Keras stores each kind of object's attribute skip set under one key and looks it up under another
    (shared/keras_saving.py), so each save made a plain `Layer()` per layer it walked. Building a model through the
    model zoo keeps the sets: a second save makes none, also after `clear_session`."""
    import keras
    from keras.src.layers.layer import Layer
    from keras.src.saving import saving_lib

    from shared.modelzoo import MODELS_DIR, build_model, load_model_module

    model = build_model(load_model_module(MODELS_DIR / "resnet"), 4, (16, 16, 3),
                        {"depth": 18, "width": 4, "small_input": True})
    model.save(tmp_path / "first.keras")
    keras.backend.clear_session(free_memory=False)
    made = []
    init = Layer.__init__
    monkeypatch.setattr(Layer, "__init__", lambda self, *a, **k: (made.append(1) if type(self) is Layer else None,
                                                                   init(self, *a, **k))[1])
    model.save(tmp_path / "second.keras")
    model.load_weights(tmp_path / "second.keras")
    assert made == []
    assert saving_lib.get_attr_skipset("Layer") is saving_lib.get_attr_skipset("Layer")

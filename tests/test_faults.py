"""Faults at the end of an epoch and at every write of a training run: a SIGKILL at each commit point
(the run resumes with no epoch or checkpoint lost, no temporary file left, every epoch counted once), and
a full disk at each write (one line naming the file and the free space, the run marked failed, the last
good checkpoint intact, no temporary file left). A two-layer model keeps each run to seconds."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import forked
from conftest import KILLING_RUNNER, REPO, TINY_MODEL, tiny_tree

EPOCHS = 3
STEPS = 2  # 64 training images of 32


def tiny_model_tree(tmp_path: Path, **train) -> dict:
    model = tmp_path / "tiny_model"
    model.mkdir(exist_ok=True)
    (model / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(tmp_path / "runs", data={"synthetic_train": 80, "synthetic_test": 32, "val_fraction": 0.2},
                     train={"epochs": EPOCHS, "batch_size": 32, "verbose": 0, "lr": {"base": 0.05}, **train})
    tree["model"] = {"name": "tiny", "path": str(model)}
    return tree


def killed_at(kill_at: str, *args: str) -> subprocess.CompletedProcess:
    result = forked.run([sys.executable, "-c", KILLING_RUNNER, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "KILL_AT": kill_at})
    assert result.returncode == -signal.SIGKILL, result.stderr
    return result


def checkpoint_names(run_dir: Path) -> list[str]:
    from shared.runs import Run

    found = Run(run_dir).checkpoints()  # what every reader (test, export, finetune) lists
    for path in found:
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is None, path  # complete, not a truncated file
    return [path.name for path in found]


def backup_epoch(run_dir: Path) -> int:
    from shared.checkpoints import backup_state

    return backup_state(run_dir / "backup" / "phase-1")["epoch"]


def metric_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def partials(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if ".partial" in p.name)


@pytest.mark.slow
def test_a_kill_at_each_commit_point_of_an_epoch_end_loses_nothing(tmp_path, capsys):
    """One run killed four times, at each commit point of an epoch's end (with EMA, so the checkpoint holds
    the averaged weights and the backup the raw ones), then resumed to its end: after every kill the
    checkpoints of the epochs done are there and complete, and the last resume, which trains nothing,
    records the figure `test --run` gives for the last checkpoint."""
    import keras

    from shared.lifecycle import test as evaluate
    from shared.lifecycle import resume

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_model_tree(tmp_path, ema_momentum=0.9)))

    # Epoch 2's checkpoint written in full but not yet renamed: readers see epoch 1 only.
    killed_at("epoch-0002.keras:before:1", "--config", str(config))
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert checkpoint_names(run_dir) == ["epoch-0001.keras"] and backup_epoch(run_dir) == 1
    assert any(p.endswith("epoch-0002.keras") for p in partials(run_dir))  # hidden, never listed
    assert metric_epochs(run_dir) == [0, 1]  # the row comes before the checkpoint

    # Epoch 2's checkpoint renamed, its backup not yet written: the checkpoint is kept, the epoch redone.
    result = killed_at("epoch-0002.keras:after:1", "--resume", str(run_dir))
    assert "resuming after epoch 1 of 3" in result.stdout
    assert checkpoint_names(run_dir) == ["epoch-0001.keras", "epoch-0002.keras"] and backup_epoch(run_dir) == 1

    # The backup's weights renamed, its metadata not yet: the backup still says epoch 1.
    killed_at("epoch-0002.weights.h5:after:1", "--resume", str(run_dir))
    assert checkpoint_names(run_dir) == ["epoch-0001.keras", "epoch-0002.keras"] and backup_epoch(run_dir) == 1
    assert metric_epochs(run_dir) == [0, 1]

    # Just after the last epoch's commit, before the test: all three epochs are done.
    killed_at("training_metadata.json:after:2", "--resume", str(run_dir))
    assert checkpoint_names(run_dir) == [f"epoch-{n:04d}.keras" for n in range(1, EPOCHS + 1)]
    assert backup_epoch(run_dir) == EPOCHS and metric_epochs(run_dir) == [0, 1, 2]

    capsys.readouterr()
    run = resume(run_dir, argv=["pytest"])
    assert f"resuming after epoch {EPOCHS} of {EPOCHS}" in capsys.readouterr().out
    assert run.status()["status"] == "finished" and metric_epochs(run_dir) == list(range(EPOCHS))
    assert checkpoint_names(run_dir) == [f"epoch-{n:04d}.keras" for n in range(1, EPOCHS + 1)]
    assert partials(run_dir) == [] and not (run_dir / "backup").exists()
    recorded = run.test_metrics()
    assert recorded["checkpoint"] == f"checkpoints/epoch-{EPOCHS:04d}.keras" and recorded["weights"] == "ema"
    retest = evaluate(run)  # what `test --run` prints; the model in memory held the backup's raw weights
    assert (retest["top1"], retest["loss"]) == (recorded["top1"], recorded["loss"])
    # every resume went on from the backup's optimizer state: each epoch's steps counted once
    last = keras.saving.load_model(run_dir / "checkpoints" / f"epoch-{EPOCHS:04d}.keras", compile=True)
    assert int(last.optimizer.iterations.numpy()) == EPOCHS * STEPS


def test_a_metrics_row_cut_off_by_a_kill_is_dropped_when_resuming(tmp_path):
    """A kill while epoch 13's row was being written left "1" of "12,...": read as epoch 1, it would stay."""
    from shared.checkpoints import truncate_metrics

    path = tmp_path / "metrics.csv"
    path.write_text("epoch,loss,lr\n" + "".join(f"{n},0.5,0.1\n" for n in range(12)) + "1")
    truncate_metrics(path, epochs_done=12)
    assert metric_epochs(tmp_path) == list(range(12))


@pytest.mark.slow
def test_the_recorded_figure_is_the_one_test_gives_for_the_last_checkpoint(tmp_path):
    """Trained in bfloat16 with EMA, the run still records what `test --run` computes from its last checkpoint
    (rebuilt in float32): the figure is never the model in memory's own."""
    from shared.config import load_config
    from shared.lifecycle import test as evaluate
    from shared.lifecycle import train

    run = train(load_config(tree=tiny_model_tree(tmp_path, epochs=1, ema_momentum=0.9, precision="mixed_bfloat16")),
                draw=False)  # the figures are drawn by `test --run` (evaluate) below
    recorded, retest = run.test_metrics(), evaluate(run)
    assert recorded["checkpoint"] == "checkpoints/epoch-0001.keras"
    assert (retest["top1"], retest["loss"], retest["confusion"]) == \
        (recorded["top1"], recorded["loss"], recorded["confusion"])


# Runs the runner with Run.set_status wrapped: SIGKILL this process just before or just after status.json
# says "finished" (KILL_AT_FINISHED=before|after).
KILLED_AT_FINISHED = """
import os, signal, sys
from shared import runner, runs

when, set_status = os.environ["KILL_AT_FINISHED"], runs.Run.set_status


def killing(run, status, **details):
    if status == "finished" and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    set_status(run, status, **details)
    if status == "finished" and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)


runs.Run.set_status = killing
sys.exit(runner.main(sys.argv[1:]))
"""


def killed_at_finished(tmp_path: Path, when: str) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_model_tree(tmp_path, epochs=1)))
    result = forked.run([sys.executable, "-c", KILLED_AT_FINISHED, "--config", str(config)], cwd=REPO,
                        capture_output=True, text=True, timeout=300, env={**os.environ, "KILL_AT_FINISHED": when})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert (run_dir / "test_metrics.json").is_file()  # it was killed after testing
    return run_dir


@pytest.mark.slow
def test_a_kill_just_after_finished_leaves_no_backup(tmp_path):
    """The backup is removed before the status says finished: nothing resumes a finished run, so a backup
    left then would stay for good."""
    run_dir = killed_at_finished(tmp_path, "after")
    assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"
    assert not (run_dir / "backup").exists()


@pytest.mark.slow
def test_a_run_killed_just_before_finished_is_marked_finished_by_resume(tmp_path):
    """Killed between removing its backup and writing "finished": trained and tested, nothing to resume;
    --resume says so in one line and writes the status training did not."""
    from shared.errors import UserError
    from shared.lifecycle import resume
    from shared.runs import Run, lock_holder

    run_dir = killed_at_finished(tmp_path, "before")
    assert not (run_dir / "backup").exists() and Run(run_dir).status()["status"] == "running"
    with pytest.raises(UserError, match="had finished .* it is now marked finished"):
        resume(run_dir, argv=["pytest"])
    status = Run(run_dir).status()
    assert status["status"] == "finished" and status["ended"] and lock_holder(Run(run_dir)) is None


# ---------------------------------------------------------------- a full disk


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_fsync(monkeypatch, name: str, nth: int, times: int = 1) -> None:
    """fsync of a file whose name ends with `name` (its temporary name included) fails with ENOSPC from
    the nth call on, `times` times: where a full disk shows on file systems that allocate late."""
    fsync, calls = os.fsync, [0]

    def failing(descriptor):
        if os.readlink(f"/proc/self/fd/{descriptor}").endswith(name):
            calls[0] += 1
            if nth <= calls[0] < nth + times:
                raise enospc()
        return fsync(descriptor)

    monkeypatch.setattr(os, "fsync", failing)


def fail_writer(monkeypatch, method: str, name: str) -> None:
    """keras.Model's `method(path)` (save, save_weights) for a path ending with `name` writes a few bytes
    and fails with ENOSPC."""
    import keras

    real = getattr(keras.Model, method)

    def failing(self, path, *args, **kwargs):
        if str(path).endswith(name):
            Path(path).write_bytes(b"PK\x03\x04 half a file")
            raise enospc()
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, method, failing)


def fail_tensorboard(monkeypatch) -> None:
    """The TensorBoard callback's epoch-2 summaries fail as TensorFlow reports it: an op error whose text
    names the event file and the OS error."""
    import keras
    import tensorflow as tf

    real = keras.callbacks.TensorBoard.on_epoch_end

    def failing(self, epoch, logs=None):
        if epoch == 1:
            raise tf.errors.ResourceExhaustedError(None, None, f"{self.log_dir}/train/events.out.tfevents.1.v2; "
                                                               f"No space left on device")
        return real(self, epoch, logs)

    monkeypatch.setattr(keras.callbacks.TensorBoard, "on_epoch_end", failing)


def fail_figure(monkeypatch, name: str) -> None:
    """Rendering the PNG named `name` writes a few bytes and fails with ENOSPC."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    real = FigureCanvasAgg.print_png

    def failing(self, target, *args, **kwargs):
        if name in getattr(target, "name", str(target)):
            target.write(b"\x89PNG half a picture")
            raise enospc()
        return real(self, target, *args, **kwargs)

    monkeypatch.setattr(FigureCanvasAgg, "print_png", failing)


# Where the disk fills (in epoch 2 of 2, or after it): the fault, the file the error names, the status left,
# and how many checkpoints, backed-up epochs and metrics rows are kept.
FULL_DISK = {
    "checkpoint": (lambda mp: fail_writer(mp, "save", "epoch-0002.keras"),
                   "checkpoints/epoch-0002.keras", "failed", 1, 1, 2),
    "backup weights": (lambda mp: fail_writer(mp, "save_weights", "epoch-0002.weights.h5"),
                       "backup/phase-1/epoch-0002.weights.h5", "failed", 2, 1, 2),
    "backup commit": (lambda mp: fail_fsync(mp, "training_metadata.json", 2),
                      "backup/phase-1/training_metadata.json", "failed", 2, 1, 2),
    "metrics row": (lambda mp: fail_fsync(mp, "metrics.csv", 2), "metrics.csv", "failed", 1, 1, 1),  # row cut off
    "tensorboard": (fail_tensorboard, "logs/train/events.out.tfevents.1.v2", "failed", 1, 1, 1),
    "curves plot": (lambda mp: fail_figure(mp, "curves.png"), "curves.png", "failed", 2, 2, 2),
    # the finished status and then the failed one cannot be written: the old status stays; the backup is gone
    # (removed just before), and --resume marks the tested run finished
    "status": (lambda mp: fail_fsync(mp, "status.json", 2, times=2), "status.json", "running", 2, 0, 2),
}


@pytest.mark.parametrize("where", list(FULL_DISK))
def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, where):
    import keras

    from shared import runner
    from shared.checkpoints import backup_state

    fault, named, status, checkpoints, backup, rows = FULL_DISK[where]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_model_tree(tmp_path, epochs=2)))
    fault(monkeypatch)
    code = runner.main(["--config", str(config)])
    monkeypatch.undo()

    err = capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: disk full while writing {run_dir / named} (") and " free there)" in err, err
    assert f"--resume {run_dir}" in err
    assert json.loads((run_dir / "status.json").read_text())["status"] == status
    assert ("is marked failed" in err) == (status == "failed")
    assert checkpoint_names(run_dir) == [f"epoch-{n:04d}.keras" for n in range(1, checkpoints + 1)]
    keras.saving.load_model(run_dir / "checkpoints" / f"epoch-{checkpoints:04d}.keras")  # the last good one loads
    backed_up = backup_state(run_dir / "backup" / "phase-1")  # what --resume goes on from
    assert (backed_up["epoch"] if backed_up else 0) == backup
    assert metric_epochs(run_dir) == list(range(rows))  # each row whole, every backed-up epoch's there
    assert partials(run_dir) == [] and not list(run_dir.rglob("*.tmp")), partials(run_dir)
    if where == "status":  # trained and tested: the resume the line offers writes the status that was missing
        assert runner.main(["--resume", str(run_dir)]) == 2
        assert "it is now marked finished" in capsys.readouterr().err
        assert json.loads((run_dir / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_a_real_full_disk_stops_the_run_in_one_line_and_it_resumes(tmp_path):
    """On a 4 MB tmpfs filled to the last byte after epoch 1: the run stops with the one-line DiskFull,
    keeps epoch 1's checkpoint and backup, leaves no temporary file, and resumes once there is room."""
    import keras

    from shared.config import load_config
    from shared.durable import DiskFull
    from shared.lifecycle import resume, train

    disk = tmp_path / "small_disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    filler = disk / "filler"

    class FillTheDisk(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):  # after the runner's own: epoch 1 is committed
            if epoch == 0:
                with open(filler, "wb", buffering=0) as out:
                    for chunk in (1 << 16, 1 << 12, 1):
                        with contextlib.suppress(OSError):
                            while True:
                                out.write(b"\0" * chunk)

    try:
        with pytest.raises(DiskFull) as stopped:
            train(load_config(tree=tiny_model_tree(disk, epochs=2)), callbacks=[FillTheDisk()])
        (run_dir,) = (disk / "runs" / "tiny").iterdir()
        message = str(stopped.value)
        assert "\n" not in message and message.startswith(f"disk full while writing {run_dir}"), message
        status = json.loads((run_dir / "status.json").read_text())["status"]
        assert status == ("failed" if "is marked failed" in message else "running"), message
        assert checkpoint_names(run_dir) == ["epoch-0001.keras"]
        keras.saving.load_model(run_dir / "checkpoints" / "epoch-0001.keras")
        assert backup_epoch(run_dir) == 1 and partials(run_dir) == []

        filler.unlink()
        run = resume(run_dir, argv=["pytest"])
        assert run.status()["status"] == "finished" and metric_epochs(run_dir) == [0, 1]
        assert checkpoint_names(run_dir) == ["epoch-0001.keras", "epoch-0002.keras"]
    finally:
        # lazy: TensorBoard's writers of the failed fit still hold their event files open
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)

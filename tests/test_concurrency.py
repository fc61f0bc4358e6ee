"""Two real processes at once: tune workers sharing a new study, exports into one folder, shard writers
into one output folder. Each test starts both processes before either can finish."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import forked
from conftest import REPO, load_script, tiny_tree

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}

TINY_MODEL = '''
import keras
from keras import layers


def build(num_classes: int = 10, input_shape: tuple = (16, 16, 3), width: int = 4) -> keras.Model:
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Conv2D(width, 3, strides=2, activation="relu", name="conv")(inputs)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax", name="predictions")(x))
'''


def together(*commands: list[str]) -> list[subprocess.CompletedProcess]:
    """Start every command, then wait for all: they race from the first line."""
    started = [forked.popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for command in commands]
    results = []
    for process, command in zip(started, commands):
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("sampler, trials", [("random", 4), ("grid", 3)])
def test_two_tune_workers_share_a_new_study(tmp_path, sampler, trials):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1}, data={"synthetic_train": 64, "synthetic_test": 32})
    tree["model"] = {"name": "tiny", "path": str(tmp_path / "tiny"), "width": 4}
    # Random: three values, four trials, so the workers meet values another one has or is training (and the
    # study trains three: the space has no more).
    # Grid: the workers must agree on which point each stored grid id is.
    tree["tune"] = {"study": "shared", "sampler": sampler, "trials": trials,
                    "space": {"train.lr.base": {"choice": [0.01, 0.05, 0.1]}}}
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    command = [sys.executable, "-m", "shared.runner", "tune", "--config", str(recipe)]

    first, second = together(command, command)  # a new database: both create the tables and the study
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]

    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'runs' / 'tuning.db'}")
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert study.user_attrs["workers"] == 2
    trained = [t for t in study.trials if "same_as" not in t.user_attrs]
    values = [t.params["train.lr.base"] for t in trained]
    # no values trained twice, no more than asked in all (random: four asked of a space of three points, so
    # three), and every point: proposals of values already measured do not count
    assert sorted(values) == [0.01, 0.05, 0.1]
    runs = sorted((tmp_path / "runs" / "tiny").iterdir())
    assert sorted(str(r) for r in runs) == sorted(t.user_attrs["run"] for t in trained)
    for trial in study.trials:
        if "same_as" in trial.user_attrs:
            assert trial.params == study.trials[trial.user_attrs["same_as"]].params


# ---------------------------------------------------------------- exports into one folder


@pytest.fixture(scope="module")
def one_conv_run(tmp_path_factory):
    """A finished run of the one-convolution model: what the export tests check is the versions, the locks and
    the folder, and each exporting process traces the model (the tiny ResNet's seconds in each)."""
    from shared.config import load_config
    from shared.lifecycle import train

    base = tmp_path_factory.mktemp("one_conv_run")
    (base / "tiny").mkdir()
    (base / "tiny" / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(base / "runs", train={"epochs": 1}, data={"synthetic_train": 64, "synthetic_test": 32})
    tree["model"] = {"name": "tiny", "path": str(base / "tiny"), "width": 4}
    return train(load_config(tree=tree), argv=["pytest"], draw=False)  # no test looks at its figures


def fake_version(folder: Path) -> None:
    """An earlier export, as far as numbering and pruning can tell (a real one costs seconds)."""
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"an earlier version")


@pytest.mark.slow
def test_three_exports_at_once_take_their_own_versions(one_conv_run, tmp_path):
    run = one_conv_run
    export_dir = tmp_path / "exports"
    for version in (1, 2, 3):
        fake_version(export_dir / "tiny" / str(version))

    def export(name: str) -> list[str]:
        return [sys.executable, "-m", "shared.runner", "export", "--run", str(run.path), "--format", "saved_model",
                "--export-dir", str(export_dir), "--name", name, "--keep", "2"]

    results = together(export("tiny"), export("tiny"), export("other"))
    assert [r.returncode for r in results] == [0, 0, 0], "\n".join(r.stderr[-1500:] for r in results)
    published = sorted(line.split()[1] for r in results for line in r.stdout.splitlines()
                       if line.startswith("exported "))
    assert published == [str(export_dir / "other" / "1"), str(export_dir / "tiny" / "4"),
                         str(export_dir / "tiny" / "5")]  # one number each, none lost to pruning
    assert sorted(p.name for p in (export_dir / "tiny").iterdir()) == ["4", "5"]  # 1-3 pruned, nothing hidden
    assert sorted(p.name for p in (export_dir / "other").iterdir()) == ["1"]
    for version in ("tiny/4", "tiny/5", "other/1"):
        assert (export_dir / version / "saved_model.pb").is_file()
        assert (export_dir / version / "assets.extra" / "export.json").is_file()
    config = (export_dir / "models.config").read_text()
    assert 'name: "tiny"' in config and 'name: "other"' in config  # neither export's listing lost


HOLD_EXPORT_LOCK = """
import sys, time
from pathlib import Path
from shared.export import export_lock
export_dir = Path(sys.argv[1])
while not list(export_dir.glob("tiny/.export-*")):  # the export has started writing its version
    time.sleep(0.01)
with export_lock(export_dir):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.slow
def test_an_export_publishes_only_once_the_lock_is_free(one_conv_run, tmp_path):
    import threading

    from shared.classification.export import export_saved_model
    from shared.tasks import rebuild

    run = one_conv_run
    export_dir = tmp_path / "exports"
    fake_version(export_dir / "tiny" / "1")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_EXPORT_LOCK, str(export_dir)], cwd=REPO, env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    published = []
    exporting = threading.Thread(target=lambda: published.append(
        export_saved_model(*rebuild(run), run, export_dir, model_name="tiny", keep=1)))
    exporting.start()
    try:
        assert holder.stdout.readline() == "held\n"
        # The export finishes writing and then waits: no new version, no pruning, no models.config.
        staging = export_dir / "tiny"
        while not list(staging.glob(".export-*/assets.extra/export.json")) and exporting.is_alive():
            time.sleep(0.05)
        time.sleep(1.0)
        assert exporting.is_alive()
        assert sorted(p.name for p in staging.iterdir() if not p.name.startswith(".")) == ["1"]
        assert not (export_dir / "models.config").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
        exporting.join(timeout=120)
    assert published == [export_dir / "tiny" / "2"]
    assert sorted(p.name for p in staging.iterdir()) == ["2"]


HOLD_STAGING_LOCK = """
import sys
from pathlib import Path
from shared.export import STAGING_LOCK
from shared.locks import FileLock
with FileLock(Path(sys.argv[1]) / STAGING_LOCK):
    print("writing", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.slow
def test_what_a_killed_export_left_goes_with_the_next_export_and_a_live_one_stays(trained_run, tmp_path):
    """SIGKILL an export while it writes its version: the next export into the folder removes the staging
    folder it left (and a half-pruned version), but not the staging folder of an export still writing."""
    import signal

    from shared import export
    from shared.classification.export import export_saved_model
    from shared.tasks import rebuild

    run, _ = trained_run
    export_dir = tmp_path / "exports"
    killed = forked.popen([sys.executable, "-m", "shared.runner", "export", "--run", str(run.path), "--format",
                           "saved_model", "--export-dir", str(export_dir), "--name", "tiny"], cwd=REPO, env=ENV,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list((export_dir / "tiny").glob(f"{export.STAGING_PREFIX}*/saved_model.pb")):
        assert killed.poll() is None and time.monotonic() < deadline, "the export ended before it was killed"
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    (left,) = (export_dir / "tiny").glob(f"{export.STAGING_PREFIX}*")
    half_pruned = export_dir / "tiny" / f"{export.DELETING_PREFIX}1-123-456"
    (half_pruned / "variables").mkdir(parents=True)
    live = export_dir / "tiny" / f"{export.STAGING_PREFIX}live"
    live.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", HOLD_STAGING_LOCK, str(live)], cwd=REPO, env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        published = export_saved_model(*rebuild(run), run, export_dir, model_name="tiny")
        assert published == export_dir / "tiny" / "1"
        assert sorted(p.name for p in (export_dir / "tiny").iterdir()) == sorted(["1", live.name])
        assert not left.exists() and not half_pruned.exists()
        assert not (published / export.STAGING_LOCK).exists()  # the writer's lock is not published
    finally:
        writer.stdin.close()
        writer.wait(timeout=60)


# ---------------------------------------------------------------- shard writers into one folder


@pytest.mark.slow
def test_two_make_tfrecords_into_one_folder(tmp_path):
    from test_tfrecord import make_source

    from shared.data.tfrecord import count_records, read_labels

    src, out = make_source(tmp_path / "src"), tmp_path / "out"
    out.mkdir()  # an existing folder: the second run stops before listing any image
    command = [sys.executable, str(REPO / "scripts" / "make_tfrecords.py"), str(src), str(out),
               "--train-shards", "3", "--val-shards", "2", "--no-progress"]
    results = together(command, command)
    assert sorted(r.returncode for r in results) in ([0, 0], [0, 2]), "\n".join(r.stderr[-1500:] for r in results)
    for refused in (r for r in results if r.returncode == 2):  # the other one was writing: one line, naming it
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith(f"error: {out} is being written by pid ") and line.endswith(
            "; wait for it or choose another folder")
    assert sorted(p.name for p in out.iterdir()) == [
        ".train.plan", ".validation.plan", ".writer.lock", "counts.json", "encoding.json", "labels.txt",
        "train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003", "validation-00000-of-00002",
        "validation-00001-of-00002"]
    assert count_records(str(out / "train-*")) == 9 and count_records(str(out / "validation-*")) == 3
    assert len(read_labels(out / "labels.txt")) == 3


HOLD_FOLDER = """
import sys
from shared.locks import folder_writer
with folder_writer(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def test_make_detection_dataset_refuses_a_folder_being_written(tmp_path, capsys):
    import socket

    script = load_script("make_detection_dataset")
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLDER, str(out)], cwd=REPO, env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert script.main([str(out), "--train", "2", "--test", "1", "--no-progress"]) == 2
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        rf"error: {re.escape(str(out))} is being written by pid {holder.pid} on {re.escape(socket.gethostname())} "
        r"since \d{4}-\d\d-\d\dT[\d:]{8}; wait for it or choose another folder", lines[0]), lines
    assert sorted(p.name for p in out.iterdir()) == [".writer.lock"]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    import signal

    from shared.locks import FileLock

    lock = FileLock(tmp_path / ".some.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_FOLDER, str(tmp_path / "out")], cwd=REPO, env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    writer_lock = FileLock(tmp_path / "out" / ".writer.lock")
    assert not writer_lock.acquire(blocking=False)  # held by the other process
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert writer_lock.acquire(blocking=False)  # the kernel dropped it with the process
    writer_lock.release()
    with lock, lock:  # re-entrant within a process
        pass


LOCK_THEN_WRITE_RECORD_LATE = """
import fcntl, json, os, socket, sys, time
descriptor = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(0.5)  # the window between winning the lock and writing the record, widened
os.ftruncate(descriptor, 0)
os.pwrite(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}).encode(), 0)
sys.stdin.read()
"""


def test_a_refusal_names_the_holder_that_has_just_taken_the_lock(tmp_path):
    """The race CI once lost: the loser read the lock file before the winner had written its record into it.
    A stale record of a dead process is in the file beforehand, as a killed earlier writer leaves it."""
    from shared.errors import UserError
    from shared.locks import WRITER_LOCK, folder_writer

    out = tmp_path / "out"
    out.mkdir()
    (out / WRITER_LOCK).write_text('{"pid": 999999999, "host": "%s", "started": "long ago"}' % os.uname().nodename)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_THEN_WRITE_RECORD_LATE, str(out / WRITER_LOCK)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(UserError, match=rf"is being written by pid {holder.pid} on .* since now;"):
            with folder_writer(out):
                pass
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)

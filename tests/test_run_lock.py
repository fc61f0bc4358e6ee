"""The training lock: a run that a live process trains is refused, with one line naming the process, by
--resume, test, export, size, finetune --from, distill --teacher and prune; a lock left by a killed process
is taken over. The holder is a real second process."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from shared import runs
from shared.config import load_config
from shared.lifecycle import train

import forked
from conftest import REPO, tiny_tree

HOLD = ("import sys, time; from pathlib import Path; from shared import runs; "
        "runs.lock_run(runs.Run(Path(sys.argv[1]))); print('locked', flush=True); time.sleep(600)")
PRUNE = REPO / "scripts" / "prune_checkpoints.sh"


@contextlib.contextmanager
def held(run_dir: Path):
    """A second process that holds the run's lock until the block ends (then it is killed)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        yield process
    finally:
        process.kill()
        process.wait()


def refused_elsewhere(run_dir: Path) -> str:
    """Another process trying to take the lock: its error output (it must fail)."""
    result = subprocess.run([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "locked" not in result.stdout
    return result.stderr


def in_use(pid: int) -> str:
    return f"is in use by pid {pid} on {socket.gethostname()} since "


@pytest.fixture
def live_copy(trained_run, tmp_path) -> Path:
    """A private copy of the finished tiny run, marked running as a live run's folder would be."""
    run_dir = tmp_path / "runs" / "resnet" / "v0001"
    shutil.copytree(trained_run[0].path, run_dir)
    runs.runs_root(tmp_path / "runs")
    runs.Run(run_dir).set_status("running")
    return run_dir


def cli(*args: str) -> subprocess.CompletedProcess:
    return forked.run([sys.executable, "-m", "shared.runner", *args], cwd=REPO, capture_output=True, text=True,
                      timeout=120)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file() and p.name != runs.LOCK_FILE}


@pytest.mark.slow
def test_every_command_refuses_a_live_run_with_one_line(live_copy, tmp_path, capsys):
    # The holder is the second process; each command runs in this one (the same main() the console calls),
    # which spares a TensorFlow start per command.
    from shared import runner

    config = str(REPO / "models" / "resnet" / "quick.yaml")
    elsewhere = f"run.dir={tmp_path / 'other_runs'}"
    before = snapshot(live_copy)
    with held(live_copy) as holder:
        for args in (["--resume", str(live_copy)], ["test", "--run", str(live_copy)],
                     ["export", "--run", str(live_copy), "--format", "tflite"], ["size", "--run", str(live_copy)],
                     ["finetune", "--config", config, "--from", str(live_copy), "--set", elsewhere],
                     ["distill", "--config", config, "--teacher", str(live_copy), "--set", elsewhere]):
            capsys.readouterr()
            code = runner.main(args)
            err = capsys.readouterr().err
            assert code == 2, (args, err)
            assert len(err.strip().splitlines()) == 1, (args, err)
            assert err.startswith("error: run ") and in_use(holder.pid) in err, args
    assert snapshot(live_copy) == before  # nothing written, nothing redrawn
    assert not (tmp_path / "other_runs").exists()


@pytest.mark.slow  # its holder is a process of its own
def test_library_readers_refuse_a_live_run(live_copy, tmp_path):
    from shared.lifecycle import test as evaluate
    from shared.lifecycle import resume
    from shared.tasks import rebuild

    run = runs.Run(live_copy)
    with held(live_copy) as holder:
        # export, size, TFLite, a finetune source and a teacher all read the run through the one rebuild
        for read in (lambda: evaluate(run), lambda: rebuild(run), lambda: resume(run.path)):
            with pytest.raises(runs.RunInUse, match=in_use(holder.pid)):
                read()
    assert runs.Run(live_copy).status()["status"] == "running"


@pytest.mark.slow  # its holder is a process of its own
def test_detection_run_readers_refuse_a_live_run(tmp_path):
    from shared.lifecycle import resume as resume_detection
    from shared.tasks import rebuild

    run_dir = tmp_path / "runs" / "resnet" / "v0001"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(load_config(REPO / "models" / "resnet" / "detect.yaml").dump())
    with held(run_dir) as holder:
        for read in (lambda: rebuild(runs.Run(run_dir)), lambda: resume_detection(run_dir)):
            with pytest.raises(runs.RunInUse, match=in_use(holder.pid)):
                read()


def test_prune_skips_a_live_run_and_prunes_the_others(tmp_path):
    root = runs.runs_root(tmp_path / "runs")
    for version in ("v0001", "v0002"):
        (root / "resnet" / version / "checkpoints").mkdir(parents=True)
        for epoch in (1, 2, 3):
            (root / "resnet" / version / "checkpoints" / f"epoch-{epoch:04d}.keras").write_bytes(b"x" * 10)
    live = root / "resnet" / "v0001"
    with held(live) as holder:
        result = subprocess.run(["bash", str(PRUNE), str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"skipped {live}: in use by pid {holder.pid} on {socket.gethostname()} since ")
    assert len(list((live / "checkpoints").iterdir())) == 3
    assert [p.name for p in (root / "resnet" / "v0002" / "checkpoints").iterdir()] == ["epoch-0003.keras"]
    assert "skipped 1 run(s) still training" in result.stdout


@pytest.mark.slow  # its holder is a process of its own
def test_a_killed_holders_lock_is_taken_over(tmp_path):
    root = runs.runs_root(tmp_path / "runs")
    run = runs.Run(root / "resnet" / "v0001")
    run.checkpoint_dir.mkdir(parents=True)
    for epoch in (1, 2):
        (run.checkpoint_dir / f"epoch-{epoch:04d}.keras").write_bytes(b"x")
    run.set_status("running")
    with held(run.path) as holder:
        assert runs.lock_holder(run)["pid"] == holder.pid
        assert runs.shown_status(run) == "running"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        # The kill left run.lock naming the dead process; nobody holds it.
        assert runs.lock_holder(run) is None and runs.shown_status(run) == "crashed"
        assert runs.table([run]).splitlines()[1].split()[:2] == ["resnet/v0001", "crashed"]
        result = subprocess.run(["bash", str(PRUNE), str(root)], capture_output=True, text=True)
        assert result.returncode == 0 and "removed" in result.stdout and not result.stderr
        runs.lock_run(run, ["taking over"])
    try:
        assert runs.lock_holder(run)["pid"] == os.getpid() and runs.shown_status(run) == "running"
        assert in_use(os.getpid()) in refused_elsewhere(run.path)
    finally:
        runs.unlock_run(run)
    assert runs.lock_holder(run) is None


class ProbeThenInterrupt(keras.callbacks.Callback):
    """At the first epoch's end (after the runner's own callbacks committed its backup): ask a second process
    to test the run being trained, then stop as Ctrl-C would."""

    def __init__(self, runs_dir: Path):
        super().__init__()
        self.runs_dir = runs_dir
        self.result = None

    def on_epoch_end(self, epoch, logs=None):
        (run_dir,) = self.runs_dir.glob("*/v*")
        self.result = cli("test", "--run", str(run_dir))
        raise KeyboardInterrupt


@pytest.mark.slow
def test_training_holds_the_lock_and_resume_trusts_the_backup_over_a_damaged_status(tmp_path, capsys,
                                                                                     one_conv_model):
    from shared.lifecycle import resume

    probe = ProbeThenInterrupt(tmp_path / "runs")
    # the lock is what is checked, not the model: one convolution, two batches an epoch
    tree = tiny_tree(tmp_path / "runs", data={"synthetic_train": 64, "synthetic_test": 32}, train={"epochs": 2})
    tree["model"] = one_conv_model
    with pytest.raises(KeyboardInterrupt):
        train(load_config(tree=tree), callbacks=[probe])
    assert probe.result.returncode == 2 and in_use(os.getpid()) in probe.result.stderr
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    run = runs.Run(run_dir)
    assert runs.lock_holder(run) is None and runs.shown_status(run) == "interrupted"  # released when it stopped

    (run_dir / "status.json").write_text('{"status": "interr')  # a torn write: the status is unknown
    resumed = resume(run_dir)
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out  # from the backup, not from epoch 0
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3  # header + epochs 0 and 1, once each
    assert resumed.status()["status"] == "finished" and runs.lock_holder(resumed) is None

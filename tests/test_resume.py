"""Nothing lost: a run killed with SIGKILL mid-epoch resumes into the same folder and finishes with
every epoch exactly once; SIGTERM saves and marks the run interrupted; a NaN loss stops it cleanly."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import forked
from conftest import REPO, tiny_tree

EPOCHS = 3


def slow_tree(runs_dir: Path, **train) -> dict:
    """Epochs of a couple of seconds of the tiny ResNet, so a signal can land in the middle of one."""
    return tiny_tree(runs_dir, data={"synthetic_train": 2048, "image_size": 24},
                     train={"epochs": EPOCHS, "batch_size": 32, "verbose": 0, "lr": {"base": 0.05}, **train})


IMAGES, BATCH = 4096, 8  # many small steps: an epoch of a second or more without a model that is slow to build


def many_steps_tree(runs_dir: Path, model: dict, **train) -> dict:
    """Epochs of a second or more of the one-convolution `model` (what is checked is the recovery, not the
    model), so a signal can land in the middle of one."""
    tree = tiny_tree(runs_dir, data={"synthetic_train": IMAGES},
                     train={"epochs": EPOCHS, "batch_size": BATCH, "verbose": 0, "lr": {"base": 0.05}, **train})
    tree["model"] = model
    return tree


def start(tmp_path: Path, tree: dict, *extra: str) -> subprocess.Popen:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    return forked.popen([sys.executable, "-m", "shared.runner", "--config", str(config), *extra],
                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_backup(runs_dir: Path, process: subprocess.Popen, epochs: int, timeout: float = 240) -> Path:
    """The run folder, once its backup holds `epochs` complete epochs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        for state in runs_dir.glob("*/v*/backup/phase-1/training_metadata.json"):
            if json.loads(state.read_text())["epoch"] >= epochs:
                return state.parents[2]
        time.sleep(0.05)
    raise AssertionError("no backup appeared in time")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The runner's main() in this process (what a fresh `python -m shared.runner` runs, without a second
    TensorFlow start): its exit status, stdout and stderr. The kills themselves are of a subprocess."""
    from shared import runner

    capsys.readouterr()
    code = runner.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def resume(run_dir: Path, capsys) -> tuple[int, str, str]:
    return cli(capsys, "--resume", str(run_dir))


def metric_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "status.json").read_text())["status"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path, capsys, one_conv_model):
    # EMA: the checkpoints hold the averages
    process = start(tmp_path, many_steps_tree(tmp_path / "runs", one_conv_model, ema_momentum=0.99))
    run_dir = wait_for_backup(tmp_path / "runs", process, epochs=1)
    time.sleep(0.3)  # into epoch 2
    process.kill()
    process.wait()
    assert status(run_dir) == "running"  # SIGKILL leaves no chance to say anything
    done = json.loads((run_dir / "backup/phase-1/training_metadata.json").read_text())["epoch"]
    assert 1 <= done < EPOCHS

    code, out, err = resume(run_dir, capsys)
    assert code == 0, err
    assert f"resuming after epoch {done} of {EPOCHS}" in out
    assert status(run_dir) == "finished"
    assert metric_epochs(run_dir) == list(range(EPOCHS))  # none duplicated, none missing
    assert (run_dir / "checkpoints" / f"epoch-{EPOCHS:04d}.keras").is_file()
    assert not (run_dir / "backup").exists()  # finished: the backup is gone
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert metrics["checkpoint"] == f"checkpoints/epoch-{EPOCHS:04d}.keras"
    # the checkpoint is readable and re-tests to the recorded figure
    code, out, err = cli(capsys, "test", "--run", str(run_dir))
    assert code == 0, err
    assert f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}" in out
    # the optimizer continued: its step counter covers every epoch's batches exactly once
    steps = IMAGES // BATCH
    import keras
    model = keras.saving.load_model(run_dir / "checkpoints" / f"epoch-{EPOCHS:04d}.keras", compile=True)
    assert int(model.optimizer.iterations.numpy()) == EPOCHS * steps


@pytest.mark.slow
def test_sigterm_saves_and_marks_interrupted(tmp_path, capsys, one_conv_model):
    process = start(tmp_path, many_steps_tree(tmp_path / "runs", one_conv_model))
    run_dir = wait_for_backup(tmp_path / "runs", process, epochs=1)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    assert status(run_dir) == "interrupted"
    assert (run_dir / "checkpoints" / "interrupted.keras").is_file()

    code, _, err = resume(run_dir, capsys)
    assert code == 0, err
    assert status(run_dir) == "finished"
    assert metric_epochs(run_dir) == list(range(EPOCHS))


def test_resume_refuses_a_finished_run(trained_run, capsys):
    from shared import runner

    run, _ = trained_run
    code = runner.main(["--resume", str(run.path)])
    err = capsys.readouterr().err
    assert code == 2 and "already finished" in err


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message(tmp_path, capsys, one_conv_model):
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 2, "verbose": 0, "lr": {"base": 1.0e+30}})
    tree["model"] = one_conv_model  # what is checked is the stop, not the model
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    code, _, err = cli(capsys, "--config", str(config))
    assert code == 2, err
    assert "loss became" in err and "Traceback" not in err
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    assert status(run_dir) == "failed"
    assert not list((run_dir / "checkpoints").glob("epoch-*.keras"))  # no broken weights saved


def test_a_recorded_signal_stops_training_at_the_next_batch():
    """The SIGTERM handler only records; the callback raises from Python after the batch in flight, and a
    second signal raises at once."""
    import keras
    import numpy as np
    import pytest

    from shared.callbacks import StopOnSignal

    stop = StopOnSignal()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    seen = []

    class Sender(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(batch)
            if batch == 2:
                stop.request(signal.SIGTERM, None)

    with pytest.raises(KeyboardInterrupt):
        model.fit(np.zeros((64, 2)), np.zeros(64), batch_size=4, epochs=1, verbose=0, callbacks=[Sender(), stop])
    assert seen == [0, 1, 2]  # batch 2 ran to its end, no later batch started
    with pytest.raises(KeyboardInterrupt):
        stop.request(signal.SIGTERM, None)


def test_plateau_patience_survives_a_resume(tmp_path):
    """ReduceLROnPlateau's count of epochs without improvement is committed with the backup: a run cut
    after epoch 3 of a flat loss resumes counting at 2, not 0."""
    import keras
    import numpy as np

    from shared.callbacks import ResumableReduceLROnPlateau
    from shared.checkpoints import AtomicBackupAndRestore, backup_state

    x, y = np.random.default_rng(0).normal(size=(32, 2)), np.zeros(32)
    seen = []

    class Probe(keras.callbacks.Callback):
        def __init__(self, plateau):
            super().__init__()
            self.plateau = plateau

        def on_epoch_begin(self, epoch, logs=None):
            seen.append((epoch, self.plateau.wait))

    def fit(epochs: int) -> None:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.0), "mse")  # rate 0: the loss never improves
        plateau = ResumableReduceLROnPlateau(monitor="loss", patience=10)
        backup = AtomicBackupAndRestore(tmp_path / "backup", stateful=[plateau])
        model.fit(x, y, batch_size=8, epochs=epochs, verbose=0, callbacks=[plateau, backup, Probe(plateau)])

    fit(3)
    assert seen == [(0, 0), (1, 0), (2, 1)]
    saved = backup_state(tmp_path / "backup")["callbacks"]["ResumableReduceLROnPlateau"]
    assert saved["wait"] == 2 and saved["cooldown_counter"] == 0 and saved["best"] > 0
    seen.clear()
    fit(5)
    assert seen == [(3, 2), (4, 3)]  # Keras' own callback would start again at 0

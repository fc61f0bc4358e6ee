"""Keras callbacks the runner adds to `model.fit`: durable per-epoch checkpoints and metrics rows, the
crash-safe backup that `--resume` restores, a stop on a non-finite loss, and the learning rate in the
epoch logs (so metrics.csv and TensorBoard show it)."""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import keras

from shared import durable

BACKUP_STATE = "training_metadata.json"


class EpochCheckpoint(keras.callbacks.Callback):
    """Save model and optimizer state as checkpoints/epoch-NNNN.keras after every epoch, durably: written
    beside under a temporary name, fsynced, renamed, the folder fsynced (shared.durable), so a crash never
    leaves a truncated checkpoint. `ema`: the checkpoint holds the optimizer's moving averages of the
    weights, swapped in for the save and out again after it, so training (and the backup after this
    callback) goes on with the raw weights."""

    def __init__(self, directory: Path, epoch_offset: int = 0, ema: bool = False):
        super().__init__()
        self.directory = Path(directory)
        self.epoch_offset = epoch_offset  # epochs trained before this fit (a head-only warm start)
        self.ema = keras.callbacks.SwapEMAWeights() if ema else None

    def set_model(self, model):
        super().set_model(model)
        if self.ema is not None:
            self.ema.set_model(model)

    def on_epoch_end(self, epoch, logs=None):
        final = self.directory / f"epoch-{epoch + 1 + self.epoch_offset:04d}.keras"
        if self.ema is None:
            self._save(final)
            return
        self.ema.on_test_begin()  # Keras' own swap, as around validation: the averages into the model
        try:
            self._save(final)
        finally:
            self.ema.on_test_end()

    def _save(self, final: Path) -> None:
        with durable.partial_path(final) as partial:
            self.model.save(partial)


class DurableCSVLogger(keras.callbacks.CSVLogger):
    """Keras' CSVLogger whose epoch row is on disk (flushed and fsynced) when the callback returns, so a
    backup committed after it never counts an epoch whose row was lost. A row that could not be written
    (a full disk) is cut off again, and the error is a DiskFull naming the file."""

    def on_epoch_end(self, epoch, logs=None):
        path = Path(self.filename)
        size = os.fstat(self.csv_file.fileno()).st_size  # the previous rows were flushed: nothing buffered
        try:
            with durable.disk_space_checked(path):
                super().on_epoch_end(epoch, logs)
                os.fsync(self.csv_file.fileno())
                durable.fsync_dir(path.parent)  # the file's entry, when this row created it
        except BaseException:
            with contextlib.suppress(Exception):
                self.csv_file.close()  # flushes what it can, then drops the buffer with the descriptor
            self.writer = None
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras' BackupAndRestore (weights, optimizer state and epoch counter, restored when `fit` starts
    again), made crash-safe: each epoch's weights go to a new file, and the metadata that names it is
    replaced afterwards (both durably, shared.durable), so the backup on disk is always one complete
    epoch, whatever moment a SIGKILL lands. Keras' own writes overwrite the files in place."""

    def __init__(self, backup_dir: Path, stateful: list | tuple = ()):
        """`stateful`: callbacks with get_state()/set_state() whose state is committed with each epoch's
        weights and restored with them; list them before this callback, so that at an epoch's end their
        state is already updated, and at the start their own reset comes before the restore."""
        super().__init__(str(backup_dir), save_freq="epoch", delete_checkpoint=False)
        self.directory = Path(backup_dir)
        self.stateful = {type(callback).__name__: callback for callback in stateful}

    def _save_model(self):
        weights = f"epoch-{self._current_epoch:04d}.weights.h5"
        with durable.partial_path(self.directory / weights) as partial:
            self.model.save_weights(str(partial), overwrite=True)
        callbacks = {name: callback.get_state() for name, callback in self.stateful.items()}
        durable.atomic_write(self.directory / BACKUP_STATE,  # the commit point
                             json.dumps({"epoch": self._current_epoch, "weights": weights, "callbacks": callbacks}))
        for old in self.directory.glob("epoch-*.weights.h5"):
            if old.name != weights:
                old.unlink()

    def _load_model(self):
        state = backup_state(self.directory)
        if state is None:
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)  # its slots must exist to be loaded
        self.model.load_weights(str(self.directory / state["weights"]))
        self.model._initial_epoch = state["epoch"]  # what Keras' own callback sets: fit starts there
        for name, saved in state.get("callbacks", {}).items():  # older backups have none
            if name in self.stateful:
                self.stateful[name].set_state(saved)


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """Keras' ReduceLROnPlateau whose patience count, best value and cooldown are committed with the
    backup, so `--resume` goes on counting where the run stopped (Keras' own starts afresh, which can
    put off a due reduction by `patience` epochs). The reduced rate itself is optimizer state."""

    def get_state(self) -> dict:
        return {"wait": int(self.wait), "best": float(self.best), "cooldown_counter": int(self.cooldown_counter)}

    def set_state(self, state: dict) -> None:
        self.wait, self.best, self.cooldown_counter = state["wait"], state["best"], state["cooldown_counter"]


def backup_state(directory: Path) -> dict | None:
    """The last committed backup, {"epoch": completed epochs, "weights": file name}, or None."""
    path = Path(directory) / BACKUP_STATE
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    return state if (Path(directory) / state.get("weights", "")).is_file() else None


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise at the first batch whose loss is NaN or infinite, before the epoch's checkpoint and
    backup could save the broken weights (Keras' TerminateOnNaN would let the epoch end callbacks run)."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"the training loss became {float(loss)} at epoch {self.epoch + 1}, batch {batch + 1}")


class StopOnSignal(keras.callbacks.Callback):
    """SIGTERM (a scheduler's stop, a cloud preemption) ends training at the next batch boundary, as
    Ctrl-C does. The signal handler only records the signal and the callback raises KeyboardInterrupt
    from Python: an exception raised inside the handler itself can land in native TF code that drops
    it (seen once: a run that ignored SIGTERM and finished). A second signal stops at once."""

    def __init__(self):
        super().__init__()
        self.signal: int | None = None

    def request(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt(f"signal {signum}")
        self.signal = signum

    def check(self, *args, **kwargs):
        if self.signal is not None:
            raise KeyboardInterrupt(f"signal {self.signal}")

    on_train_batch_end = on_test_batch_end = on_epoch_begin = check


class LearningRateLogger(keras.callbacks.Callback):
    """Add the learning rate at the end of each epoch to the logs, as `lr`."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            optimizer = self.model.optimizer
            logs["lr"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))

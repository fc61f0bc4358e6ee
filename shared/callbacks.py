"""Keras callbacks the runner adds to `model.fit` beside the checkpoint policy's (shared.checkpoints): durable
metrics rows, a plateau schedule whose counters survive a resume, a stop on a non-finite loss or a signal, and
the learning rate in the epoch logs (so metrics.csv and TensorBoard show it)."""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import keras

from shared import durable


def built_before_fit(trainer: keras.Model, train_data) -> bool:
    """Builds the compiled losses and metrics now, on the data's element spec (a tf.data.Dataset, or one batch of
    arrays: (x, y)), as Keras builds them before fit only under an explicit distribution strategy: built in the
    first traced step instead (each output's loss tracker of a detector or of aux heads), their variables would
    make TensorFlow trace the whole train step twice. False where it cannot be done beforehand (a custom
    train_step, a distiller's: Keras builds it in its first step)."""
    try:
        trainer._symbolic_build(data_batch=getattr(train_data, "element_spec", train_data))  # Keras' own build
    except Exception:
        return False
    return True


def logged_metrics(trainer: keras.Model, train_data, validating: bool) -> set[str] | None:
    """The keys of the epoch logs that `trainer.fit(train_data)` will write (compiled metrics, their val_
    copies when validating, and LearningRateLogger's lr), found by building the compiled trainer on the
    data's element spec, without a batch; None when that cannot be known beforehand (a trainer whose
    metrics only exist after a real step)."""
    if not built_before_fit(trainer, train_data):
        return None  # a custom train_step: the callbacks check the logs at the first epoch's end instead
    try:
        names = set(trainer.get_metrics_result())
    except Exception:
        return None
    return names | {f"val_{name}" for name in names if validating} | {"lr"}


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


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """Keras' ReduceLROnPlateau whose patience count, best value and cooldown are committed with the
    backup, so `--resume` goes on counting where the run stopped (Keras' own starts afresh, which can
    put off a due reduction by `patience` epochs). The reduced rate itself is optimizer state."""

    def get_state(self) -> dict:
        return {"wait": int(self.wait), "best": float(self.best), "cooldown_counter": int(self.cooldown_counter)}

    def set_state(self, state: dict) -> None:
        self.wait, self.best, self.cooldown_counter = state["wait"], state["best"], state["cooldown_counter"]


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

"""Keras callbacks the runner adds to `model.fit`: durable per-epoch checkpoints (the newest N kept) and
metrics rows, the best epoch's checkpoint, the crash-safe backup that `--resume` restores, early stopping
and a plateau schedule whose counters survive it, a stop on a non-finite loss, and the learning rate in
the epoch logs (so metrics.csv and TensorBoard show it)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import keras

from shared import durable
from shared.runs import BEST_CHECKPOINT, epoch_checkpoints

BACKUP_STATE = "training_metadata.json"


class EpochCheckpoint(keras.callbacks.Callback):
    """Save model and optimizer state as checkpoints/epoch-NNNN.keras after every epoch, durably: written
    beside under a temporary name, fsynced, renamed, the folder fsynced (shared.durable), so a crash never
    leaves a truncated checkpoint. `ema`: the checkpoint holds the optimizer's moving averages of the
    weights, swapped in for the save and out again after it, so training (and the backup after this
    callback) goes on with the raw weights."""

    def __init__(self, directory: Path, epoch_offset: int = 0, ema: bool = False, keep: int | None = None):
        """`keep`: only the newest `keep` epoch checkpoints stay; older ones are deleted once the new one
        is durable (best.keras and interrupted.keras are other names, never deleted here)."""
        super().__init__()
        self.directory = Path(directory)
        self.epoch_offset = epoch_offset  # epochs trained before this fit (a head-only warm start)
        self.ema = keras.callbacks.SwapEMAWeights() if ema else None
        self.keep = keep
        self.last_saved: Path | None = None

    def set_model(self, model):
        super().set_model(model)
        if self.ema is not None:
            self.ema.set_model(model)

    def on_epoch_end(self, epoch, logs=None):
        final = self.directory / f"epoch-{epoch + 1 + self.epoch_offset:04d}.keras"
        if self.ema is None:
            self._save(final)
        else:
            self.ema.on_test_begin()  # Keras' own swap, as around validation: the averages into the model
            try:
                self._save(final)
            finally:
                self.ema.on_test_end()
        self.last_saved = final
        if self.keep is not None:
            for old in epoch_checkpoints(self.directory)[:-self.keep]:
                durable.remove(old)

    def _save(self, final: Path) -> None:
        with durable.partial_path(final) as partial:
            self.model.save(partial)


MAXIMIZED = ("top1", "top5", "acc", "psnr", "map")  # metric names where higher is better (map: detection mAP)


def monitor_mode(monitor: str, mode: str = "auto") -> str:
    """min or max: `mode` itself unless auto, then max for accuracies (and PSNR), min for losses."""
    if mode != "auto":
        return mode
    return "max" if any(word in monitor for word in MAXIMIZED) else "min"


def logged_metrics(trainer: keras.Model, train_data, validating: bool) -> set[str] | None:
    """The keys of the epoch logs that `trainer.fit(train_data)` will write (compiled metrics, their val_
    copies when validating, and LearningRateLogger's lr), found by building the compiled trainer on the
    data's element spec, without a batch; None when that cannot be known beforehand (a trainer whose
    metrics only exist after a real step)."""
    try:
        trainer._symbolic_build(data_batch=train_data.element_spec)  # Keras' own build before fit
        names = set(trainer.get_metrics_result())
    except Exception:  # a custom train_step: the callbacks check the logs at the first epoch's end instead
        return None
    return names | {f"val_{name}" for name in names if validating} | {"lr"}


def monitored_value(monitor: str, logs: dict | None, what: str) -> float:
    """The monitored value of an epoch's logs; a UserError naming the logged keys if it is not there."""
    from shared.errors import UserError

    logs = logs or {}
    if monitor not in logs:
        raise UserError(f"{what} is {monitor!r}, which this run does not log; it logs: "
                        f"{', '.join(sorted(logs))}")
    return float(logs[monitor])


class BestCheckpoint(keras.callbacks.Callback):
    """Keep checkpoints/best.keras: a copy of the epoch checkpoint (the same weights, EMA included, and
    optimizer state) whose monitored value is the best so far, and only ever of an epoch the backup has
    committed. An improving epoch's copy is written durably beside (`.best-epoch-NNNN.keras`) and renamed to
    best.keras once its backup is committed (at the next epoch's start, at the end of training, or by the
    `--resume` that restores that commit); after a kill before the commit, best.keras is the previous best and
    the resume removes the copy. Place after the EpochCheckpoint it copies from; its state (best value and
    epoch) is committed with the backup, and it is not reset between the phases of one run."""

    def __init__(self, source: EpochCheckpoint, monitor: str, mode: str = "auto"):
        super().__init__()
        self.source = source
        self.monitor = monitor
        self.mode = monitor_mode(monitor, mode)
        self.best: float | None = None
        self.best_epoch: int | None = None  # 1-based, as the checkpoint names count
        self.pending = False  # the best epoch's copy is staged, not yet best.keras

    def on_epoch_end(self, epoch, logs=None):
        current = monitored_value(self.monitor, logs, "train.best.monitor")
        if not math.isfinite(current) or not self._improves(current):
            return
        with durable.partial_path(self._staged(epoch + 1)) as partial:
            shutil.copyfile(self.source.last_saved, partial)
        self.best, self.best_epoch, self.pending = current, epoch + 1, True

    def on_epoch_begin(self, epoch, logs=None):
        self._publish()  # the previous epoch's backup is committed by now

    def on_train_end(self, logs=None):
        self._publish()

    def _staged(self, epoch: int) -> Path:
        return self.source.directory / f".best-epoch-{epoch:04d}.keras"

    def _publish(self) -> None:
        if self.pending and self._staged(self.best_epoch).is_file():
            durable.publish(self._staged(self.best_epoch), self.source.directory / BEST_CHECKPOINT)
        self.pending = False

    def _improves(self, current: float) -> bool:
        if self.best is None:
            return True
        return current > self.best if self.mode == "max" else current < self.best

    def record(self) -> dict | None:
        """What test_metrics.json and status.json say about the best epoch (None before one)."""
        if self.best_epoch is None:
            return None
        return {"monitor": self.monitor, "mode": self.mode, "value": self.best, "epoch": self.best_epoch,
                "checkpoint": f"checkpoints/{BEST_CHECKPOINT}"}

    def get_state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "pending": self.pending}

    def set_state(self, state: dict) -> None:
        """The committed state, with its staged copy made best.keras; copies of uncommitted epochs go."""
        self.best, self.best_epoch, self.pending = state["best"], state["best_epoch"], state["pending"]
        self._publish()
        for stale in self.source.directory.glob(".best-epoch-*.keras"):
            durable.remove(stale)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping whose patience count and best value are committed with the backup, so
    `--resume` stops at the epoch an uninterrupted run would; `stopped_epoch` too, so a run killed after
    it stopped (while testing) is not trained further on resume. A monitor missing from the logs is a
    UserError (Keras' own only warns, and never stops)."""

    def on_epoch_end(self, epoch, logs=None):
        monitored_value(self.monitor, logs, "train.early_stopping.monitor")
        super().on_epoch_end(epoch, logs)

    def get_state(self) -> dict:
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "best": best, "stopped_epoch": int(self.stopped_epoch)}

    def set_state(self, state: dict) -> None:
        self.wait, self.best, self.stopped_epoch = state["wait"], state["best"], state["stopped_epoch"]


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
        self.commit(self._current_epoch)

    def commit(self, epoch: int) -> None:
        """Back up the model's state (set_model first) as the state after `epoch` complete epochs: what each
        epoch's end does, and where a continued run starts (`fit` then restores it)."""
        weights = f"epoch-{epoch:04d}.weights.h5"
        with durable.partial_path(self.directory / weights) as partial:
            self.model.save_weights(str(partial), overwrite=True)
        callbacks = {name: callback.get_state() for name, callback in self.stateful.items()}
        durable.atomic_write(self.directory / BACKUP_STATE,  # the commit point
                             json.dumps({"epoch": epoch, "weights": weights, "callbacks": callbacks}))
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

"""What a run keeps and where it starts from: one checkpoint policy (in the manner of timm's CheckpointSaver)
and the start state of a training, decided once before anything runs.

- `CheckpointPolicy`, owned by the run: the last epochs' checkpoints (checkpoints/epoch-NNNN.keras, the newest
  `train.keep_checkpoints` kept), the best epoch's (best.keras, `train.best`), early stopping's state
  (`train.early_stopping`), and the per-phase backup that `--resume` restores (backup/phase-N), each as a Keras
  callback whose state is committed with the backup; what test_metrics.json and status.json record of them.
- `Start`: fresh, init (init.from_run / init.weights), resume (a committed backup) or continue (a finished run
  trained further in a new folder), with the epochs already trained; `check_resumable` refuses what cannot be
  resumed. The run store (`shared.runs`) reads checkpoints back (`Run.checkpoint`); `ilsvrc-canon prune` deletes
  old ones of finished runs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Iterator

import keras
import numpy

from shared import durable, modelzoo, runs
from shared.config_schema import Config
from shared.errors import UserError, first_line
from shared.runs import BEST_CHECKPOINT, epoch_checkpoints
from shared.task import Phase



BACKUP_STATE = "training_metadata.json"


MAXIMIZED = ("top1", "top5", "acc", "psnr", "map")  # metric names where higher is better (map: detection mAP)


def monitor_mode(monitor: str, mode: str = "auto") -> str:
    """min or max: `mode` itself unless auto, then max for accuracies (and PSNR), min for losses."""
    if mode != "auto":
        return mode
    return "max" if any(word in monitor for word in MAXIMIZED) else "min"


def monitored_value(monitor: str, logs: dict | None, what: str) -> float:
    """The monitored value of an epoch's logs; a UserError naming the logged keys if it is not there."""
    logs = logs or {}
    if monitor not in logs:
        raise UserError(f"{what} is {monitor!r}, which this run does not log; it logs: "
                        f"{', '.join(sorted(logs))}")
    return float(logs[monitor])


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


def backup_state(directory: Path) -> dict | None:
    """The last committed backup, {"epoch": completed epochs, "weights": file name}, or None."""
    path = Path(directory) / BACKUP_STATE
    if not path.is_file():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    return state if (Path(directory) / state.get("weights", "")).is_file() else None


class CheckpointPolicy:
    """One run's checkpoints over all its phases: the epoch checkpoints (last, keep-N), best.keras, early
    stopping, and the backup of each phase; built once per training, so the best value and early stopping's
    patience carry over between phases and are committed with each backup."""

    def __init__(self, run: runs.Run, config: Config, phases: list[Phase]) -> None:
        train = config.train
        self.config = config
        self.last = EpochCheckpoint(run.checkpoint_dir, ema=train.ema_momentum is not None,
                                    keep=train.keep_checkpoints)
        self.best = BestCheckpoint(self.last, train.best.monitor, train.best.mode) if train.best.monitor else None
        stop = train.early_stopping
        self.stopper = ResumableEarlyStopping(monitor=stop.monitor, patience=stop.patience, min_delta=stop.min_delta,
                                              mode=monitor_mode(stop.monitor, stop.mode)) if stop.monitor else None
        self.backups = backup_dirs(run, phases)

    @property
    def run_wide(self) -> list:
        """The callbacks that keep one state for the whole run (best checkpoint, early stopping)."""
        return [callback for callback in (self.best, self.stopper) if callback is not None]

    def callbacks(self, phase: int, stateful: list) -> list:
        """A phase's checkpoint callbacks, in their order at an epoch's end: the epoch checkpoint (on disk
        before best.keras copies it), the run-wide ones, then the backup, which commits their state and that of
        `stateful` (the schedule's) with the epoch's weights."""
        committed = [callback for callback in (*stateful, *self.run_wide) if hasattr(callback, "get_state")]
        return [self.last, *self.run_wide, AtomicBackupAndRestore(self.backups[phase], stateful=committed)]

    def restore_stop(self, saved: list[dict]) -> bool:
        """True when the newest committed backup says early stopping had stopped the run (a kill came while it
        tested): the run is not trained further, and its run-wide callbacks get their committed state back."""
        states = saved[-1].get("callbacks", {}) if saved else {}
        if self.stopper is None or not states.get(ResumableEarlyStopping.__name__, {}).get("stopped_epoch"):
            return False
        for callback in self.run_wide:
            if type(callback).__name__ in states:
                callback.set_state(states[type(callback).__name__])
        return self.stopped_early()

    def stopped_early(self) -> bool:
        """Early stopping ended the run before its last epoch (a stop at the last epoch is no early one)."""
        return self.stopper is not None and 0 < self.stopper.stopped_epoch < self.config.train.epochs - 1

    def outcome(self) -> dict:
        """What test_metrics.json and status.json record of the best epoch and of an early stop."""
        outcome = {}
        if self.best is not None and self.best.record():
            outcome["best"] = self.best.record()
        if self.stopped_early():
            stopper = self.stopper
            outcome["stopped_early"] = {"epoch": stopper.stopped_epoch + 1, "of": self.config.train.epochs,
                                        "monitor": stopper.monitor, "patience": stopper.patience}
        return outcome


def backup_dirs(run: runs.Run, phases: list[Phase]) -> list[Path]:
    return [run.path / "backup" / f"phase-{i + 1}" for i in range(len(phases))]


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a training starts, decided once before anything runs: "fresh", "init" (init.from_run /
    init.weights copied in), "resume" (the resumed run's committed backups, `saved`) or "continue" (a
    finished run's last checkpoint, `continuation`); `epoch`: the epochs already trained; `run`: the run
    folder trained in place (resume), `snapshot`: where its model.py is read from (None: the config's)."""
    kind: str
    epoch: int = 0
    run: runs.Run | None = None
    saved: tuple = ()
    continuation: "Continuation | None" = None

    @property
    def snapshot(self) -> Path | None:
        if self.run is not None:
            return self.run.path
        return self.continuation.source.path if self.continuation else None


def decide_start(config: Config, phases: list[Phase], resumed: runs.Run | None = None,
                 continuation: "Continuation | None" = None) -> Start:
    """The start of a training of `config` in `phases`: a resumed run's committed backups, a continuation, or a
    new run from init's weights or from scratch. A resumed run without a committed backup starts again (in its
    folder)."""
    if continuation is not None:
        return Start("continue", continuation.epoch, continuation=continuation)
    saved = tuple(state for state in map(backup_state, backup_dirs(resumed, phases)) if state) if resumed else ()
    if saved:
        return Start("resume", max(state["epoch"] for state in saved), run=resumed, saved=saved)
    kind = "init" if config.init.from_run or config.init.weights else "fresh"
    return Start(kind, run=resumed)



@dataclasses.dataclass(frozen=True)
class Continuation:
    """A finished run trained further in a new run folder: from its last checkpoint (weights, optimizer
    state, and so the schedule's position), after the epochs that checkpoint holds."""
    source: runs.Run
    checkpoint: Path
    epoch: int

    def describe(self) -> str:
        return (f"continued from {self.source.path} after epoch {self.epoch} "
                f"({self.checkpoint.relative_to(self.source.path)}, weights and optimizer state)")


def continuation_of(source: runs.Run, epochs: int) -> Continuation:
    """Where continuing `source` to `epochs` in all starts; UserError unless it finished and `epochs` is more
    than its last checkpoint holds."""
    state = source.status().get("status", "unknown")
    if state != "finished":
        raise UserError(f"run {source.path} is {state}, not finished; --set train.epochs continues a finished run "
                        f"in a new folder: resume this one without --set (python -m shared.runner --resume "
                        f"{source.path})")
    if (source.config_dict().get("distill") or {}).get("teacher"):
        raise UserError(f"run {source.path} is a distillation run, whose checkpoints hold the student without the "
                        f"optimizer state a continuation needs; start a new run (distill, or finetune-all --from "
                        f"{source.path})")
    last = source.last_checkpoint()
    if last is None:
        raise UserError(f"run {source.path} has no epoch checkpoint in {source.checkpoint_dir} to continue from")
    trained = int(runs.CHECKPOINT_RE.match(last.name).group(1))
    if epochs <= trained:
        raise UserError(f"run {source.path} has trained {trained} epochs; train.epochs={epochs} must be more to "
                        f"continue it (e.g. --set train.epochs={trained + max(trained, 1)})")
    return Continuation(source, last, trained)


def check_resumable(run: runs.Run) -> None:
    """Refuse (and let go of the run's lock) unless resuming continues the run: a finished run, or one whose
    trained epochs (checkpoints, metrics rows, test metrics) have no committed backup to continue from, is
    never retrained in place from epoch 0. The backup, not status.json (which may be missing or damaged),
    says how far training got; a run with nothing trained yet simply starts again. A run tested to the end whose
    status still says running (killed between removing its backup and writing "finished") is marked finished."""
    try:
        _check_resumable(run)
    except BaseException:
        runs.unlock_run(run)
        raise


def _check_resumable(run: runs.Run) -> None:
    state = run.status().get("status", "unknown")
    if state == "finished":
        raise UserError(f"run {run.path} already finished; start a new run instead")
    for backup in sorted((run.path / "backup").glob("phase-*")):
        try:
            if backup_state(backup):
                return
        except (OSError, ValueError) as error:
            raise UserError(f"the backup of run {run.path} is damaged ({backup}: {first_line(error)}); it cannot "
                            f"be resumed: start a new run (finetune --from {run.path} starts from its last "
                            f"checkpoint)") from None
    tested = None
    with contextlib.suppress(OSError, ValueError):  # a damaged file: the run is not known to be tested
        tested = run.test_metrics()
    if state == "running" and isinstance(tested, dict):  # stopped between removing its backup and "finished"
        _mark_finished_after_kill(run, tested)
        raise UserError(f"run {run.path} had finished (trained and tested: test_metrics.json) but was stopped "
                        f"before its status said so; it is now marked finished: start a new run to train more "
                        f"(--resume {run.path} --set train.epochs=N)")
    trained = [what for what, there in (("checkpoints", run.checkpoints()), ("metrics rows", _metric_rows(run)),
                                        ("test metrics", (run.path / "test_metrics.json").is_file())) if there]
    if trained:
        raise UserError(f"run {run.path} has {', '.join(trained)} but no committed backup to resume from "
                        f"(status: {state}); resuming would retrain it from epoch 0 over them: start a new run "
                        f"(finetune --from {run.path} starts from its last checkpoint)")


def _mark_finished_after_kill(run: runs.Run, tested: dict) -> None:
    """What training's last step did not write: status finished, with the outcome its test figures record and
    the time they were written."""
    ended = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((run.path / "test_metrics.json").stat().st_mtime))
    outcome = {key: tested[key] for key in ("best", "stopped_early") if key in tested}
    run.set_status("finished", ended=ended, **outcome)


def _metric_rows(run: runs.Run) -> bool:
    with contextlib.suppress(OSError):
        return len((run.path / "metrics.csv").read_text(encoding="utf-8").strip().splitlines()) > 1
    return False


def start_from(trainer: keras.Model, checkpoint: Path, config: Config, backup: AtomicBackupAndRestore,
                epoch: int) -> None:
    """A continued run's start: the checkpoint's weights and optimizer state in the compiled trainer,
    committed as the backup after `epoch` epochs, which `fit` restores (and `--resume` finds)."""
    load_training_state(trainer, checkpoint, config)
    backup.set_model(trainer)
    backup.commit(epoch)


def load_training_state(trainer: keras.Model, checkpoint: Path, config: Config) -> int:
    """A checkpoint's weights and optimizer state in the compiled trainer; returns the optimizer's step count."""
    if not trainer.optimizer.built:
        trainer.optimizer.build(trainer.trainable_variables)  # its slots must exist to be loaded
    with _learning_rate_either_way(trainer.optimizer):
        modelzoo.load_weight_file(trainer, checkpoint, what=f"model and optimizer of {checkpoint}")
    if config.train.ema_momentum is not None:
        swap = keras.callbacks.SwapEMAWeights()  # the checkpoint holds the averages as the weights:
        swap.set_model(trainer)
        swap.on_test_begin()  # swap back, raw weights into the model, the averages into the optimizer
    return int(keras.ops.convert_to_numpy(trainer.optimizer.iterations))


@contextlib.contextmanager
def _learning_rate_either_way(optimizer: keras.optimizers.Optimizer) -> Iterator[None]:
    """Keras gives an optimizer with a fixed rate a learning-rate variable (second, after the step count) and
    one with a schedule none, and skips a saved state of the other kind whole (with a warning only). Matched
    here across that one difference: a saved rate the optimizer lacks is dropped, a rate it has and the file
    lacks keeps its value; every other count mismatch stays Keras' own."""
    own = optimizer.load_own_variables

    def load(store):
        saved = [store[str(index)] for index in range(len(store.keys()))]
        variables = optimizer.variables
        if len(saved) == len(variables) + 1 and numpy.ndim(saved[1]) == 0 and variables[1].name != "learning_rate":
            del saved[1]
        elif len(saved) + 1 == len(variables) and variables[1].name == "learning_rate":
            saved.insert(1, keras.ops.convert_to_numpy(variables[1]))
        own({str(index): value for index, value in enumerate(saved)})

    optimizer.load_own_variables = load
    try:
        yield
    finally:
        del optimizer.load_own_variables  # the class's own again


def carry_optimizer_state(trainer: keras.Model, run: runs.Run, config: Config) -> None:
    """init.optimizer_state: the init run's last checkpoint, weights and optimizer state, in the compiled
    trainer, recorded in the run's status.json (`optimizer_from`: the checkpoint and its step count). The
    schedule must begin at that step (`train.lr.start_step`): a mismatch is refused, not trained on."""
    source = runs.open_run(config.init.from_run)
    checkpoint = source.last_checkpoint()
    if checkpoint is None:
        raise UserError(f"init.from_run {source.path} has no epoch checkpoint in {source.checkpoint_dir}, so no "
                        f"optimizer state to carry; set init.optimizer_state: false")
    step = load_training_state(trainer, checkpoint, config)
    if step != config.train.lr.start_step:
        raise UserError(f"init.from_run {checkpoint} holds an optimizer at step {step} but train.lr.start_step "
                        f"is {config.train.lr.start_step}; set train.lr.start_step: {step}")
    run.set_status("running", optimizer_from={"checkpoint": str(checkpoint), "step": step})


def record_continuation(run: runs.Run, continued: Continuation) -> None:
    """Where a continued run came from (status.json), and the source's metrics rows of the epochs it holds."""
    run.set_status("running", continued_from={"run": str(continued.source.path), "epoch": continued.epoch,
                                              "checkpoint": str(continued.checkpoint)})
    rows = continued.source.path / "metrics.csv"
    if rows.is_file():
        durable.atomic_write(run.path / "metrics.csv", rows.read_bytes())
        truncate_metrics(run.path / "metrics.csv", continued.epoch)


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """Keep the metrics rows of the epochs the backup holds: an epoch cut short and redone must not
    appear twice, and a row cut off by a kill (fewer fields than the header) goes too."""
    if not path.is_file():
        return
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return
    kept = [rows[0]] + [row for row in rows[1:] if len(row) == len(rows[0]) and int(float(row[0])) < epochs_done]
    text = "".join(",".join(row) + "\n" for row in kept)
    durable.atomic_write(path, text)


def remove_partials(run: runs.Run) -> None:
    """Temporary files a killed run left beside its checkpoints, backup and small files (never read:
    readers see only the renamed ones), which would otherwise hold disk space for good."""
    for folder, pattern in ((run.checkpoint_dir, ".partial-*"), (run.path / "backup", "**/.partial-*"),
                            (run.path, ".partial-*")):
        for partial in folder.glob(pattern):
            durable.remove(partial)

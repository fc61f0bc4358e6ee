"""One run lifecycle for every task: config -> task's datasets -> task's model -> phases of `model.fit` with
the run's callbacks -> the task's test figures on the last checkpoint -> run snapshot.

Everything that can be checked (config, model hyperparameters, data, starting weights) is checked
before the run folder is created, so a bad input leaves nothing behind; once the folder exists, any
failure marks it failed, and SIGTERM or Ctrl-C marks it interrupted. `resume(run)` continues an
interrupted run from its last complete epoch, in the same folder. What differs between tasks
(classification, detection, ...) is a `shared.task.Task` (`shared.tasks.TASKS`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import re
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import keras

from shared import distribute, durable, finetune, modelzoo, optim, plots, runs
from shared.callbacks import (AtomicBackupAndRestore, BestCheckpoint, DurableCSVLogger, EpochCheckpoint,
                              LearningRateLogger, NonFiniteLoss, ResumableEarlyStopping, StopOnNonFiniteLoss,
                              StopOnSignal, backup_state, logged_metrics, monitor_mode)
from shared.config import Config, InitConfig, with_changes
from shared.errors import UserError, embedded_user_error
from shared.progress import keras_verbosity
from shared.task import Phase, Rebuilt, Task
from shared.tasks import rebuild, rebuilt, task_for


@contextlib.contextmanager
def precision_policy(name: str):
    """Build and train under a Keras dtype policy (mixed_float16 / mixed_bfloat16: compute in half
    precision, variables in float32); the classifier layers keep float32 outputs."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (a scheduler's or cloud preemption's stop) handled like Ctrl-C: stop, save, mark. Yields
    the callbacks every fit inside must get: the one that raises at the next batch (none off the main
    thread, where signals can't be caught)."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    stop = StopOnSignal()
    previous = signal.signal(signal.SIGTERM, stop.request)
    try:
        yield [stop]
    finally:
        signal.signal(signal.SIGTERM, previous)
    stop.check()  # a signal during the last batch still stops the run before testing


def train(config: Config, argv: list[str] | None = None, callbacks: list | tuple = ()) -> runs.Run:
    """Train as the config says (its task's model and data), test on the held-out split, and return the
    finished run. `callbacks`: extra Keras callbacks, run after the runner's own (a tuner's pruning hook).
    `config` is frozen: the run resolves a new one (hyperparameters, class count, absolute paths) in
    `prepare`, which its config.yaml records."""
    return _run_training(_task(config), config, argv, resumed=None, extra_callbacks=list(callbacks))


def resume(path: str | Path, argv: list[str] | None = None) -> runs.Run:
    """Continue an interrupted or failed run from its last complete epoch (weights, optimizer state,
    schedule position and epoch counter from its backup), with its own config and model.py."""
    run = runs.open_run(path)
    runs.lock_run(run, argv)  # before anything is read or written: a live run is refused here
    check_resumable(run)
    from shared import config as config_module

    config = config_module.from_dict(run.config_dict())
    return _run_training(_task(config), config, argv, resumed=run)


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


def continue_run(path: str | Path, epochs: int, argv: list[str] | None = None,
                 callbacks: list | tuple = ()) -> runs.Run:
    """Train a finished run further, to `epochs` in all, in a new version folder of its model that records
    where it came from (notes.md, and `continued_from` in status.json): from its last checkpoint's weights,
    optimizer state and epoch counter (the schedule goes on from that epoch, over the new total), with its own
    config and model.py otherwise. Its metrics.csv starts with the source's rows up to that epoch, so the
    curves show the whole training; the source run is not changed. `callbacks`: as `train`'s. Interrupted, the
    new run resumes in place like any other."""
    from shared import config as config_module

    source = runs.open_run(path)
    runs.require_idle(source)
    continuation = continuation_of(source, epochs)
    tree = source.config_dict()
    config = config_module.from_dict({**tree, "train": {**tree.get("train", {}), "epochs": epochs}})
    return _run_training(_task(config), config, argv, resumed=None, extra_callbacks=list(callbacks),
                         continued=continuation)


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


def _task(config: Config) -> Task:
    return task_for(config)


def starting_run(init: InitConfig, where: str = "") -> Rebuilt | None:
    """The run init.from_run names (or whose checkpoint init.weights is) rebuilt as it trained, auxiliary heads
    kept, for `Task.initialize`; None for a weight file of no run. `where`: as `finetune.initialize_from`'s."""
    with finetune.named_init(init, where):
        named = finetune.source_run(init)
        return rebuilt(*named, training_outputs=True) if named is not None else None


def test(run: runs.Run | str | Path, checkpoint: str | Path | None = None, changes: dict | None = None,
         draw: bool = True) -> dict:
    """Re-test a finished run on its test split from its own snapshot (model.py, config.yaml, last
    checkpoint): the figures equal those recorded at training time. `checkpoint`: last (default), best, or a
    checkpoint file (`runs.Run.checkpoint`). Refuses (UserError) data whose class names are not the run's
    (labels.txt), in the same order. Redraws the task's figure in the run folder unless not `draw`.
    `changes`: config keys to test it with instead of its own (the loop tests a run on its held-out set)."""
    from shared import config as config_module

    run = run if isinstance(run, runs.Run) else runs.open_run(run)
    weights = run.checkpoint(checkpoint or "last")  # before the data: a run without a checkpoint says so first
    config = with_changes(config_module.from_dict(run.config_dict()), changes or {})
    task = _task(config)
    data = task.test_data(run)  # checked against the run's classes before the model loads
    model, _ = rebuild(run, weights)
    metrics, redraw = task.evaluate(model, data)
    if draw:
        redraw(run.path)
    return metrics


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
            raise UserError(f"the backup of run {run.path} is damaged ({backup}: {_first_line(error)}); it cannot "
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


def _run_training(task: Task, config: Config, argv: list[str] | None, resumed: runs.Run | None,
                  extra_callbacks: list | None = None, continued: Continuation | None = None) -> runs.Run:
    # ---- everything checked before a run folder exists
    # The strategy first: the multi-worker runtime must be set up before any TensorFlow work, and a
    # task's checks may build layers (the detection augmentations do).
    placement = distribute.make_placement(config.distribute) if task.distributes else _one_device()
    task.check()
    phases = task.plan_phases()
    saved = [s for s in map(backup_state, _backup_dirs(resumed, phases)) if s] if resumed else []
    restoring, done = bool(saved), max((s["epoch"] for s in saved), default=0)
    done = continued.epoch if continued else done
    snapshot = resumed.path if resumed else continued.source.path if continued else None
    with precision_policy(config.train.precision), placement.strategy.scope():
        folder, module, model, data, task = prepare(task, snapshot, placement.replicas, start_epoch=done)
        config = task.config  # resolved: the one the run records
        provenance = continued.describe() if continued else ""
        if (config.init.from_run or config.init.weights) and not restoring and not continued:
            provenance = task.initialize(model, module, data, starting_run(config.init, config.where))
        distills = config.distill.teacher and "distill" in task.commands  # a task that does not, ignores it
        teacher = rebuilt(runs.open_run(config.distill.teacher)) if distills else None
        trainer = task.trainer(model, data, teacher)  # the model that fit() trains
    distribute.patch_multi_worker_build(trainer, placement)
    train_data, val_data = task.fit_data(model, module, data)
    head = task.head_layer_names(module, model, data.input_shape) if any(phase.freeze for phase in phases) else set()
    for phase in phases:  # patterns are checked now, before a run folder exists
        _freeze(model, phase.freeze, head)
    task_callbacks = task.callbacks(model, data)  # one set for the run's phases
    if config.train.best.monitor or config.train.early_stopping.monitor:
        with precision_policy(config.train.precision), placement.strategy.scope():
            _freeze(model, phases[0].freeze, head)
            compile_phase(task, trainer, model, module, data, phases[0].until_epoch, phases[0].lr_scale,
                     placement.replicas)
            logged = logged_metrics(trainer, train_data, validating=val_data is not None)
            _check_monitors(config, None if logged is None else logged.union(
                *(getattr(callback, "logged", ()) for callback in task_callbacks)))

    # ---- the run
    if resumed:
        run = resumed
        run.set_status("running", resumed=_now(), pid=os.getpid())
    elif placement.is_chief:
        run = runs.create(config, folder, argv, provenance=provenance)
        durable.atomic_write(run.path / runs.LABELS_FILE, "".join(f"{name}\n" for name in data.class_names))
        if continued:
            _record_continuation(run, continued)
    else:
        run = runs.scratch()
    # what the task's data asks a run to record (a folder's split); a resumed or continued run's data read
    # its source's record back and records the same again
    for name, content in (data.records.items() if placement.is_chief else ()):
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        durable.atomic_write(run.path / name, content)
    print(f"run {run.path}: {config.model.name} {task.name} {config.model.hparams}, {data.description}, "
          f"{data.steps_per_epoch} steps x {config.train.epochs} epochs; {placement.description}"
          + (f"; {provenance}" if provenance else ""), flush=True)
    backups = _backup_dirs(run, phases)
    if resumed:
        _truncate_metrics(run.path / "metrics.csv", done)
        _remove_partials(run)
        print(f"resuming after epoch {done} of {config.train.epochs}", flush=True)

    checkpoint = EpochCheckpoint(run.checkpoint_dir, ema=config.train.ema_momentum is not None,
                                 keep=config.train.keep_checkpoints)
    best, stopper = _best_checkpoint(config, checkpoint), _early_stopping(config)
    run_callbacks = [c for c in (best, stopper) if c is not None]  # one state for the whole run, all phases
    stopped = _restore_early_stop(saved, run_callbacks, config)  # stopped before a kill: no more training
    started = time.time()
    with _scratch_removed(run, placement.is_chief), failures_marked(run, model, data.undecodable):
        with sigterm_as_interrupt() as stop_callbacks:
            start = 0
            for index, (phase, backup) in enumerate(zip(phases, backups)):
                if stopped:
                    break
                if phase.until_epoch <= done and (continued or any(map(backup_state, backups[index + 1:]))):
                    start = phase.until_epoch  # trained, and a later phase's backup holds its weights
                    continue
                with precision_policy(config.train.precision), placement.strategy.scope():
                    _freeze(model, phase.freeze, head)
                    optim.apply_weight_decay(model, config.train)  # the student's, when distilling
                    compile_phase(task, trainer, model, module, data, phase.until_epoch - start, phase.lr_scale,
                             placement.replicas)
                phase_callbacks = _callbacks(config, run, backup, val_data is not None, checkpoint, run_callbacks,
                                             task_callbacks)
                if continued and start <= continued.epoch < phase.until_epoch:
                    _start_from(trainer, continued.checkpoint, config, phase_callbacks[-1], continued.epoch)
                with _unknown_validation_length_allowed(val_data):
                    trainer.fit(train_data, epochs=phase.until_epoch, initial_epoch=start,
                                steps_per_epoch=data.steps_per_epoch, validation_data=val_data,
                                verbose=keras_verbosity(config.train.verbose), shuffle=False,
                                callbacks=[*stop_callbacks, *phase_callbacks, *(extra_callbacks or [])])
                start = phase.until_epoch
                stopped = _stopped_early(stopper, config)
            if stopped:
                print(f"stopped early after epoch {stopper.stopped_epoch + 1} of {config.train.epochs}: "
                      f"{stopper.monitor} did not improve by more than {abs(stopper.min_delta)} for "
                      f"{stopper.patience} epochs", flush=True)
        if not placement.is_chief:  # its figures would go with its scratch folder
            return run
        metrics, draw, last = _test_last_checkpoint(task, run, data)
        with durable.disk_space_checked(run.path / "curves.png"):
            plots.plot_curves(run.path / "metrics.csv", run.path / "curves.png")
        metrics["train_seconds"] = round(time.time() - started, 1)
        if config.train.ema_momentum is not None:
            metrics["weights"] = "ema"
        metrics["checkpoint"] = str(last.relative_to(run.path))
        outcome = _checkpoint_outcome(best, stopper if stopped else None, config)
        metrics.update(outcome)
        run.write_json("test_metrics.json", metrics)
        draw(run.path)
        # Before "finished": a kill after it would leave the backup for good, as no command resumes a finished
        # run. A kill before it leaves a tested run without a backup, which --resume marks finished.
        shutil.rmtree(run.path / "backup", ignore_errors=True)
        run.set_status("finished", ended=_now(), **outcome)
    return run


def prepare(task: Task, model_folder: Path | None = None, replicas: int = 1, start_epoch: int = 0):
    """The task's model and data as a run builds them, also for the tools that train a few steps outside a
    run (lr-sweep, find-batch, benchmarks): returns (folder, module, model, TaskData, the task bound to the
    resolved config).
    `model_folder`: where model.py lives (a run folder when resuming), else the config's model;
    `start_epoch`: epochs already trained, where the training stream starts.

    The one point where a run's config is resolved, before any folder exists: the model's hyperparameters
    here, the paths it records in `task.resolve` (absolute), then what the task's data settles (class
    count, normalization statistics) in `task.datasets`. The result is a new frozen Config, the one the
    run records and everything after uses (the returned task's); `task.config` itself is never changed."""
    config = task.config
    folder = model_folder or modelzoo.model_dir(config.model.name, config.model.path)
    module = modelzoo.load_model_module(folder)
    task = task.bound(with_changes(config, {"model.hparams": modelzoo.resolve_hparams(
        module, config.model.hparams, config.where)}))
    task = task.bound(task.resolve())
    keras.utils.set_random_seed(task.config.train.seed)
    data = task.datasets(folder, replicas, start_epoch=start_epoch)
    task = task.bound(data.config)
    return folder, module, task.build(module, data.input_shape), data, task


def compile_phase(task: Task, trainer: keras.Model, model: keras.Model, module, data, epochs: int, lr_scale: float,
             replicas: int) -> None:
    """The phase's trainer compiled with the task's objective and the optimizer of the phase's own schedule
    (a schedule spans the phase, not the whole run)."""
    optim.compile_trainer(trainer, task.objective(model, module, data), _phase_train_config(task.config, epochs).train,
                          data.steps_per_epoch, replicas, lr_scale)


def _one_device() -> distribute.Placement:
    """Where a task that does not spread over devices trains: TensorFlow's default placement."""
    import tensorflow as tf

    return distribute.Placement(tf.distribute.get_strategy(), 1, True, "default strategy, 1 replica")


@contextlib.contextmanager
def _scratch_removed(run: runs.Run, is_chief: bool) -> Iterator[None]:
    """A non-chief worker's run is a scratch folder under the temporary folder (runs.scratch): removed when
    its training ends, however it ends."""
    try:
        yield
    finally:
        if not is_chief:
            shutil.rmtree(run.path, ignore_errors=True)


@contextlib.contextmanager
def failures_marked(run: runs.Run, model: keras.Model,
                    undecodable: Callable[[BaseException], list[str]] = lambda error: []) -> Iterator[None]:
    """What a run's training and testing do to it when they stop early, for every task: Ctrl-C or SIGTERM
    saves the moment's weights and marks it interrupted; a non-finite loss, a full disk or files that
    `undecodable(error)` names mark it failed with one line; anything else marks it failed and keeps its
    traceback. On a full disk the old status stays, and the line says so."""
    try:
        yield
    except KeyboardInterrupt:
        _save_interrupted(model, run)
        with _unless_disk_full():  # a full disk must not hide the stop
            plots.plot_curves(run.path / "metrics.csv", run.path / "curves.png")
        _mark(run, "interrupted", ended=_now())
        raise KeyboardInterrupt(f"interrupted; the state of the last complete epoch is kept: "
                                f"python -m shared.runner --resume {run.path}") from None
    except NonFiniteLoss as error:
        _mark(run, "failed", ended=_now(), error=str(error))
        last = run.last_checkpoint()
        raise UserError(f"{error}; lower train.lr.base or set train.optimizer.clip_global_norm (run {run.path} "
                        f"is marked failed, last good checkpoint: {last or 'none'})") from None
    except BaseException as error:
        if _disk_full(error):
            full = error if isinstance(error, durable.DiskFull) else durable.disk_full_error(_written_path(error, run))
            marked = _mark(run, "failed", ended=_now(), error=str(full))
            raise durable.DiskFull(f"{full} (run {run.path} {'is' if marked else 'could not be'} marked failed; "
                                   f"once there is room: python -m shared.runner --resume {run.path})") from None
        bad = undecodable(error)
        _mark(run, "failed", ended=_now(), error=f"undecodable images: {bad}" if bad else _first_line(error))
        if bad:
            raise UserError(f"corrupt or unreadable image(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                            f"delete or replace them (run {run.path} is marked failed)") from None
        embedded = embedded_user_error(error)  # a check in the input pipeline that names its problem
        if embedded is not None:
            raise UserError(f"{embedded} (run {run.path} is marked failed)") from None
        raise


@contextlib.contextmanager
def _unknown_validation_length_allowed(val_data) -> Iterator[None]:
    """Keras warns that the input "ran out of data" whenever it reaches the end of a dataset of unknown length,
    as a validation split is when data.on_corrupt: skip drops the images that do not decode: there the end of
    each pass is expected. The training stream repeats forever, so during fit the warning can only be about
    such a split, and is left out while one is validated."""
    import tensorflow as tf

    if not isinstance(val_data, tf.data.Dataset) or int(val_data.cardinality()) != tf.data.UNKNOWN_CARDINALITY:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield


def _test_last_checkpoint(task: Task, run: runs.Run, data) -> tuple[dict, Callable, Path]:
    """The test figures of the checkpoint the run records as its last, on the model `test --run` rebuilds
    from it (float32, from the run's model.py and config), so the two always agree; the model in memory
    can differ (it computes in bfloat16 under mixed precision, or holds a restored backup's weights)."""
    last = run.last_checkpoint()
    model, _ = rebuild(run)  # the same file: nothing else writes checkpoints now
    return (*task.evaluate(model, data), last)


def _disk_full(error: BaseException) -> bool:
    return isinstance(error, durable.DiskFull) or durable.is_disk_full(error)


def _written_path(error: BaseException, run: runs.Run) -> Path:
    """The file a disk-full error was writing: the OSError's own, else one in the run folder that the
    message names (TensorFlow's writers), else the run folder."""
    if isinstance(error, OSError) and error.filename:
        return Path(error.filename)
    named = re.search(re.escape(str(run.path)) + r"[^\s;:,'\"]*", str(error))
    return Path(named.group(0)) if named else run.path


@contextlib.contextmanager
def _unless_disk_full():
    try:
        yield
    except Exception as error:
        if not _disk_full(error):
            raise


def _mark(run: runs.Run, status: str, **details) -> bool:
    """Set the run's status; on a full disk keep the old one (False) rather than hide the error in hand."""
    with _unless_disk_full():
        run.set_status(status, **details)
        return True
    return False


def _freeze(model: keras.Model, patterns: list[str], head: set[str]) -> None:
    """Exactly the phase's layers frozen: everything trainable first, then the patterns."""
    finetune.unfreeze_all(model)
    if patterns:
        finetune.freeze_layers(model, patterns, head)


def _backup_dirs(run: runs.Run, phases: list[Phase]) -> list[Path]:
    return [run.path / "backup" / f"phase-{i + 1}" for i in range(len(phases))]


def _phase_train_config(config: Config, epochs: int):
    """The phase's own schedule length: a schedule spans the phase, not the whole run."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=max(epochs, 1)))


def _callbacks(config: Config, run: runs.Run, backup: Path, validating: bool, checkpoint: EpochCheckpoint,
               run_callbacks: list, task_callbacks: list = ()) -> list:
    """Order matters at the end of an epoch: the metrics row and the checkpoint (then best.keras) are on
    disk (fsynced) before the backup commits, so a crash anywhere between makes resume redo that epoch,
    never skip it, and no kill loses a checkpoint. With EMA, validation and the checkpoint see the averaged
    weights, the backup the raw ones with the optimizer state. `run_callbacks` (best checkpoint, early
    stopping) keep one state over the run's phases; theirs and the schedule's are committed with the
    backup. The task's callbacks (`Task.callbacks`) come before the schedule and the loggers, so what they
    log is recorded and monitored. The backup comes last."""
    schedule = optim.schedule_callbacks(config.train, validating=validating)
    ema = config.train.ema_momentum is not None
    stateful = [*schedule, *run_callbacks]
    return [
        StopOnNonFiniteLoss(),
        LearningRateLogger(),
        *task_callbacks,
        *schedule,
        *([keras.callbacks.SwapEMAWeights()] if ema else []),  # for validation only
        keras.callbacks.TensorBoard(log_dir=str(run.path / "logs"), write_graph=False),
        DurableCSVLogger(str(run.path / "metrics.csv"), append=True),
        checkpoint,
        *run_callbacks,
        AtomicBackupAndRestore(backup, stateful=[c for c in stateful if hasattr(c, "get_state")]),
    ]


def _check_monitors(config: Config, logged: set[str] | None) -> None:
    """Refuse a best or early-stopping monitor the run will not log (a typo, val_* without validation), before
    the run folder exists. `logged` None (not known beforehand): the callbacks check at the first epoch."""
    if logged is None:
        return
    for key, monitor in (("train.best.monitor", config.train.best.monitor),
                         ("train.early_stopping.monitor", config.train.early_stopping.monitor)):
        if monitor and monitor not in logged:
            hint = "; val_* metrics need data.val_fraction" if monitor.startswith("val_") and not any(
                name.startswith("val_") for name in logged) else ""
            raise UserError(f"{key} is {monitor!r}, which this run will not log{config.where}; it logs: "
                            f"{', '.join(sorted(logged))}{hint}")


def _best_checkpoint(config: Config, checkpoint: EpochCheckpoint) -> BestCheckpoint | None:
    best = config.train.best
    return BestCheckpoint(checkpoint, best.monitor, best.mode) if best.monitor else None


def _early_stopping(config: Config) -> ResumableEarlyStopping | None:
    stop = config.train.early_stopping
    if not stop.monitor:
        return None
    return ResumableEarlyStopping(monitor=stop.monitor, patience=stop.patience, min_delta=stop.min_delta,
                                  mode=monitor_mode(stop.monitor, stop.mode))


def _stopped_early(stopper: ResumableEarlyStopping | None, config: Config) -> bool:
    """Early stopping ended the run before its last epoch (a stop at the last epoch is no early one)."""
    return stopper is not None and 0 < stopper.stopped_epoch < config.train.epochs - 1


def _restore_early_stop(saved: list[dict], run_callbacks: list, config: Config) -> bool:
    """True when the newest committed backup says early stopping had stopped the run (a kill came while it
    tested): the run is not trained further, and its run-wide callbacks get their committed state back."""
    states = saved[-1].get("callbacks", {}) if saved else {}
    stopper = next((c for c in run_callbacks if isinstance(c, ResumableEarlyStopping)), None)
    if stopper is None or not states.get(ResumableEarlyStopping.__name__, {}).get("stopped_epoch"):
        return False
    for callback in run_callbacks:
        if type(callback).__name__ in states:
            callback.set_state(states[type(callback).__name__])
    return _stopped_early(stopper, config)


def _checkpoint_outcome(best: BestCheckpoint | None, stopper: ResumableEarlyStopping | None,
                        config: Config) -> dict:
    """What test_metrics.json and status.json record of the best epoch and of an early stop."""
    outcome = {}
    if best is not None and best.record():
        outcome["best"] = best.record()
    if stopper is not None:
        outcome["stopped_early"] = {"epoch": stopper.stopped_epoch + 1, "of": config.train.epochs,
                                    "monitor": stopper.monitor, "patience": stopper.patience}
    return outcome


def _start_from(trainer: keras.Model, checkpoint: Path, config: Config, backup: AtomicBackupAndRestore,
                epoch: int) -> None:
    """A continued run's start: the checkpoint's weights and optimizer state in the compiled trainer,
    committed as the backup after `epoch` epochs, which `fit` restores (and `--resume` finds)."""
    if not trainer.optimizer.built:
        trainer.optimizer.build(trainer.trainable_variables)  # its slots must exist to be loaded
    modelzoo.load_weight_file(trainer, checkpoint, what=f"model of {checkpoint}")
    if config.train.ema_momentum is not None:
        swap = keras.callbacks.SwapEMAWeights()  # the checkpoint holds the averages as the weights:
        swap.set_model(trainer)
        swap.on_test_begin()  # swap back, raw weights into the model, the averages into the optimizer
    backup.set_model(trainer)
    backup.commit(epoch)


def _record_continuation(run: runs.Run, continued: Continuation) -> None:
    """Where a continued run came from (status.json), and the source's metrics rows of the epochs it holds."""
    run.set_status("running", continued_from={"run": str(continued.source.path), "epoch": continued.epoch,
                                              "checkpoint": str(continued.checkpoint)})
    rows = continued.source.path / "metrics.csv"
    if rows.is_file():
        durable.atomic_write(run.path / "metrics.csv", rows.read_bytes())
        _truncate_metrics(run.path / "metrics.csv", continued.epoch)


def _truncate_metrics(path: Path, epochs_done: int) -> None:
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


def _save_interrupted(model: keras.Model, run: runs.Run) -> None:
    """The weights at the moment of the stop, as checkpoints/interrupted.keras (resume continues from
    the last complete epoch's backup; this file keeps the partial epoch's progress at hand)."""
    with contextlib.suppress(Exception), durable.partial_path(run.checkpoint_dir / "interrupted.keras") as partial:
        model.save(partial)


def _remove_partials(run: runs.Run) -> None:
    """Temporary files a killed run left beside its checkpoints, backup and small files (never read:
    readers see only the renamed ones), which would otherwise hold disk space for good."""
    for folder, pattern in ((run.checkpoint_dir, ".partial-*"), (run.path / "backup", "**/.partial-*"),
                            (run.path, ".partial-*")):
        for partial in folder.glob(pattern):
            durable.remove(partial)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _first_line(error: BaseException) -> str:
    embedded = embedded_user_error(error)  # a data check inside the pipeline: its own one line
    if embedded is not None:
        return str(embedded)
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:500] if text else ''}"

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

from shared import config as config_module
from shared import distribute, durable, finetune, mlflow_log, modelzoo, optim, plots, runs
from shared.callbacks import (DurableCSVLogger, LearningRateLogger, NonFiniteLoss, StopOnNonFiniteLoss, StopOnSignal,
                              built_before_fit, logged_metrics)
from shared.checkpoints import (CheckpointPolicy, Continuation, Start, backup_state, carry_optimizer_state,
                                check_resumable, continuation_of, decide_start, record_continuation, remove_partials,
                                start_from, truncate_metrics)
from shared.config_schema import Config, InitConfig, as_new_run, with_changes
from shared.data import ends_promptly
from shared.data import service as data_service
from shared.errors import UserError, embedded_user_error, first_line
from shared.kept import KeptTrainer, reset_optimizer, set_random_seed
from shared.locks import FileLock
from shared.progress import keras_verbosity
from shared.task import Rebuilt, Task
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


def train(config: Config, argv: list[str] | None = None, callbacks: list | tuple = (), draw: bool = True,
          tested: Callable[[keras.Model], None] | None = None, keep: KeptTrainer | None = None) -> runs.Run:
    """Train as the config says (its task's model and data), test on the held-out split, and return the
    finished run. `callbacks`: extra Keras callbacks, run after the runner's own (a tuner's pruning hook);
    `draw`: False leaves out the run's figures (curves.png and the task's), which `test --run` draws later;
    `tested`: gets the model the test rebuilt from the last checkpoint once the run is finished (what
    `shared.tasks.rebuild(run)` gives: an export that follows need not build it again).
    `keep`: a trainer kept between the runs of this process (`shared.kept`): the run trains the kept model
    without building or compiling it where their graphs agree, and leaves its own there once finished.
    `config` is frozen: the run resolves a new one (hyperparameters, class count, absolute paths) in
    `prepare`, which its config.yaml records."""
    try:
        return _run_training(task_for(config), argv, extra_callbacks=callbacks, draw=draw, tested=tested, keep=keep)
    except BaseException:
        if keep is not None:  # what it holds now is no finished run's state
            keep.forget()
        raise


def resume(path: str | Path, argv: list[str] | None = None) -> runs.Run:
    """Continue an interrupted or failed run from its last complete epoch (weights, optimizer state,
    schedule position and epoch counter from its backup), with its own config and model.py."""
    run = runs.open_run(path)
    runs.lock_run(run, argv)  # before anything is read or written: a live run is refused here
    check_resumable(run)
    config = config_module.from_dict(run.config_dict())
    return _run_training(task_for(config), argv, resumed=run)


def continue_run(path: str | Path, epochs: int, argv: list[str] | None = None,
                 callbacks: list | tuple = ()) -> runs.Run:
    """Train a finished run further, to `epochs` in all, in a new version folder of its model that records
    where it came from (notes.md, and `continued_from` in status.json): from its last checkpoint's weights,
    optimizer state and epoch counter (the schedule goes on from that epoch, over the new total), with its own
    config and model.py otherwise. Its metrics.csv starts with the source's rows up to that epoch, so the
    curves show the whole training; the source run is not changed. `callbacks`: as `train`'s. Interrupted, the
    new run resumes in place like any other."""
    source = runs.open_run(path)
    runs.require_idle(source)
    continuation = continuation_of(source, epochs)
    tree = source.config_dict()
    config = config_module.from_dict({**tree, "train": {**tree.get("train", {}), "epochs": epochs}})
    return _run_training(task_for(config), argv, continuation=continuation, extra_callbacks=callbacks)


def starting_run(init: InitConfig, where: str = "") -> Rebuilt | None:
    """The run init.from_run names (or whose checkpoint init.weights is) rebuilt as it trained, auxiliary heads
    kept, for `Task.initialize`; None for a weight file of no run. `where`: as `finetune.initialize_from`'s."""
    with finetune.named_init(init, where):
        named = finetune.source_run(init)
        return rebuilt(*named, training_outputs=True) if named is not None else None


def test(run: runs.Run | str | Path, checkpoint: str | Path | None = None, changes: dict | None = None,
         draw: bool = True, views: str | None = None) -> dict:
    """Re-test a finished run on its test split from its own snapshot (model.py, config.yaml, last
    checkpoint): the figures equal those recorded at training time. `checkpoint`: last (default), best, or a
    checkpoint file (`runs.Run.checkpoint`). Refuses (UserError) data whose class names are not the run's
    (labels.txt), in the same order. Redraws the task's figure in the run folder unless not `draw`.
    `changes`: config keys to test it with instead of its own (the loop tests a run on its held-out set).
    `views`: test views of a task that has them (`Task.test_options`; classification: center, flip, 10crop,
    multiscale, 144crop, `shared.classification.views`); their figures (top-1, top-5, loss) are recorded in the
    run's test_metrics.json under `by_view` when the last checkpoint is tested, and no figure is redrawn."""
    run = run if isinstance(run, runs.Run) else runs.open_run(run)
    weights = run.checkpoint(checkpoint or "last")  # before the data: a run without a checkpoint says so first
    config = with_changes(config_module.from_dict(run.config_dict()), changes or {})
    task = task_for(config)
    data = task.test_data(run)  # checked against the run's classes before the model loads
    if views is not None:
        data = task.with_views(data, views)
    model, _ = rebuild(run, weights)
    metrics, redraw = task.evaluate(model, data)
    if views is not None:
        metrics["views"] = views
        if checkpoint in (None, "last"):
            with FileLock(run.path / ".test_metrics.lock"):  # two `test --views` at once: both recorded
                recorded = run.test_metrics() or {}
                figures = {key: metrics[key] for key in ("top1", "top5", "loss", "examples") if key in metrics}
                run.write_json("test_metrics.json",
                               {**recorded, "by_view": {**(recorded.get("by_view") or {}), views: figures}})
        return metrics
    if draw:
        redraw(run.path)
    return metrics


def _run_training(task: Task, argv: list[str] | None, resumed: runs.Run | None = None,
                  continuation: Continuation | None = None, extra_callbacks: list | tuple = (),
                  draw: bool = True, tested: Callable[[keras.Model], None] | None = None,
                  keep: KeptTrainer | None = None) -> runs.Run:
    # ---- everything checked before a run folder exists
    # The strategy first: the multi-worker runtime must be set up before any TensorFlow work, and a
    # task's checks may build layers (the detection augmentations do).
    placement = distribute.make_placement(task.config.distribute) if task.distributes else _one_device()
    task.check()
    if task.config.track:  # a missing extra is said before the run folder exists
        mlflow_log.import_mlflow()
    phases = task.plan_phases()
    start = decide_start(task.config, phases, resumed, continuation)  # once: fresh, init, resume or continue
    keep = keep if keep is not None and _keepable(task.config, phases, start, placement) else None
    with precision_policy(task.config.train.precision), placement.strategy.scope():
        folder, module, model, data, task = prepare(task, start.snapshot, placement.replicas, start_epoch=start.epoch,
                                                    kept=keep)
        config = task.config  # resolved: the one the run records
        provenance = start.continuation.describe() if start.continuation else ""
        fresh = finetune.fresh_values(model, config.init) if start.kind == "init" else None
        if start.kind == "init" and config.init.optimizer_state:  # the whole state is loaded once compiled
            provenance = f"weights and optimizer state from {config.init.from_run} (its last checkpoint)"
        elif start.kind == "init":
            if keep is not None and keep.holds_weights_of(model, _last_checkpoint(config.init)):
                provenance = (f"weights from {config.init.from_run} ({keep.last_checkpoint.name}, in memory since "
                              f"that run ended)")
            else:
                provenance = task.initialize(model, module, data, starting_run(config.init, config.where))
            if fresh is not None:
                finetune.shrink_and_perturb(model, fresh, config.init)
        if fresh is not None:
            provenance += f", shrunk x{config.init.shrink:g} and perturbed x{config.init.perturb:g}"
        distills = config.distill.teacher and "distill" in task.commands  # a task that does not, ignores it
        teacher = rebuilt(runs.open_run(config.distill.teacher)) if distills else None
        trainer = keep.trainer if keep is not None and keep.holds(model) else task.trainer(model, data, teacher)
    distribute.patch_multi_worker_build(trainer, placement)
    train_data, val_data = task.fit_data(model, module, data)
    train_data = data_service.distribute_train(train_data, config.data.service)  # off unless data.service is set
    train_data, val_data = ends_promptly(train_data), ends_promptly(val_data)
    head = task.head_layer_names(module, model, data.input_shape) if any(phase.freeze for phase in phases) else set()
    for phase in phases:  # patterns are checked now, before a run folder exists
        _freeze(model, phase.freeze, head)
    task_callbacks = task.callbacks(model, data)  # one set for the run's phases
    if config.train.best.monitor or config.train.early_stopping.monitor:
        with precision_policy(config.train.precision), placement.strategy.scope():
            _freeze(model, phases[0].freeze, head)
            _compiled(task, trainer, model, module, data, phases[0].until_epoch, phases[0].lr_scale,
                      placement.replicas, keep)
            logged = logged_metrics(trainer, train_data, validating=val_data is not None)
            _check_monitors(config, None if logged is None else logged.union(
                *(getattr(callback, "logged", ()) for callback in task_callbacks)))

    # ---- the run
    run = _open_run(start, config, folder, argv, provenance, data, placement.is_chief)
    print(f"run {run.path}: {config.model.name} {task.name} {config.model.hparams}, {data.description}, "
          f"{data.steps_per_epoch} steps x {config.train.epochs} epochs; {placement.description}"
          + (f"; {provenance}" if provenance else ""), flush=True)
    if start.run is not None:
        truncate_metrics(run.path / "metrics.csv", start.epoch)
        remove_partials(run)
        print(f"resuming after epoch {start.epoch} of {config.train.epochs}", flush=True)

    policy = CheckpointPolicy(run, config, phases)
    tracking = [mlflow_log.epoch_tracker(run.path, config.track_uri)] if config.track and placement.is_chief else []
    stopped = policy.restore_stop(list(start.saved))  # stopped before a kill: no more training
    started = time.time()
    # Tracking outermost: it logs the run once its status is final; a tracking server that fails is a warning line
    with mlflow_log.logged_at_end(tracking), _scratch_removed(run, placement.is_chief), \
            failures_marked(run, model, data.undecodable):
        with sigterm_as_interrupt() as stop_callbacks:
            epoch = 0
            for index, phase in enumerate(phases):
                if stopped:
                    break
                if phase.until_epoch <= start.epoch and (start.kind == "continue" or
                                                         any(map(backup_state, policy.backups[index + 1:]))):
                    epoch = phase.until_epoch  # trained, and a later phase's backup holds its weights
                    continue
                with precision_policy(config.train.precision), placement.strategy.scope():
                    _freeze(model, phase.freeze, head)
                    optim.apply_weight_decay(model, config.train)  # the student's, when distilling
                    rate = _compiled(task, trainer, model, module, data, phase.until_epoch - epoch, phase.lr_scale,
                                     placement.replicas, keep)
                    built_before_fit(trainer, train_data)
                phase_callbacks = _callbacks(config, run, index, val_data is not None, policy, task_callbacks)
                if start.kind == "continue" and epoch <= start.epoch < phase.until_epoch:
                    start_from(trainer, start.continuation.checkpoint, config, phase_callbacks[-1], start.epoch)
                if start.kind == "init" and config.init.optimizer_state and index == 0:
                    carry_optimizer_state(trainer, run, config)
                    if fresh is not None:
                        finetune.shrink_and_perturb(model, fresh, config.init)
                with _unknown_validation_length_allowed(val_data):
                    trainer.fit(train_data, epochs=phase.until_epoch, initial_epoch=epoch,
                                steps_per_epoch=data.steps_per_epoch, validation_data=val_data,
                                verbose=keras_verbosity(config.train.verbose), shuffle=False,
                                callbacks=[*stop_callbacks, *rate, *phase_callbacks, *tracking, *extra_callbacks])
                epoch = phase.until_epoch
                stopped = policy.stopped_early()
            if stopped:
                stopper = policy.stopper
                print(f"stopped early after epoch {stopper.stopped_epoch + 1} of {config.train.epochs}: "
                      f"{stopper.monitor} did not improve by more than {abs(stopper.min_delta)} for "
                      f"{stopper.patience} epochs", flush=True)
        if not placement.is_chief:  # its figures would go with its scratch folder
            return run
        in_memory = keep.inference_model(task, model) if keep is not None and _holds_last_checkpoint(
            config, stopped) else None
        metrics, redraw, last, tested_model = _test_last_checkpoint(task, run, data, in_memory)
        if draw:
            with durable.disk_space_checked(run.path / "curves.png"):
                plots.plot_curves(run.path / "metrics.csv", run.path / "curves.png")
        metrics["train_seconds"] = round(time.time() - started, 1)
        if config.train.ema_momentum is not None:
            metrics["weights"] = "ema"
        metrics["checkpoint"] = str(last.relative_to(run.path))
        outcome = policy.outcome()
        metrics.update(outcome)
        run.write_json("test_metrics.json", metrics)
        if draw:
            redraw(run.path)
        # Before "finished": a kill after it would leave the backup for good, as no command resumes a finished
        # run. A kill before it leaves a tested run without a backup, which --resume marks finished.
        shutil.rmtree(run.path / "backup", ignore_errors=True)
        run.set_status("finished", ended=_now(), **outcome)
    if keep is not None:
        keep.keep(config, data.input_shape, model, trainer, last if _holds_last_checkpoint(config, stopped) else None)
    if tested is not None:
        tested(tested_model)
    return run


def _open_run(start: Start, config: Config, folder: Path, argv: list[str] | None, provenance: str, data,
              is_chief: bool) -> runs.Run:
    """The run folder training writes to: the resumed one, a new version (labels.txt and, continuing, where it
    came from), or a non-chief worker's scratch folder; with the files the task's data asks a run to record
    (a folder's split; a resumed or continued run's data read its source's record back and records it again)."""
    if start.run is not None:
        run = start.run
        run.set_status("running", resumed=_now(), pid=os.getpid())
    elif is_chief:
        run = runs.create(config, folder, argv, provenance=provenance)
        durable.atomic_write(run.path / runs.LABELS_FILE, "".join(f"{name}\n" for name in data.class_names))
        if start.continuation:
            record_continuation(run, start.continuation)
    else:
        return runs.scratch()
    for name, content in data.records.items():
        (run.path / name).parent.mkdir(parents=True, exist_ok=True)
        durable.atomic_write(run.path / name, content)
    return run


def prepare(task: Task, model_folder: Path | None = None, replicas: int = 1, start_epoch: int = 0,
            kept: KeptTrainer | None = None):
    """The task's model and data as a run builds them, also for the tools that train a few steps outside a
    run (lr-sweep, find-batch, benchmarks): returns (folder, module, model, TaskData, the task bound to the
    resolved config).
    `model_folder`: where model.py lives (a run folder when resuming), else the config's model;
    `start_epoch`: epochs already trained, where the training stream starts; `kept`: a kept trainer whose model
    is returned instead of a new one where the run's graph is its (`shared.kept`).

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
    if model_folder is None:  # a new run, not one rebuilt from its folder
        task = task.bound(as_new_run(task.config))
    if kept is not None:  # the kernels of the traces it keeps stay instantiated
        set_random_seed(task.config.train.seed)
    else:
        keras.utils.set_random_seed(task.config.train.seed)
    data = task.datasets(folder, replicas, start_epoch=start_epoch)
    task = task.bound(data.config)
    if task.config.train.steps:  # one epoch of exactly that many steps: the training stream repeats
        data = dataclasses.replace(data, steps_per_epoch=task.config.train.steps)
    model = kept.model_for(task.config, data.input_shape) if kept is not None else None
    return folder, module, model or task.build(module, data.input_shape), data, task


def compile_phase(task: Task, trainer: keras.Model, model: keras.Model, module, data, epochs: int, lr_scale: float,
             replicas: int, rate_variable: bool = False) -> None:
    """The phase's trainer compiled with the task's objective and the optimizer of the phase's own schedule
    (a schedule spans the phase, not the whole run); `rate_variable`: its rate a variable, for a kept trainer."""
    optim.compile_trainer(trainer, task.objective(model, module, data), _phase_train_config(task.config, epochs).train,
                          data.steps_per_epoch, replicas, lr_scale, rate_variable)


def _compiled(task: Task, trainer: keras.Model, model: keras.Model, module, data, epochs: int, lr_scale: float,
              replicas: int, keep: KeptTrainer | None) -> list:
    """`compile_phase`, or with `keep` holding this model compiled already, its optimizer set for this run
    instead (carried in later, or zeroed as a new one would be) and its rate from this run's schedule. Returns
    the callbacks fit() needs for the rate (a `StepSchedule` whenever a trainer is kept)."""
    if keep is None or not keep.holds(model):
        compile_phase(task, trainer, model, module, data, epochs, lr_scale, replicas, rate_variable=keep is not None)
    else:
        keep.reused += 1
        if not task.config.init.optimizer_state:
            reset_optimizer(trainer.optimizer)
    if keep is None:
        return []
    train = _phase_train_config(task.config, epochs).train
    return [optim.StepSchedule(optim.learning_rate(train, data.steps_per_epoch, replicas, lr_scale))]


def _keepable(config: Config, phases: list, start: Start, placement: distribute.Placement) -> bool:
    """Whether a run can train a kept trainer (`shared.kept`): a run that starts from another run's weights (all
    of them loaded over the kept model's, as a loop round's are), of one phase on one replica, without
    what keeps its own state in the optimizer or the model apart from the weights (EMA, a plateau's rate, a
    teacher), and without perturbing towards a fresh initialization, which a kept model no longer holds."""
    return (start.kind == "init" and bool(config.init.from_run) and len(phases) == 1 and placement.replicas == 1
            and config.train.ema_momentum is None and config.train.lr.schedule != "plateau"
            and not config.distill.teacher and config.init.perturb == 0.0)


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
        _mark(run, "failed", ended=_now(), error=f"undecodable images: {bad}" if bad else first_line(error))
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


def _test_last_checkpoint(task: Task, run: runs.Run, data,
                          in_memory: keras.Model | None = None) -> tuple[dict, Callable, Path, keras.Model]:
    """The test figures of the checkpoint the run records as its last, on the model `test --run` rebuilds
    from it (float32, from the run's model.py and config), so the two always agree; the model in memory
    can differ (it computes in bfloat16 under mixed precision, or holds a restored backup's weights). Returns
    (metrics, what draws the figures, the checkpoint, the rebuilt model). `in_memory`: the trained model where
    it computes what the rebuilt one would (`_holds_last_checkpoint`), tested instead of a rebuild: a kept
    trainer's, whose tests and exports then reuse their traces round after round."""
    last = run.last_checkpoint()
    model = in_memory if in_memory is not None else rebuild(run)[0]  # the same file: nothing else writes now
    return (*task.evaluate(model, data), last, model)


def _last_checkpoint(init: InitConfig) -> Path | None:
    """The last checkpoint of the run init.from_run names (None: none, or the weights come from elsewhere)."""
    if not init.from_run or init.weights:
        return None
    return runs.open_run(init.from_run).last_checkpoint()


def _holds_last_checkpoint(config: Config, stopped: bool) -> bool:
    """Whether a run's model in memory, once trained, is its last checkpoint in float32: a run that trained
    to its end (not stopped early, which may restore other weights) without EMA (whose averaged weights the
    checkpoint holds) in float32. Asked only of runs that keep a trainer, which never resume."""
    return not stopped and config.train.ema_momentum is None and config.train.precision == "float32"


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


def _phase_train_config(config: Config, epochs: int):
    """The phase's own schedule length: a schedule spans the phase, not the whole run."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=max(epochs, 1)))


def _callbacks(config: Config, run: runs.Run, phase: int, validating: bool, policy: CheckpointPolicy,
               task_callbacks: list = ()) -> list:
    """Order matters at the end of an epoch: the metrics row and the checkpoint (then best.keras) are on
    disk (fsynced) before the backup commits, so a crash anywhere between makes resume redo that epoch,
    never skip it, and no kill loses a checkpoint. With EMA, validation and the checkpoint see the averaged
    weights, the backup the raw ones with the optimizer state. The policy's run-wide callbacks (best
    checkpoint, early stopping) keep one state over the run's phases; theirs and the schedule's are committed
    with the backup. The task's callbacks (`Task.callbacks`) come before the schedule and the loggers, so what
    they log is recorded and monitored. The backup comes last."""
    schedule = optim.schedule_callbacks(config.train, validating=validating)
    ema = config.train.ema_momentum is not None
    return [
        StopOnNonFiniteLoss(),
        LearningRateLogger(),
        *task_callbacks,
        *schedule,
        *([keras.callbacks.SwapEMAWeights()] if ema else []),  # for validation only
        keras.callbacks.TensorBoard(log_dir=str(run.path / "logs"), write_graph=False),
        DurableCSVLogger(str(run.path / "metrics.csv"), append=True),
        *policy.callbacks(phase, schedule),
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


def _save_interrupted(model: keras.Model, run: runs.Run) -> None:
    """The weights at the moment of the stop, as checkpoints/interrupted.keras (resume continues from
    the last complete epoch's backup; this file keeps the partial epoch's progress at hand)."""
    with contextlib.suppress(Exception), durable.partial_path(run.checkpoint_dir / "interrupted.keras") as partial:
        model.save(partial)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")

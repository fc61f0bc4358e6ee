"""Hyperparameter search with Optuna: `python -m shared.runner tune --config models/<m>/tune.yaml`.

The `tune:` section of a recipe names the search space (dotted config keys), the objectives and the
sampler. Every trial is an ordinary training run: the sampled values are applied to the recipe, the
run's notes say "tune study <name> trial <n>: key=value ...", and the run folder is stored on the
trial (user attribute `run`). The study lives in an SQL database (default
`sqlite:///<run.dir>/tuning.db`), so

- rerunning the same command resumes it: only the trials still missing run (completed and pruned
  ones count; a proposal of values already measured reuses their figures and does not count, and 30 such in a
  row end the study; a space of finitely many points trains at most that many);
- several processes given the same storage share the study: started together, they create it one
  at a time (a lock beside the SQLite or journal file, or on the PostgreSQL server), each draws its own
  seed stream, they start no more than tune.trials between them, and values one worker is training
  another waits for and reuses;
- a trial left RUNNING by a killed process is failed by Optuna's heartbeat once it is stale
  (tune.heartbeat_seconds x 2 without a beat; SQL storages) and queued again once with the same values.

Space entries: `{choice: [a, b]}`, `{int: [lo, hi], step: 2, log: false}`,
`{float: [lo, hi], log: true}`. Objectives: `{metric, direction}` with a metric the task measures
(`shared.task.Task.measures`) or a size / latency figure (shared.tuning.metrics).
Constraints: `{metric: upper bound}`; a trial over a bound stays in the study, marked infeasible,
and never counts as best. A point the sampler proposes again (NSGA-II does, on small spaces) reuses
the earlier trial's figures and run instead of training the same seeded run twice.

Pruning (one objective with a per-epoch figure, tune.prune): each epoch's value goes to Optuna's
MedianPruner; a pruned trial's run stops there and its status.json says "pruned". At the end the
best trial (or the Pareto front) is printed, drawn next to the database, and each best trial's
config is written as a recipe that trains as it is: <run.dir>/tune/<study>/trial-<n>.yaml.

This module runs the study; its parts are in shared/tuning/: what it optimizes (metrics), its search space
(space), where it is stored (storage), one trial (trial) and the outcome (report).
"""

from __future__ import annotations

import math
import time

import optuna
from optuna.trial import TrialState

from shared import mlflow_log
from shared.config_schema import Config
from shared.errors import UserError
from shared.locks import FileLock
from shared.tuning.metrics import (Objective, TrialFailed, check_metric_needs, monitored_names, parse_constraints,
                                   parse_objectives, task_measures)
from shared.tuning.report import report
from shared.tuning.space import grid_values, parse_space
from shared.tuning.storage import (AdvisoryLock, journal_file, open_storage, quiet_experimental, storage_url,
                                   study_lock, study_name)
from shared.tuning.trial import make_objective

PRUNE_STARTUP_TRIALS = 5  # MedianPruner: no pruning until this many trials have finished
PRUNE_WARMUP_EPOCHS = 1  # ... nor on the first epoch, whose figures are mostly noise


def _make_sampler(kind: str, grid: dict | None, trials: int, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "nsga2":
        # Optuna's default population of 50 would make a short study one random generation.
        return optuna.samplers.NSGAIISampler(population_size=max(2, min(50, trials // 2)), seed=seed)
    return optuna.samplers.TPESampler(n_startup_trials=min(10, max(2, trials // 3)), seed=seed)


def _make_pruner(monitor: tuple[str, ...] | None) -> optuna.pruners.BasePruner:
    if monitor is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=PRUNE_WARMUP_EPOCHS)


def tune(config: Config, argv: list[str] | None = None) -> dict:
    """Run (or resume) the study the config's tune section describes; returns a summary:
    study, storage, counts of trials by state, best (a list of {trial, run, values, params, config}),
    plot (the PNG or None) and table (the printed text)."""
    settings = config.tune
    objectives = parse_objectives(config)
    constraints = parse_constraints(config)
    space = parse_space(settings.space, config)
    check_metric_needs(config, {o.metric for o in objectives} | set(constraints), space)
    name = study_name(config)
    wanted = settings.trials
    points = {key: grid_values(distribution) for key, distribution in space.items()}  # None: a float range
    grid = None
    if settings.sampler == "grid":
        floats = [key for key, values in points.items() if values is None]
        if floats:
            raise UserError(f"tune.sampler is grid but tune.space.{floats[0]} is a float range; a grid needs "
                            f"finite values: use {{choice: [...]}} or an int range, or sampler tpe / random")
        grid = points
    if all(values is not None for values in points.values()):  # a space of so many points trains no more runs
        size = math.prod(len(values) for values in points.values())
        if wanted > size:
            print(f"note: tune.trials is {wanted} but the {'grid' if grid is not None else 'space'} has {size} "
                  f"points; running {size}", flush=True)
            wanted = size
    url = storage_url(config)
    single = len(objectives) == 1
    monitor = monitored_names(objectives[0].metric, task_measures(config), config.data.val_fraction > 0) \
        if single and settings.prune else None
    lock = study_lock(config, url)
    # Workers started together: one at a time creates the tables and the study and takes a worker number.
    with lock:
        study = optuna.create_study(storage=open_storage(url, settings.heartbeat_seconds), study_name=name,
                                    load_if_exists=True, directions=[o.direction for o in objectives],
                                    pruner=_make_pruner(monitor))
        _check_same_objectives(study, objectives, url)
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)  # a killed process's trials: failed, queued again
        counted = _counted_trials(study)
        worker = study.user_attrs.get("workers", 0)
        study.set_user_attr("workers", worker + 1)
    # Each start (a resume, a second worker) draws its own stream; the first reproduces tune.seed's. Not
    # the grid: its stored grid ids index a grid shuffled by the seed, so every worker needs the same one.
    seed = settings.seed + (0 if grid is not None else worker)
    study.sampler = _make_sampler(settings.sampler, grid, wanted, seed)
    print(f"study {name} in {url}: {counted} of {wanted} trials done or running, running "
          f"{max(0, wanted - counted)} more", flush=True)
    if counted < wanted:
        objective = make_objective(config, name, space, objectives, constraints, monitor, argv, lock)
        run_trials(study, objective, wanted, wanted - counted, lock,
                   settings.heartbeat_seconds if journal_file(url) is None else None)
    summary = report(study, config, objectives, constraints, list(space), url)
    if config.track:  # the study's run in MLflow, whose children its trials' runs are (shared/mlflow_log.py)
        mlflow_log.track_study(config, summary)
    return summary


REPEATS_IN_A_ROW = 30  # proposals of measured values in a row that end a study short of tune.trials
WAIT_POLL_SECONDS = 1.0  # how often a worker with nothing left to start looks at the others' running trials


def run_trials(study: optuna.Study, objective, wanted: int, most_failed: int,
               lock: FileLock | AdvisoryLock, heartbeat_seconds: float | None = None) -> None:
    """Start trials until `wanted` are complete, pruned or running, counting every worker's (those that reused an
    earlier trial's figures do not count), or until `most_failed` of those started here have failed (failed trials
    do not count towards `wanted`: a study whose every trial fails would never end). The count and the new trial are
    one step under the study lock, so workers together never start more than `wanted`; a trial of a worker that died
    (its heartbeat stale) is failed before the count, so its queued retry runs instead of being counted as running.
    With heartbeats (`heartbeat_seconds`, SQL storages), a worker that finds the count reached while other workers'
    trials still run waits until they end or go stale: a dead worker's trial is then retried here, not left RUNNING
    in a study every live worker has left. REPEATS_IN_A_ROW reused trials in a row end it too."""
    ended: list[TrialState] = []
    waiting = None
    while ended.count(TrialState.FAIL) < most_failed:
        lock.acquire()
        held = True

        def started(trial: optuna.Trial):
            nonlocal held
            lock.release()  # the trial is RUNNING now: the other workers count it
            held = False
            return objective(trial)

        try:
            with quiet_experimental():  # a dead worker's trial counts no more: failed, and queued again
                optuna.storages.fail_stale_trials(study)
            repeats = _repeats_in_a_row(study)
            if repeats >= REPEATS_IN_A_ROW:  # the sampler keeps to measured points: what it finds is found
                print(f"study {study.study_name}: the last {repeats} trials proposed values already measured; "
                      f"ending with {_counted_trials(study)} of {wanted} trials trained", flush=True)
                return
            if _counted_trials(study) >= wanted:
                running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
                if not running or heartbeat_seconds is None:
                    return
                if running != waiting:
                    print(f"study {study.study_name}: waiting for {running} trial(s) other workers are running (a "
                          f"dead worker's is retried once its heartbeat is {2 * heartbeat_seconds:g} s old)",
                          flush=True)
                waiting = running
                lock.release()
                held = False
                time.sleep(min(WAIT_POLL_SECONDS, heartbeat_seconds))  # a trial that ends is seen within it
                continue
            # No gc_after_trial: each trial starts with keras.backend.clear_session(), which collects already.
            study.optimize(started, n_trials=1, catch=(TrialFailed,),
                           callbacks=[lambda _, trial: ended.append(trial.state)])
        finally:
            if held:
                lock.release()


def _counted_trials(study: optuna.Study) -> int:
    """The trials that count towards tune.trials: those that trained (complete or pruned) or are running. A
    proposal of values already measured reuses their figures and trains nothing, so it does not count: a small
    NSGA-II population proposes its best parent again and again, which would end a study trials short."""
    return sum("same_as" not in trial.user_attrs for trial in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)))


def _repeats_in_a_row(study: optuna.Study) -> int:
    """How many of the study's newest finished trials in a row reused an earlier trial's figures."""
    count = 0
    for trial in reversed(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))):
        if "same_as" not in trial.user_attrs:
            break
        count += 1
    return count


def _check_same_objectives(study: optuna.Study, objectives: list[Objective], url: str) -> None:
    """A resumed study must optimize what it did before; Optuna itself does not check."""
    metrics = [o.metric for o in objectives]
    directions = [d.name.lower() for d in study.directions]
    stored = study.user_attrs.get("objectives")
    if stored is None and directions == [o.direction for o in objectives]:  # a new study
        study.set_user_attr("objectives", metrics)
        with quiet_experimental():
            study.set_metric_names(metrics)
        stored = metrics
    if stored != metrics or directions != [o.direction for o in objectives]:
        was = ", ".join(f"{m} ({d[:3]})" for m, d in zip(stored, directions)) if stored else " and ".join(directions)
        raise UserError(f"study {study.study_name} in {url} optimizes {was}, not "
                        f"{', '.join(o.label for o in objectives)}; set tune.study to a new name")

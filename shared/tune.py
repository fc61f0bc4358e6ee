"""Hyperparameter search with Optuna: `python -m shared.runner tune --config models/<m>/tune.yaml`.

The `tune:` section of a recipe names the search space (dotted config keys), the objectives and the
sampler. Every trial is an ordinary training run: the sampled values are applied to the recipe, the
run's notes say "tune study <name> trial <n>: key=value ...", and the run folder is stored on the
trial (user attribute `run`). The study lives in an SQL database (default
`sqlite:///<run.dir>/tuning.db`), so

- rerunning the same command resumes it: only the trials still missing run (completed and pruned
  ones count);
- several processes given the same storage share the study: started together, they create it one
  at a time (a lock file beside the SQLite file), each draws its own seed stream, they start no more
  than tune.trials between them, and values one worker is training another waits for and reuses;
- a trial left RUNNING by a killed process is failed by Optuna's heartbeat once it is stale
  (HEARTBEAT_S * 2 without a beat) and queued again once with the same values.

Space entries: `{choice: [a, b]}`, `{int: [lo, hi], step: 2, log: false}`,
`{float: [lo, hi], log: true}`. Objectives: `{metric, direction}` with the metrics in METRICS.
Constraints: `{metric: upper bound}`; a trial over a bound stays in the study, marked infeasible,
and never counts as best. A point the sampler proposes again (NSGA-II does, on small spaces) reuses
the earlier trial's figures and run instead of training the same seeded run twice.

Pruning (one objective with a per-epoch figure, tune.prune): each epoch's value goes to Optuna's
MedianPruner; a pruned trial's run stops there and its status.json says "pruned". At the end the
best trial (or the Pareto front) is printed, drawn next to the database, and each best trial's
config is written as a recipe that trains as it is: <run.dir>/tune/<study>/trial-<n>.yaml.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import importlib.util
import math
import re
import time
import warnings
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from shared import config as config_module
from shared.config import Config
from shared.errors import UserError
from shared.locks import FileLock
from shared.names import check_plain_name

# metric -> its natural direction (the default when an objective gives none)
METRICS: dict[str, str] = {
    "top1": "maximize",  # test split
    "top5": "maximize",  # test split
    "loss": "minimize",  # test split, cross-entropy without the weight penalty
    "val_loss": "minimize",  # the last epoch's; needs data.val_fraction > 0
    "map": "maximize",  # detection, test split: mAP@[.5:.95]
    "map50": "maximize",  # detection, test split: mAP@.5
    "map75": "maximize",  # detection, test split: mAP@.75
    "params": "minimize",  # trainable parameters
    "macs": "minimize",  # multiply-adds of one image's forward pass
    "tflite_int8_mb": "minimize",  # size of the int8 TFLite file, 10^6 bytes
    "latency_ms": "minimize",  # median batch-1 LiteRT latency of the int8 TFLite model
}
DIRECTIONS = ("minimize", "maximize")
TFLITE_METRICS = ("tflite_int8_mb", "latency_ms")
SIZE_METRICS = ("params", "macs")
# metric -> its key in test_metrics.json, for each task; the size and latency figures fit every task
TEST_METRICS = {"classification": {"top1": "top1", "top5": "top5", "loss": "loss", "val_loss": None},
                "detection": {"map": "mAP", "map50": "mAP50", "map75": "mAP75"}}
SPEC_KINDS = ("choice", "int", "float")
SPEC_OPTIONS = {"choice": (), "int": ("step", "log"), "float": ("step", "log")}
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # it names files too
HEARTBEAT_S = 60  # a running trial writes a heartbeat this often; stale after twice as long
MAX_RETRY = 1  # a trial whose process died is queued again this many times
PRUNE_STARTUP_TRIALS = 5  # MedianPruner: no pruning until this many trials have finished
PRUNE_WARMUP_EPOCHS = 1  # ... nor on the first epoch, whose figures are mostly noise
CLAIM = "trains_values"  # user attribute of a trial that trains its values (no other trial had them)
WAIT_S = 2.0  # how often a trial waiting for another worker's trial of the same values looks again


@dataclass(frozen=True)
class Objective:
    metric: str  # a key of METRICS
    direction: str  # minimize or maximize

    @property
    def label(self) -> str:
        return f"{self.metric} ({self.direction[:3]})"


class TrialFailed(Exception):
    """A trial whose run started but did not finish (diverged, say): the study goes on without it."""


# ---------------------------------------------------------------- reading the tune: section


def parse_objectives(config: Config) -> list[Objective]:
    """`tune.objectives` as Objective records: each a {metric, direction} mapping or a metric name
    (its natural direction); unknown metrics or directions are UserErrors with the closest name."""
    entries = config.tune.objectives
    if not entries:
        raise UserError("tune.objectives is empty; give at least one, e.g. [{metric: top1, direction: maximize}]")
    objectives = []
    for entry in entries:
        if isinstance(entry, str):
            entry = {"metric": entry}
        if not isinstance(entry, dict):
            raise UserError(f"tune.objectives entry {entry!r} must be {{metric: NAME, direction: minimize|maximize}}")
        unknown = set(entry) - {"metric", "direction"}
        if unknown:
            raise UserError(f"tune.objectives entry {entry} has unknown key(s) {', '.join(map(str, sorted(unknown)))}; "
                            f"only metric and direction")
        metric = _known(entry.get("metric"), METRICS, "tune.objectives metric")
        direction = entry.get("direction", METRICS[metric])
        _known(direction, DIRECTIONS, f"tune.objectives direction of {metric}")
        objectives.append(Objective(metric, direction))
    metrics = [o.metric for o in objectives]
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise UserError(f"tune.objectives names {', '.join(repeated)} more than once; keep one entry per metric")
    return objectives


def parse_constraints(config: Config) -> dict[str, float]:
    """`tune.constraints`: metric -> upper bound (a trial is feasible when every value <= its bound)."""
    constraints = {}
    for metric, bound in (config.tune.constraints or {}).items():
        _known(metric, METRICS, "tune.constraints metric")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise UserError(f"tune.constraints.{metric} is {bound!r}; give a number, the upper bound "
                            f"(e.g. latency_ms: 5.0)")
        constraints[metric] = float(bound)
    return constraints


def _known(value: Any, valid, what: str) -> str:
    if value not in valid:
        match = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
        hint = f"did you mean {match[0]}?" if match else f"choose one of {', '.join(valid)}"
        raise UserError(f"{what} {value!r} is unknown; {hint}")
    return value


def parse_space(space: dict, base_config: Config) -> dict[str, BaseDistribution]:
    """The search space as Optuna distributions, keyed by dotted config key, in the given order.

    Nested mappings (what `--set tune.space.model.width=...` makes) are read as dotted keys. Every
    key is checked by applying each choice (or both ends of the range) to the base config and
    validating it the way a recipe is, so a typo gets the config's own did-you-mean message; model
    hyperparameters are checked against the model's build() signature."""
    flat = _flatten_space(space or {})
    if not flat:
        raise UserError("tune.space is empty; give at least one key to search, e.g. "
                        "train.lr.base: {float: [0.01, 0.3], log: true}")
    distributions = {key: _parse_spec(key, spec) for key, spec in flat.items()}
    _check_keys(distributions, base_config)
    return distributions


def _flatten_space(space: dict, prefix: str = "") -> dict:
    if not isinstance(space, dict):
        raise UserError(f"tune.space{'.' + prefix.rstrip('.') if prefix else ''} must be a mapping of dotted "
                        f"config keys to specs, e.g. train.lr.base: {{float: [0.01, 0.3], log: true}}")
    flat = {}
    for key, spec in space.items():
        dotted = f"{prefix}{key}"
        # A mapping of mappings with no spec kind in it is a section: --set writes keys that way.
        if isinstance(spec, dict) and spec and not set(spec) & set(SPEC_KINDS) \
                and all(isinstance(value, dict) for value in spec.values()):
            flat.update(_flatten_space(spec, dotted + "."))
        else:
            flat[dotted] = spec
    return flat


def _parse_spec(key: str, spec: Any) -> BaseDistribution:
    where = f"tune.space.{key}"
    example = "{choice: [a, b]}, {int: [lo, hi]} or {float: [lo, hi], log: true}"
    if not isinstance(spec, dict):
        raise UserError(f"{where} is {spec!r}; write a spec such as {example}")
    kinds = [k for k in spec if k in SPEC_KINDS]
    if len(kinds) != 1:
        if kinds:
            raise UserError(f"{where} gives {' and '.join(kinds)}; give exactly one of {', '.join(SPEC_KINDS)}")
        unknown = next((k for k in spec if k not in ("step", "log")), None)
        match = difflib.get_close_matches(str(unknown), SPEC_KINDS, n=1, cutoff=0.5) if unknown else []
        hint = f"did you mean {match[0]}?" if match else f"write a spec such as {example}"
        raise UserError(f"{where}: unknown spec kind {unknown!r}; {hint}" if unknown
                        else f"{where} has no spec kind; {hint}")
    kind = kinds[0]
    extra = [k for k in spec if k != kind and k not in SPEC_OPTIONS[kind]]
    if extra:
        allowed = ", ".join(SPEC_OPTIONS[kind]) or "nothing"
        raise UserError(f"{where}: {extra[0]!r} does not go with {kind} (allowed beside it: {allowed})")
    value = spec[kind]
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: choice must be a non-empty list of values, got {value!r}; "
                            f"e.g. {{choice: [4, 8, 16]}}")
        bad = [v for v in value if v is not None and not isinstance(v, (bool, int, float, str))]
        if bad:
            raise UserError(f"{where}: choice {bad[0]!r} is not a single value (number, string, true/false, "
                            f"null); search a scalar key instead")
        return CategoricalDistribution(value)
    number = int if kind == "int" else (int, float)
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, number) and not isinstance(v, bool) for v in value)):
        raise UserError(f"{where}: {kind} must be [low, high] of {'integers' if kind == 'int' else 'numbers'}, "
                        f"got {value!r}")
    low, high = value
    if not low < high:
        raise UserError(f"{where}: range [{low}, {high}] is empty or inverted; write [low, high] with low < high "
                        f"(one value: use {{choice: [{low}]}})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise UserError(f"{where}: a log range must start above 0, got [{low}, {high}]; raise the low end "
                        f"(e.g. {high / 1000:g}) or drop log: true")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise UserError(f"{where}: step must be a positive {'integer' if kind == 'int' else 'number'}, "
                            f"got {step!r}")
        if log and step != 1:
            raise UserError(f"{where}: step and log: true do not combine; keep one")
        if kind == "int" and (high - low) % step:
            raise UserError(f"{where}: [{low}, {high}] is not a whole number of steps of {step}; "
                            f"make the high end {high - (high - low) % step}")
    if kind == "int":
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def candidate_values(distribution: BaseDistribution) -> list:
    """Values that stand for the whole distribution when validating: every choice, or both ends."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]


def grid_values(distribution: BaseDistribution) -> list | None:
    """All values of a finite distribution (a choice, an int range); None for a float range."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    return None


def _check_keys(distributions: dict[str, BaseDistribution], base_config: Config) -> None:
    tree = base_config.to_dict()
    tree.pop("tune", None)
    provenance = {**base_config.provenance, **{key: "tune.space" for key in distributions}}
    model_module = None
    varies_model = {"model.name", "model.path"} & set(distributions)
    for key, distribution in distributions.items():
        if key == "tune" or key.startswith("tune."):
            raise UserError(f"tune.space.{key}: the tune section itself cannot be searched; remove the key")
        for value in candidate_values(distribution):
            candidate = copy.deepcopy(tree)
            set_dotted(candidate, key, value)
            try:
                config_module.from_dict(candidate, provenance)
            except UserError as error:
                raise UserError(f"tune.space: {error}") from None
        # model.* beyond name and path are build() arguments: the config does not know them, the model does.
        if key.startswith("model.") and key not in ("model.name", "model.path") and not varies_model:
            from shared import modelzoo

            if model_module is None:
                folder = modelzoo.model_dir(base_config.model.name, base_config.model.path)
                model_module = modelzoo.load_model_module(folder)
            name = key.split(".", 1)[1]
            for value in candidate_values(distribution):
                modelzoo.resolve_hparams(model_module, {**base_config.model.hparams, name: value},
                                         " (from tune.space)")


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree[a][b][c] = value for key a.b.c, making missing sections on the way."""
    parts = key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise UserError(f"tune.space.{key}: {'.'.join(parts[:depth + 1])} is a value, not a section; "
                            f"check the key")
        node = child
    node[parts[-1]] = value


def _check_metric_needs(config: Config, metrics: set[str], space: dict[str, BaseDistribution]) -> None:
    """Fail before any training when a metric cannot be measured with this config."""
    if "val_loss" in metrics:
        fractions = candidate_values(space["data.val_fraction"]) if "data.val_fraction" in space \
            else [config.data.val_fraction]
        if min(fractions) <= 0:
            raise UserError("metric val_loss needs a validation split, but data.val_fraction is 0; set "
                            "data.val_fraction (e.g. 0.1) or use loss (the test split)")
    task = config.task or "classification"
    own = TEST_METRICS.get(task, {})
    foreign = sorted(m for m in metrics if m not in own and m not in (*SIZE_METRICS, *TFLITE_METRICS))
    if foreign:
        raise UserError(f"metric {foreign[0]} is not measured for task: {task}; choose from "
                        f"{', '.join([*own, *SIZE_METRICS, *TFLITE_METRICS])}")
    wanted = sorted(metrics & set(TFLITE_METRICS))
    if wanted and importlib.util.find_spec("shared.tflite") is None:
        raise UserError(f"metric {wanted[0]} needs shared/tflite.py (LiteRT export), which this checkout lacks")


# ---------------------------------------------------------------- names and places


def study_name(config: Config) -> str:
    """tune.study, else <model>-<config file stem> (<model>-tune for a config built in code)."""
    name = config.tune.study or f"{config.model.name}-{Path(config.source_file).stem if config.source_file else 'tune'}"
    check_plain_name("tune.study", name)
    if not STUDY_NAME_RE.match(name):
        raise UserError(f"tune.study {name!r} must be letters, digits, '.', '_' and '-' (it names files too)")
    return name


def storage_url(config: Config) -> str:
    """tune.storage, else an SQLite file in the runs root."""
    return config.tune.storage or f"sqlite:///{(Path(config.run.dir) / 'tuning.db').resolve()}"


def _sqlite_file(url: str) -> Path | None:
    if not url.startswith("sqlite"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    return Path(database) if database and database != ":memory:" else None


def study_lock(config: Config, url: str) -> FileLock:
    """The lock the workers of a study take to create it and to claim trials: beside an SQLite file, else
    (a database server) in <run.dir>/tune, which covers the workers of one machine; workers on several
    machines rely on Optuna's own create-or-load of the study."""
    database = _sqlite_file(url)
    if database is not None:
        return FileLock(database.with_name(f".{database.name}.lock"))
    return FileLock(Path(config.run.dir) / "tune" / f".{study_name(config)}.lock")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The study database, with heartbeats: a trial of a process that died is failed once its heartbeat
    is stale, and queued again (same values) up to MAX_RETRY times."""
    database = _sqlite_file(url)
    engine_kwargs = {}
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers on one file wait, not fail
    try:
        with _quiet_experimental():
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except Exception as error:  # SQLAlchemy's ArgumentError, OperationalError, a missing driver ...
        raise UserError(f"tune.storage {url!r} could not be opened: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}; give an SQLAlchemy URL such as "
                        f"sqlite:///runs/tuning.db") from None


@contextlib.contextmanager
def _quiet_experimental():
    """Heartbeat retry, stale-trial failing and metric names are marked experimental in Optuna; the
    warning would be noise on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


# ---------------------------------------------------------------- one trial


def trial_config(base_config: Config, values: dict[str, Any], notes: str) -> Config:
    """The base config with the trial's values applied, the tune section dropped (the run's
    config.yaml then trains as it is) and `notes` as run.notes."""
    tree = copy.deepcopy(base_config.to_dict())
    tree.pop("tune", None)
    for key, value in values.items():
        set_dotted(tree, key, value)
    tree["run"]["notes"] = notes
    provenance = {**base_config.provenance, **{key: "tune" for key in values}}
    return dataclasses.replace(config_module.from_dict(tree, provenance), source_file=base_config.source_file)


def trial_tag(study: str, number: int) -> str:
    return f"tune study {study} trial {number}"


def describe_values(values: dict[str, Any]) -> str:
    return " ".join(f"{key}={_format(value)}" for key, value in values.items())


def suggest(trial: optuna.Trial, key: str, distribution: BaseDistribution) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(key, list(distribution.choices))
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(key, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    return trial.suggest_float(key, distribution.low, distribution.high, step=distribution.step,
                               log=distribution.log)


def monitored_names(metric: str, validating: bool) -> tuple[str, ...] | None:
    """The per-epoch Keras log entries that track `metric` (validation ones when there is a validation
    split), main-output names of multi-output models second; None when the metric has no per-epoch
    value (sizes, latency), so there is nothing to prune on."""
    per_epoch = {"top1": "top1", "top5": "top5", "loss": "loss", "val_loss": "loss"}.get(metric)
    if per_epoch is None:
        return None
    prefix = "val_" if validating or metric == "val_loss" else ""
    return f"{prefix}{per_epoch}", f"{prefix}predictions_{per_epoch}"


def pruning_callback(trial: optuna.Trial, names: tuple[str, ...]):
    """A Keras callback that reports the first of `names` found in each epoch's logs to the trial and
    raises optuna.TrialPruned when the pruner gives up on it.

    Our own ten lines rather than optuna-integration's KerasPruningCallback (which does work with
    Keras 3): that one watches one fixed log name and silently never prunes when it is missing, and
    the name differs for models with auxiliary heads (val_predictions_top1); it would also be one
    more dependency for the same report / should_prune / raise."""
    import keras

    class PruningCallback(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = logs or {}
            name = next((n for n in names if n in logs), None)
            if name is None:
                return
            value = float(logs[name])
            trial.report(value, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {name} {value:.4g}")

    return PruningCallback()


def measure(run, wanted: list[str]) -> dict[str, float]:
    """The requested metrics of a finished run, in the order asked."""
    metrics = set(wanted)
    values: dict[str, float] = {}
    tested = run.test_metrics() or {}
    keys = {name: key for table in TEST_METRICS.values() for name, key in table.items() if key}
    for name in sorted(metrics & set(keys)):
        if not isinstance(tested.get(keys[name]), (int, float)):
            raise TrialFailed(f"run {run.path} recorded no test {keys[name]}")
        values[name] = float(tested[keys[name]])
    if "val_loss" in metrics:
        from shared import plots

        column = plots.read_metrics(run.path / "metrics.csv").get("val_loss")
        if column is None or not len(column) or not math.isfinite(column[-1]):
            raise TrialFailed(f"run {run.path} logged no val_loss for its last epoch")
        values["val_loss"] = float(column[-1])
    if metrics & set(SIZE_METRICS):
        from shared.sizing import multiply_adds, trainable_parameters

        model = _architecture(run)
        values["params"] = float(trainable_parameters(model))
        values["macs"] = float(multiply_adds(model))
    if metrics & set(TFLITE_METRICS):
        from shared import tflite  # written alongside; imported only when a study asks for it
        from shared.tasks import rebuild, task_for

        path, _ = task_for(run).export_tflite(rebuild(run)[0], run, "int8", "float")  # a detector: its default form
        path = Path(path)
        values["tflite_int8_mb"] = path.stat().st_size / 1e6
        if "latency_ms" in metrics:
            values["latency_ms"] = float(tflite.latency_ms(path))
    return {name: values[name] for name in wanted}


def _architecture(run):
    """The run's model (classifier or detector) rebuilt from its own model.py and config (for its sizes)."""
    from shared.tasks import rebuild

    return rebuild(run)[0]


def find_run(config: Config, tag: str):
    """The run folder a trial created, found by its notes (training raised, so no Run came back)."""
    from shared.runs import all_runs

    for run in reversed(all_runs(Path(config.run.dir), config.model.name)):  # by version number: newest first
        notes = run.path / "notes.md"
        if notes.is_file() and f"{tag}:" in notes.read_text(encoding="utf-8"):
            return run
    return None


def make_objective(base_config: Config, study: str, space: dict[str, BaseDistribution],
                   objectives: list[Objective], constraints: dict[str, float], monitor: tuple[str, ...] | None,
                   argv: list[str] | None, lock: FileLock):
    """The function Optuna calls for each trial: sample, train a run, measure, return the values."""
    needed = list(dict.fromkeys([*(o.metric for o in objectives), *constraints]))  # objectives first

    def objective(trial: optuna.Trial) -> float | tuple[float, ...]:
        import keras

        from shared.lifecycle import train

        values = {key: suggest(trial, key, distribution) for key, distribution in space.items()}
        earlier = same_values(trial, values)
        if earlier is not None:
            # NSGA-II on a small space often proposes a point again, and workers sampling at once may
            # too; training is seeded, so the figures would be the same: reuse them.
            metrics = earlier.user_attrs["metrics"]
            trial.set_user_attr("run", earlier.user_attrs.get("run"))
            trial.set_user_attr("metrics", metrics)
            trial.set_user_attr("same_as", earlier.number)
            print(f"trial {trial.number}: the values of trial {earlier.number}; its figures reused", flush=True)
            return finish(trial, metrics)
        tag = trial_tag(study, trial.number)
        notes = f"{tag}: {describe_values(values)}"
        if base_config.run.notes.strip():
            notes += "\n\n" + base_config.run.notes.strip()
        config = trial_config(base_config, values, notes)
        keras.backend.clear_session()  # a long study in one process: drop the previous trials' graphs
        callbacks = [pruning_callback(trial, monitor)] if monitor else []
        try:
            run = train(config, argv=argv, callbacks=callbacks)
        except optuna.TrialPruned as pruned:
            # shared.lifecycle has marked the run failed and re-raised; say what really happened.
            run = find_run(config, tag)
            if run is not None:
                trial.set_user_attr("run", str(run.path))
                run.set_status("pruned", ended=time.strftime("%Y-%m-%dT%H:%M:%S"), reason=str(pruned))
            print(f"trial {trial.number}: {run.path if run else 'no run'} {pruned}", flush=True)
            raise
        except Exception as error:
            run = find_run(config, tag)
            if run is None:
                raise  # nothing was trained: a config or data problem that every trial would hit
            # The run started and broke (diverged, out of memory at this width): the study goes on.
            trial.set_user_attr("run", str(run.path))
            raise TrialFailed(f"run {run.path}: {type(error).__name__}: {error}") from None
        trial.set_user_attr("run", str(run.path))
        try:
            metrics = measure(run, needed)
        except UserError as error:  # e.g. an architecture the TFLite converter refuses
            raise TrialFailed(f"run {run.path}: {error}") from None
        trial.set_user_attr("metrics", metrics)
        feasible = all(metrics[m] <= b for m, b in constraints.items())
        print(f"trial {trial.number}: {run.path} " + " ".join(f"{m}={_format(v)}" for m, v in metrics.items())
              + ("" if feasible else "  (infeasible)"), flush=True)
        return finish(trial, metrics)

    def same_values(trial: optuna.Trial, values: dict[str, Any]) -> FrozenTrial | None:
        """A complete trial with these values, waiting for one another worker is training; else None,
        and this trial claims the values (under the lock, so two workers never both train them)."""
        told = False
        while True:
            with lock:
                others = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                                                    TrialState.RUNNING))
                          if t.number != trial.number and t.params == values]
                done = next((t for t in others if t.state == TrialState.COMPLETE and "metrics" in t.user_attrs),
                            None)
                training = next((t for t in others if t.state == TrialState.RUNNING and t.user_attrs.get(CLAIM)),
                                None)
                if done is not None or training is None:
                    if done is None:
                        trial.set_user_attr(CLAIM, True)
                    return done
            if not told:
                print(f"trial {trial.number}: trial {training.number} is training the same values; waiting "
                      f"for its figures", flush=True)
                told = True
            time.sleep(WAIT_S)
            with _quiet_experimental():  # a worker that died: its trial fails once stale, we train instead
                optuna.storages.fail_stale_trials(trial.study)

    def finish(trial: optuna.Trial, metrics: dict[str, float]) -> float | tuple[float, ...]:
        for metric, bound in constraints.items():  # Optuna 5: set_constraint replaces constraints_func
            trial.set_constraint(metric, metrics[metric] - bound)
        result = tuple(metrics[o.metric] for o in objectives)
        return result[0] if len(result) == 1 else result

    return objective


# ---------------------------------------------------------------- the study


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
    _check_metric_needs(config, {o.metric for o in objectives} | set(constraints), space)
    name = study_name(config)
    wanted = settings.trials
    grid = None
    if settings.sampler == "grid":
        grid = {}
        for key, distribution in space.items():
            values = grid_values(distribution)
            if values is None:
                raise UserError(f"tune.sampler is grid but tune.space.{key} is a float range; a grid needs "
                                f"finite values: use {{choice: [...]}} or an int range, or sampler tpe / random")
            grid[key] = values
        size = math.prod(len(values) for values in grid.values())
        if wanted > size:
            print(f"note: tune.trials is {wanted} but the grid has {size} points; running {size}", flush=True)
            wanted = size
    url = storage_url(config)
    single = len(objectives) == 1
    monitor = monitored_names(objectives[0].metric, config.data.val_fraction > 0) \
        if single and settings.prune else None
    lock = study_lock(config, url)
    # Workers started together: one at a time creates the tables and the study and takes a worker number.
    with lock:
        study = optuna.create_study(storage=open_storage(url), study_name=name, load_if_exists=True,
                                    directions=[o.direction for o in objectives], pruner=_make_pruner(monitor))
        _check_same_objectives(study, objectives, url)
        with _quiet_experimental():
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
        run_trials(study, objective, wanted, wanted - counted, lock)
    return report(study, config, objectives, constraints, list(space), url)


def run_trials(study: optuna.Study, objective, wanted: int, most_failed: int, lock: FileLock) -> None:
    """Start trials until `wanted` are complete, pruned or running, counting every worker's, or until
    `most_failed` of those started here have failed (failed trials do not count towards `wanted`: a study
    whose every trial fails would never end). The count and the new trial are one step under the study
    lock, so workers together never start more than `wanted`."""
    ended: list[TrialState] = []
    while ended.count(TrialState.FAIL) < most_failed:
        lock.acquire()
        held = True

        def started(trial: optuna.Trial):
            nonlocal held
            lock.release()  # the trial is RUNNING now: the other workers count it
            held = False
            return objective(trial)

        try:
            if _counted_trials(study) >= wanted:
                return
            study.optimize(started, n_trials=1, catch=(TrialFailed,), gc_after_trial=True,
                           callbacks=[lambda _, trial: ended.append(trial.state)])
        finally:
            if held:
                lock.release()


def _counted_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                        TrialState.RUNNING)))


def _check_same_objectives(study: optuna.Study, objectives: list[Objective], url: str) -> None:
    """A resumed study must optimize what it did before; Optuna itself does not check."""
    metrics = [o.metric for o in objectives]
    directions = [d.name.lower() for d in study.directions]
    stored = study.user_attrs.get("objectives")
    if stored is None and directions == [o.direction for o in objectives]:  # a new study
        study.set_user_attr("objectives", metrics)
        with _quiet_experimental():
            study.set_metric_names(metrics)
        stored = metrics
    if stored != metrics or directions != [o.direction for o in objectives]:
        was = ", ".join(f"{m} ({d[:3]})" for m, d in zip(stored, directions)) if stored else " and ".join(directions)
        raise UserError(f"study {study.study_name} in {url} optimizes {was}, not "
                        f"{', '.join(o.label for o in objectives)}; set tune.study to a new name")


# ---------------------------------------------------------------- the outcome


def best_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The best feasible trial, or the feasible Pareto front (by trial number); [] when none."""
    if len(study.directions) > 1:  # a trial that repeated an earlier one's values is that one again
        return sorted((t for t in study.best_trials if "same_as" not in t.user_attrs), key=lambda t: t.number)
    try:
        return [study.best_trial]
    except ValueError:  # no complete (or no feasible) trial
        return []


def report(study: optuna.Study, config: Config, objectives: list[Objective], constraints: dict[str, float],
           keys: list[str], url: str) -> dict:
    """Print the best trial(s), draw the study, write each best trial's recipe."""
    name = study.study_name
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    best = best_trials(study)
    title = "best trial" if len(objectives) == 1 else f"Pareto front ({len(best)} trials)"
    summary = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    lines = [f"study {name}: {summary or 'no trials'}"]
    if best:
        lines += [f"{title}:", format_table(best, objectives, keys)]
    else:
        lines.append("no complete" + (" feasible" if constraints else "") + " trial yet")
    out_dir = _output_dir(config, url)
    plot = plot_study(study, objectives, out_dir / f"{name}-{'history' if len(objectives) == 1 else 'pareto'}.png")
    configs = []
    for trial in best:
        path = write_trial_config(config, name, trial, objectives, Path(config.run.dir) / "tune" / name)
        configs.append(path)
        lines.append(f"trial {trial.number} config: {path}")
    if plot:
        lines.append(f"plot: {plot}")
    table = "\n".join(lines)
    print(table, flush=True)
    return {
        "study": name, "storage": url, "trials": counts, "plot": plot, "table": table,
        "best": [{"trial": t.number, "run": t.user_attrs.get("run"),
                  "values": dict(zip((o.metric for o in objectives), t.values)), "params": dict(t.params),
                  "config": path} for t, path in zip(best, configs)],
    }


def _output_dir(config: Config, url: str) -> Path:
    """Next to the SQLite file; for a server database, <run.dir>/tune."""
    database = _sqlite_file(url)
    return database.parent if database is not None else Path(config.run.dir) / "tune"


def format_table(trials: list[FrozenTrial], objectives: list[Objective], keys: list[str]) -> str:
    header = ["trial", "run", *(o.label for o in objectives), *keys]
    rows = [[str(t.number), t.user_attrs.get("run", "-"), *map(_format, t.values),
             *(_format(t.params.get(key, "-")) for key in keys)] for t in trials]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def write_trial_config(config: Config, study: str, trial: FrozenTrial, objectives: list[Objective],
                       folder: Path) -> Path:
    """The base recipe with the trial's values, as a YAML recipe that trains as it is (no tune section)."""
    from shared.durable import atomic_write

    values = {key: trial.params[key] for key in trial.params}
    results = ", ".join(f"{o.metric} {_format(v)}" for o, v in zip(objectives, trial.values))
    notes = f"from {trial_tag(study, trial.number)} ({results}): {describe_values(values)}"
    trial_cfg = trial_config(config, values, notes)
    tree = trial_cfg.to_dict()
    tree.pop("tune", None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"trial-{trial.number}.yaml"
    header = (f"# {trial_tag(study, trial.number)} ({results}); its run: {trial.user_attrs.get('run', '-')}\n"
              f"# Train it again: python -m shared.runner --config {path}\n")
    atomic_write(path, header + yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, width=100))
    return path


def plot_study(study: optuna.Study, objectives: list[Objective], out_png: Path) -> Path | None:
    """Two objectives: every trial, the Pareto front joined up; one objective: each trial's value and
    the best so far. Other counts of objectives, or no complete trial: no plot (None)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from shared import plots

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete or len(objectives) > 2:
        return None
    feasible = [t for t in complete if all(v <= 0 for v in t.constraints.values())]
    infeasible = [t for t in complete if t not in feasible]
    figure = Figure(figsize=(6.0, 4.5), dpi=plots.DPI, layout="constrained")
    axes = figure.subplots()
    if len(objectives) == 2:
        front = sorted(best_trials(study), key=lambda t: t.values[0])
        others = [t for t in feasible if t not in front]
        for group, style, label in ((others, dict(color="0.6", marker="o"), "trial"),
                                    (infeasible, dict(color="tab:red", marker="x"), "infeasible"),
                                    (front, dict(color="tab:blue", marker="o"), "Pareto front")):
            if group:
                axes.scatter([t.values[0] for t in group], [t.values[1] for t in group], label=label, **style)
        if front:
            # The front as a staircase: ordered as if both were minimized, each point's level held
            # until the next (the edge of what the front dominates).
            signs = [1 if o.direction == "minimize" else -1 for o in objectives]
            ordered = sorted(front, key=lambda t: (signs[0] * t.values[0], signs[1] * t.values[1]))
            axes.plot([t.values[0] for t in ordered], [t.values[1] for t in ordered], color="tab:blue",
                      alpha=0.5, drawstyle="steps-post")
        labels: dict[tuple, list[str]] = {}  # trials with the same values share one label
        for trial in complete:
            labels.setdefault(tuple(trial.values), []).append(str(trial.number))
        for (x, y), numbers in labels.items():
            axes.annotate(",".join(numbers), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axes.set_xlabel(objectives[0].label)
        axes.set_ylabel(objectives[1].label)
        axes.set_title(f"{study.study_name}: Pareto front")
    else:
        better = max if objectives[0].direction == "maximize" else min
        numbers = [t.number for t in feasible]
        values = [t.value for t in feasible]
        axes.scatter(numbers, values, color="tab:blue", label="trial")
        if infeasible:
            axes.scatter([t.number for t in infeasible], [t.value for t in infeasible], color="tab:red",
                         marker="x", label="infeasible")
        if values:
            running = [better(values[:i + 1]) for i in range(len(values))]
            axes.step(numbers, running, where="post", color="tab:orange", label="best so far")
        axes.set_xlabel("trial")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel(objectives[0].label)
        axes.set_title(f"{study.study_name}: optimization history")
    axes.grid(alpha=0.3)
    axes.legend()
    return plots.save_figure(figure, out_png)

"""What a study optimizes: the `tune.objectives` and `tune.constraints` of a recipe, checked against the
figures its task declares (`shared.task.Task.measures`) and the size and latency figures every run has, and
those figures measured on a finished trial's run."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from optuna.distributions import BaseDistribution

from shared import plots, tflite
from shared.config_schema import Config
from shared.frozen import thaw
from shared.lifecycle import test
from shared.errors import UserError
from shared.sizing import multiply_adds, trainable_parameters
from shared.task import Measure
from shared.tasks import TASKS, rebuild, task_class, task_for
from shared.tuning.space import candidate_values

# The figures every task's run has, beside the test figures its task declares; all are costs (minimized).
SIZE_METRICS = ("params", "macs")  # trainable parameters; multiply-adds of one image's forward pass
# size of the int8 TFLite file (10^6 bytes); median batch-1 LiteRT latency of the int8 TFLite model
TFLITE_METRICS = ("tflite_int8_mb", "latency_ms")
# the run's wall seconds from its data to its test figures (test_metrics.json's train_seconds)
RUN_METRICS = ("train_seconds",)
VIEW_SEPARATOR = "@"  # top1@flip: a test figure measured through one of the task's test views (`test --views`)
DIRECTIONS = ("minimize", "maximize")
VALIDATION_PREFIX = "val_"  # Keras logs a figure of the validation split under this prefix


@dataclass(frozen=True)
class Objective:
    metric: str  # a task's measure or a size / latency figure
    direction: str  # minimize or maximize

    @property
    def label(self) -> str:
        return f"{self.metric} ({self.direction[:3]})"


class TrialFailed(Exception):
    """A trial whose run started but did not finish (diverged, say): the study goes on without it."""


def direction(higher_is_better: bool) -> str:
    return "maximize" if higher_is_better else "minimize"


def task_measures(config: Config) -> Mapping[str, Measure]:
    """The test figures the config's task declares: what its studies may optimize beside sizes and latency."""
    return task_class(config.task).measures


def split_view(metric: str) -> tuple[str, str | None]:
    """`top1@flip` -> ("top1", "flip"); a name without a view -> (name, None)."""
    base, _, view = metric.partition(VIEW_SEPARATOR)
    return base, view or None


def _with_views(task) -> dict[str, bool]:
    """A task's measures and, for each of its test figures, that figure through each of its test views."""
    senses = {name: declared.higher_is_better for name, declared in task.measures.items()}
    senses.update({f"{name}{VIEW_SEPARATOR}{view}": declared.higher_is_better
                   for name, declared in task.measures.items() if declared.key is not None
                   for view in task.test_views})
    return senses


def _every_metric(config: Config) -> dict[str, bool]:
    """Every metric name a study may give -> higher_is_better: every task's measures and views (a name another
    task measures is refused later as not measured for this one, not as a typo), this task's sense first, then
    the size, latency and time figures."""
    senses: dict[str, bool] = {}
    for task in TASKS.values():
        for name, higher in _with_views(task).items():
            senses.setdefault(name, higher)
    senses.update(_with_views(task_class(config.task)))
    senses.update(dict.fromkeys((*SIZE_METRICS, *TFLITE_METRICS, *RUN_METRICS), False))
    return senses


def parse_objectives(config: Config) -> list[Objective]:
    """`tune.objectives` as Objective records: each a {metric, direction} mapping or a metric name
    (its natural direction, from the measure's higher_is_better); unknown metrics or directions are
    UserErrors with the closest name."""
    entries = thaw(config.tune.objectives)  # YAML's lists and dicts, as the checks and messages read them
    measures = task_measures(config)
    if not entries:
        name, higher = next(((n, m.higher_is_better) for n, m in measures.items()), ("params", False))
        raise UserError(f"tune.objectives is empty; give at least one, e.g. [{{metric: {name}, direction: "
                        f"{direction(higher)}}}]")
    senses = _every_metric(config)
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
        metric = _known(entry.get("metric"), senses, "tune.objectives metric")
        chosen = entry.get("direction", direction(senses[metric]))
        _known(chosen, DIRECTIONS, f"tune.objectives direction of {metric}")
        objectives.append(Objective(metric, chosen))
    metrics = [o.metric for o in objectives]
    repeated = sorted({m for m in metrics if metrics.count(m) > 1})
    if repeated:
        raise UserError(f"tune.objectives names {', '.join(repeated)} more than once; keep one entry per metric")
    return objectives


def parse_constraints(config: Config) -> dict[str, float]:
    """`tune.constraints`: metric -> upper bound (a trial is feasible when every value <= its bound)."""
    senses = _every_metric(config)
    constraints = {}
    for metric, bound in (config.tune.constraints or {}).items():
        _known(metric, senses, "tune.constraints metric")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise UserError(f"tune.constraints.{metric} is {bound!r}; give a number, the upper bound "
                            f"(e.g. latency_ms: 5.0)")
        constraints[metric] = float(bound)
    return constraints


def _known(value: Any, valid: Iterable[str], what: str) -> str:
    if value not in valid:
        match = difflib.get_close_matches(str(value), list(valid), n=1, cutoff=0.5)
        hint = f"did you mean {match[0]}?" if match else f"choose one of {', '.join(valid)}"
        raise UserError(f"{what} {value!r} is unknown; {hint}")
    return value


def check_metric_needs(config: Config, metrics: set[str], space: dict[str, BaseDistribution]) -> None:
    """Fail before any training when a metric cannot be measured with this config."""
    task = task_class(config.task)
    for metric in sorted(metrics):
        declared = task.measures.get(metric)  # a figure through a view is a test figure: needs no validation split
        # A figure read from the history under Keras' validation prefix is logged only with a validation split.
        if declared is None or declared.key is not None or not metric.startswith(VALIDATION_PREFIX):
            continue
        fractions = candidate_values(space["data.val_fraction"]) if "data.val_fraction" in space \
            else [config.data.val_fraction]
        if min(fractions) <= 0:
            tested = metric.removeprefix(VALIDATION_PREFIX)
            instead = f" or use {tested} (the test split)" if tested in task.measures else ""
            raise UserError(f"metric {metric} needs a validation split, but data.val_fraction is 0; set "
                            f"data.val_fraction (e.g. 0.1){instead}")
    measured = {*_with_views(task), *SIZE_METRICS, *TFLITE_METRICS, *RUN_METRICS}
    foreign = sorted(m for m in metrics if m not in measured)
    if foreign:
        views = f", a test figure through a view ({', '.join(task.test_views)}: e.g. " \
                f"{next(iter(task.measures))}{VIEW_SEPARATOR}{task.test_views[1]})" if task.test_views else ""
        raise UserError(f"metric {foreign[0]} is not measured for task: {task.name}; choose from "
                        f"{', '.join([*task.measures, *SIZE_METRICS, *TFLITE_METRICS, *RUN_METRICS])}{views}")


def monitored_names(metric: str, measures: Mapping[str, Measure], validating: bool) -> tuple[str, ...] | None:
    """The per-epoch Keras log entries that track `metric`: a measure is logged under its name (validation
    ones when there is a validation split; a history figure such as val_loss names its own split), main-output
    names of multi-output models second; None when the metric is no measure (sizes, latency), so there is
    nothing to prune on."""
    metric = split_view(metric)[0]  # a figure through a test view follows its single-view figure per epoch
    if metric not in measures:
        return None
    logged = metric.removeprefix(VALIDATION_PREFIX)
    prefix = VALIDATION_PREFIX if validating or logged != metric else ""
    return f"{prefix}{logged}", f"{prefix}predictions_{logged}"


def measure(run, wanted: list[str]) -> dict[str, float]:
    """The requested metrics of a finished run, in the order asked."""
    metrics = set(wanted)
    values: dict[str, float] = {}
    measures = task_for(run).measures
    tested = run.test_metrics() or {}
    for name in sorted(metrics & set(measures)):
        key = measures[name].key
        if key is None:  # the last epoch's value in the history
            column = plots.read_metrics(run.path / "metrics.csv").get(name)
            if column is None or not len(column) or not math.isfinite(column[-1]):
                raise TrialFailed(f"run {run.path} logged no {name} for its last epoch")
            values[name] = float(column[-1])
        elif not isinstance(tested.get(key), (int, float)):
            raise TrialFailed(f"run {run.path} recorded no test {key}")
        else:
            values[name] = float(tested[key])
    for view in sorted({split_view(name)[1] for name in metrics} - {None}):
        figures = test(run, views=view)  # recorded in the run's test_metrics.json under by_view
        for name in metrics:
            base, seen_through = split_view(name)
            if seen_through == view:
                values[name] = float(figures[measures[base].key])
    if "train_seconds" in metrics:
        if not isinstance(tested.get("train_seconds"), (int, float)):
            raise TrialFailed(f"run {run.path} recorded no train_seconds")
        values["train_seconds"] = float(tested["train_seconds"])
    if metrics & set(SIZE_METRICS):
        model = _architecture(run)
        values["params"] = float(trainable_parameters(model))
        values["macs"] = float(multiply_adds(model))
    if metrics & set(TFLITE_METRICS):
        path, _ = task_for(run).export_tflite(rebuild(run)[0], run, "int8", "float")  # the task's default form
        path = Path(path)
        values["tflite_int8_mb"] = path.stat().st_size / 1e6
        if "latency_ms" in metrics:
            values["latency_ms"] = float(tflite.latency_ms(path))
    return {name: values[name] for name in wanted}


def _architecture(run):
    """The run's model rebuilt from its own model.py and config, as its task evaluates it (for its sizes)."""
    return rebuild(run)[0]

"""The tasks a run can have (`task:` in its config), and the one way to rebuild a run's model.

A new task is one package implementing `shared.task.Task` (its `task.py`) and one entry in TASKS.
"""

from __future__ import annotations

from pathlib import Path

from shared import config as config_module
from shared import modelzoo
from shared.errors import UserError
from shared.predict import ImagePredictor, Source, checked_min_score
from shared.runs import Run, require_idle
from shared.classification.task import ClassificationTask
from shared.deblur.task import DeblurTask
from shared.detection.task import DetectionTask
from shared.task import Rebuilt, Task

TASKS: dict[str, type[Task]] = {"classification": ClassificationTask, "detection": DetectionTask,
                                "deblur": DeblurTask}
DEFAULT_TASK = "classification"  # a config without `task:`


def task_class(name: str | None) -> type[Task]:
    """The Task class of a task name (None: the default); its class facts (commands, measures) need no config."""
    try:
        return TASKS[name or DEFAULT_TASK]
    except KeyError:
        raise UserError(f"task {name!r} is not one of {', '.join(TASKS)}") from None


def recorded_task(run: Run) -> str:
    """The task a run's config.yaml names (a config without `task:` has the default)."""
    return (run.config_dict() or {}).get("task") or DEFAULT_TASK


def task_for(config_or_run) -> Task:
    """The Task of a Config or a Run (its snapshotted config.yaml), bound to that config."""
    config = config_or_run
    if isinstance(config_or_run, Run):
        config = config_module.from_dict(config_or_run.config_dict() or {})
    return task_class(config.task)(config)


def rebuild(run: Run, checkpoint: Path | None = None, training_outputs: bool = False):
    """The run's model rebuilt from its own snapshot (model.py, config.yaml) with its last checkpoint (or
    `checkpoint`), as its task evaluates and exports it (`training_outputs`: as it trained, auxiliary
    heads kept); returns (model, config)."""
    require_idle(run)  # a live run's last checkpoint is about to change
    config = config_module.from_dict(run.config_dict())
    checkpoint = checkpoint or run.checkpoint("last")
    task = task_for(config)
    module = modelzoo.load_model_module(run.path)
    data = config.data
    model = task.build(module, (data.image_size, data.image_size, data.channels))
    modelzoo.load_weight_file(model, checkpoint, what=f"model built from {run.path / 'model.py'}")
    return (model if training_outputs else task.inference_model(model)), config


def open_predictor(run: Run | None = None, saved_model: str | Path | None = None, tflite: str | Path | None = None,
                   checkpoint: str | Path | None = None, min_score: float | None = None) -> ImagePredictor:
    """What `predict` runs (a run, its SavedModel or its .tflite file: `shared.predict.Source`), opened by the
    task it names (`Task.open_predictor`), which rebuilds a run's model with `rebuild` when it needs it."""
    min_score = checked_min_score(min_score)
    source = Source.of(run, saved_model, tflite, checkpoint, rebuild)
    return task_class(source.task_name).open_predictor(source, min_score)


def rebuilt(run: Run, checkpoint: Path | None = None, training_outputs: bool = False) -> Rebuilt:
    """`rebuild`'s model and config with the run and checkpoint they came from: what a command hands down to
    the hooks that use another run (init.from_run's source, distill.teacher, test --classifier)."""
    model, config = rebuild(run, checkpoint, training_outputs)
    return Rebuilt(run, model, config, checkpoint or run.checkpoint("last"))

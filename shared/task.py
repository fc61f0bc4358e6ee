"""What a task is: the part of a run that differs between classification, detection and deblurring.

A run's lifecycle (`shared.lifecycle`: lock, run folder, phases, callbacks, signals, resume, status) is the
same for every task; a `Task` says what it builds, feeds, compiles, measures and exports. The tasks are
listed in `shared.tasks.TASKS` (a plain dict: name -> instance), and `shared.tasks.task_for(config or run)`
picks a config's or a run's. In the spirit of TF Model Garden's `base_task.Task`, without its registries.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

# The CLI commands a task may support (shared.runner's command table lists which task supports which).
ALL_COMMANDS = frozenset({"train", "resume", "test", "finetune", "finetune-all", "distill", "tune", "preview",
                          "lr-sweep", "find-batch", "export", "size", "predict", "loop"})


# The config keys every task records as paths (made absolute by Task.resolve): read against the current folder.
PATH_KEYS = ("model.path", "data.path", "data.data_dir", "data.manual_dir", "init.from_run", "init.weights",
             "loop.dir", "loop.eval", "run.dir")


def absolute(path: str | None) -> str | None:
    """`path` absolute, `~` expanded; None and "" as they are."""
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _get(config, dotted: str):
    for key in dotted.split("."):
        config = getattr(config, key)
    return config


@dataclasses.dataclass
class Phase:
    """A stretch of epochs trained with one set of frozen layers and one optimizer."""
    until_epoch: int
    freeze: list[str]
    lr_scale: float = 1.0


@dataclasses.dataclass
class TaskData:
    """A task's input pipelines and the facts the lifecycle reports and records about them."""
    train: Any  # tf.data.Dataset of (inputs, targets), repeating; fit_data() adapts the targets to the model
    val: Any | None  # likewise, or None when there is no validation split
    steps_per_epoch: int
    class_names: list[str]  # written to the run's labels.txt
    input_shape: tuple[int, int, int]
    description: str  # "N training / M test images, K classes, ..." for the run's first line
    details: Any = None  # the task's own (its datasets or splits), for evaluate()
    # names the files behind a pipeline error (undecodable images), or [] when it is not about files
    undecodable: Callable[[BaseException], list[str]] = lambda error: []
    # the config as loading this data resolved it (class count, normalization statistics):
    # a new frozen Config, the one the run records (see shared.lifecycle.prepare)
    config: Any = None
    # files a new run records beside labels.txt ({run-relative path: text or bytes}), e.g. the split of a
    # folder that has none on disk, which test_data() reads back from the run
    records: dict = dataclasses.field(default_factory=dict)


class Task:
    """The interface every task implements. The lifecycle calls, in order: check -> plan_phases -> resolve ->
    datasets -> build -> initialize (when init.from_run / init.weights) -> trainer -> fit_data -> head_layer_names ->
    per phase: compile + fit -> evaluate (on the model rebuilt from the last checkpoint) -> summary."""

    name: str = ""
    commands: frozenset[str] = frozenset()  # the CLI commands it supports (subset of ALL_COMMANDS)
    distributes: bool = False  # whether distribute.strategy may spread it over devices or workers

    # ---- before a run folder exists (every user mistake is raised here as a UserError)
    def check(self, config) -> None:
        """Rules of this task that involve several config keys; may make paths absolute."""

    def plan_phases(self, config) -> list[Phase]:
        """finetune_all with head_epochs: the head alone first (backbone frozen), then every layer at the
        lower rate; otherwise one phase."""
        train, init = config.train, config.init
        if init.mode != "finetune_all":
            return [Phase(train.epochs, list(train.freeze))]
        phases = [Phase(init.head_epochs, ["backbone"])] if init.head_epochs else []
        return phases + [Phase(train.epochs, list(train.freeze), init.lr_scale)]

    def resolve(self, config) -> Any:
        """The config with the paths the run records made absolute (and checked), so its config.yaml finds
        them from any directory (`test --run`, `--resume` elsewhere): a new Config (`config` is frozen).
        Called by `shared.lifecycle.prepare`; a task adds its own keys to these."""
        from shared.config_schema import with_changes

        return with_changes(config, {key: absolute(_get(config, key)) for key in PATH_KEYS})

    def datasets(self, config, folder: Path, replicas: int = 1, start_epoch: int = 0) -> TaskData:
        """The training (and validation / test) pipelines, and in TaskData.config the config resolved by them
        (data.num_classes from the data, ...); `config` is frozen and stays as it is."""
        raise NotImplementedError

    def build(self, module, config, input_shape: tuple[int, int, int]) -> Any:
        """The trainable keras.Model from the model module (its build() or backbone()) and a resolved config."""
        raise NotImplementedError

    def inference_model(self, model) -> Any:
        """The model evaluation and export see (e.g. without training-only auxiliary heads)."""
        return model

    def initialize(self, config, model, module, data: TaskData) -> str:
        """Copy init.from_run's / init.weights' layers into `model`; returns the line for the run's notes."""
        raise NotImplementedError

    def trainer(self, config, model, data: TaskData) -> Any:
        """The model fit() trains (a distillation wrapper around `model`, say); checkpoints see `model`."""
        return model

    def fit_data(self, config, model, module, data: TaskData) -> tuple[Any, Any]:
        """The (training, validation or None) pipelines fit() gets, with targets as the compiled loss wants
        them for this model (anchor targets, one label per auxiliary head, ...)."""
        return data.train, data.val

    def callbacks(self, config, model, data: TaskData) -> list:
        """The task's Keras callbacks for training (e.g. a periodic evaluation); the lifecycle runs them before
        its loggers and checkpoints, so what they add to an epoch's logs is recorded and can be monitored. A
        callback that adds log keys names them in its `logged` set (the monitor check reads it)."""
        return []

    def head_layer_names(self, module, model, config, input_shape: tuple[int, int, int]) -> set[str]:
        """The layers the task adds on the backbone: never frozen by train.freeze: [backbone]."""
        raise NotImplementedError

    # ---- per phase
    def compile(self, trainer, model, module, config, data: TaskData, lr_scale: float, replicas: int) -> None:
        """Compile `trainer` with the task's losses and metrics and shared.optim's optimizer; `config.train`
        holds the phase's own epochs (a schedule spans the phase)."""
        raise NotImplementedError

    # ---- after training, and `test --run`
    def evaluate(self, model, data: TaskData, config) -> tuple[dict, Callable[[Path], Any]]:
        """The test metrics of `model` (JSON-able dict) and a function that draws the task's figure(s) into
        a run folder (confusion.png, detections.png, ...)."""
        raise NotImplementedError

    def test_data(self, config, run) -> TaskData:
        """The data `test --run` evaluates on, refused (UserError) when its classes are not the run's."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> str:
        """One line of a run's test figures, printed by train / test / resume."""
        raise NotImplementedError

    def details(self, metrics: dict) -> str:
        """What train / test print after the summary line (the worst classes, ...); '' for nothing."""
        return ""

    # ---- export (commands "export"; run is a finished run)
    def export_saved_model(self, run, export_dir: Path, model_name: str | None, keep: int) -> Path:
        raise NotImplementedError

    def export_tflite(self, run, quantize: str, io: str) -> tuple[Path, str]:
        """The .tflite file and a line saying what was written beside it ('' when nothing)."""
        raise NotImplementedError

    def evaluate_tflite(self, path: Path, run) -> dict:
        raise NotImplementedError

"""What a task is: the part of a run that differs between classification, detection and deblurring.

A run's lifecycle (`shared.lifecycle`: lock, run folder, phases, callbacks, signals, resume, status) is the
same for every task; a `Task` says what it builds, feeds, measures and exports. Each task is a package
(`shared/classification/`, `shared/detection/`, `shared/deblur/`: its `task.py` holds its Task), listed in
`shared.tasks.TASKS` (name -> class); `shared.tasks.task_for(config or run)` gives the Task bound to a config.
In the manner of TF Model Garden's `base_task.Task(params)`, without its registries: a Task is created bound to
one config (`Task(config)`, the config `self.config`), so its hooks take only what differs between calls.
`Task` is abstract: a task class that lacks a hook cannot be instantiated (TypeError at construction, not
mid-run).
"""

from __future__ import annotations

import abc
import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from shared.config_schema import with_changes

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


@dataclasses.dataclass(frozen=True)
class Measure:
    """A test figure a study optimizes or a loop judges rounds by: its key in test_metrics.json and its sense."""
    key: str | None  # None: not in test_metrics.json (read from the history, e.g. the last val_loss)
    higher_is_better: bool


@dataclasses.dataclass
class Objective:
    """What a task compiles its trainer with, beside the optimizer the lifecycle builds (`keras.Model.compile`)."""
    loss: Any
    loss_weights: Any = None
    metrics: Any = None


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


@dataclasses.dataclass(frozen=True)
class Rebuilt:
    """Another finished run's model as `shared.tasks.rebuild` builds it, by the command at the top, which hands
    it down (init.from_run's source, distill.teacher, test --classifier's classifier)."""
    run: Any  # shared.runs.Run
    model: Any  # keras.Model
    config: Any  # the run's own Config
    checkpoint: Path  # the checkpoint loaded into `model`


class Task(abc.ABC):
    """The interface every task implements, bound to one config (`self.config`). The lifecycle calls, in
    order: check -> plan_phases -> resolve -> datasets -> (bound to the config the data resolved) build ->
    initialize (when init.from_run / init.weights) -> trainer -> fit_data -> head_layer_names -> per phase:
    objective, compiled with the lifecycle's optimizer, and fit -> evaluate (on the model rebuilt from the last
    checkpoint) -> summary."""

    name: ClassVar[str]
    commands: ClassVar[frozenset[str]]  # the CLI commands it supports (of shared.commands.ALL_COMMANDS)
    distributes: ClassVar[bool] = False  # whether distribute.strategy may spread it over devices or workers
    # the test figures a study may optimize (`tune.metric`), by name; the first is what a loop round is judged by
    measures: ClassVar[Mapping[str, Measure]] = {}
    # options its `export --format tflite` takes beyond --quantize and --io: option -> its default
    tflite_options: ClassVar[Mapping[str, Any]] = {}
    # options its `test --run` takes (test_with_*)
    test_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config) -> None:
        missing = [fact for fact in ("name", "commands") if not getattr(type(self), fact, None)]
        if missing:  # like a missing hook, at construction rather than mid-run
            raise TypeError(f"task class {type(self).__name__} does not set {', '.join(missing)}")
        self.config = config

    def bound(self, config) -> "Task":
        """This task bound to another config (the same task: the config resolved further, a run's own)."""
        return type(self)(config)

    @property
    def judged_by(self) -> tuple[str, Measure]:
        """The measure a loop round is judged by (and a study's default): the first of `measures`."""
        if not self.measures:
            raise NotImplementedError(f"task {self.name} declares no measures")
        return next(iter(self.measures.items()))

    # ---- before a run folder exists (every user mistake is raised here as a UserError)
    def check(self) -> None:  # noqa: B027 (a hook with nothing to check by default, not an abstract one)
        """Rules of this task that involve several config keys."""

    def plan_phases(self) -> list[Phase]:
        """finetune_all with head_epochs: the head alone first (backbone frozen), then every layer at the
        lower rate; otherwise one phase."""
        train, init = self.config.train, self.config.init
        if init.mode != "finetune_all":
            return [Phase(train.epochs, list(train.freeze))]
        phases = [Phase(init.head_epochs, ["backbone"])] if init.head_epochs else []
        return phases + [Phase(train.epochs, list(train.freeze), init.lr_scale)]

    def resolve(self) -> Any:
        """The config with the paths the run records made absolute (and checked), so its config.yaml finds
        them from any directory (`test --run`, `--resume` elsewhere): a new Config (configs are frozen).
        Called by `shared.lifecycle.prepare`; a task adds its own keys to these."""
        return with_changes(self.config, {key: absolute(_get(self.config, key)) for key in PATH_KEYS})

    @abc.abstractmethod
    def datasets(self, folder: Path, replicas: int = 1, start_epoch: int = 0) -> TaskData:
        """The training (and validation / test) pipelines, and in TaskData.config the config resolved by them
        (data.num_classes from the data, ...)."""

    @abc.abstractmethod
    def build(self, module, input_shape: tuple[int, int, int]) -> Any:
        """The trainable keras.Model from the model module (its build() or backbone())."""

    def inference_model(self, model) -> Any:
        """The model evaluation and export see (e.g. without training-only auxiliary heads)."""
        return model

    @abc.abstractmethod
    def initialize(self, model, module, data: TaskData, source: Rebuilt | None) -> str:
        """Copy init.from_run's / init.weights' layers into `model`; returns the line for the run's notes.
        `source`: the run they come from, rebuilt (None for a weight file outside a run folder)."""

    def trainer(self, model, data: TaskData, teacher: Rebuilt | None) -> Any:
        """The model fit() trains (a distillation wrapper around `model` and the rebuilt `teacher` run, say);
        checkpoints see `model`."""
        return model

    def fit_data(self, model, module, data: TaskData) -> tuple[Any, Any]:
        """The (training, validation or None) pipelines fit() gets, with targets as the task's loss wants
        them for this model (anchor targets, one label per auxiliary head, ...)."""
        return data.train, data.val

    def callbacks(self, model, data: TaskData) -> list:
        """The task's Keras callbacks for training (e.g. a periodic evaluation); the lifecycle runs them before
        its loggers and checkpoints, so what they add to an epoch's logs is recorded and can be monitored. A
        callback that adds log keys names them in its `logged` set (the monitor check reads it)."""
        return []

    @abc.abstractmethod
    def head_layer_names(self, module, model, input_shape: tuple[int, int, int]) -> set[str]:
        """The layers the task adds on the backbone: never frozen by train.freeze: [backbone]."""

    # ---- per phase
    @abc.abstractmethod
    def objective(self, model, module, data: TaskData) -> Objective:
        """The losses (and their weights) and metrics the trainer is compiled with; the optimizer is the
        lifecycle's (`shared.optim.compile_trainer`)."""

    # ---- after training, and `test --run`
    @abc.abstractmethod
    def evaluate(self, model, data: TaskData) -> tuple[dict, Callable[[Path], Any]]:
        """The test metrics of `model` (JSON-able dict) and a function that draws the task's figure(s) into
        a run folder (confusion.png, detections.png, ...)."""

    @abc.abstractmethod
    def test_data(self, run) -> TaskData:
        """The data `test --run` evaluates on, refused (UserError) when its classes are not the run's."""

    @classmethod
    @abc.abstractmethod
    def summary(cls, metrics: dict) -> str:
        """One line of a run's test figures, printed by train / test / resume."""

    @classmethod
    def details(cls, metrics: dict) -> str:
        """What train / test print after the summary line (the worst classes, ...); '' for nothing."""
        return ""

    # ---- predict (command "predict")
    @classmethod
    @abc.abstractmethod
    def open_predictor(cls, source, min_score: float | None) -> Any:
        """The `shared.predict.ImagePredictor` of this task's `shared.predict.Source`: a run (its model from
        `source.rebuilt()`), its SavedModel or its TFLite file; `min_score`: --min-score (0..1), None when not
        given. A task that does not predict raises a UserError."""

    # ---- export (command "export"; `model` is the finished `run`'s, rebuilt by the command: shared.tasks.rebuild)
    @abc.abstractmethod
    def export_saved_model(self, model, run, export_dir: Path, model_name: str | None, keep: int) -> Path:
        """The SavedModel version written under `export_dir` (shared.export's versioning and publishing)."""

    @abc.abstractmethod
    def export_tflite(self, model, run, quantize: str, io: str, **options) -> tuple[Path, str]:
        """The .tflite file and a line saying what was written beside it ('' when nothing); `options`: the
        task's own `tflite_options`."""

    @abc.abstractmethod
    def evaluate_tflite(self, path: Path, run) -> dict:
        """The test figures of a .tflite file on the run's test split."""

    onnx_file: ClassVar[str] = "model.onnx"  # `export --format onnx` writes <run>/export/<onnx_file>

    def export_onnx(self, model, run) -> Path:
        """`export --format onnx`: the inference model (`inference_model`: its raw outputs) as an ONNX file, with
        what a reader needs to feed it in its metadata (`onnx_metadata`)."""
        from shared.onnx_export import export_onnx

        return export_onnx(self.inference_model(model), run.path / "export" / self.onnx_file, self.onnx_metadata(run))

    def onnx_metadata(self, run) -> dict[str, str]:
        """The ONNX file's metadata_props: the input it takes (the data keys of its preprocessing), its classes
        and the run, each a string (JSON where not one)."""
        import json

        data = self.config.data
        preprocessing = {key: getattr(data, key) for key in ("image_size", "channels", "normalize", "mean", "std",
                                                             "crop_fraction")}
        return {"task": self.name, "run": str(run.path), "labels": json.dumps(run.class_names() or []),
                "preprocessing": json.dumps(preprocessing, default=list)}

    def test_with_classifier(self, model, run, classifier: Rebuilt) -> dict:
        """`test --run RUN --classifier CLASSIFIER` (for tasks with "classifier" in test_options): `model` is
        the run's, rebuilt."""
        raise NotImplementedError(f"task {self.name} does not test with a classifier")

    test_views: ClassVar[tuple[str, ...]] = ()  # the views `with_views` takes (and a study's `top1@flip` names)

    def with_views(self, data: TaskData, views: str) -> TaskData:
        """`test --run RUN --views NAME` (for tasks with "views" in test_options): `data` (test_data's) with its
        test split seen through those views."""
        raise NotImplementedError(f"task {self.name} has no test views")

    # ---- import-weights (tasks with "import-weights" in commands)
    @classmethod
    def import_weights(cls, source: str, path: Path, model_name: str, overrides: list[str],
                       argv: list[str] | None = None) -> Any:
        """`import-weights --from SOURCE FILE --model NAME [--set ...]`: a new finished run (a `shared.runs.Run`)
        holding the file's weights in `model_name`, built as the task's recipe and `overrides` say."""
        raise NotImplementedError(f"task {cls.name} does not import weights")

    # ---- the loop command (tasks with "loop" in commands)
    def loop_support(self) -> Any:
        """The task's `shared.loop.support.LoopSupport`: what it supplies to the loop (its annotations, shards,
        held-out set and round config changes)."""
        raise NotImplementedError(f"task {self.name} does not support the loop")

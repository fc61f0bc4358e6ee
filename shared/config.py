"""Run recipes: YAML files with `extends`, `--set` overrides in dot notation, strict validation.

The schema is the dataclasses below: every key a user may write, its type, its default. Anything else
is an error naming the key, the file it came from and the closest valid key. Every number is finite and
in the range `RANGES` gives its key, checked when the config loads, before any folder exists. `model` is open-ended:
besides `name` and `path` it holds the model's own hyperparameters, which `shared.modelzoo` checks
against the model's `build` signature.

A loaded Config is frozen: the run lifecycle resolves it once (`shared.lifecycle.prepare`: hyperparameters,
class count, normalization statistics, absolute paths) into a new value with `with_changes`, and nothing
changes it afterwards (an assignment raises dataclasses.FrozenInstanceError).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shared.errors import UserError
from shared.names import check_plain_name
from shared.source_facts import SOURCES

SET_SOURCE = "--set"


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-3` (no dot) is text; YAML 1.2 and every user read a number."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


class _YamlDumper(yaml.SafeDumper):
    """Multi-line text (notes) as a literal block, as it was typed; PyYAML falls back to a quoted
    string where a block cannot hold the text exactly."""


_YamlDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def yaml_load(text: str):
    """A recipe's YAML, with exponent floats such as 1e-3 read as numbers."""
    return yaml.load(text, Loader=_YamlLoader)


class UnreadableYaml(ValueError):
    """Why a YAML file cannot be read: `where` (" at line N", or "") and `problem`, for its reader's one line."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{problem}{where}")
        self.where, self.problem = where, problem


def read_yaml_file(path: Path):
    """A YAML file's content (`yaml_load`); UnreadableYaml when it is not UTF-8 text or not YAML (with the line
    PyYAML reports)."""
    try:
        return yaml_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise UnreadableYaml("", f"not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise UnreadableYaml(f" at line {mark.line + 1}" if mark else "",
                             str(getattr(error, "problem", None) or error)) from None


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet"  # a folder under models/
    path: str | None = None  # the model folder, when it is not models/<name>
    hparams: dict = field(default_factory=dict)  # everything else under `model:`


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="fashion_mnist", metadata={"choices": tuple(SOURCES)})
    name: str | None = None  # TFDS dataset name (source: tfds)
    path: str | None = None  # IDX folder (fashion_mnist), or the root holding train/ and val/ (folder, ilsvrc)
    data_dir: str | None = None  # TFDS data_dir
    manual_dir: str | None = None  # TFDS manual_dir (ImageNet tars)
    label_offset: int = 0  # tfrecord: added to stored labels (-1 for 1-based shards from imagenet_to_gcs.py)
    train_split: str = "train"
    test_split: str = "test"  # the held-out split evaluated after training
    image_size: int = 224
    channels: int = field(default=3, metadata={"choices": (1, 3)})
    num_classes: int | None = None  # None: as many as the source has
    normalize: bool = True  # subtract mean, divide by std; off: pixels scaled to [0, 1]
    mean: list[float] | None = None  # per channel, on the 0-255 scale; None: the source's statistics
    std: list[float] | None = None
    augment: list = field(default_factory=list)  # names or {name: {arg: value}}, see shared.data.augment
    batch_augment: list = field(default_factory=list)  # MixUp / CutMix on whole batches (soft labels)
    crop_fraction: float = 0.875  # eval: resize to image_size / crop_fraction, center-crop image_size
    val_fraction: float = 0.0  # carve a validation split off train, evaluated every epoch
    # folder source with only PATH/<class>/* (no split folders): the share of each class held out for testing
    test_fraction: float = 0.0
    limit_train: int | None = None  # use only the first N training examples (smoke runs)
    limit_test: int | None = None
    shuffle_buffer: int = 10_000
    on_corrupt: str = field(default="error", metadata={"choices": ("error", "skip")})  # undecodable images
    # images above this many pixels (read from the header) are refused: a small PNG can decode to gigabytes
    max_pixels: int = 100_000_000
    max_image_bytes: int = 100_000_000  # an image file (or data: URI) above this size is refused
    deterministic: bool = False  # the same batches for the same seed (one decode thread: tests, debugging)
    synthetic_train: int = 1024  # examples generated by source: synthetic
    synthetic_test: int = 256


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = field(default="sgd", metadata={"choices": ("sgd", "adam", "adamw", "rmsprop")})
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False
    rho: float = 0.9  # rmsprop: the decay of the squared-gradient average (MobileNetV2's "decay 0.9")
    epsilon: float | None = None  # None: 1e-3 for rmsprop (TF's reference recipes), 1e-7 for adam/adamw
    clip_norm: float | None = None  # clip each gradient tensor to this L2 norm
    clip_global_norm: float | None = None  # clip all gradients together to this global L2 norm


@dataclass(frozen=True)
class LearningRateConfig:
    base: float = 0.1
    base_batch_size: int | None = None  # set: scale linearly, lr = base * batch_size / base_batch_size
    schedule: str = field(default="constant",
                          metadata={"choices": ("constant", "step", "exponential", "cosine", "polynomial",
                                                "plateau")})
    milestones: list[int] = field(default_factory=list)  # epochs where `step` multiplies by gamma
    gamma: float = 0.1  # the factor of step, exponential and plateau
    decay_epochs: float = 1.0  # exponential: multiply by gamma every decay_epochs (staircase)
    patience: int = 5  # plateau: epochs without improvement of the monitored loss before multiplying by gamma
    warmup_epochs: float = 0.0  # linear warmup from 0 before the schedule starts
    power: float = 1.0  # polynomial: (1 - t/T)^power from base to end
    end: float = 0.0  # polynomial: the final rate


@dataclass(frozen=True)
class BestConfig:
    monitor: str | None = None  # e.g. val_top1: keep checkpoints/best.keras, the best epoch so far; null: off
    mode: str = field(default="auto", metadata={"choices": ("auto", "min", "max")})  # auto: max for accuracies


@dataclass(frozen=True)
class EarlyStoppingConfig:
    monitor: str | None = None  # e.g. val_loss: stop when it has not improved for `patience` epochs; null: off
    patience: int = 5
    min_delta: float = 0.0  # a smaller change is no improvement
    mode: str = field(default="auto", metadata={"choices": ("auto", "min", "max")})


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    steps_per_epoch: int | None = None  # cap on steps per epoch; None: the whole training split
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr: LearningRateConfig = field(default_factory=LearningRateConfig)
    weight_decay: float = 0.0  # on convolution and dense kernels (not biases or batch norm)
    weight_decay_mode: str = field(default="l2", metadata={"choices": ("l2", "decoupled")})  # l2: a loss
    # term wd/2*|w|^2, as the papers use it; decoupled: w -= lr*wd*w in the optimizer (Loshchilov & Hutter)
    label_smoothing: float = 0.0
    ema_momentum: float | None = None  # e.g. 0.9999: keep an exponential moving average of the weights,
    # evaluated and saved as the model
    precision: str = field(default="float32", metadata={"choices": ("float32", "mixed_float16", "mixed_bfloat16")})
    freeze: list[str] = field(default_factory=list)  # layer-name patterns (fnmatch) kept frozen; "backbone":
    # every layer but the classifier head
    jit_compile: bool = False  # XLA
    seed: int = 0
    verbose: int = field(default=1, metadata={"choices": (0, 1, 2)})  # Keras fit: 1 is a progress bar
    keep_checkpoints: int | None = None  # keep only the newest N epoch checkpoints while training; null: all
    best: BestConfig = field(default_factory=BestConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    class_weight: str | dict | None = None  # auto (inverse class frequency) or {class name: weight}; null: none


@dataclass(frozen=True)
class InitConfig:
    """Where the starting weights come from (finetune, finetune-all, detection)."""
    from_run: str | None = None  # a run folder: its weights, built from its own snapshotted model.py
    weights: str | None = None  # a weight file (e.g. a Keras Applications .h5 for ResNet / MobileNetV2)
    mode: str = field(default="finetune", metadata={"choices": ("finetune", "finetune_all")})  # finetune:
    # train the new head on a frozen backbone; finetune_all: every layer, at lr * lr_scale
    lr_scale: float = 0.1  # finetune_all: the learning rate is train.lr.base times this
    head_epochs: int = 0  # finetune_all: first train the head alone for this many epochs (warm start)


@dataclass(frozen=True)
class DistributeConfig:
    strategy: str = field(default="auto", metadata={"choices": ("auto", "one_device", "mirrored", "multi_worker",
                                                                "tpu")})  # auto: mirrored on several GPUs
    tpu: str = ""  # tpu: the TPU name or grpc:// address ("" on a TPU VM)


@dataclass(frozen=True)
class DetectionConfig:
    """A single-shot detector on a classification backbone (task: detection)."""
    format: str = field(default="coco", metadata={"choices": ("coco", "voc", "tfrecord")})  # annotations
    train_annotations: str | None = None  # coco: the JSON; voc: the image-set list (None: every XML);
    test_annotations: str | None = None   # tfrecord: a file glob (label_map.pbtxt beside it, or label_map)
    label_map: str | None = None  # tfrecord: the TF Object Detection API label_map.pbtxt (1-based ids)
    strides: list[int] = field(default_factory=lambda: [8, 16, 32])  # backbone feature maps used
    fpn_channels: int = 64
    head: str = field(default="conv", metadata={"choices": ("conv", "ssdlite", "depthwise")})  # ssdlite: SSDLite;
    # depthwise: the earlier SSDLite without BatchNorm, kept so its runs load (learns slowly)
    head_depth: int = 2  # shared head convolutions before the box / class outputs
    anchor_size: float = 4.0  # anchor side = anchor_size x stride, times each scale
    anchor_scales: list[float] = field(default_factory=lambda: [1.0, 1.26, 1.59])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    positive_iou: float = 0.5  # anchors matched at or above: positive; below negative_iou: background;
    negative_iou: float = 0.4  # in between: ignored
    max_boxes: int = 32  # ground-truth boxes per image kept (padded) in the pipeline
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    box_loss_weight: float = 1.0
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections: int = 100
    unfreeze_epoch: int | None = None  # with init.from_run and train.freeze [backbone]: train all from here
    eval_every: int | None = None  # validation mAP (val_map, val_map50) every N epochs while training
    eval_protocol: str = field(default="coco", metadata={"choices": ("coco", "voc")})  # voc: AP@.5, difficult ignored


@dataclass(frozen=True)
class DeblurConfig:
    """Image restoration on a classification backbone (task: deblur; shared/deblur/)."""
    blur: list = field(default_factory=lambda: [{"gaussian": {"sigma": [1.0, 2.0]}}])  # see shared.data.blur
    decoder_channels: int = 32  # every decoder level's width (the skips are reduced to it by a 1x1 first)
    loss: str = field(default="l1", metadata={"choices": ("l1", "l2")})  # on the normalized images
    gallery: int = 8  # test images drawn in deblur.png (blurred / restored / sharp rows)


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015): `distill --teacher RUN` or distill.teacher."""
    teacher: str | None = None  # a finished run; its model is rebuilt from its own snapshot and frozen
    temperature: float = 4.0  # softens both distributions; the soft loss is scaled by T^2
    alpha: float = 0.9  # weight of the teacher's soft targets; 1 - alpha on the hard labels


@dataclass(frozen=True)
class TuneConfig:
    """Hyperparameter search with Optuna: `python -m shared.runner tune --config models/<m>/tune.yaml`."""
    study: str | None = None  # None: <model>-<config file stem>
    storage: str | None = None  # an SQLAlchemy URL; None: sqlite:///<run.dir>/tuning.db
    sampler: str = field(default="tpe", metadata={"choices": ("grid", "random", "tpe", "nsga2")})
    trials: int = 10
    objectives: list = field(default_factory=lambda: [{"metric": "top1", "direction": "maximize"}])
    constraints: dict = field(default_factory=dict)  # metric -> upper bound, e.g. {latency_ms: 5.0}
    space: dict = field(default_factory=dict)  # dotted config key -> {choice: [...]}, {int: [lo, hi]},
    # {float: [lo, hi], log: true}
    prune: bool = True  # single objective: stop bad trials early (Optuna's median pruner)
    seed: int = 0


@dataclass(frozen=True)
class LoopConfig:
    """Training in the loop (`python -m shared.runner loop`): rounds of new annotations -> finetune -> export."""
    dir: str | None = None  # the loop's folder (data, state, rounds.csv); None: <run.dir>/loops/<model>-<recipe stem>
    steps: int = 100  # training steps per round, over all examples so far (rounded up to whole equal epochs)
    eval: str | None = None  # the held-out annotations (JSONL); None: the recipe's own test split
    tolerance: float | None = 0.01  # export unless the metric fell by more than this; null: always export
    keep: int = 3  # newest data shard sets, export versions and round runs kept (older data sets are merged)
    min_new: int = 50  # --watch: new accepted annotations that start a round
    poll_seconds: float = 10.0  # --watch: how often the annotations file is read
    attempt: str | None = None  # set by the loop on the runs it trains (state.json lists them): leave it null


@dataclass(frozen=True)
class RunConfig:
    notes: str = ""
    dir: str = "runs"  # the runs root; each run lands in <dir>/<model>/<version>/


@dataclass(frozen=True)
class Config:
    task: str = field(default="classification", metadata={"choices": ("classification", "detection", "deblur")})
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    init: InitConfig = field(default_factory=InitConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    deblur: DeblurConfig = field(default_factory=DeblurConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source_file: str | None = field(default=None, metadata={"internal": True})  # the recipe it was read from
    provenance: dict = field(default_factory=dict, metadata={"internal": True})  # dotted key -> file or --set

    @property
    def where(self) -> str:
        """` (in recipe.yaml)` for error messages, or nothing for a config built in code."""
        return f" (in {self.source_file})" if self.source_file else ""

    def to_dict(self) -> dict:
        """The resolved config in schema order (stable, so run-to-run diffs show only changes)."""
        out = _section_to_dict(self)
        out["model"] = {"name": self.model.name, **({"path": self.model.path} if self.model.path else {}),
                        **self.model.hparams}
        return out

    def dump(self) -> str:
        # allow_unicode: notes, names and paths stay readable (UTF-8), not \u escapes
        return yaml.dump(self.to_dict(), Dumper=_YamlDumper, sort_keys=False, default_flow_style=False,
                         width=100, allow_unicode=True)


def _section_to_dict(section) -> dict:
    out = {}
    for f in dataclasses.fields(section):
        if f.metadata.get("internal"):
            continue
        value = getattr(section, f.name)
        out[f.name] = _section_to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def with_changes(section, changes: dict[str, Any]):
    """A copy of `section` (the Config or one of its sections) with the dotted keys in `changes` set, e.g.
    `with_changes(config, {"data.num_classes": 10})`: the config is frozen once loaded, so every resolution
    step makes a new one and nothing changes a config another part of the program holds."""
    direct, nested = {}, {}
    for dotted, value in changes.items():
        head, _, rest = dotted.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = with_changes(getattr(section, head), sub)
    return dataclasses.replace(section, **direct)


# ---------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """The numbers a key allows: from `low` to `high`, each end included unless `*_open`. Always finite."""
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below  # NaN compares false both ways

    def __str__(self) -> str:
        """What the error message says a value must be: "> 0", "in [0, 1)", "finite"."""
        low, high = (f"{v:g}" for v in (self.low, self.high))
        if self.high == math.inf:
            return "finite" if self.low == -math.inf else f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


ANY = Range()
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
UNIT = Range(0, 1)  # [0, 1]

# Every number of the schema (keys with `choices` aside); a list's range holds for each of its items.
RANGES: dict[str, Range] = {
    "data.label_offset": ANY,
    "data.image_size": AT_LEAST_ONE,
    "data.num_classes": AT_LEAST_ONE,
    "data.mean": Range(0, 255),  # the 0-255 pixel scale
    "data.std": POSITIVE,
    "data.crop_fraction": Range(0, 1, low_open=True),
    "data.val_fraction": FRACTION,
    "data.test_fraction": FRACTION,
    "data.limit_train": AT_LEAST_ONE,
    "data.limit_test": AT_LEAST_ONE,
    "data.shuffle_buffer": AT_LEAST_ONE,
    "data.max_pixels": AT_LEAST_ONE,
    "data.max_image_bytes": AT_LEAST_ONE,
    "data.synthetic_train": AT_LEAST_ONE,
    "data.synthetic_test": AT_LEAST_ONE,
    "train.epochs": AT_LEAST_ONE,
    "train.batch_size": AT_LEAST_ONE,
    "train.steps_per_epoch": AT_LEAST_ONE,
    "train.optimizer.momentum": FRACTION,
    "train.optimizer.rho": FRACTION,
    "train.optimizer.epsilon": POSITIVE,
    "train.optimizer.clip_norm": POSITIVE,
    "train.optimizer.clip_global_norm": POSITIVE,
    "train.lr.base": POSITIVE,
    "train.lr.base_batch_size": AT_LEAST_ONE,
    "train.lr.milestones": AT_LEAST_ONE,
    "train.lr.gamma": POSITIVE,
    "train.lr.decay_epochs": POSITIVE,
    "train.lr.patience": NON_NEGATIVE,
    "train.lr.warmup_epochs": NON_NEGATIVE,
    "train.lr.power": POSITIVE,
    "train.lr.end": NON_NEGATIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.label_smoothing": FRACTION,
    "train.ema_momentum": Range(0, 1, low_open=True, high_open=True),  # e.g. 0.9999; null: no EMA
    "train.seed": NON_NEGATIVE,
    "train.keep_checkpoints": AT_LEAST_ONE,
    "train.early_stopping.patience": NON_NEGATIVE,
    "train.early_stopping.min_delta": NON_NEGATIVE,
    "init.lr_scale": POSITIVE,
    "init.head_epochs": NON_NEGATIVE,
    "detection.strides": AT_LEAST_ONE,
    "detection.fpn_channels": AT_LEAST_ONE,
    "detection.head_depth": NON_NEGATIVE,
    "detection.anchor_size": POSITIVE,
    "detection.anchor_scales": POSITIVE,
    "detection.aspect_ratios": POSITIVE,
    "detection.positive_iou": Range(0, 1, low_open=True),
    "detection.negative_iou": UNIT,
    "detection.max_boxes": AT_LEAST_ONE,
    "detection.focal_alpha": UNIT,
    "detection.focal_gamma": NON_NEGATIVE,
    "detection.box_loss_weight": NON_NEGATIVE,
    "detection.score_threshold": UNIT,
    "detection.nms_iou": Range(0, 1, low_open=True),
    "detection.max_detections": AT_LEAST_ONE,
    "detection.unfreeze_epoch": AT_LEAST_ONE,
    "detection.eval_every": AT_LEAST_ONE,
    "deblur.decoder_channels": AT_LEAST_ONE,
    "deblur.gallery": AT_LEAST_ONE,
    "distill.temperature": POSITIVE,
    "distill.alpha": UNIT,
    "tune.trials": AT_LEAST_ONE,
    "tune.seed": NON_NEGATIVE,
    "loop.steps": AT_LEAST_ONE,
    "loop.tolerance": NON_NEGATIVE,
    "loop.keep": AT_LEAST_ONE,
    "loop.min_new": AT_LEAST_ONE,
    "loop.poll_seconds": POSITIVE,
}


# ---------------------------------------------------------------- loading and merging


def deep_merge(base: dict, override: dict) -> dict:
    """`override` wins; nested mappings merge key by key, everything else is replaced whole."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _provenance(tree: dict, source: str, prefix: str = "") -> dict[str, str]:
    """Which file (or --set) each dotted key came from, so errors can point at it."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        out[dotted] = source
        if isinstance(value, dict):
            out.update(_provenance(value, source, dotted + "."))
    return out


def read_yaml(path: Path, chain: tuple = ()) -> tuple[dict, dict[str, str]]:
    """Read one recipe, following `extends:` (relative to the file); returns (tree, provenance)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise UserError(f"config extends itself in a loop: {cycle}; remove one of the `extends:` lines")
    if not path.is_file():
        hint = f" (extended by {chain[-1]})" if chain else ""
        raise UserError(f"config file not found: {path}{hint}; check the path")
    try:
        tree = read_yaml_file(path) or {}
    except UnreadableYaml as why:
        if not why.where and why.problem.startswith("not UTF-8"):
            raise UserError(f"config {path} is {why.problem}; save it as UTF-8") from None
        raise UserError(f"config {path}{why.where} is not valid YAML: {why.problem}; fix the syntax") from None
    if not isinstance(tree, dict):
        raise UserError(f"config {path} must be a mapping of sections (model:, data:, train:, run:)")
    parents = tree.pop("extends", None) or []
    merged, provenance = {}, {}
    for parent in [parents] if isinstance(parents, str) else parents:
        parent_tree, parent_provenance = read_yaml(path.parent / parent, (*chain, path))
        merged = deep_merge(merged, parent_tree)
        provenance.update(parent_provenance)
    provenance.update(_provenance(tree, str(path)))
    return deep_merge(merged, tree), provenance


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.batch_size=64` -> (["train", "batch_size"], 64); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r} is not key=value; write e.g. --set train.batch_size=64")
    stripped = raw.strip()
    try:
        value = yaml_load(stripped) if stripped else None
    except yaml.YAMLError:
        value = stripped  # "a: b: c" is no YAML value, but a fine note
    if isinstance(value, (dict, list)) and not stripped.startswith(("{", "[")):
        value = stripped  # only flow style ([1, 2], {a: 1}) makes a collection; "hello: world" stays text
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> tuple[dict, dict[str, str]]:
    provenance = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
        for depth in range(1, len(keys) + 1):
            provenance[".".join(keys[:depth])] = SET_SOURCE
    return tree, provenance


def load_config(path: str | Path | None = None, overrides: list[str] = (), tree: dict | None = None) -> Config:
    """Read a recipe (or take `tree`), apply `--set` overrides and validate everything but the model
    hyperparameters (those need the model's code: see `shared.modelzoo.resolve_hparams`)."""
    provenance: dict[str, str] = {}
    if path is not None:
        tree, provenance = read_yaml(Path(path))
    tree = dict(tree or {})
    tree, set_provenance = apply_overrides(tree, list(overrides))
    provenance.update(set_provenance)
    return dataclasses.replace(from_dict(tree, provenance),
                               source_file=str(Path(path).resolve()) if path is not None else None)


# ---------------------------------------------------------------- validation


def _where(dotted: str, provenance: dict[str, str]) -> str:
    source = provenance.get(dotted)
    while source is None and "." in dotted:
        dotted = dotted.rsplit(".", 1)[0]
        source = provenance.get(dotted)
    return f" (from {source})" if source else ""


def _closest(word: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]}?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


def _dataclass_type(annotation):
    resolved = _resolve(annotation)
    return resolved if dataclasses.is_dataclass(resolved) else None


def _resolve(annotation):
    if isinstance(annotation, str):
        return eval(annotation, globals(), vars(typing))  # annotations are strings (PEP 563)
    return annotation


def type_name(annotation) -> str:
    annotation = _resolve(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        args = typing.get_args(annotation)
        return f"list of {type_name(args[0])}" if args else "list"
    return {type(None): "null"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def matches_type(value, annotation) -> bool:
    annotation = _resolve(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, a) for a in typing.get_args(annotation))
    if origin is list or annotation is list:
        args = typing.get_args(annotation)
        return isinstance(value, list) and (not args or all(matches_type(v, args[0]) for v in value))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is dict:
        return isinstance(value, dict)
    return isinstance(value, annotation)


def _allowed(annotation) -> tuple:
    annotation = _resolve(annotation)
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)


def _ints_to_floats(value, annotation):
    """YAML reads `lr: 1` as an int; a float key stores it as 1.0 so the dumped config is typed right."""
    allowed = _allowed(annotation)
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        return float(value)
    if isinstance(value, list) and any(typing.get_origin(a) is list and typing.get_args(a) == (float,)
                                       for a in allowed):
        return [float(v) for v in value]
    return value


def _build_section(section_type, tree: dict, provenance: dict, prefix: str):
    if not isinstance(tree, dict):
        raise UserError(f"config key {prefix.rstrip('.')} must be a mapping{_where(prefix.rstrip('.'), provenance)}")
    fields = {f.name: f for f in dataclasses.fields(section_type) if not f.metadata.get("internal")}
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if key not in fields or key == "hparams":
            candidates = [f"{prefix}{k}" for k in fields if k != "hparams"]
            raise UserError(f"unknown config key {dotted}{_where(dotted, provenance)}{_closest(dotted, candidates)}")
        f = fields[key]
        sub = _dataclass_type(f.type)
        if sub:
            kwargs[key] = _build_section(sub, value or {}, provenance, dotted + ".")
            continue
        if not matches_type(value, f.type):
            raise UserError(f"config key {dotted}{_where(dotted, provenance)} must be {type_name(f.type)}, "
                            f"got {value!r}")
        value = _ints_to_floats(value, f.type)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"config key {dotted}{_where(dotted, provenance)} is {value!r}; "
                            f"choose one of {', '.join(map(str, choices))}")
        _check_value(dotted, value, provenance)
        kwargs[key] = value
    return section_type(**kwargs)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # YAML's true is an int


def _check_value(dotted: str, value, provenance: dict) -> None:
    """The one place every value is checked beyond its type: numbers against `RANGES` (finite, always),
    text for what a file name or config.yaml cannot hold; nested free-form values (tune.space,
    augment arguments, model hyperparameters) item by item."""
    where = _where(dotted, provenance)
    if _is_number(value):
        allowed = RANGES.get(dotted, ANY)
        if value not in allowed:
            raise UserError(f"config key {dotted}{where} is {value!r}; it must be {allowed}")
    elif isinstance(value, str):
        problem = _text_problem(value)
        if problem:
            raise UserError(f"config key {dotted}{where} is {value!r}, which {problem}")
    elif isinstance(value, list):
        for item in value:
            if _is_number(item) and item not in RANGES.get(dotted, ANY):
                raise UserError(f"config key {dotted}{where} is {value!r}; each item must be "
                                f"{RANGES.get(dotted, ANY)}")
            _check_value(dotted, item, provenance)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_value(f"{dotted}.{key}", item, provenance)


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes (os.fsdecode), or a \ud83d escape
        return "is not valid UTF-8 text (undecodable bytes, or half of a \\u surrogate pair); write it in UTF-8"
    return None


def from_dict(tree: dict, provenance: dict[str, str] | None = None) -> Config:
    provenance = provenance or {}
    tree = dict(tree)
    model_tree = tree.pop("model", None) or {}
    if not isinstance(model_tree, dict):
        raise UserError(f"config key model must be a mapping{_where('model', provenance)}")
    config = _build_section(Config, tree, provenance, "")
    model_tree = dict(model_tree)
    name = model_tree.pop("name", "resnet")
    path = model_tree.pop("path", None)
    # The name is a folder of the runs root (with or without model.path), so it must be a plain name.
    check_plain_name("config key model.name", name, _where("model.name", provenance))
    if path is not None and not isinstance(path, str):
        raise UserError(f"config key model.path{_where('model.path', provenance)} must be a folder path, got {path!r}")
    _check_value("model", {"name": name, "path": path, **model_tree}, provenance)
    if config.tune.study is not None:
        check_plain_name("config key tune.study", config.tune.study, _where("tune.study", provenance))
    config = dataclasses.replace(config, model=ModelConfig(name=name, path=path, hparams=model_tree),
                                 provenance=provenance)
    _check_consistency(config, provenance)
    return config


def _check_runs_root(directory: str, provenance: dict) -> None:
    """run.dir must be a folder, or creatable: found now, not after the model is built."""
    path = Path(directory)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"config key run.dir{_where('run.dir', provenance)} is {directory!r}, but {existing} is a "
                        f"file, not a folder; choose another runs root")


def _check_consistency(config: Config, provenance: dict) -> None:
    """Rules that involve more than one key."""
    data, train = config.data, config.train
    for key in ("mean", "std"):
        value = getattr(data, key)
        if value is not None and len(value) != data.channels:
            raise UserError(f"config key data.{key}{_where('data.' + key, provenance)} has {len(value)} values "
                            f"but data.channels is {data.channels}; give one per channel")
    _check_runs_root(config.run.dir, provenance)
    facts = SOURCES[data.source]
    if facts.required and not getattr(data, facts.required):
        raise UserError(f"data.source is {data.source} but data.{facts.required} is empty; {facts.required_hint}")
    if train.optimizer.clip_norm and train.optimizer.clip_global_norm:
        raise UserError("train.optimizer.clip_norm and clip_global_norm are both set; keep one")
    if config.init.mode == "finetune_all" and not (config.init.from_run or config.init.weights):
        raise UserError("init.mode is finetune_all but neither init.from_run nor init.weights is set; "
                        "name the run or weight file to start from")
    if config.init.head_epochs >= train.epochs and config.init.mode == "finetune_all":
        raise UserError(f"init.head_epochs is {config.init.head_epochs}; it must be in [0, train.epochs)")
    if config.detection.negative_iou > config.detection.positive_iou:
        raise UserError(f"detection.negative_iou {config.detection.negative_iou} is above detection.positive_iou "
                        f"{config.detection.positive_iou}; keep negative_iou <= positive_iou")
    if config.init.from_run and config.init.weights:
        raise UserError("init.from_run and init.weights are both set; start from one of them")
    if train.lr.schedule == "plateau" and train.lr.warmup_epochs:
        raise UserError("train.lr.schedule plateau does not combine with train.lr.warmup_epochs; set it to 0")
    if train.lr.schedule == "step" and not train.lr.milestones:
        raise UserError("train.lr.schedule is step but train.lr.milestones is empty; list the epochs, e.g. [30, 60]")

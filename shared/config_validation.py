"""What a config value may be beyond its schema type: every number finite and in the range `RANGES` gives its
key, text that a file name and config.yaml can hold, and the rules that involve more than one key. The checks
run when a recipe loads (`shared.config.from_dict`), before any folder exists; each failure is a UserError
naming the key, the file it came from and what to write instead."""

from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from shared.config_schema import Config, resolve_type
from shared.errors import UserError
from shared.source_facts import SOURCES


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
    "train.steps": AT_LEAST_ONE,
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
    "init.shrink": Range(0, 1, low_open=True),
    "init.perturb": NON_NEGATIVE,
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
    "tune.heartbeat_seconds": AT_LEAST_ONE,
    "loop.steps": AT_LEAST_ONE,
    "loop.passes": POSITIVE,
    "loop.tolerance": NON_NEGATIVE,
    "loop.keep": AT_LEAST_ONE,
    "loop.min_new": AT_LEAST_ONE,
    "loop.poll_seconds": POSITIVE,
    "loop.lr_scale": POSITIVE,
    "loop.oversample_new": AT_LEAST_ONE,
    "loop.shrink": Range(0, 1, low_open=True),
    "loop.perturb": NON_NEGATIVE,
    "train.lr.start_step": NON_NEGATIVE,
}


# ---------------------------------------------------------------- validation


def where_from(dotted: str, provenance: dict[str, str]) -> str:
    """` (from FILE)` for the file (or --set) that gave `dotted` or its nearest section, or nothing."""
    source = provenance.get(dotted)
    while source is None and "." in dotted:
        dotted = dotted.rsplit(".", 1)[0]
        source = provenance.get(dotted)
    return f" (from {source})" if source else ""


def closest_key(word: str, candidates: list[str]) -> str:
    """The did-you-mean end of an unknown key's message, or the valid keys when none is close."""
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]}?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


def type_name(annotation) -> str:
    annotation = resolve_type(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(annotation))
    if origin is list:
        args = typing.get_args(annotation)
        return f"list of {type_name(args[0])}" if args else "list"
    return {type(None): "null"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def matches_type(value, annotation) -> bool:
    annotation = resolve_type(annotation)
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
    annotation = resolve_type(annotation)
    return typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)


def ints_to_floats(value, annotation):
    """YAML reads `lr: 1` as an int; a float key stores it as 1.0 so the dumped config is typed right."""
    allowed = _allowed(annotation)
    if isinstance(value, int) and not isinstance(value, bool) and float in allowed and int not in allowed:
        return float(value)
    if isinstance(value, list) and any(typing.get_origin(a) is list and typing.get_args(a) == (float,)
                                       for a in allowed):
        return [float(v) for v in value]
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # YAML's true is an int


def check_value(dotted: str, value, provenance: dict) -> None:
    """The one place every value is checked beyond its type: numbers against `RANGES` (finite, always),
    text for what a file name or config.yaml cannot hold; nested free-form values (tune.space,
    augment arguments, model hyperparameters) item by item."""
    where = where_from(dotted, provenance)
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
            check_value(dotted, item, provenance)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_value(f"{dotted}.{key}", item, provenance)


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes (os.fsdecode), or a \ud83d escape
        return "is not valid UTF-8 text (undecodable bytes, or half of a \\u surrogate pair); write it in UTF-8"
    return None


def _check_runs_root(directory: str, provenance: dict) -> None:
    """run.dir must be a folder, or creatable: found now, not after the model is built."""
    path = Path(directory)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"config key run.dir{where_from('run.dir', provenance)} is {directory!r}, but {existing} is a "
                        f"file, not a folder; choose another runs root")


def check_consistency(config: Config, provenance: dict) -> None:
    """Rules that involve more than one key."""
    data, train = config.data, config.train
    for key in ("mean", "std"):
        value = getattr(data, key)
        if value is not None and len(value) != data.channels:
            raise UserError(f"config key data.{key}{where_from('data.' + key, provenance)} has {len(value)} values "
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
    if data.oversample and data.source != "tfrecord":
        raise UserError(f"data.oversample is set but data.source is {data.source}; it reads tfrecord shards more "
                        f"than once: use data.source tfrecord, or data.oversample: {{}}")
    for pattern, times in data.oversample.items():
        if not isinstance(pattern, str) or isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise UserError(f"data.oversample {{{pattern!r}: {times!r}}}: give a shard glob and a whole number of "
                            f"reads of at least 1")
    if config.init.optimizer_state and not config.init.from_run:
        raise UserError("init.optimizer_state is true but init.from_run is not set; name the run whose optimizer "
                        "state to carry, or set init.optimizer_state: false")
    if (config.init.shrink != 1.0 or config.init.perturb != 0.0) and not (config.init.from_run or config.init.weights):
        raise UserError(f"init.shrink {config.init.shrink:g} / init.perturb {config.init.perturb:g} act on loaded "
                        f"weights, but neither init.from_run nor init.weights is set; name where the weights come "
                        f"from, or leave shrink 1 and perturb 0")
    if config.init.from_run and config.init.weights:
        raise UserError("init.from_run and init.weights are both set; start from one of them")
    if train.steps is not None and train.epochs != 1:
        raise UserError(f"train.steps is {train.steps} but train.epochs is {train.epochs}; train.steps makes one "
                        f"epoch of that many steps: set train.epochs: 1, or train.steps: null")
    if train.lr.schedule == "plateau" and train.lr.warmup_epochs:
        raise UserError("train.lr.schedule plateau does not combine with train.lr.warmup_epochs; set it to 0")
    _check_data_service(data, provenance)
    if train.lr.schedule == "step" and not train.lr.milestones:
        raise UserError("train.lr.schedule is step but train.lr.milestones is empty; list the epochs, e.g. [30, 60]")


def split_address(address: str) -> tuple[str, int]:
    """(host, port) of a tf.data service HOST:PORT (a grpc:// prefix allowed); ValueError when it is not that."""
    host, _, port = address.removeprefix("grpc://").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _check_data_service(data, provenance: dict) -> None:
    """data.service: a HOST:PORT dispatcher, a mode that can share, no skipped-image log (kept in the trainer)."""
    service = data.service
    if service.dispatcher is None:
        return
    try:
        split_address(service.dispatcher)
    except ValueError:
        raise UserError(f"config key data.service.dispatcher{where_from('data.service.dispatcher', provenance)} is "
                        f"{service.dispatcher!r}; give the HOST:PORT `serve-data dispatcher` prints, e.g. "
                        f"localhost:5050") from None
    if service.share and service.mode != "parallel_epochs":
        raise UserError("data.service.share needs data.service.mode: parallel_epochs (a shared distributed_epoch "
                        "job would split each pass among its trainers)")
    if data.on_corrupt == "skip":
        raise UserError("data.on_corrupt: skip does not combine with data.service (the service's workers would "
                        "skip images the run could not name); use data.on_corrupt: error")

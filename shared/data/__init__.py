"""Datasets for a run: a source (`sources`), the shared preprocessors (`preprocess`) and the
augmentation generators (`augment`) assembled into batched, prefetched `tf.data` pipelines."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType

import tensorflow as tf

from shared.config_schema import Config, with_changes
from shared.data import augment, class_weights, formats, preprocess, sources, split
from shared.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
CACHE_BYTES = 2 * 1024**3  # preprocessed training images kept in memory up to this size


class SkipLog:
    """Which images a pipeline left out under `data.on_corrupt: skip`, each named (or counted) once however
    often it was read. Examples carry an identity (their index in the source's file list, or for encoded records
    a fingerprint of their bytes) and, after the shuffle, their position in the stream; `ignore_errors` keeps
    the order, so a position that never arrives before a later one arrives is an image that failed."""

    def __init__(self, names: list[str] | None, finite: bool = False):
        self.names = names  # identity -> file name; None: identities are fingerprints of the encoded bytes
        # a split read in whole passes (validation, test): what has not arrived when a pass ends failed too
        self._in_flight = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, default_value=-1)
        self._failed = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int32, default_value=0)
        self._last = tf.Variable(-1, dtype=tf.int64, trainable=False)
        self._arrived = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.finite = finite

    def attempt(self, position: tf.Tensor, identity: tf.Tensor) -> tf.Operation:
        """Before decoding: the position's identity, for when it does not arrive."""
        return self._in_flight.insert(tf.reshape(position, [1]), tf.reshape(identity, [1]))

    def arrived(self, position: tf.Tensor) -> tf.Operation:
        """After `ignore_errors`, in stream order: the positions skipped since the last arrival failed. A
        position at or below the last one starts a new pass (a new epoch's iterator, an evaluation again)."""
        start = tf.where(position <= self._last, tf.constant(0, tf.int64), self._last + 1)
        gap = tf.range(start, position)
        failed = tf.reshape(self._in_flight.lookup(gap), [-1])
        known = tf.boolean_mask(failed, failed >= 0)
        with tf.control_dependencies([self._failed.insert(known, tf.ones_like(known, tf.int32))]):
            done = tf.range(start, position + 1)
            with tf.control_dependencies([self._in_flight.remove(done)]):
                return tf.group(self._last.assign(position), self._arrived.assign_add(1))

    @property
    def seen(self) -> bool:
        """Whether the pipeline was read at all (a run re-tested never reads its training split)."""
        return int(self._arrived.numpy()) > 0

    def skipped(self) -> list[str]:
        """The images left out, each once: file names in the source's order, or for encoded records without
        names 'record <fingerprint>'."""
        identities = {int(i) for i in self._failed.export()[0].numpy()}
        if self.finite:  # the last images of a pass: no later arrival shows the gap
            identities |= {int(i) for i in self._in_flight.export()[1].numpy()}
        identities = sorted(identities)
        if self.names is not None:
            return [self.names[i] for i in identities]
        return [f"record {i & 0xFFFFFFFFFFFFFFFF:016x}" for i in identities]


def _identified(dataset: tf.data.Dataset, source: sources.Source, split: str) -> tf.data.Dataset:
    """(identity, image, label): the index in the source's file list of `split`, else a fingerprint of the
    encoded bytes (a record's order may change between epochs)."""
    if source.files.get(split):
        return dataset.enumerate().map(lambda index, example: (index, *example))

    def fingerprint(image, label):
        identity = tf.bitcast(tf.fingerprint(tf.reshape(image, [1]))[0], tf.int64)
        return identity, image, label
    return dataset.map(fingerprint)


def _skipping(dataset: tf.data.Dataset, fn, log: SkipLog, parallel, identified: bool = True) -> tf.data.Dataset:
    """`fn` over (image, label) pairs of `dataset`, leaving out the images it fails on, logged in `log`.
    `identified`: the elements carry their identity first (else their position is their identity)."""
    def attempt(position, example):
        identity = example[0] if identified else position
        image, label = example[1:] if identified else example
        with tf.control_dependencies([log.attempt(position, identity)]):
            return (position, *fn(tf.identity(image), label))

    def arrived(position, image, label):
        with tf.control_dependencies([log.arrived(position)]):
            return tf.identity(image), label
    return (dataset.enumerate().map(attempt, num_parallel_calls=parallel, deterministic=True)
            .ignore_errors().map(arrived))


@dataclass
class Datasets:
    train: tf.data.Dataset  # repeats forever; one epoch is `steps_per_epoch` batches
    test: tf.data.Dataset
    val: tf.data.Dataset | None
    steps_per_epoch: int
    num_train: int
    num_val: int
    num_test: int
    class_names: list[str]
    input_shape: tuple[int, int, int]
    source: sources.Source
    soft_labels: bool = False  # train and val labels are (mixed) one-hot vectors, not class indices
    # with data.on_corrupt: skip, the images each split left out ({"train", "val", "test"} -> SkipLog)
    skips: dict[str, SkipLog] | None = None
    # the config as this data resolves it (data.mean / std, data.num_classes, train.class_weight): a new frozen Config
    config: Config | None = None
    class_weights: list[float] | None = None  # train.class_weight resolved: one loss weight per class, or None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _image_fn(config: Config, source: sources.Source, augmentations: list[augment.Augmentation] | None):
    """The per-example map: decode (fused with the crop for encoded images) -> float -> augment ->
    normalize. Train and eval differ only in `augmentations`."""
    data = config.data
    augmentations = augmentations or []
    crop = augmentations[0].fn if augmentations and augmentations[0].crops_raw_image else None
    rest = augmentations[1:] if crop else augmentations
    normalize = preprocess.normalizer(data.mean, data.std, data.normalize, data.image_size)

    records = f"a record of the {data.source} data {data.path or data.name or ''}".rstrip()

    def from_encoded(encoded):
        name = encoded if source.encoding == "path" else records  # what a refusal names
        if source.encoding == "path":
            encoded = tf.io.read_file(encoded)
        if crop is not None:
            return crop.from_encoded(encoded, data.channels, data.max_pixels, name, bool(data.dct_scaling))
        view = preprocess.encoded_eval_view(data.image_size, data.crop_fraction, data.channels, data.max_pixels,
                                            bool(data.dct_scaling))
        return view(encoded, tf.convert_to_tensor(name, tf.string))

    def from_pixels(image):
        if crop is None:
            return preprocess.eval_view(image, data.image_size, data.crop_fraction, data.channels,
                                        whole=source.fixed_size)
        return crop(tf.cast(formats.to_channels(image, data.channels), tf.float32))

    def fn(image, label):
        image = from_encoded(image) if source.encoding else from_pixels(image)
        for augmentation in rest:
            image = augmentation.fn(image)
        image = tf.ensure_shape(image, (data.image_size, data.image_size, data.channels))
        return normalize(image), label
    return fn


def ends_promptly(dataset: tf.data.Dataset | None) -> tf.data.Dataset | None:
    """`dataset` without tf.data's autotuning thread, for a pipeline that `fit` iterates. With TensorFlow 2.21
    the iterator a `fit` made waits, when `fit` returns, until that thread wakes by itself, and its sleep
    doubles as the iterator lives, so a fit could end with a stall nearly as long as its training
    (`scripts/bench_fit_end.py`; docs/loop.md). Without the thread, AUTOTUNE takes TensorFlow's fixed
    defaults."""
    if dataset is None:
        return None
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def normalization_statistics(data, source: sources.Source | None = None) -> tuple[list[float], list[float]]:
    """The per-channel mean and std (0-255 scale) the pipeline normalizes with: the config's, else the
    source's fitted to the channels. Runs record them in config.yaml; for older runs (and configs not
    yet resolved) they come from the source, loaded if not given."""
    if data.mean and data.std:
        return list(data.mean), list(data.std)
    source = source or sources.load(data)
    return (list(data.mean or _fit_channels(source.mean, data.channels)),
            list(data.std or _fit_channels(source.std, data.channels)))


def _fit_channels(stats: list[float], channels: int) -> list[float]:
    if len(stats) == channels:
        return stats
    return [sum(stats) / len(stats)] * channels


def find_undecodable(source: sources.Source, max_pixels: int | None = None) -> list[str]:
    """Decode every file of an encoded source and return those that fail (run only after a failure)."""
    from shared.progress import progress_bar

    bad = []
    paths = [path for split in source.files.values() for path in split]
    for path in progress_bar(paths, desc="looking for the unreadable image", unit="file", leave=False):
        try:
            preprocess.decode(tf.io.read_file(os.fsencode(path)), 3, max_pixels)  # bytes: names need not be UTF-8
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            bad.append(path)
    return bad


SKIPPED_FILE = "skipped.txt"  # in a run folder trained with data.on_corrupt: skip: split<TAB>image per line
SHOWN_SKIPPED = 5  # names printed on screen; the file lists every one
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}


def skipped_images(skips: dict[str, SkipLog]) -> dict[str, list[str]]:
    """{split: the images it left out, each once} for the splits that were read (a re-tested run never reads
    its training split), printed once: the count and the first few names."""
    found = {part: log.skipped() for part, log in skips.items() if part == "test" or log.seen}
    for part, names in found.items():
        if names:
            more = f" and {len(names) - SHOWN_SKIPPED} more" if len(names) > SHOWN_SKIPPED else ""
            listed = f" (all in the run's {SKIPPED_FILE})" if part == "train" else ""
            print(f"skipped {len(names)} unreadable {SPLIT_WORDS[part]} image{'s' if len(names) > 1 else ''}"
                  f"{listed}: {', '.join(names[:SHOWN_SKIPPED])}{more}", flush=True)
    return found


def write_skipped(folder, skipped: dict[str, list[str]], max_pixels: int | None = None) -> None:
    """The run's skipped.txt: one `split<TAB>image<TAB>why` line per image left out (none: no file); why is
    what the formats table or the decoder says of the file now (records without a file: empty)."""
    from pathlib import Path

    from shared.durable import atomic_write

    lines = [f"{part}\t{name}\t{_why_skipped(name, max_pixels)}\n" for part, names in skipped.items() for name in names]
    if lines:  # a name need not be UTF-8: its own bytes back
        atomic_write(Path(folder) / SKIPPED_FILE, "".join(lines).encode("utf-8", "surrogateescape"))


def _why_skipped(name: str, max_pixels: int | None) -> str:
    from shared.data import formats

    if not os.path.isfile(name):
        return "" if name.startswith("record ") else "no longer there"
    try:
        with open(name, "rb") as handle:
            formats.verify(handle.read(), max_pixels)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    except formats.Refused as why:
        return str(why).replace("\t", " ")
    return "decodes now (changed since it was skipped?)"


def undecodable_files(error: BaseException, source: sources.Source, max_pixels: int | None = None) -> list[str]:
    """The files behind a pipeline's decoding error, found by decoding each again; [] when the error is not
    about files, or already names its image in one line (a refusal of `shared.data.formats`)."""
    from shared.errors import embedded_user_error

    if not isinstance(error, tf.errors.InvalidArgumentError) or source.encoding != "path" \
            or embedded_user_error(error) is not None:
        return []
    return find_undecodable(source, max_pixels)


PROBED_IMAGES = 1000  # data.on_corrupt: skip refuses a training set whose first this many images all fail


def _check_one_decodes(train: tf.data.Dataset, decode, num_train: int, where: str) -> None:
    """Under data.on_corrupt: skip, a training image that decodes, looked for among the first PROBED_IMAGES
    (the first one, for healthy data): with none, skipping would spin over the endless training stream
    without ever yielding a batch. A one-line UserError before any run folder exists."""
    probed = min(num_train, PROBED_IMAGES)
    if list(train.take(probed).map(decode).ignore_errors().take(1)):
        return
    raise UserError(f"not one of the {'first ' if probed < num_train else ''}{probed} training images of {where} "
                    f"decodes (data.on_corrupt: skip would leave every one out and train on nothing); check "
                    f"that the data are images")


def _labels_checked(dataset: tf.data.Dataset, source: sources.Source) -> tf.data.Dataset:
    """(image, label) pairs whose labels the source's `label_check` checks: after `ignore_errors`, which would
    otherwise drop an example with a wrong label as if its image were damaged (with every label wrong, the
    training data would simply run out)."""
    if source.label_check is None:
        return dataset
    return dataset.map(lambda image, label: (image, source.label_check(label)))


def make_datasets(config: Config, model_augment: ModuleType | None = None,
                  input_context: tf.distribute.InputContext | None = None, replicas: int = 1,
                  start_epoch: int = 0, recorded: split.RecordedSplit | None = None) -> Datasets:
    """The run's pipelines, batched at the global batch: train.batch_size per replica x `replicas`
    (Keras splits each batch over the replicas of a tf.distribute strategy). With an `input_context`
    (several input pipelines, one per worker) each pipeline reads its own shard of the training
    examples and batches per replica. `start_epoch` (a resumed run): the training stream starts where
    that many epochs left it, so a resumed run sees the examples in the order an uninterrupted one would.
    `recorded`: the split a run recorded (a split-less folder), read instead of splitting the folder again."""
    data, train_config = config.data, config.train
    source = sources.load(data, recorded)
    if data.num_classes is not None and data.num_classes != source.num_classes:
        raise UserError(f"data.num_classes is {data.num_classes} but the {data.source} data has "
                        f"{source.num_classes} classes; remove data.num_classes or fix it")
    # The normalization statistics and class count, resolved into a new config (Datasets.config): the
    # run's snapshot (and an export of it) then holds the exact values the model was trained with.
    mean, std = normalization_statistics(data, source)
    config = with_changes(config, {"data.mean": mean, "data.std": std, "data.num_classes": source.num_classes})
    data = config.data
    augmentations = augment.build(data.augment, data.image_size, model_augment, seed=train_config.seed)

    skipping = data.on_corrupt == "skip" and source.encoding is not None
    train, num_train, train_labels = source.train, source.num_train, source.train_labels
    if skipping:  # (identity, image, label): what a skipped image is named by (SkipLog)
        train = _identified(train, source, "train")
    if data.limit_train:
        train, num_train = train.take(data.limit_train), min(num_train, data.limit_train)
        train_labels = train_labels and train_labels[:num_train]
    if source.val is not None:  # the source's own (stratified) validation split
        val, num_val = source.val, source.num_val
    else:  # carved off the head of train
        num_val = int(num_train * data.val_fraction)
        val = train.take(num_val) if num_val else None
        train, num_train = train.skip(num_val), num_train - num_val
        train_labels = train_labels and train_labels[num_val:]
    weights = class_weights.resolve(train_config.class_weight, source.class_names, train_labels, data.source)
    if weights is not None:  # config.yaml records the weights used, class by class
        config = with_changes(config, {"train.class_weight": class_weights.as_config(weights, source.class_names)})
    test, num_test = source.test, source.num_test
    if data.limit_test:
        test, num_test = test.take(data.limit_test), min(num_test, data.limit_test)
    if num_train <= 0 or num_test <= 0:
        raise UserError(f"the {data.source} data has {num_train} training and {num_test} test examples "
                        f"after limits and val_fraction; both must be positive")

    mixers = augment.build_batch(data.batch_augment, seed=train_config.seed)
    train_fn = _image_fn(config, source, augmentations)
    eval_fn = _image_fn(config, source, None)
    batch = train_config.batch_size * replicas
    if input_context is not None and input_context.num_input_pipelines > 1:
        train = train.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
        num_train = len(range(input_context.input_pipeline_id, num_train, input_context.num_input_pipelines))
        batch = input_context.get_per_replica_batch_size(batch)
    # Deterministic: one map thread, so the stateful random ops draw in a fixed order.
    parallel = 1 if data.deterministic else AUTOTUNE
    if skipping:  # in reading order, before the shuffle fills its buffer and a resume skips its epochs
        _check_one_decodes(train.map(lambda identity, image, label: (image, label)), eval_fn, num_train,
                           data.path or data.source)
    # Decoded arrays without random augmentation: preprocess once and keep the result in memory, so an
    # epoch is only shuffle and batch (as a bare fit on arrays); with augmentation, cache the raw arrays.
    float_bytes = num_train * data.image_size ** 2 * data.channels * 4
    preprocess_once = not source.encoding and not augmentations and float_bytes <= CACHE_BYTES
    if preprocess_once:
        train = train.map(train_fn, num_parallel_calls=parallel, deterministic=True).cache()
    elif not source.encoding and num_train <= 200_000:
        train = train.cache()  # decoded arrays: keep them in memory across epochs
    steps = math.ceil(num_train / batch)
    if train_config.steps_per_epoch:
        steps = min(steps, train_config.steps_per_epoch)
    train = train.shuffle(min(data.shuffle_buffer, num_train), seed=train_config.seed,
                          reshuffle_each_iteration=True).repeat()
    # skipped before decoding and augmenting: only the shuffle runs over them (on tf.data service workers the
    # order is theirs anyway, and each would skip as much of the stream: a resumed run starts a new pass there)
    if start_epoch and not data.service.dispatcher:
        train = train.skip(start_epoch * steps * batch)
    names = {split: source.files.get(split) for split in ("train", "val", "test")}
    skips = {"train": SkipLog(names["train"]), "test": SkipLog(names["test"], finite=True),
             "val": SkipLog(names["val"] if source.val is not None else names["train"], finite=True)} \
        if skipping else None
    if skipping:  # drop the images that fail to decode, each named once in skips["train"]
        train = _labels_checked(_skipping(train, train_fn, skips["train"], parallel), source)
    elif not preprocess_once:
        train = train.map(train_fn, num_parallel_calls=parallel, deterministic=True)
    train = train.batch(batch, drop_remainder=False)
    num_classes = source.num_classes

    def one_hot(images, labels):
        return images, tf.one_hot(labels, num_classes)

    if mixers:  # whole-batch work after batching: one vectorized call per batch
        train = train.map(one_hot)
        for mix in mixers:
            train = train.map(mix, num_parallel_calls=parallel, deterministic=True)
    train = train.prefetch(AUTOTUNE)

    def evaluation(dataset, split: str, soft: bool = False):
        if skipping:  # in order: an image's position is its identity, but for validation carved off train
            identified = split == "val" and source.val is None
            dataset = _labels_checked(_skipping(dataset, eval_fn, skips[split], AUTOTUNE, identified), source)
        else:
            dataset = dataset.map(eval_fn, num_parallel_calls=AUTOTUNE)
        dataset = dataset.batch(batch)
        return (dataset.map(one_hot) if soft else dataset).prefetch(AUTOTUNE)

    return Datasets(
        train=train, test=evaluation(test, "test"),
        val=evaluation(val, "val", soft=bool(mixers)) if val is not None else None,
        steps_per_epoch=steps, num_train=num_train, num_val=num_val, num_test=num_test,
        class_names=source.class_names, input_shape=(data.image_size, data.image_size, data.channels),
        source=source, soft_labels=bool(mixers), skips=skips, config=config, class_weights=weights,
    )

"""Datasets for a run: a source (`sources`), the shared preprocessors (`preprocess`) and the
augmentation generators (`augment`) assembled into batched, prefetched `tf.data` pipelines."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType

import tensorflow as tf

from shared.config import Config, with_changes
from shared.data import augment, class_weights, preprocess, sources, split
from shared.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
CACHE_BYTES = 2 * 1024**3  # preprocessed training images kept in memory up to this size


class SkipCounter:
    """Counts the encoded images the training pipeline could not decode and skipped
    (`data.on_corrupt: skip`): examples are numbered before decoding, so the gaps after
    `ignore_errors` are the skipped ones."""

    def __init__(self):
        self.passed = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.last = tf.Variable(-1, dtype=tf.int64, trainable=False)

    def record(self, index, image, label):
        with tf.control_dependencies([self.passed.assign_add(1), self.last.assign(tf.maximum(self.last, index))]):
            return tf.identity(image), label

    @property
    def skipped(self) -> int:
        return int(self.last.numpy()) + 1 - int(self.passed.numpy())


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
    skips: SkipCounter | None = None  # with data.on_corrupt: skip, how many training images were skipped
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

    def from_encoded(encoded):
        if source.encoding == "path":
            encoded = tf.io.read_file(encoded)
        if crop is not None:
            return crop.from_encoded(encoded, data.channels)
        return preprocess.eval_view(encoded, data.image_size, data.crop_fraction, data.channels, whole=False)

    def from_pixels(image):
        if crop is None:
            return preprocess.eval_view(image, data.image_size, data.crop_fraction, data.channels,
                                        whole=source.fixed_size)
        return crop(tf.cast(preprocess.match_channels(image, data.channels), tf.float32))

    def fn(image, label):
        image = from_encoded(image) if source.encoding else from_pixels(image)
        for augmentation in rest:
            image = augmentation.fn(image)
        image = tf.ensure_shape(image, (data.image_size, data.image_size, data.channels))
        return normalize(image), label
    return fn


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


def find_undecodable(source: sources.Source) -> list[str]:
    """Decode every file of an encoded source and return those that fail (run only after a failure)."""
    from shared.progress import progress_bar

    bad = []
    paths = [path for split in source.files.values() for path in split]
    for path in progress_bar(paths, desc="looking for the unreadable image", unit="file", leave=False):
        try:
            preprocess.decode(tf.io.read_file(os.fsencode(path)), 3)  # bytes: names need not be UTF-8
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            bad.append(path)
    return bad


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

    train, num_train, train_labels = source.train, source.num_train, source.train_labels
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
    skipping = data.on_corrupt == "skip" and source.encoding is not None
    if skipping:  # in reading order, before the shuffle fills its buffer and a resume skips its epochs
        _check_one_decodes(train, eval_fn, num_train, data.path or data.source)
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
    if start_epoch:  # skipped before decoding and augmenting: only the shuffle runs over them
        train = train.skip(start_epoch * steps * batch)
    skips = SkipCounter() if skipping else None
    if skipping:  # number the examples, drop those that fail to decode, count the gaps
        train = (train.enumerate()
                 .map(lambda index, example: (index, *train_fn(*example)), num_parallel_calls=parallel)
                 .ignore_errors()
                 .map(skips.record))
        train = _labels_checked(train, source)
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

    def evaluation(dataset, soft: bool = False):
        dataset = dataset.map(eval_fn, num_parallel_calls=AUTOTUNE)
        if skipping:
            dataset = _labels_checked(dataset.ignore_errors(), source)  # the count falls short by the skipped
        dataset = dataset.batch(batch)
        return (dataset.map(one_hot) if soft else dataset).prefetch(AUTOTUNE)

    return Datasets(
        train=train, test=evaluation(test), val=evaluation(val, soft=bool(mixers)) if val is not None else None,
        steps_per_epoch=steps, num_train=num_train, num_val=num_val, num_test=num_test,
        class_names=source.class_names, input_shape=(data.image_size, data.image_size, data.channels),
        source=source, soft_labels=bool(mixers), skips=skips, config=config, class_weights=weights,
    )

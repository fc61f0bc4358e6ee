"""Datasets for a run: a source (`sources`), the shared preprocessors (`preprocess`) and the
augmentation generators (`augment`) assembled into batched, prefetched `tf.data` pipelines."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import tensorflow as tf

from shared.config import Config
from shared.data import augment, preprocess, sources
from shared.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE


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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _image_fn(config: Config, source: sources.Source, augmentations: list[augment.Augmentation] | None):
    """The per-example map: decode -> channels -> float -> (augment | resize) -> normalize."""
    data = config.data
    mean = data.mean or _fit_channels(source.mean, data.channels)
    std = data.std or _fit_channels(source.std, data.channels)
    augmentations = augmentations or []
    crops_raw = bool(augmentations) and augmentations[0].crops_raw_image

    def fn(image, label):
        if source.encoded:
            image = preprocess.decode(image, data.channels)
        image = tf.cast(preprocess.match_channels(image, data.channels), tf.float32)
        if not crops_raw:
            image = (preprocess.resize(image, data.image_size) if source.fixed_size else
                     preprocess.resize_and_center_crop(image, data.image_size, data.crop_fraction))
        for augmentation in augmentations:
            image = augmentation.fn(image)
        image = tf.ensure_shape(image, (data.image_size, data.image_size, data.channels))
        return preprocess.normalize(image, mean, std, data.normalize), label
    return fn


def _fit_channels(stats: list[float], channels: int) -> list[float]:
    if len(stats) == channels:
        return stats
    return [sum(stats) / len(stats)] * channels


def find_undecodable(source: sources.Source) -> list[str]:
    """Decode every file of an encoded source and return those that fail (run only after a failure)."""
    from tqdm import tqdm

    bad = []
    paths = [path for split in source.files.values() for path in split]
    for path in tqdm(paths, desc="looking for the unreadable image", unit="file", leave=False):
        try:
            tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            bad.append(path)
    return bad


def make_datasets(config: Config, model_augment: ModuleType | None = None) -> Datasets:
    data, train_config = config.data, config.train
    source = sources.load(data)
    if data.num_classes is not None and data.num_classes != source.num_classes:
        raise UserError(f"data.num_classes is {data.num_classes} but the {data.source} data has "
                        f"{source.num_classes} classes; remove data.num_classes or fix it")
    augmentations = augment.build(data.augment, data.image_size, model_augment, seed=train_config.seed)

    train, num_train = source.train, source.num_train
    if data.limit_train:
        train, num_train = train.take(data.limit_train), min(num_train, data.limit_train)
    num_val = int(num_train * data.val_fraction)
    val = train.take(num_val) if num_val else None
    train, num_train = train.skip(num_val), num_train - num_val
    test, num_test = source.test, source.num_test
    if data.limit_test:
        test, num_test = test.take(data.limit_test), min(num_test, data.limit_test)
    if num_train <= 0 or num_test <= 0:
        raise UserError(f"the {data.source} data has {num_train} training and {num_test} test examples "
                        f"after limits and val_fraction; both must be positive")

    train_fn = _image_fn(config, source, augmentations)
    eval_fn = _image_fn(config, source, None)
    batch = train_config.batch_size
    if not source.encoded and num_train <= 200_000:
        train = train.cache()  # decoded arrays: keep them in memory across epochs
    train = (train.shuffle(min(data.shuffle_buffer, num_train), seed=train_config.seed,
                           reshuffle_each_iteration=True)
             .repeat()
             .map(train_fn, num_parallel_calls=AUTOTUNE)
             .batch(batch, drop_remainder=False)
             .prefetch(AUTOTUNE))

    def evaluation(dataset):
        return dataset.map(eval_fn, num_parallel_calls=AUTOTUNE).batch(batch).prefetch(AUTOTUNE)

    steps = math.ceil(num_train / batch)
    if train_config.steps_per_epoch:
        steps = min(steps, train_config.steps_per_epoch)
    return Datasets(
        train=train, test=evaluation(test), val=evaluation(val) if val is not None else None,
        steps_per_epoch=steps, num_train=num_train, num_val=num_val, num_test=num_test,
        class_names=source.class_names, input_shape=(data.image_size, data.image_size, data.channels),
        source=source,
    )

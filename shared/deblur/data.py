"""(blurred, sharp) pairs for a deblurring run: any classification source through the classification
pipeline (`shared.data.make_datasets`: decode, augment, normalize, batch), each batch mapped back to 0-255
pixels, degraded by `deblur.blur` (shared.data.blur) and normalized again."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import tensorflow as tf

from shared.config_schema import Config
from shared.data import Datasets, blur, make_datasets, normalization_statistics

# Batch numbers the stateless blur draws are keyed by: training batches count from 0 (on from where a
# resumed run starts), the held-out splits from far above, so they never share a training batch's draws.
TEST_OFFSET = 2**40
VAL_OFFSET = 2**41


@dataclass
class DeblurData:
    train: tf.data.Dataset  # (blurred, sharp), repeating
    val: tf.data.Dataset | None  # (blurred, sharp)
    test: tf.data.Dataset  # (blurred, sharp, labels): the same blur on every pass
    datasets: Datasets  # the classification pipelines underneath (class names, counts, source)


def pixel_mapping(config: Config) -> tuple:
    """(to_pixels, from_pixels): normalized images <-> 0-255 pixels, as config.data normalizes."""
    data = config.data
    if not data.normalize:
        return (lambda images: images * 255.0), (lambda pixels: pixels / 255.0)
    mean, std = normalization_statistics(data)
    mean, std = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
    return (lambda images: images * std + mean), (lambda pixels: (pixels - mean) / std)


def degradation(config: Config):
    """A function (normalized images, batch index) -> normalized blurred images, clipped to the pixel range."""
    degrade = blur.build(config.deblur.blur, config.data.image_size, seed=config.train.seed)
    to_pixels, from_pixels = pixel_mapping(config)
    return lambda images, index: from_pixels(degrade(tf.clip_by_value(to_pixels(images), 0.0, 255.0), index))


def pairs(dataset: tf.data.Dataset, config: Config, first_index: int = 0, keep_labels: bool = False) -> tf.data.Dataset:
    """Batches (images, labels) -> (blurred, sharp[, labels]); batch i is blurred with the draws of
    batch number first_index + i."""
    degrade = degradation(config)
    to_pixels, from_pixels = pixel_mapping(config)

    def pair(index, batch):
        images, labels = batch
        sharp = from_pixels(tf.clip_by_value(to_pixels(images), 0.0, 255.0))  # the target is a real image
        blurred = degrade(images, index)
        return (blurred, sharp, labels) if keep_labels else (blurred, sharp)

    return dataset.enumerate(start=first_index).map(pair, num_parallel_calls=tf.data.AUTOTUNE) \
        .prefetch(tf.data.AUTOTUNE)


def make_pairs(config: Config, model_augment: ModuleType | None = None, replicas: int = 1,
               start_epoch: int = 0) -> DeblurData:
    """The run's pair pipelines, on the config as make_datasets resolves it (datasets.config: data.mean /
    std, data.num_classes). `data.batch_augment` (MixUp, CutMix) mixes images and is refused by the task."""
    datasets = make_datasets(config, model_augment, replicas=replicas, start_epoch=start_epoch)
    config = datasets.config
    train = pairs(datasets.train, config, first_index=start_epoch * datasets.steps_per_epoch)
    val = pairs(datasets.val, config, VAL_OFFSET) if datasets.val is not None else None
    test = pairs(datasets.test, config, TEST_OFFSET, keep_labels=True)
    return DeblurData(train=train, val=val, test=test, datasets=datasets)

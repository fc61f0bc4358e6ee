"""Detection data from the config: the annotations `config.detection` names read into the common form
(`load_detection_data`: COCO `shared.detection.coco`, Pascal VOC `shared.detection.voc`, TFRecords
`shared.detection.tfod`), and the `tf.data` pipeline that feeds a detector.

The pipeline (`make_dataset`) yields batches `(images, {"boxes", "classes"})`:
  images  float32 [B, S, S, C]: resized to S x S (plain resize, no aspect-preserving letterbox), normalized
          (x - mean) / std on the 0-255 scale; mean = std = 127.5 per channel (pixels in [-1, 1]) unless
          data.mean / data.std are set; data.normalize: false gives x / 255. The detection task writes the
          statistics used into the run's config (data.mean / std), as for classification.
  boxes   float32 [B, max_boxes, 4]: absolute xyxy in the resized S x S image, rows padded with -1.
  classes int32 [B, max_boxes]: 0-based, padded with -1; valid rows come first.
Training augmentation is `shared.detection.augment`: SSD's crop and zoom out per image, Keras' box-aware
layers (RandomFlip, RandomZoom, RandomTranslation with `bounding_box_format="xyxy"`, RandomColorJitter) on
whole batches; boxes that leave the image or shrink below `MIN_BOX_SIDE`
pixels are dropped (set to padding). Keras 3.15's RandomCrop is NOT used: it shifts boxes by the vertical
offset horizontally and vice versa (its transform_bounding_boxes subtracts h_start from x), so its boxes do not
match its crops, and on a batch it crops every image at the same place.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf

from shared.config_schema import Config
from shared.data import checks
from shared.detection import augment as detection_augment
from shared.detection.coco import read_coco
from shared.detection.label_map import read_class_list
from shared.detection.records import DetectionSplit
from shared.detection.tfod import read_tfod_records
from shared.detection.voc import read_voc, voc_class_names
from shared.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE

DEFAULT_MEAN = 127.5  # per channel, on the 0-255 scale: (x - 127.5) / 127.5 puts pixels in [-1, 1]
DEFAULT_STD = 127.5
MIN_BOX_SIDE = 2.0  # pixels: boxes narrower or lower than this after augmentation are dropped
DEFAULT_AUGMENT = ("flip", "zoom", "translate")
CACHE_BYTES = 1 << 30  # decoded, resized splits up to this size stay in memory across epochs


# ---------------------------------------------------------------- from the config


def load_detection_data(config: Config) -> tuple[DetectionSplit, DetectionSplit | None, list[str]]:
    """(train split, test split or None, class names) as `config.detection` describes them:
    - coco: train_annotations / test_annotations are the JSON files, data.path the folder their file_names
      are relative to;
    - voc: data.path is the VOC root, train_annotations / test_annotations image-set names (or list files;
      train None: every XML), detection.label_map an optional label list fixing the class order;
    - tfrecord: train_annotations / test_annotations are file globs, detection.label_map the label_map.pbtxt
      (default: label_map.pbtxt beside the first file).
    test_annotations None: no test split (None). data.limit_train / limit_test keep the first N images."""
    detection, data = config.detection, config.data
    root = os.path.expanduser(data.path) if data.path else None
    fmt = detection.format
    if fmt == "coco":
        if not detection.train_annotations:
            raise UserError("detection.format is coco but detection.train_annotations is empty; set it to the "
                            "training JSON (e.g. annotations/instances_train2017.json)")
        if not root:
            raise UserError("detection.format is coco but data.path is empty; set it to the folder the JSON's "
                            "file_name entries are relative to")
        train = read_coco(detection.train_annotations, root)
        test = read_coco(detection.test_annotations, root) if detection.test_annotations else None
    elif fmt == "voc":
        if not root:
            raise UserError("detection.format is voc but data.path is empty; set it to the VOC root "
                            "(the folder holding Annotations/ and JPEGImages/)")
        sets = [detection.train_annotations] + ([detection.test_annotations] if detection.test_annotations else [])
        names = read_class_list(detection.label_map) if detection.label_map else voc_class_names(root, sets)
        train = read_voc(root, detection.train_annotations, names)
        test = read_voc(root, detection.test_annotations, names) if detection.test_annotations else None
    elif fmt == "tfrecord":
        if not detection.train_annotations:
            raise UserError("detection.format is tfrecord but detection.train_annotations is empty; set it to a "
                            "file glob such as data/train-*.tfrecord")
        train = read_tfod_records(os.path.expanduser(detection.train_annotations), detection.label_map)
        test = (read_tfod_records(os.path.expanduser(detection.test_annotations), detection.label_map)
                if detection.test_annotations else None)
    else:
        raise UserError(f"detection.format {fmt!r} is unknown; choose coco, voc or tfrecord")
    if test is not None and test.class_names != train.class_names:
        raise UserError(f"the test annotations {test.source} have other classes than the training ones "
                        f"{train.source} ({len(test.class_names)} vs {len(train.class_names)}: "
                        f"{', '.join(test.class_names[:5])} ...); use files with the same categories")
    train = train.limit(data.limit_train)
    test = test.limit(data.limit_test) if test is not None else None
    return train, test, train.class_names


# ---------------------------------------------------------------- the tf.data pipeline


def detection_normalization(config: Config) -> tuple[list[float], list[float]]:
    """The (mean, std) per channel on the 0-255 scale that `make_dataset` uses: data.mean / data.std when
    set, else DEFAULT_MEAN / DEFAULT_STD (127.5: pixels in [-1, 1])."""
    channels = config.data.channels
    return (list(config.data.mean or [DEFAULT_MEAN] * channels),
            list(config.data.std or [DEFAULT_STD] * channels))


def _padded_arrays(split: DetectionSplit, max_boxes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Boxes [N, max_boxes, 4] and classes [N, max_boxes] padded with -1, and how many images lost boxes."""
    boxes = np.full((len(split), max_boxes, 4), -1.0, np.float32)
    classes = np.full((len(split), max_boxes), -1, np.int32)
    truncated = 0
    for i, record in enumerate(split.records):
        count = min(len(record.classes), max_boxes)
        truncated += len(record.classes) > max_boxes
        boxes[i, :count] = record.boxes[:count]
        classes[i, :count] = record.classes[:count]
    return boxes, classes, truncated


def drop_invalid_boxes(boxes: tf.Tensor, classes: tf.Tensor, image_size: int,
                       min_side: float = MIN_BOX_SIDE) -> tuple[tf.Tensor, tf.Tensor]:
    """Clip boxes [..., M, 4] to the image, turn those that are padding (class < 0), empty, or narrower /
    lower than `min_side` into padding (-1), and move the valid ones to the front (stable order)."""
    boxes = tf.clip_by_value(boxes, 0.0, float(image_size))
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    valid = (classes >= 0) & (width > 0) & (height > 0) & (width >= min_side) & (height >= min_side)
    boxes = tf.where(valid[..., None], boxes, -1.0)
    classes = tf.where(valid, classes, -1)
    order = tf.argsort(tf.cast(~valid, tf.int32), axis=-1, stable=True)
    batch_dims = len(classes.shape) - 1
    return (tf.gather(boxes, order, axis=-2, batch_dims=batch_dims),
            tf.gather(classes, order, axis=-1, batch_dims=batch_dims))


def _name_failed_images(loaded: tf.data.Dataset, names: list[str], image_shape: tuple, max_boxes: int
                        ) -> tf.data.Dataset:
    """`loaded` yields (index, pixels, boxes, classes) in index order; an image whose loading fails (a corrupt
    or truncated file TF cannot decode) would stop the pipeline with TF's message, which names no file. Here
    failed images are dropped, and the gap in the indices fails the pipeline with a one-line message naming
    the first of them (`shared.data.checks`). A sentinel after the last image shows a gap at the end."""
    count, names = len(names), tf.constant(names, tf.string)
    sentinel = tf.data.Dataset.from_tensors((tf.constant(count, tf.int64), tf.zeros(image_shape, tf.float32),
                                             tf.fill([max_boxes, 4], -1.0), tf.fill([max_boxes], -1)))

    def expect(next_index, element):
        index = element[0]
        check = checks.check(tf.equal(index, next_index), "detection image ",
                             tf.gather(names, tf.minimum(next_index, count - 1)),
                             " cannot be read or decoded (a corrupt or truncated file?), or its size is not the "
                             "annotation's; replace it or remove it from the annotations")
        with tf.control_dependencies([check]):
            return index + 1, (tf.identity(index), *element[1:])

    return (loaded.ignore_errors().concatenate(sentinel)
            .scan(tf.constant(0, tf.int64), expect)
            .filter(lambda index, *rest: index < count)
            .map(lambda index, *rest: tuple(rest)))


def make_dataset(split: DetectionSplit, config: Config, training: bool, augment: Sequence | None = None,
                 repeat: bool = False, batch_size: int | None = None) -> tf.data.Dataset:
    """Batches `(images float32 [B, S, S, C], {"boxes": float32 [B, M, 4], "classes": int32 [B, M]})` with
    S = data.image_size, C = data.channels, M = detection.max_boxes, B = train.batch_size (or `batch_size`;
    the last batch may be smaller). Boxes are absolute xyxy in the resized S x S image; padding is -1.

    training: shuffle (buffer data.shuffle_buffer, seed train.seed, a new order each pass) and augment with
    `augment` (data.augment entries of shared.detection.augment; None: DEFAULT_AUGMENT; () none);
    evaluation keeps the file order.
    One pass is one epoch unless `repeat`. data.deterministic: one thread for the random maps, so the same
    seed gives the same batches. Images with more than M boxes keep their first M (a warning says how many).
    An image that does not decode (or not to its annotated size) stops the pipeline when it is reached, with
    one line naming it (an InvalidArgumentError whose message `run_cli` prints alone).
    Normalizes with data.mean / data.std, or the defaults when unset (see `detection_normalization`)."""
    from shared.data import preprocess

    if not len(split):
        raise UserError(f"the detection split {split.source} is empty; check the annotations and data.limit_*")
    data, train_config = config.data, config.train
    size, channels, max_boxes = data.image_size, data.channels, config.detection.max_boxes
    batch = batch_size or train_config.batch_size
    mean, std = detection_normalization(config)  # the detection task records them in the run's config
    normalize = preprocess.normalizer(mean, std, data.normalize, size)
    parallel = 1 if data.deterministic else AUTOTUNE

    boxes, classes, truncated = _padded_arrays(split, max_boxes)
    if truncated:
        warnings.warn(f"{truncated} image(s) of {split.source} have more than detection.max_boxes={max_boxes} "
                      f"boxes; only the first {max_boxes} are kept (raise detection.max_boxes to keep all)",
                      stacklevel=2)
    by_path = isinstance(split.records[0].image, str)
    if any(isinstance(record.image, str) != by_path for record in split.records):
        raise ValueError("a split must hold either image paths or encoded images, not both")
    images = [record.image for record in split.records]
    sizes = np.array([[record.height, record.width] for record in split.records], np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((tf.constant(images, tf.string), sizes, boxes, classes))

    def load(image, hw, boxes, classes):
        encoded = tf.io.read_file(image) if by_path else image
        pixels = preprocess.decode(encoded, channels, data.max_pixels, image if by_path else "an image of the records")
        same_size = tf.debugging.assert_equal(tf.shape(pixels)[:2], hw)  # the readers checked the header
        with tf.control_dependencies([same_size]):
            pixels = tf.image.resize(tf.cast(pixels, tf.float32), [size, size])
        hw = tf.cast(hw, tf.float32)
        scale = tf.stack([size / hw[1], size / hw[0], size / hw[1], size / hw[0]])
        boxes = tf.where(classes[:, None] >= 0, boxes * scale, -1.0)
        return pixels, boxes, classes

    dataset = _name_failed_images(dataset.enumerate().map(lambda index, example: (index, *load(*example)),
                                                          num_parallel_calls=AUTOTUNE, deterministic=True),
                                  [record.image if by_path else record.name for record in split.records],
                                  (size, size, channels), max_boxes)
    if len(split) * size * size * channels * 4 <= CACHE_BYTES:
        dataset = dataset.cache()  # decode and resize once; augmentation runs after the cache
    if training:
        dataset = dataset.shuffle(min(data.shuffle_buffer, len(split)), seed=train_config.seed,
                                  reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    entries = list(DEFAULT_AUGMENT if augment is None else augment) if training else []
    augmenter = detection_augment.build(entries, channels, mean, train_config.seed)
    if augmenter.per_image:  # stateless draws from a seed per image: the same train.seed, the same crops
        dataset = tf.data.Dataset.zip(dataset, detection_augment.seeds(train_config.seed)).map(
            lambda example, seed: augmenter.apply_per_image(*example, seed), num_parallel_calls=parallel,
            deterministic=True)
    dataset = dataset.batch(batch, drop_remainder=False)  # every example already padded to M boxes

    def finish(images, boxes, classes):
        if augmenter.per_batch:
            images, boxes, classes = augmenter.apply_per_batch(images, boxes, classes)
        # Training drops slivers an augmentation left at the border; evaluation keeps every non-empty box.
        boxes, classes = drop_invalid_boxes(boxes, classes, size, MIN_BOX_SIDE if training else 0.0)
        images = tf.ensure_shape(normalize(images), (None, size, size, channels))
        return images, {"boxes": tf.ensure_shape(boxes, (None, max_boxes, 4)),
                        "classes": tf.ensure_shape(classes, (None, max_boxes))}

    # Whole batches through the Keras layers: one vectorized call per batch, per-image random draws.
    dataset = dataset.map(finish, num_parallel_calls=parallel if entries else AUTOTUNE, deterministic=True)
    return dataset.prefetch(AUTOTUNE)


def steps_per_epoch(split: DetectionSplit, config: Config) -> int:
    """Batches in one pass over `split` (the last one may be partial), capped by train.steps_per_epoch."""
    steps = -(-len(split) // config.train.batch_size)
    return min(steps, config.train.steps_per_epoch) if config.train.steps_per_epoch else steps

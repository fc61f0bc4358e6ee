"""Box-aware detection augmentation, by name in `data.augment` (task: detection).

The grammar is classification's (`shared.data.augment.parse_entry`): a name, or `{name: {argument: value}}`.
Per image, before batching, in the order listed (they must come before the batch ones):
- `ssd_crop` {min_object_covered, area, aspect_ratio, max_attempts}: SSD's random crop (Liu et al. 2016) as
  the Object Detection API's `ssd_random_crop` samples it, with `tf.image.stateless_sample_distorted_bounding_box`:
  one of `min_object_covered` is drawn (0.0: any patch), then a patch of `area` (fraction of the image) and
  `aspect_ratio` that covers at least that fraction of some box (the API's criterion: the covered fraction of
  the box's area, not the box/patch IoU). Boxes whose centres leave the patch are dropped, the others clipped
  to it; the patch is resized back to the image size.
- `expand` {max_ratio}: SSD's zoom out: the image is placed at a random place on a canvas up to `max_ratio`
  times its side, filled with the normalization mean (data.mean: 0 after normalization), and the canvas is
  resized back to the image size.
Per batch, after batching (Keras' box-aware layers):
- `flip`, `zoom`, `translate`: RandomFlip, RandomZoom, RandomTranslation with `bounding_box_format="xyxy"`.
- `color_jitter` {brightness, contrast, saturation, hue}: keras.layers.RandomColorJitter (the factors are its
  `*_factor` arguments; saturation and hue need 3 channels). Boxes are unchanged.
Boxes are absolute xyxy pixels, padding -1; the pipeline then drops boxes below MIN_BOX_SIDE. Random draws
come from a per-image seed (`tf.data.Dataset.random(seed=train.seed)`) and stateless ops: the same seed gives
the same crops.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import keras
import tensorflow as tf

from shared.data.augment import call_with_checked_args, parse_entry
from shared.errors import UserError

ZOOM_FACTOR = 0.2       # RandomZoom: up to 20 % in or out
TRANSLATE_FACTOR = 0.1  # RandomTranslation: up to 10 % of the side each way


def crop_to_window(image: tf.Tensor, boxes: tf.Tensor, classes: tf.Tensor, window: Sequence) -> tuple:
    """Cut `window` (top, left, height, width in pixels) out of `image` [S, S, C] and resize it back to S x S.
    Boxes [M, 4] whose centres are outside the window become padding; the others are clipped to it and scaled."""
    size = tf.shape(image)[0]
    top, left, height, width = (tf.cast(value, tf.int32) for value in window)
    cropped = tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, -1]))
    resized = tf.image.resize(cropped, tf.stack([size, size]))
    top, left, height, width = (tf.cast(value, tf.float32) for value in (top, left, height, width))
    centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    keep = ((classes >= 0) & (centre_x > left) & (centre_x < left + width)
            & (centre_y > top) & (centre_y < top + height))
    shifted = boxes - tf.stack([left, top, left, top])
    clipped = keras.utils.bounding_boxes.clip_to_image_size(
        {"boxes": shifted, "labels": classes}, bounding_box_format="xyxy", height=height, width=width)["boxes"]
    scale = tf.cast(size, tf.float32) / tf.stack([width, height, width, height])
    return resized, tf.where(keep[:, None], clipped * scale, -1.0), tf.where(keep, classes, -1)


def place_on_canvas(image: tf.Tensor, boxes: tf.Tensor, classes: tf.Tensor, small: tf.Tensor, top: tf.Tensor,
                    left: tf.Tensor, fill: Sequence[float]) -> tuple:
    """Zoom out: `image` [S, S, C] shrunk to `small` x `small` and placed at (top, left) on an S x S canvas of
    `fill` per channel (the same as placing it on a canvas S / small times larger and resizing that to S)."""
    size = tf.shape(image)[0]
    fill = tf.constant(fill, tf.float32)
    shrunk = tf.image.resize(image, tf.stack([small, small])) - fill
    canvas = tf.image.pad_to_bounding_box(shrunk, top, left, size, size) + fill
    scale = tf.cast(small, tf.float32) / tf.cast(size, tf.float32)
    offset = tf.cast(tf.stack([left, top, left, top]), tf.float32)
    return canvas, tf.where(classes[:, None] >= 0, boxes * scale + offset, -1.0), classes


@dataclass
class SSDCrop:
    min_object_covered: tuple
    area: tuple
    aspect_ratio: tuple
    max_attempts: int

    def window(self, image: tf.Tensor, boxes: tf.Tensor, classes: tf.Tensor, seed: tf.Tensor) -> tuple:
        """The sampled patch (top, left, height, width) for this image's valid boxes."""
        choice_seed, box_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        covered = tf.constant(self.min_object_covered, tf.float32)
        index = tf.random.stateless_uniform([], choice_seed, 0, len(self.min_object_covered), tf.int32)
        shape = tf.shape(image)
        valid = tf.boolean_mask(boxes, classes >= 0)
        relative = keras.utils.bounding_boxes.convert_format(valid, source="xyxy", target="rel_yxyx",
                                                             height=shape[0], width=shape[1])
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape, relative[None], seed=box_seed, min_object_covered=covered[index],
            aspect_ratio_range=self.aspect_ratio, area_range=self.area, max_attempts=self.max_attempts,
            use_image_if_no_bounding_boxes=True)
        return begin[0], begin[1], size[0], size[1]

    def __call__(self, image, boxes, classes, seed):
        return crop_to_window(image, boxes, classes, self.window(image, boxes, classes, seed))


def ssd_crop(min_object_covered: Sequence[float] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0),
             area: Sequence[float] = (0.1, 1.0), aspect_ratio: Sequence[float] = (0.5, 2.0),
             max_attempts: int = 50) -> SSDCrop:
    """SSD's random crop with the Object Detection API's defaults (ssd_random_crop)."""
    covered = [min_object_covered] if isinstance(min_object_covered, (int, float)) else list(min_object_covered)
    if not covered or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in covered):
        raise ValueError(f"min_object_covered must be a list of fractions in [0, 1], got {min_object_covered!r}")
    if len(area) != 2 or not 0 < area[0] <= area[1] <= 1:
        raise ValueError(f"area must be [low, high] with 0 < low <= high <= 1, got {area!r}")
    if len(aspect_ratio) != 2 or not 0 < aspect_ratio[0] <= aspect_ratio[1]:
        raise ValueError(f"aspect_ratio must be [low, high] with 0 < low <= high, got {aspect_ratio!r}")
    if not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be a positive integer, got {max_attempts!r}")
    return SSDCrop(tuple(float(c) for c in covered), tuple(map(float, area)), tuple(map(float, aspect_ratio)),
                   max_attempts)


@dataclass
class Expand:
    max_ratio: float
    fill: tuple

    def __call__(self, image, boxes, classes, seed):
        ratio_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        size = tf.shape(image)[0]
        ratio = tf.random.stateless_uniform([], ratio_seed, 1.0, self.max_ratio)
        small = tf.maximum(1, tf.cast(tf.round(tf.cast(size, tf.float32) / ratio), tf.int32))
        top = tf.random.stateless_uniform([], top_seed, 0, size - small + 1, tf.int32)
        left = tf.random.stateless_uniform([], left_seed, 0, size - small + 1, tf.int32)
        return place_on_canvas(image, boxes, classes, small, top, left, self.fill)


def expand(fill: Sequence[float], max_ratio: float = 4.0) -> Expand:
    """SSD's zoom out by up to `max_ratio`, on a canvas of the normalization mean."""
    if not isinstance(max_ratio, (int, float)) or max_ratio <= 1:
        raise ValueError(f"max_ratio must be a number above 1, got {max_ratio!r}")
    return Expand(float(max_ratio), tuple(fill))


def color_jitter(channels: int, brightness: float | Sequence | None = 0.125, contrast: float | Sequence | None = 0.5,
                 saturation: float | Sequence | None = None, hue: float | Sequence | None = None,
                 seed: int | None = None) -> keras.layers.Layer:
    """keras.layers.RandomColorJitter on the 0-255 scale (SSD's photometric distortions); saturation and hue
    only on 3-channel images."""
    if channels != 3 and (saturation is not None or hue is not None):
        raise ValueError(f"saturation and hue need 3-channel images, data.channels is {channels}")
    as_factor = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
    return keras.layers.RandomColorJitter(value_range=(0, 255), brightness_factor=as_factor(brightness),
                                          contrast_factor=as_factor(contrast),
                                          saturation_factor=as_factor(saturation), hue_factor=as_factor(hue),
                                          seed=seed, bounding_box_format="xyxy")


def flip(seed: int | None = None) -> keras.layers.Layer:
    return keras.layers.RandomFlip("horizontal", bounding_box_format="xyxy", seed=seed)


def zoom(seed: int | None = None) -> keras.layers.Layer:
    # constant black fill: the default reflection would mirror objects in without boxes
    return keras.layers.RandomZoom((-ZOOM_FACTOR, ZOOM_FACTOR), fill_mode="constant", fill_value=0.0,
                                   bounding_box_format="xyxy", seed=seed)


def translate(seed: int | None = None) -> keras.layers.Layer:
    return keras.layers.RandomTranslation(TRANSLATE_FACTOR, TRANSLATE_FACTOR, fill_mode="constant", fill_value=0.0,
                                          bounding_box_format="xyxy", seed=seed)


PER_IMAGE = {"ssd_crop": ssd_crop, "expand": expand}
PER_BATCH = {"flip": flip, "zoom": zoom, "translate": translate, "color_jitter": color_jitter}
NAMES = (*PER_IMAGE, *PER_BATCH)


@dataclass
class Augmenter:
    """The built augmentations: `per_image` (image, boxes, classes, seed [2]) -> same, before batching;
    `per_batch` the Keras layers (built once, so their random state advances across batches)."""
    per_image: list
    per_batch: list

    def apply_per_image(self, image, boxes, classes, seed):
        seeds = tf.random.experimental.stateless_split(seed, max(1, len(self.per_image)))
        for position, augmentation in enumerate(self.per_image):
            image, boxes, classes = augmentation(image, boxes, classes, seeds[position])
        return image, boxes, classes

    def apply_per_batch(self, images, boxes, classes):
        data = {"images": images, "bounding_boxes": {"boxes": boxes, "labels": classes}}
        for layer in self.per_batch:
            data = layer(data, training=True)
        # Keras returns labels as float and may already mark boxes clipped to nothing with -1
        labels = tf.cast(tf.round(data["bounding_boxes"]["labels"]), tf.int32)
        return data["images"], data["bounding_boxes"]["boxes"], tf.where(labels >= 0, classes, -1)


def build(entries: Sequence, channels: int, fill: Sequence[float], seed: int = 0, where: str = "") -> Augmenter:
    """`data.augment` of a detection run as an Augmenter, every name and argument checked (UserError)."""
    per_image, per_batch = [], []
    for position, entry in enumerate(entries):
        name, kwargs = parse_entry(entry)
        if name not in NAMES:
            match = difflib.get_close_matches(str(name), NAMES, n=1)
            hint = f"did you mean {match[0]}? " if match else ""
            raise UserError(f"data.augment entry {name!r}{where} is no detection augmentation; {hint}choose from "
                            f"{', '.join(NAMES)} (boxes follow them), or [] for none")
        if name in PER_IMAGE:
            if per_batch:
                raise UserError(f"data.augment {name}{where} runs per image before batching; list it before "
                                f"{', '.join(PER_BATCH)}")
            factory = PER_IMAGE[name]
            if name == "expand":
                factory = lambda max_ratio=4.0: expand(fill, max_ratio)  # noqa: E731
            per_image.append(call_with_checked_args(name, factory, kwargs, 0, seed + position))
        else:
            factory = PER_BATCH[name]
            if name == "color_jitter":
                def factory(brightness=0.125, contrast=0.5, saturation=None, hue=None, seed=None):
                    return color_jitter(channels, brightness, contrast, saturation, hue, seed)
            per_batch.append(call_with_checked_args(name, factory, kwargs, 0, seed + position))
    return Augmenter(per_image, per_batch)


def seeds(seed: int) -> tf.data.Dataset:
    """An endless dataset of per-image seeds [2] for the stateless draws of `Augmenter.apply_per_image`."""
    return tf.data.Dataset.random(seed=seed).batch(2)

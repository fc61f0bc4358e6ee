"""Anchors for a single-shot detector: the grid of prior boxes, matching ground truth to them, and the
box encoding the box head regresses.

Conventions follow RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection", Sec. 4) and SSD
(Liu et al. 2016, "SSD: Single Shot MultiBox Detector", Sec. 2.2):

* One anchor per (scale, aspect ratio) at every cell of every feature map used. Sides are
  `anchor_size * stride * scale` (RetinaNet: 4 x stride, scales 2^0, 2^(1/3), 2^(2/3)), reshaped to the
  aspect ratio (width / height) at constant area. Centres sit at `(i + 0.5) * stride`.
* The stride of a level is measured, not assumed: `image_size / h` down and `image_size / w` across, from
  the shapes of the built backbone's maps. AlexNet's valid-padded maps (15x15 at 64 px, nominal stride 4)
  or odd image sizes thus still get a grid that covers the image evenly.
* Order: level (as given, finest first from `model.feature_shapes`), then row y, column x, then anchor
  (scale-major, aspect ratio minor): index = offset(level) + ((y * w + x) * S + s) * R + r. The detector's
  outputs are concatenated in the same order.
* Boxes are absolute pixel `xyxy`. Targets are `center_xywh` deltas, (dx, dy, log dw, log dh), divided by
  SSD's variances (0.1, 0.1, 0.2, 0.2) so that they have roughly unit scale for the Huber loss.
* Matching (RetinaNet): IoU >= positive_iou: positive; < negative_iou: background (-1); in between:
  ignored (-2). Each ground-truth box's best anchor is made positive as well (SSD's "best jaccard overlap"
  step), so a box smaller than every anchor still trains something.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf
from keras.utils import bounding_boxes

BACKGROUND = -1  # class target of an anchor matched to nothing
IGNORE = -2  # class target of an anchor between the IoU thresholds: neither loss sees it
VARIANCES = (0.1, 0.1, 0.2, 0.2)  # SSD's: centre offsets / 0.1, log size ratios / 0.2
ENCODING = "center_xywh"  # deltas are (dx, dy, dw, dh)
BOX_FORMAT = "xyxy"  # absolute pixels: [left, top, right, bottom]


def anchors_per_location(config) -> int:
    """Anchors at every feature-map cell: one per scale and aspect ratio."""
    return len(config.anchor_scales) * len(config.aspect_ratios)


def level_strides(shape: tuple[int, int], image_size: int) -> tuple[float, float]:
    """(stride_y, stride_x) of a map of `shape` = (h, w) over a square image: measured, not nominal."""
    h, w = int(shape[0]), int(shape[1])
    return image_size / h, image_size / w


def anchor_grid(feature_shapes: Mapping[int | str, tuple[int, int]], image_size: int, config) -> tf.Tensor:
    """All anchors, [A, 4] float32 absolute xyxy, A = sum over levels of h * w * anchors_per_location.

    `feature_shapes` maps each level (any key; iteration order is the level order) to its (h, w), e.g.
    `shared.detection.model.feature_shapes(detector)`. `config` is a DetectionConfig (anchor_size,
    anchor_scales, aspect_ratios). Order: level, y, x, scale, aspect ratio (see the module docstring)."""
    if not feature_shapes:
        raise ValueError("anchor_grid needs at least one feature map shape")
    per_level = []
    for shape in feature_shapes.values():
        h, w = int(shape[0]), int(shape[1])
        stride_y, stride_x = level_strides((h, w), image_size)
        # One size per level even if stride_y != stride_x (non-square maps): their geometric mean.
        base = config.anchor_size * math.sqrt(stride_y * stride_x)
        sizes = []  # (width, height) per anchor, scale-major
        for scale in config.anchor_scales:
            for ratio in config.aspect_ratios:
                root = math.sqrt(ratio)  # width / height = ratio at the area of the square anchor
                sizes.append((base * scale * root, base * scale / root))
        sizes = np.asarray(sizes, np.float64)  # [K, 2]
        cy = (np.arange(h, dtype=np.float64) + 0.5) * stride_y
        cx = (np.arange(w, dtype=np.float64) + 0.5) * stride_x
        cy, cx = np.meshgrid(cy, cx, indexing="ij")  # [h, w], y-major
        centres = np.stack([cx, cy], axis=-1).reshape(-1, 1, 2)  # [h*w, 1, 2]
        half = sizes[None] / 2.0  # [1, K, 2]
        boxes = np.concatenate([centres - half, centres + half], axis=-1)  # [h*w, K, 4] xyxy
        per_level.append(boxes.reshape(-1, 4))
    return tf.constant(np.concatenate(per_level, axis=0), tf.float32)


def _valid_boxes(gt_boxes: tf.Tensor, gt_classes: tf.Tensor) -> tf.Tensor:
    """Real boxes: a class >= 0 and a positive area (the pipeline pads with -1 boxes and classes)."""
    x1, y1, x2, y2 = tf.unstack(gt_boxes, axis=-1)
    return (gt_classes >= 0) & (x2 > x1) & (y2 > y1)


def assign_targets(anchors, gt_boxes, gt_classes, config) -> tuple[tf.Tensor, tf.Tensor]:
    """Match ground truth to anchors by IoU (RetinaNet Sec. 4, plus SSD's best-anchor rule).

    anchors [A, 4] xyxy; gt_boxes [G, 4] absolute xyxy and gt_classes [G] (or batched [B, G, 4] and
    [B, G]), padded with -1 rows, which are ignored. Returns (box_targets [A, 4] float32 encoded deltas,
    zero where not positive; class_targets [A] int32: the class of positive anchors, -1 background, -2
    ignored), with a leading batch dimension when the inputs had one. Pure TensorFlow: runs inside
    tf.data's graph mode."""
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_classes = tf.cast(gt_classes, tf.int32)
    # An always-invalid extra column: argmax needs one even when an image (or max_boxes) has no boxes.
    batch_shape = tf.shape(gt_classes)[:-1]
    gt_boxes = tf.concat([gt_boxes, tf.fill(tf.concat([batch_shape, [1, 4]], 0), -1.0)], axis=-2)
    gt_classes = tf.concat([gt_classes, tf.fill(tf.concat([batch_shape, [1]], 0), BACKGROUND)], axis=-1)
    valid = _valid_boxes(gt_boxes, gt_classes)[..., None, :]  # [..., 1, G]

    iou = bounding_boxes.compute_iou(anchors, gt_boxes, BOX_FORMAT)  # [..., A, G]
    iou = tf.where(valid, iou, -1.0)
    max_iou = tf.reduce_max(iou, axis=-1)  # [..., A]
    # SSD: every real box's best anchor (all of them, on ties) is positive whatever its IoU, so small or
    # oddly shaped objects are never left without a positive anchor. Needs some overlap at all.
    best_iou = tf.reduce_max(iou, axis=-2, keepdims=True)  # [..., 1, G]
    is_best = valid & (best_iou > 0.0) & tf.equal(iou, best_iou)
    forced = tf.reduce_any(is_best, axis=-1)
    # An anchor that is some box's best goes to that box (the best-overlapping one if several).
    match = tf.argmax(tf.where(is_best, iou + 2.0, iou), axis=-1, output_type=tf.int32)  # [..., A]

    positive = (max_iou >= config.positive_iou) | forced
    negative = (max_iou < config.negative_iou) & ~forced
    batch_dims = len(gt_classes.shape) - 1
    matched_classes = tf.gather(gt_classes, match, batch_dims=batch_dims)
    class_targets = tf.where(positive, matched_classes,
                             tf.where(negative, tf.constant(BACKGROUND), tf.constant(IGNORE)))
    matched_boxes = tf.gather(gt_boxes, match, batch_dims=batch_dims)  # [..., A, 4]
    deltas = bounding_boxes.encode_box_to_deltas(anchors, matched_boxes, anchor_format=BOX_FORMAT,
                                                 box_format=BOX_FORMAT, encoding_format=ENCODING,
                                                 variance=VARIANCES)
    box_targets = tf.where(positive[..., None], tf.cast(deltas, tf.float32), 0.0)
    return box_targets, tf.cast(class_targets, tf.int32)


def decode(anchors, box_deltas) -> tf.Tensor:
    """Deltas [A, 4] or [B, A, 4] (the box head's output, or assign_targets' box targets) back to
    absolute xyxy boxes of the same shape; the inverse of the encoding in assign_targets."""
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    box_deltas = tf.cast(box_deltas, tf.float32)
    return bounding_boxes.decode_deltas_to_boxes(anchors, box_deltas, anchor_format=BOX_FORMAT,
                                                 box_format=BOX_FORMAT, encoded_format=ENCODING,
                                                 variance=VARIANCES)


def training_targets(anchors, config) -> Callable:
    """A tf.data map function: (images, {"boxes": [.., G, 4], "classes": [.., G]}) -> (images,
    {"boxes": [.., A, 5], "classes": [.., A]}), batched or not, the targets DetectionLoss' two parts
    (`shared.detection.losses.detection_losses`) expect. "boxes" carries the class target as a fifth
    column so the box loss can tell positive anchors apart and normalize by their count."""
    anchors = tf.convert_to_tensor(anchors, tf.float32)

    def encode(images, ground_truth):
        box_targets, class_targets = assign_targets(anchors, ground_truth["boxes"], ground_truth["classes"],
                                                    config)
        packed = tf.concat([box_targets, tf.cast(class_targets, tf.float32)[..., None]], axis=-1)
        return images, {"boxes": packed, "classes": class_targets}

    return encode

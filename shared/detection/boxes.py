"""Box operations in numpy, outside any graph: decoding anchor deltas, IoU, greedy NMS, and a split's ground
truth in the resized image. The TFLite decoding (`shared.detection.tflite_inference`), the VOC matching
(`shared.detection.metrics`) and the gallery (`shared.detection.gallery`) use these; `shared.detection.anchors`
and `postprocess` are their TensorFlow counterparts inside the model's graph.
"""

from __future__ import annotations

import numpy as np

from shared.detection.anchors import VARIANCES


def decode_boxes(anchors: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Deltas [..., A, 4] -> absolute xyxy boxes: the inverse of `anchors.assign_targets`' encoding, as
    keras.utils.bounding_boxes.decode_deltas_to_boxes computes it (center_xywh, SSD's variances)."""
    anchors = np.asarray(anchors, np.float32)
    deltas = np.asarray(deltas, np.float32) * np.asarray(VARIANCES, np.float32)
    width, height = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + width / 2.0, anchors[:, 1] + height / 2.0
    x = deltas[..., 0] * width + cx
    y = deltas[..., 1] * height + cy
    w = np.exp(deltas[..., 2]) * width
    h = np.exp(deltas[..., 3]) * height
    return np.stack([x - w / 2.0, y - h / 2.0, x + w / 2.0, y + h / 2.0], axis=-1)


def ground_truth(split, image_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every annotated box of a DetectionSplit (not only the first detection.max_boxes), in the resized
    image's pixels."""
    truth = []
    for record in split:
        scale = np.array([image_size / record.width, image_size / record.height] * 2, np.float32)
        truth.append((record.boxes * scale, record.classes))
    return truth


def box_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of `others` [K, 4], as TF's NMS kernels compute it (0 for empty boxes)."""
    x_min, y_min = np.maximum(box[0], others[:, 0]), np.maximum(box[1], others[:, 1])
    x_max, y_max = np.minimum(box[2], others[:, 2]), np.minimum(box[3], others[:, 3])
    inter = np.clip(x_max - x_min, 0, None) * np.clip(y_max - y_min, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    union = area + areas - inter
    valid = (area > 0) & (areas > 0) & (union > 0)
    return np.where(valid, inter / np.where(union > 0, union, 1.0), 0.0)


def non_max_suppression(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, score_threshold: float,
                        max_output: int) -> np.ndarray:
    """Greedy NMS of one class: indices of the kept boxes, best first. Candidates score above
    `score_threshold`; a box is dropped when its IoU with a kept one exceeds `iou_threshold`."""
    candidates = np.flatnonzero(scores > score_threshold)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    kept: list[int] = []
    for index in order:
        if len(kept) >= max_output:
            break
        if not kept or not (box_iou(boxes[index], boxes[kept]) > iou_threshold).any():
            kept.append(int(index))
    return np.asarray(kept, np.int64)

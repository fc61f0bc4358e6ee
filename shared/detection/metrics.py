"""COCO mean average precision with pycocotools' COCOeval, on in-memory ground truth and detections.

The COCO protocol (101-point interpolated precision, IoU thresholds .50:.05:.95, up to 100 detections per
image) is the one RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection") reports; SSD (Liu
et al. 2016) and SSDLite (Sandler et al. 2018) report it on COCO too.
"""

from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
from keras.utils import bounding_boxes
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def _rows(boxes, classes, scores=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Drop padding (class < 0, e.g. the pipeline's -1 rows or decode_detections' unused slots)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    classes = np.asarray(classes, np.int64).reshape(-1)
    keep = classes >= 0
    return boxes[keep], classes[keep], None if scores is None else np.asarray(scores, np.float64).reshape(-1)[keep]


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """Absolute xyxy -> COCO's [x, y, width, height]."""
    if not len(boxes):
        return boxes.reshape(0, 4)
    return np.asarray(bounding_boxes.convert_format(boxes, source="xyxy", target="xywh", dtype="float64"))


def _category(index: int) -> int:
    return int(index) + 1  # COCO category ids from 1; class index 0 is the first class, not background


def coco_map(ground_truth: Sequence[tuple], detections: Sequence[tuple], class_names: Sequence[str],
             max_detections: int = 100) -> dict:
    """COCO box AP of `detections` against `ground_truth`, one entry per image in the same order.

    ground_truth: [(boxes [N, 4] absolute xyxy, classes [N] int)] per image; detections: [(boxes [M, 4]
    absolute xyxy, classes [M], scores [M])] per image. Rows with a negative class are padding and
    skipped. class_names: one per class index.

    Returns {"mAP": AP@[.5:.95], "mAP50": AP@.5, "mAP75": AP@.75, "per_class": {name: {"AP": AP@[.5:.95],
    "AP50": AP@.5}}}; the means are over the classes that have ground truth (COCO's rule), and a class
    without ground truth has None. Nothing to detect at all: every value None."""
    if len(ground_truth) != len(detections):
        raise ValueError(f"coco_map: {len(ground_truth)} ground-truth images but {len(detections)} "
                         f"detection entries; give one per image")
    categories = [{"id": _category(i), "name": str(name)} for i, name in enumerate(class_names)]
    images, annotations, results = [], [], []
    for image_id, ((gt_boxes, gt_classes), (boxes, classes, scores)) in enumerate(zip(ground_truth, detections)):
        images.append({"id": image_id})
        gt_boxes, gt_classes, _ = _rows(gt_boxes, gt_classes)
        for box, cls in zip(_xywh(gt_boxes), gt_classes):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": _category(cls),
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
        boxes, classes, scores = _rows(boxes, classes, scores)
        for box, cls, score in zip(_xywh(boxes), classes, scores):
            results.append({"id": len(results) + 1, "image_id": image_id, "category_id": _category(cls),
                            "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0,
                            "score": float(score)})
    empty = {"mAP": None, "mAP50": None, "mAP75": None, "per_class": {str(n): {"AP": None, "AP50": None}
                                                                        for n in class_names}}
    if not annotations:
        return empty

    quiet = io.StringIO()  # pycocotools prints progress and its summary table; keep it off the run's log
    with contextlib.redirect_stdout(quiet):
        truth = COCO()
        truth.dataset = {"images": images, "annotations": annotations, "categories": categories}
        truth.createIndex()
        found = COCO()  # built directly: COCO.loadRes rejects an empty result list
        found.dataset = {"images": images, "annotations": results, "categories": categories}
        found.createIndex()
        evaluation = COCOeval(truth, found, iouType="bbox")
        evaluation.params.maxDets = [1, 10, max_detections]
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()

    # precision: [IoU thresholds (10), recall points (101), classes, area ranges (all first), max dets]
    precision = evaluation.eval["precision"][:, :, :, 0, -1]
    thresholds = evaluation.params.iouThrs

    def average(values: np.ndarray) -> float | None:
        values = values[values > -1]  # -1: a class without ground truth
        return float(np.mean(values)) if values.size else None

    at = {name: int(np.argmin(np.abs(thresholds - value))) for name, value in (("50", 0.5), ("75", 0.75))}
    per_class = {}
    for k, name in enumerate(class_names):
        per_class[str(name)] = {"AP": average(precision[:, :, k]), "AP50": average(precision[at["50"], :, k])}
    return {"mAP": average(precision), "mAP50": average(precision[at["50"]]),
            "mAP75": average(precision[at["75"]]), "per_class": per_class}

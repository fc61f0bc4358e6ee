"""Detection mean average precision on in-memory ground truth and detections: COCO with pycocotools'
COCOeval, Pascal VOC (`voc_map`, the VOC2010+ devkit's rule) with numpy.

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

from shared.detection.boxes import box_iou


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


# ---------------------------------------------------------------- Pascal VOC

VOC_IOU = 0.5  # a detection is a true positive above this IoU (the devkit's `ovmax > 0.5`)


def voc_average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+'s all-point interpolated AP: the area under the precision envelope (precision at recall r is
    the best precision at any recall >= r), summed where recall changes."""
    recall = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    precision = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def voc_class_outcomes(ground_truth: Sequence[tuple], detections: Sequence[tuple], class_index: int,
                       iou_threshold: float = VOC_IOU) -> tuple[np.ndarray, np.ndarray, int]:
    """The devkit's matching for one class: (scores, outcome per detection best first: 1 true positive,
    0 false positive, -1 ignored, count of non-difficult ground-truth boxes). Each detection goes to the
    box of its image and class it overlaps most; above the threshold it is ignored when that box is
    difficult, a true positive when the box is not yet taken, else a false positive (a duplicate)."""
    found = []  # (score, image, box)
    truth, positives = [], 0
    for image, (gt, det) in enumerate(zip(ground_truth, detections)):
        gt_boxes, gt_classes, _ = _rows(gt[0], gt[1])
        difficult = np.zeros(len(np.asarray(gt[1]).reshape(-1)), bool) if len(gt) < 3 or gt[2] is None \
            else np.asarray(gt[2], bool).reshape(-1)
        difficult = difficult[np.asarray(gt[1], np.int64).reshape(-1) >= 0]
        mine = gt_classes == class_index
        truth.append((gt_boxes[mine], difficult[mine], np.zeros(int(mine.sum()), bool)))
        positives += int((~difficult[mine]).sum())
        boxes, classes, scores = _rows(*det)
        found.extend((score, image, box) for box, cls, score in zip(boxes, classes, scores) if cls == class_index)
    found.sort(key=lambda item: -item[0])  # stable: equal scores keep their order
    outcomes = np.zeros(len(found), np.int64)
    for k, (_, image, box) in enumerate(found):
        gt_boxes, difficult, taken = truth[image]
        if not len(gt_boxes):
            continue
        # continuous coordinates (the pipeline's boxes end one past the last pixel): no devkit +1 on widths
        overlaps = box_iou(box, gt_boxes)
        best = int(np.argmax(overlaps))
        if overlaps[best] > iou_threshold:
            if difficult[best]:
                outcomes[k] = -1
            elif not taken[best]:
                outcomes[k], taken[best] = 1, True
    return np.array([score for score, _, _ in found], np.float64), outcomes, positives


def voc_map(ground_truth: Sequence[tuple], detections: Sequence[tuple], class_names: Sequence[str],
            iou_threshold: float = VOC_IOU) -> dict:
    """Pascal VOC mAP (VOC2010+ devkit): per class the all-point interpolated AP at IoU > `iou_threshold`
    with `difficult` boxes ignored (a detection on one is neither a true nor a false positive, and a missed
    one is no miss), the mean over the classes with a non-difficult box.

    ground_truth: [(boxes [N, 4] absolute xyxy, classes [N], difficult [N] bool or None)] per image (two-item
    entries: nothing difficult); detections as `coco_map` takes them. Returns {"mAP": mean AP, "mAP50": the
    same, "per_class": {name: {"AP50": AP or None (no non-difficult box)}}}."""
    if len(ground_truth) != len(detections):
        raise ValueError(f"voc_map: {len(ground_truth)} ground-truth images but {len(detections)} "
                         f"detection entries; give one per image")
    per_class, values = {}, []
    for k, name in enumerate(class_names):
        _, outcomes, positives = voc_class_outcomes(ground_truth, detections, k, iou_threshold)
        if not positives:
            per_class[str(name)] = {"AP50": None}
            continue
        counted = outcomes[outcomes >= 0]
        true_positives = np.cumsum(counted == 1)
        false_positives = np.cumsum(counted == 0)
        recall = true_positives / positives
        precision = true_positives / np.maximum(true_positives + false_positives, np.finfo(np.float64).eps)
        ap = voc_average_precision(recall, precision)
        per_class[str(name)] = {"AP50": ap}
        values.append(ap)
    mean = float(np.mean(values)) if values else None
    return {"mAP": mean, "mAP50": mean, "per_class": per_class}


def detection_map(protocol: str, ground_truth: Sequence[tuple], detections: Sequence[tuple],
                  class_names: Sequence[str], max_detections: int = 100) -> dict:
    """mAP by `protocol` (coco or voc), with "protocol" in the result. COCO counts difficult boxes as any
    other (it has no such flag); a third item in a ground-truth entry is then ignored."""
    if protocol == "voc":
        metrics = voc_map(ground_truth, detections, class_names)
    elif protocol == "coco":
        metrics = coco_map([entry[:2] for entry in ground_truth], detections, class_names, max_detections)
    else:
        raise ValueError(f"unknown detection protocol {protocol!r}; choose coco or voc")
    return {"protocol": protocol, **metrics}

"""Pascal VOC mAP (difficult boxes ignored, all-point AP) on hand-computed cases, and detection.eval_every's
validation mAP logged during training."""

import numpy as np
import pytest

from shared.detection.metrics import detection_map, voc_average_precision, voc_class_outcomes, voc_map

BOX = [0.0, 0.0, 10.0, 10.0]
FAR = [50.0, 50.0, 60.0, 60.0]


def truth(boxes, difficult=None):
    return (np.array(boxes, float), np.zeros(len(boxes), int), None if difficult is None else np.array(difficult))


def found(boxes, scores):
    return (np.array(boxes, float).reshape(-1, 4), np.zeros(len(boxes), int), np.array(scores, float))


def test_a_detection_on_a_difficult_box_is_ignored():
    gt = [truth([BOX, FAR], difficult=[False, True])]
    _, outcomes, positives = voc_class_outcomes(gt, [found([FAR, BOX], [0.9, 0.8])], 0)
    assert positives == 1 and outcomes.tolist() == [-1, 1]  # not a false positive
    assert voc_map(gt, [found([FAR, BOX], [0.9, 0.8])], ["a"])["mAP"] == pytest.approx(1.0)
    # counted as ordinary ground truth (COCO, or no flag) the same detections give less
    assert voc_map([gt[0][:2]], [found([BOX], [0.8])], ["a"])["mAP"] == pytest.approx(0.5)


def test_an_unmatched_difficult_box_is_no_miss():
    gt = [truth([BOX, FAR], difficult=[False, True])]
    assert voc_map(gt, [found([BOX], [0.8])], ["a"])["mAP"] == pytest.approx(1.0)


def test_two_detections_on_one_box_give_one_false_positive():
    gt = [truth([BOX])]
    _, outcomes, _ = voc_class_outcomes(gt, [found([BOX, [0, 0, 10, 9]], [0.9, 0.7])], 0)
    assert outcomes.tolist() == [1, 0]
    # the duplicate ranks first of two: precision 1/2 at recall 1
    _, outcomes, _ = voc_class_outcomes(gt, [found([BOX, [0, 0, 10, 9]], [0.6, 0.7])], 0)
    assert outcomes.tolist() == [1, 0]  # the better-scored one takes the box, whichever box it is
    assert voc_map(gt, [found([[20, 20, 30, 30], BOX], [0.9, 0.8])], ["a"])["mAP"] == pytest.approx(0.5)


def test_all_point_ap_of_a_known_curve():
    # TP, FP, TP, FP, TP over 4 positives: recall .25 .25 .5 .5 .75, precision 1 .5 .667 .5 .6; the envelope
    # is 1 up to .25, 2/3 up to .5, .6 up to .75, 0 beyond: AP = .25 + .25 * 2/3 + .25 * .6
    recall = np.array([0.25, 0.25, 0.5, 0.5, 0.75])
    precision = np.array([1.0, 0.5, 2 / 3, 0.5, 0.6])
    assert voc_average_precision(recall, precision) == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 0.6)
    boxes = [[i * 20.0, 0, i * 20.0 + 10, 10] for i in range(4)]
    detections = [boxes[0], FAR, boxes[1], FAR, boxes[2]]
    result = voc_map([truth(boxes)], [found(detections, [0.9, 0.8, 0.7, 0.6, 0.5])], ["a"])
    assert result["mAP"] == pytest.approx(0.25 + 0.25 * 2 / 3 + 0.25 * 0.6)


def test_mean_over_classes_with_ground_truth_and_protocol_named():
    gt = [(np.array([BOX, FAR]), np.array([0, 1]), np.array([False, True]))]
    detections = [(np.array([BOX]), np.array([0]), np.array([0.9]))]
    result = detection_map("voc", gt, detections, ["a", "b", "c"])
    assert result["protocol"] == "voc" and result["mAP50"] == pytest.approx(1.0)
    assert result["per_class"] == {"a": {"AP50": 1.0}, "b": {"AP50": None}, "c": {"AP50": None}}
    coco = detection_map("coco", gt, detections, ["a", "b", "c"])
    assert coco["protocol"] == "coco" and coco["mAP50"] == pytest.approx(0.5)  # b's difficult box counts

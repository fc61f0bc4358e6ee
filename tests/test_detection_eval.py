"""Pascal VOC mAP (difficult boxes ignored, all-point AP) on hand-computed cases, and detection.eval_every's
validation mAP logged during training."""

import re
from pathlib import Path

import numpy as np
import pytest

from shared.fashion_mnist import FASHION_MNIST_DIRS

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


# ---------------------------------------------------------------- detection.eval_every


def test_validation_map_evaluates_first_every_nth_and_last_epoch_and_carries_between():
    from shared.detection.validation import ValidationMAP

    calls = []

    def evaluate():
        calls.append(len(calls))
        return {"mAP": 0.1 * len(calls), "mAP50": 0.2 * len(calls)}

    callback = ValidationMAP(evaluate, every=3, epochs=7, protocol="voc")
    callback.on_train_begin()
    logged = []
    for epoch in range(7):
        logs = {"loss": 1.0}
        callback.on_epoch_end(epoch, logs)
        logged.append(logs["val_map"])
    # evaluated after epochs 1 (nothing measured yet), 3, 6 and 7 (the last); carried in between
    assert len(calls) == 4
    assert logged == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.4])
    callback.on_train_begin()  # a new fit (a resume): measured again at its first epoch
    callback.on_epoch_end(3, logs := {})
    assert len(calls) == 5 and set(logs) == {"val_map", "val_map50"}


def tiny_run(generated, runs_dir, *extra):
    from conftest import tiny_backbone
    from test_detection_runner import REPO, TINY, data_overrides
    from shared import runner

    overrides = [*TINY, tiny_backbone(runs_dir), *data_overrides(generated), f"run.dir={runs_dir}", "data.augment=[]",
                 *extra]
    return runner.main(["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
                        *[arg for item in overrides for arg in ("--set", item)]])


needs_fashion_mnist = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIRS[0]) / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from test_detection_runner import tiny_canvases

    return tiny_canvases(tmp_path_factory.mktemp("canvases"))


@pytest.mark.slow
@needs_fashion_mnist
def test_eval_every_logs_validation_map_for_best_and_early_stopping(generated, tmp_path):
    import csv
    import json

    code = tiny_run(generated, tmp_path, "train.epochs=3", "detection.eval_every=2", "data.val_fraction=0.25",
                    "detection.eval_protocol=voc", "train.best.monitor=val_map",
                    "train.early_stopping.monitor=val_map50", "train.early_stopping.patience=5")
    assert code == 0
    (run,) = (tmp_path / "tiny_backbone").iterdir()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 3 and all(0.0 <= float(row["val_map"]) <= 1.0 for row in rows)
    assert all(row["val_map"] == row["val_map50"] for row in rows)  # VOC's mAP is AP@.5
    # TensorBoard writes val_* into logs/validation as epoch_*
    events = b"".join(path.read_bytes() for path in (run / "logs" / "validation").rglob("events.out.tfevents*"))
    assert b"epoch_map50" in events and re.search(rb"epoch_map[^57]", events)  # val_map50 and val_map
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["protocol"] == "voc" and metrics["best"]["monitor"] == "val_map"
    assert metrics["best"]["mode"] == "max"  # mAP: higher is better
    assert set(metrics["per_class"]["T-shirt/top"]) == {"AP50"}


@needs_fashion_mnist
@pytest.mark.parametrize("extra, message", [
    (["train.best.monitor=val_map"], "detection.eval_every"),
    (["detection.eval_every=1", "detection.eval_protocol=voc", "train.early_stopping.monitor=val_map75"],
     "val_map75"),
    (["data.val_fraction=0.25"], "detection.eval_every"),
])
def test_validation_map_monitors_need_eval_every(generated, tmp_path, capsys, extra, message):
    assert tiny_run(generated, tmp_path, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tiny_backbone").exists()  # refused before a run folder exists


def test_voc_difficult_flags_reach_the_evaluation(tmp_path):
    from shared.detection.records import DetectionRecord, DetectionSplit
    from shared.detection.voc import read_voc, write_voc
    from shared.detection.evaluate import evaluation_truth

    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (100, 80)).save(image)
    record = DetectionRecord(str(image), 100, 80, np.array([BOX, FAR], np.float32), np.array([0, 0]),
                               difficult=np.array([False, True]))
    write_voc(DetectionSplit([record], ["cat"]), tmp_path / "voc", "test")
    split = read_voc(tmp_path / "voc", "test", ["cat"])
    truth = evaluation_truth(split, 200)  # resized to 200 x 200: x times 2, y times 2.5
    assert truth[0][2].tolist() == [False, True]
    np.testing.assert_allclose(truth[0][0][0], [0, 0, 20, 25])
    only_the_easy_box = [found([[0, 0, 20, 25]], [0.9])]
    assert detection_map("voc", truth, only_the_easy_box, ["cat"])["mAP50"] == pytest.approx(1.0)
    assert detection_map("coco", truth, only_the_easy_box, ["cat"])["mAP50"] == pytest.approx(0.5, abs=0.01)


def test_validation_map_evaluates_the_ema_weights():
    import keras

    from shared.detection.validation import ValidationMAP

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.SGD(0.5, use_ema=True, ema_momentum=0.9), loss="mse")
    model.fit(np.ones((4, 2)), np.full((4, 1), 10.0), epochs=1, verbose=0)
    raw = model.get_weights()[0].copy()
    average = np.array([[1.0], [-1.0]], np.float32)  # averages unlike the weights (fit's end made them equal)
    model.optimizer._model_variables_moving_average[0].assign(average)
    seen = []
    callback = ValidationMAP(lambda: seen.append(model.get_weights()[0].copy()) or {"mAP": 0.5}, 1, 1, "voc")
    callback.set_model(model)
    callback.on_epoch_end(0, {})
    np.testing.assert_allclose(seen[0], average)  # evaluated on the averages
    np.testing.assert_allclose(model.get_weights()[0], raw)  # and training goes on with its own weights

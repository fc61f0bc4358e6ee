"""A detector evaluated on a split: its detections through the evaluation pipeline and `decode_detections`,
scored by the run's protocol (`metrics.detection_map`: COCO mAP, or VOC's with difficult boxes ignored), with
the first images kept for the gallery; and the line that sums the test metrics up.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from shared.config_schema import Config
from shared.detection.boxes import ground_truth
from shared.detection.datasets import detection_normalization, make_dataset
from shared.detection.gallery import GALLERY_IMAGES
from shared.detection.metrics import detection_map
from shared.detection.model import model_anchors
from shared.detection.postprocess import decode_detections
from shared.detection.records import DetectionSplit


def _unnormalize(images: np.ndarray, config: Config) -> np.ndarray:
    """Pipeline images back to 0-255 pixels, for drawing."""
    data = config.data
    if not data.normalize:
        return np.clip(images * 255.0, 0, 255)
    mean, std = detection_normalization(config)
    return np.clip(images * np.asarray(std, np.float32) + np.asarray(mean, np.float32), 0, 255)


def evaluate_detector(detector: keras.Model, split: DetectionSplit, config: Config,
                      class_names: list[str], gallery: int = GALLERY_IMAGES) -> tuple[dict, dict]:
    """COCO mAP of `detector` on `split` through the evaluation pipeline and decode_detections (NMS with
    config.detection's thresholds). Returns (metrics, gallery data: the first `gallery` images as 0-255
    pixels with their detections and ground truth)."""
    size = config.data.image_size
    anchors = model_anchors(detector, config.detection)

    @tf.function(reduce_retracing=True, autograph=False)  # no Python control flow to convert
    def predict(images):
        return decode_detections(anchors, detector(images, training=False), config.detection, size)

    detections, shown = [], []
    for images, _ in make_dataset(split, config, training=False):
        found = {key: value.numpy() for key, value in predict(images).items()}
        for i, count in enumerate(found["num_detections"]):
            detections.append((found["boxes"][i, :count], found["classes"][i, :count], found["scores"][i, :count]))
        if sum(map(len, shown)) < gallery:
            shown.append(_unnormalize(images.numpy(), config))
    truth = evaluation_truth(split, size)
    metrics = detection_map(config.detection.eval_protocol, truth, detections, class_names,
                            config.detection.max_detections)
    metrics.update(examples=len(split), boxes=split.num_boxes,
                   detections=int(sum(len(classes) for _, classes, _ in detections)))
    images = np.concatenate(shown)[:gallery] if shown else np.zeros((0, size, size, config.data.channels))
    return metrics, {"images": images, "detections": detections[:len(images)],
                     "truth": [entry[:2] for entry in truth[:len(images)]]}


def evaluation_truth(split: DetectionSplit, image_size: int) -> list[tuple]:
    """(boxes in the resized image's pixels, classes, VOC difficult flags) per image: the ground truth the
    protocols score against (the voc protocol ignores the difficult boxes, coco counts them)."""
    return [(boxes, classes, record.difficult) for (boxes, classes), record in zip(ground_truth(split, image_size),
                                                                                     split)]


def summary(metrics: dict) -> str:
    def fmt(value):
        return f"{value:.4f}" if isinstance(value, float) else "n/a"

    counts = f"({metrics.get('examples')} images, {metrics.get('boxes')} boxes)"
    if metrics.get("protocol") == "voc":
        return f"test VOC mAP@.5 {fmt(metrics.get('mAP50'))}, difficult boxes ignored  {counts}"
    return (f"test COCO mAP@[.5:.95] {fmt(metrics.get('mAP'))}  mAP@.5 {fmt(metrics.get('mAP50'))}  "
            f"mAP@.75 {fmt(metrics.get('mAP75'))}  {counts}")

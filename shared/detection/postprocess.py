"""From the detector's raw outputs to detections: sigmoid scores (one per class, as RetinaNet trains them:
Lin et al. 2017, "Focal Loss for Dense Object Detection", Sec. 5.1 "Inference"), anchor deltas decoded to
boxes, boxes clipped to the image, then per-class non-maximum suppression (tf.image.
combined_non_max_suppression) keeping the best `max_detections` per image, as SSD (Liu et al. 2016)
and SSDLite (Sandler et al. 2018) do at inference.

`decode_detections` is plain TensorFlow (usable in tf.function and SavedModel signatures);
`DetectionDecoder` wraps it as a Keras layer holding its anchors, and `inference_model` appends that layer
to a detector for export. combined_non_max_suppression is no TFLite builtin: a TFLite export needs
SELECT_TF_OPS (Flex) or NMS outside the model.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras.utils import bounding_boxes

from shared.detection.anchors import BOX_FORMAT, decode


def image_size_from_anchors(anchors) -> tf.Tensor:
    """The (square) image side the anchors were laid on: the finest level's centres run from stride / 2
    to image_size - stride / 2, so the smallest and largest anchor centre x add up to image_size."""
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    centre_x = (anchors[:, 0] + anchors[:, 2]) / 2.0
    return tf.reduce_min(centre_x) + tf.reduce_max(centre_x)


def decode_detections(anchors, outputs: dict, config, image_size: int | None = None) -> dict[str, tf.Tensor]:
    """Detections from the detector's outputs {"boxes": [B, A, 4] deltas, "classes": [B, A, C] logits}.

    `config`: a DetectionConfig (score_threshold, nms_iou, max_detections) or anything with those
    attributes. `image_size`: the side boxes are clipped to (None: recovered from the anchors). Returns
    {"boxes": [B, D, 4] float32 absolute xyxy, "classes": [B, D] int32, "scores": [B, D] float32,
    "num_detections": [B] int32}, D = max_detections, best score first; rows past num_detections are
    padding (boxes and scores 0, classes -1, like the data pipeline's padding)."""
    max_detections = int(config.max_detections)
    deltas = tf.cast(outputs["boxes"], tf.float32)
    scores = tf.sigmoid(tf.cast(outputs["classes"], tf.float32))  # independent per-class probabilities
    boxes = decode(anchors, deltas)  # [B, A, 4] xyxy
    size = image_size_from_anchors(anchors) if image_size is None else image_size
    boxes = bounding_boxes.clip_to_image_size({"boxes": boxes}, height=size, width=size,
                                              bounding_box_format=BOX_FORMAT)["boxes"]
    # Per-class NMS: a box of one class never suppresses another class's. The op reads y1 x1 y2 x2, but
    # IoU is symmetric in x and y, so xyxy boxes come back unchanged.
    nms = tf.image.combined_non_max_suppression(
        boxes[:, :, None, :], scores, max_output_size_per_class=max_detections, max_total_size=max_detections,
        iou_threshold=float(config.nms_iou), score_threshold=float(config.score_threshold), clip_boxes=False)
    valid = tf.range(max_detections)[None, :] < nms.valid_detections[:, None]
    classes = tf.where(valid, tf.cast(nms.nmsed_classes, tf.int32), -1)
    return {"boxes": nms.nmsed_boxes, "classes": classes, "scores": nms.nmsed_scores,
            "num_detections": tf.cast(nms.valid_detections, tf.int32)}


@keras.saving.register_keras_serializable(package="detection")
class DetectionDecoder(keras.layers.Layer):
    """decode_detections as a layer: its anchors are a non-trainable weight (saved with the model), its
    thresholds in its config. Call it on the detector's output dict. TensorFlow backend only."""

    def __init__(self, num_anchors: int, image_size: int, score_threshold: float = 0.05, nms_iou: float = 0.5,
                 max_detections: int = 100, anchors=None, **kwargs):
        super().__init__(**kwargs)
        self.num_anchors, self.image_size = int(num_anchors), int(image_size)
        self.score_threshold, self.nms_iou = float(score_threshold), float(nms_iou)
        self.max_detections = int(max_detections)
        self.anchors = self.add_weight(name="anchors", shape=(self.num_anchors, 4), initializer="zeros",
                                       trainable=False, dtype="float32")
        if anchors is not None:
            self.anchors.assign(np.asarray(anchors, np.float32))

    def call(self, outputs):
        return decode_detections(self.anchors, outputs, self, self.image_size)

    def compute_output_spec(self, outputs):
        batch = outputs["boxes"].shape[0]
        d = self.max_detections
        return {"boxes": keras.KerasTensor((batch, d, 4), "float32"),
                "classes": keras.KerasTensor((batch, d), "int32"),
                "scores": keras.KerasTensor((batch, d), "float32"),
                "num_detections": keras.KerasTensor((batch,), "int32")}

    def get_config(self) -> dict:
        return {**super().get_config(), "num_anchors": self.num_anchors, "image_size": self.image_size,
                "score_threshold": self.score_threshold, "nms_iou": self.nms_iou,
                "max_detections": self.max_detections}


def inference_model(detector: keras.Model, config) -> keras.Model:
    """`detector` (from build_detector) followed by DetectionDecoder: images -> decode_detections' dict."""
    from shared.detection.model import model_anchors

    anchors = model_anchors(detector, config)
    image_size = int(detector.inputs[0].shape[1])
    decoder = DetectionDecoder(int(anchors.shape[0]), image_size, config.score_threshold, config.nms_iou,
                               config.max_detections, anchors=anchors.numpy(), name="detections")
    return keras.Model(detector.inputs[0], decoder(detector.output), name=f"{detector.name}_inference")

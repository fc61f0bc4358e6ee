"""Export a finished detection run: a SavedModel for TensorFlow Serving (decoding and NMS inside), and a
TFLite file with builtin ops only (raw outputs; decoding and NMS outside, in numpy).

SavedModel (`export_detection_saved_model`), the layout of `shared.export` (its versioning, pruning and
atomic publishing are reused): `<export_dir>/<model_name>/<version>/`, model_name by default
`<model>_detection` so a model's detectors and classifiers never share a TF Serving model folder. Signatures:

    serving_default  image_bytes: [N] tf.string, encoded JPEG / PNG of any size
    predict_images   images: [N, S, S, C] float32, 0-255 pixels already at the run's image size

both decode, resize to S x S and normalize as the run's evaluation pipeline does
(`shared.detection.datasets.make_dataset`), run the detector, decode the anchor deltas and apply per-class
NMS (`postprocess.decode_detections`, the run's detection.score_threshold / nms_iou / max_detections), and
return `boxes` [N, D, 4] float32 absolute xyxy, in the pixels of the image as sent (serving_default: scaled
back from S x S to each image's own size), `classes` [N, D] int32 (-1 for padding), `labels` [N, D] class
names ("" for padding), `scores` [N, D] float32 and `num_detections` [N] int32.

TFLite (`export_detection_tflite`): `<run>/export/detector_<quantize>.tflite` with builtin ops only
(combined_non_max_suppression has no TFLite builtin), input one *normalized* image (1, S, S, C) as the run's
config.yaml says (data.mean / data.std), outputs the raw `boxes` deltas [1, A, 4] and `classes` logits
[1, A, C]. Beside it: `anchors.npy` ([A, 4] float32 absolute xyxy in the S x S image, the order of the
outputs) and `detection.json` (image size, normalization, class names, thresholds, box encoding).
`decode_tflite_outputs` turns the raw outputs into detections with numpy alone: the same box decoding
(center_xywh deltas times the variances 0.1, 0.1, 0.2, 0.2), sigmoid scores and per-class greedy NMS as
`decode_detections`.
"""

from __future__ import annotations

import io as io_module  # `io` is export_detection_tflite's argument (the CLI's --io)
import json
import os
from pathlib import Path

import numpy as np

from shared.detection.anchors import VARIANCES
from shared.errors import UserError
from shared.export import publish, target_folder, write_archive
from shared.runs import Run, open_run

OUTPUT_KEYS = ("boxes", "classes", "labels", "scores", "num_detections")
ANCHORS_FILE = "anchors.npy"
INFO_FILE = "detection.json"
TFLITE_QUANTIZE = ("none", "float16", "dynamic")  # int8 needs calibrated detection heads: not offered yet


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else open_run(run)


def default_model_name(run: Run) -> str:
    return f"{run.model_name}_detection"


def _preprocessing(config) -> dict:
    from shared.detection.datasets import detection_normalization

    mean, std = detection_normalization(config)
    data = config.data
    return {"image_size": data.image_size, "channels": data.channels, "preprocessing": "resize",
            "normalize": data.normalize, "mean": mean, "std": std}


# ---------------------------------------------------------------- SavedModel


def detection_serving_functions(detector, config, class_names: list[str]):
    """(bytes_fn, images_fn): the two endpoints as plain functions of batched tensors."""
    import tensorflow as tf

    from shared.data import preprocess
    from shared.detection.model import model_anchors
    from shared.detection.postprocess import decode_detections

    data = config.data
    size, channels = data.image_size, data.channels
    prep = _preprocessing(config)
    normalize = preprocess.normalizer(prep["mean"], prep["std"], data.normalize, size)
    anchors = model_anchors(detector, config.detection)
    names = tf.constant([*class_names, ""], tf.string)  # index -1 (padding) picks ""

    def detect(pixels, image_shapes):
        """pixels [N, S, S, C] 0-255; image_shapes [N, 2] (height, width) the boxes are scaled to."""
        found = decode_detections(anchors, detector(normalize(pixels), training=False), config.detection, size)
        shapes = tf.cast(image_shapes, tf.float32)
        scale = tf.stack([shapes[:, 1], shapes[:, 0], shapes[:, 1], shapes[:, 0]], axis=-1) / float(size)
        classes = found["classes"]
        return {"boxes": found["boxes"] * scale[:, None, :], "classes": classes,
                "labels": tf.gather(names, tf.where(classes >= 0, classes, len(class_names))),
                "scores": found["scores"], "num_detections": found["num_detections"]}

    def decode_one(encoded):
        # make_dataset's evaluation view: decode, resize to S x S (always; the same bilinear kernel)
        image = tf.cast(preprocess.decode(encoded, channels), tf.float32)
        shape = tf.shape(image)[:2]
        image = tf.ensure_shape(tf.image.resize(image, [size, size]), (size, size, channels))
        return image, shape

    def bytes_fn(image_bytes):
        pixels, shapes = tf.map_fn(decode_one, image_bytes, fn_output_signature=(
            tf.TensorSpec((size, size, channels), tf.float32), tf.TensorSpec((2,), tf.int32)))
        return detect(pixels, shapes)

    def images_fn(images):
        shapes = tf.fill([tf.shape(images)[0], 2], size)
        return detect(images, shapes)

    return bytes_fn, images_fn


def _write_saved_model(detector, config, class_names: list[str], target: Path) -> None:
    size, channels = config.data.image_size, config.data.channels
    bytes_fn, images_fn = detection_serving_functions(detector, config, class_names)
    write_archive(detector, bytes_fn, images_fn, (size, size, channels), target)


def export_detection_saved_model(run: Run | str | Path, export_dir: Path, model_name: str | None = None,
                                 version: int | None = None, keep: int = 5) -> Path:
    """Export the detection run's last checkpoint to `<export_dir>/<model_name>/<version>/` (default
    model_name `<model>_detection`, version one past the highest) and return that path. The version
    appears by renaming a finished hidden folder; older versions beyond `keep` are pruned and
    `<export_dir>/models.config` is rewritten (see `shared.export`)."""
    from shared.tasks import rebuild

    run = _as_run(run)
    model_name = model_name or default_model_name(run)
    model_dir = target_folder(run, export_dir, model_name, version, keep)
    detector, config = rebuild(run)
    names = run.class_names() or [str(i) for i in range(config.data.num_classes)]

    def write(staging: Path) -> dict:
        _write_saved_model(detector, config, names, staging)
        return {"task": "detection", **_preprocessing(config), "labels": names, "outputs": list(OUTPUT_KEYS),
                "boxes": "absolute xyxy pixels of the image as sent",
                "score_threshold": config.detection.score_threshold, "nms_iou": config.detection.nms_iou,
                "max_detections": config.detection.max_detections}

    return publish(run, export_dir, model_dir, version, keep, write)


# ---------------------------------------------------------------- TFLite


def _convert(detector, input_shape: tuple, quantize: str) -> bytes:
    """The detector on one image, variables frozen (see shared.tflite), builtin ops only."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec((1, *input_shape), tf.float32, name="image")

    def forward(image):
        outputs = detector(image, training=False)
        return {"boxes": outputs["boxes"], "classes": outputs["classes"]}

    frozen = convert_variables_to_constants_v2(tf.function(forward, input_signature=[spec]).get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex ops
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def export_detection_tflite(run: Run | str | Path, quantize: str = "none", io: str = "float",
                            out_path: Path | None = None) -> Path:
    """Convert the detection run's detector (its snapshot and last checkpoint) to a builtin-ops TFLite file
    with the raw outputs; write anchors.npy and detection.json beside it. Returns the .tflite path
    (default `<run>/export/detector_<quantize>.tflite`); every file is written atomically."""
    from shared.detection.model import model_anchors
    from shared.tasks import rebuild
    from shared.durable import atomic_write
    from shared.tflite import EXPORT_DIR

    if quantize not in TFLITE_QUANTIZE:
        raise UserError(f"quantize={quantize} is not offered for detectors; choose one of "
                        f"{', '.join(TFLITE_QUANTIZE)}")
    if io != "float":
        raise UserError(f"--io {io}: a detector's TFLite file has float input and outputs; leave --io out")
    run = _as_run(run)
    detector, config = rebuild(run)
    data = config.data
    try:
        content = _convert(detector, (data.image_size, data.image_size, data.channels), quantize)
    except Exception as error:  # the converter's errors are not public types
        reason = " ".join(str(error).split())[:400]
        raise UserError(f"TFLite conversion (quantize={quantize}) of {run.path} failed: {reason}") from error
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    tensors = identify_outputs(interpreter, detector, (data.image_size, data.image_size, data.channels))
    out = Path(out_path) if out_path is not None else run.path / EXPORT_DIR / f"detector_{quantize}.tflite"
    anchors = model_anchors(detector, config.detection).numpy()
    buffer = io_module.BytesIO()
    np.save(buffer, anchors.astype(np.float32))
    names = run.class_names() or [str(i) for i in range(data.num_classes)]
    detection = config.detection
    info = {"run": str(run.path.resolve()), "checkpoint": run.last_checkpoint().name, "model": out.name,
            **_preprocessing(config), "input": "one normalized image (1, S, S, C): (pixels - mean) / std",
            "outputs": {"boxes": "[1, A, 4] deltas (dx, dy, log dw, log dh) / variances",
                        "classes": "[1, A, C] logits (sigmoid per class)"},
            "anchors": ANCHORS_FILE, "num_anchors": int(len(anchors)), "variances": list(VARIANCES),
            "encoding": "center_xywh", "box_format": "xyxy", "labels": names,
            "score_threshold": detection.score_threshold, "nms_iou": detection.nms_iou,
            "max_detections": detection.max_detections,
            # every file exported here, with its own output tensor names (the anchors are the run's)
            "models": {**_exported_models(out.parent), out.name: {"quantize": quantize, "output_tensors": tensors}}}
    atomic_write(out.parent / ANCHORS_FILE, buffer.getvalue())
    atomic_write(out.parent / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
    atomic_write(out, content)
    return out



def tflite_interpreter(path: Path | str, num_threads: int | None = None):
    """The LiteRT interpreter for a detection .tflite (shared.tflite's loader)."""
    from shared.tflite import load_interpreter

    return load_interpreter(path, num_threads=num_threads)


def identify_outputs(interpreter, detector, input_shape: tuple, seed: int = 0) -> dict[str, str]:
    """{"boxes": tensor name, "classes": tensor name} of the converted file's two outputs, found by running
    it and the Keras detector on one random image: the converter names them after its graph (e.g.
    "PartitionedCall:0"), not after the model's outputs, and a shape check alone cannot tell them apart
    when there are 4 classes. Also a check of the conversion: a UserError if no output matches."""
    image = np.random.default_rng(seed).normal(size=(1, *input_shape)).astype(np.float32)
    expected = {key: np.asarray(value) for key, value in detector(image, training=False).items()
                if key in ("boxes", "classes")}
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image)
    interpreter.invoke()
    got = {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}
    names = {}
    for key, want in expected.items():
        errors = {name: float(np.abs(value - want).max()) for name, value in got.items()
                  if value.shape == want.shape and name not in names.values()}
        if not errors:
            raise UserError(f"the converted detector has no output shaped like its {key} {want.shape}")
        names[key] = min(errors, key=errors.get)
        scale = max(1.0, float(np.abs(want).max()))
        if errors[names[key]] > 0.05 * scale:  # float16 / dynamic quantization stay far below this
            raise UserError(f"the converted detector's {key} differ from the Keras model's by up to "
                            f"{errors[names[key]]:.3g}; the TFLite conversion is wrong, do not use the file")
    return names


def _exported_models(folder: Path) -> dict:
    """detection.json's record of the .tflite files in `folder` that still exist."""
    try:
        models = json.loads((folder / INFO_FILE).read_text(encoding="utf-8")).get("models", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {name: entry for name, entry in models.items() if (folder / name).is_file()}


def output_names(path: Path | str) -> dict[str, str] | None:
    """The output tensor names recorded for a .tflite file in detection.json beside it (None if none)."""
    path = Path(path)
    return _exported_models(path.parent).get(path.name, {}).get("output_tensors")


def _output_details(interpreter, names: dict[str, str] | None = None) -> tuple[dict, dict]:
    """(boxes, classes) output details: by the recorded tensor names, else by shape (the box output's last
    axis is 4; with 4 classes the first listed output counts as boxes)."""
    outputs = interpreter.get_output_details()
    if len(outputs) != 2:
        raise UserError(f"a detector's TFLite file has two outputs (boxes, classes), this one {len(outputs)}")
    if names:
        by_name = {d["name"]: d for d in outputs}
        if names.get("boxes") in by_name and names.get("classes") in by_name:
            return by_name[names["boxes"]], by_name[names["classes"]]
    ordered = sorted(outputs, key=lambda d: (int(d["shape"][-1]) != 4, d["index"]))
    return ordered[0], ordered[1]


def predict_tflite_raw(interpreter, images: np.ndarray, names: dict[str, str] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Raw outputs (box deltas [N, A, 4], class logits [N, A, C]) for normalized images [N, S, S, C],
    one invoke per image (the file is batch 1). `names`: `output_names(path)`."""
    source = interpreter.get_input_details()[0]
    boxes_detail, classes_detail = _output_details(interpreter, names)
    boxes, classes = [], []
    for image in np.asarray(images, np.float32):
        interpreter.set_tensor(source["index"], image[None])
        interpreter.invoke()
        boxes.append(interpreter.get_tensor(boxes_detail["index"])[0].copy())
        classes.append(interpreter.get_tensor(classes_detail["index"])[0].copy())
    return np.stack(boxes), np.stack(classes)


# ---------------------------------------------------------------- decoding in numpy


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


def decode_tflite_outputs(box_deltas: np.ndarray, class_logits: np.ndarray, anchors: np.ndarray,
                          image_size: int, score_threshold: float = 0.05, nms_iou: float = 0.5,
                          max_detections: int = 100) -> dict[str, np.ndarray]:
    """The TFLite file's raw outputs (box deltas [N, A, 4] or [A, 4], class logits [N, A, C] or [A, C]) to
    detections, in numpy: decode the deltas on `anchors` (anchors.npy), clip to the image, sigmoid scores,
    per-class NMS, the best `max_detections` over all classes. The result has decode_detections' form:
    {"boxes" [N, D, 4], "classes" [N, D] (-1 padding), "scores" [N, D], "num_detections" [N]}, D =
    max_detections (no batch axis if the inputs had none). Thresholds: the run's detection.json."""
    box_deltas, class_logits = np.asarray(box_deltas, np.float32), np.asarray(class_logits, np.float32)
    batched = box_deltas.ndim == 3
    if not batched:
        box_deltas, class_logits = box_deltas[None], class_logits[None]
    boxes = np.clip(decode_boxes(anchors, box_deltas), 0.0, float(image_size))
    scores = 1.0 / (1.0 + np.exp(-class_logits))
    count, d = len(boxes), int(max_detections)
    out = {"boxes": np.zeros((count, d, 4), np.float32), "classes": np.full((count, d), -1, np.int32),
           "scores": np.zeros((count, d), np.float32), "num_detections": np.zeros(count, np.int32)}
    for n in range(count):
        found = []  # (score, class, anchor)
        for c in range(scores.shape[-1]):
            for index in non_max_suppression(boxes[n], scores[n, :, c], nms_iou, score_threshold, d):
                found.append((scores[n, index, c], c, index))
        found.sort(key=lambda item: -item[0])
        found = found[:d]
        for slot, (score, c, index) in enumerate(found):
            out["boxes"][n, slot], out["classes"][n, slot], out["scores"][n, slot] = boxes[n, index], c, score
        out["num_detections"][n] = len(found)
    return out if batched else {key: value[0] for key, value in out.items()}


def evaluate_detection_tflite(path: Path | str, run: Run | str | Path, limit: int | None = None) -> dict:
    """COCO mAP of the .tflite file on the run's test split (its first `limit` images), decoded in numpy
    with anchors.npy beside the file and the run's thresholds: to compare with the run's test_metrics."""
    from shared import config as config_module
    from shared.detection import datasets as detection_data
    from shared.detection.metrics import coco_map

    run = _as_run(run)
    path = Path(path)
    anchors_path = path.parent / ANCHORS_FILE
    if not anchors_path.is_file():
        raise UserError(f"no {ANCHORS_FILE} beside {path}; export the detector again")
    anchors = np.load(anchors_path)
    config = config_module.from_dict(run.config_dict())
    _, test, class_names = detection_data.load_detection_data(config)
    test = test.limit(limit)
    interpreter = tflite_interpreter(path, num_threads=os.cpu_count())
    detection, size = config.detection, config.data.image_size
    found = []
    for images, _ in detection_data.make_dataset(test, config, training=False):
        decoded = decode_tflite_outputs(*predict_tflite_raw(interpreter, images.numpy(), output_names(path)),
                                        anchors, size, detection.score_threshold, detection.nms_iou,
                                        detection.max_detections)
        for i, count in enumerate(decoded["num_detections"]):
            found.append((decoded["boxes"][i, :count], decoded["classes"][i, :count], decoded["scores"][i, :count]))
    metrics = coco_map(ground_truth(test, size), found, class_names, detection.max_detections)
    metrics.update(examples=len(test), boxes=test.num_boxes)
    return metrics

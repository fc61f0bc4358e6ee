"""Running a detection .tflite file with LiteRT: its interpreter, which output is which (`detection.json`
records it), and per image the raw outputs or the post-processing op's detections; the raw outputs decoded
into detections in numpy (`decode_tflite_outputs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shared.detection.boxes import decode_boxes, non_max_suppression
from shared.errors import UserError

INFO_FILE = "detection.json"
POSTPROCESS_OUTPUTS = ("boxes", "classes", "scores", "count")  # the op's order, what detection apps read


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


def exported_models(folder: Path) -> dict:
    """detection.json's record of the .tflite files in `folder` that still exist."""
    try:
        models = json.loads((folder / INFO_FILE).read_text(encoding="utf-8")).get("models", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {name: entry for name, entry in models.items() if (folder / name).is_file()}


def output_names(path: Path | str) -> dict[str, str] | None:
    """The output tensor names recorded for a .tflite file in detection.json beside it (None if none)."""
    path = Path(path)
    return exported_models(path.parent).get(path.name, {}).get("output_tensors")


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


def is_postprocess_file(interpreter) -> bool:
    """Whether a detection .tflite ends in TFLite_Detection_PostProcess (four outputs) or has the raw ones."""
    return len(interpreter.get_output_details()) == len(POSTPROCESS_OUTPUTS)


def predict_tflite_postprocess(interpreter, images: np.ndarray, image_size: int) -> list[tuple]:
    """Detections of a post-processing-op file for normalized images [N, S, S, C], one invoke per image:
    per image (boxes [D, 4] absolute xyxy in the S x S image, classes [D] int, scores [D]), the op's
    `count` first rows of its outputs (boxes, classes, scores, count, in that order)."""
    from shared.tflite import quantized

    source = interpreter.get_input_details()[0]
    outputs = interpreter.get_output_details()
    found = []
    for image in np.asarray(images, np.float32):
        interpreter.set_tensor(source["index"], quantized(image[None], source))  # an int8 input: quantized
        interpreter.invoke()
        boxes, classes, scores, count = (interpreter.get_tensor(d["index"])[0] for d in outputs)
        count = int(count)
        # (ymin, xmin, ymax, xmax) normalized -> xyxy pixels, clipped to the image as decode_detections does
        yx = np.clip(boxes[:count], 0.0, 1.0) * float(image_size)
        found.append((yx[:, [1, 0, 3, 2]].astype(np.float32), classes[:count].astype(np.int32),
                      scores[:count].astype(np.float32)))
    return found


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

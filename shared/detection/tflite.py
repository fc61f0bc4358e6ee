"""A detection run's TFLite file: its detector converted (`export_detection_tflite`), and the file's COCO mAP
through LiteRT on the run's test split (`evaluate_detection_tflite`).

`export_detection_tflite`: `<run>/export/detector_<quantize>.tflite`, input one *normalized* image
(1, S, S, C) as the run's config.yaml says (data.mean / data.std). By default the file ends in TFLite's
TFLite_Detection_PostProcess op, as the Object Detection API's TF2 export writes it: outputs boxes, classes,
scores, count, the form detection apps read; labels.txt beside it. `raw_outputs`: builtin ops only, the raw
`boxes` deltas [1, A, 4] and `classes` logits [1, A, C], with `anchors.npy` beside it ([A, 4] float32
absolute xyxy in the S x S image, the order of the outputs);
`shared.detection.tflite_inference.decode_tflite_outputs` turns them into detections with numpy alone: the
same box decoding (center_xywh deltas times the variances 0.1, 0.1, 0.2, 0.2), sigmoid scores and per-class
greedy NMS as `decode_detections`. `detection.json` (image size, normalization, class names, thresholds, box
encoding) describes every file of the folder. The conversion is here; the edits of the converted flatbuffer
are `shared.detection.tflite_flatbuffer`'s, running a file `shared.detection.tflite_inference`'s.
"""

from __future__ import annotations

import io as io_module  # `io` is export_detection_tflite's argument (the CLI's --io)
import json
import os
from pathlib import Path

import numpy as np

from shared.detection import datasets as detection_data
from shared.detection.anchors import VARIANCES
from shared.detection.boxes import ground_truth
from shared.detection.metrics import coco_map
from shared.detection.model import model_anchors
from shared.detection.serving import preprocessing
from shared.detection.tflite_flatbuffer import anchors_in_int8, outputs_in_op_order
from shared.detection.tflite_inference import (INFO_FILE, POSTPROCESS_OUTPUTS, decode_tflite_outputs,
                                               exported_models, identify_outputs, is_postprocess_file,
                                               output_names, predict_tflite_postprocess, predict_tflite_raw,
                                               tflite_interpreter)
from shared.durable import atomic_write
from shared.errors import UserError
from shared.runs import Run
from shared.tflite import EXPORT_DIR, check_mode

ANCHORS_FILE = "anchors.npy"
TFLITE_QUANTIZE = ("none", "float16", "dynamic")  # both forms; int8 only with the post-processing op
POSTPROCESS_OP = "TFLite_Detection_PostProcess"
LABELS_FILE = "labels.txt"
CALIBRATION_IMAGES = 200  # training images an int8 file is calibrated on
NMS_CHOICES = ("regular", "fast")  # the op's per-class NMS, or its class-agnostic one (see postprocess_signature)
SIGNATURE_OUTPUTS = ("detection_boxes", "detection_classes", "detection_scores", "num_detections")


# ---------------------------------------------------------------- conversion


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
    _quantization(converter, quantize)
    return converter.convert()


def center_size_anchors(anchors: np.ndarray, image_size: int) -> np.ndarray:
    """Absolute xyxy anchors [A, 4] -> the post-processing op's form: (y centre, x centre, height, width),
    normalized by the image size (the op's boxes come out normalized, as detection apps expect)."""
    anchors = np.asarray(anchors, np.float64) / float(image_size)
    width, height = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    return np.stack([anchors[:, 1] + height / 2, anchors[:, 0] + width / 2, height, width], -1).astype(np.float32)


def postprocess_signature(detection, num_classes: int, nms: str = "regular") -> str:
    """The `experimental_implements` attributes that the converter turns into TFLite_Detection_PostProcess
    (as the Object Detection API's TF2 TFLite export writes them). The scales undo our variances: the op
    decodes (ty, tx, th, tw) / (y_scale, x_scale, h_scale, w_scale), we encode deltas * (1 / variance).
    nms "regular": per-class NMS, as decode_detections does, so the file finds what the SavedModel finds;
    but TFLite's kernel runs it on the interpreter's threads and with N of them (1 < N < classes) never
    visits class N (its shared class counter starts at N and is pre-incremented). "fast": the op's
    class-agnostic NMS over each anchor's best class (the Object Detection API export's default), one
    thread whatever the interpreter has."""
    vx, vy, vw, vh = VARIANCES
    regular = "true" if nms == "regular" else "false"
    attributes = [f'name: "{POSTPROCESS_OP}"',
                  f'attr {{ key: "max_detections" value {{ i: {int(detection.max_detections)} }} }}',
                  'attr { key: "max_classes_per_detection" value { i: 1 } }',
                  f'attr {{ key: "detections_per_class" value {{ i: {int(detection.max_detections)} }} }}',
                  f'attr {{ key: "use_regular_nms" value {{ b: {regular} }} }}',
                  f'attr {{ key: "nms_score_threshold" value {{ f: {float(detection.score_threshold):f} }} }}',
                  f'attr {{ key: "nms_iou_threshold" value {{ f: {float(detection.nms_iou):f} }} }}',
                  f'attr {{ key: "y_scale" value {{ f: {1 / vy:f} }} }}',
                  f'attr {{ key: "x_scale" value {{ f: {1 / vx:f} }} }}',
                  f'attr {{ key: "h_scale" value {{ f: {1 / vh:f} }} }}',
                  f'attr {{ key: "w_scale" value {{ f: {1 / vw:f} }} }}',
                  f'attr {{ key: "num_classes" value {{ i: {int(num_classes)} }} }}']
    return " ".join(attributes)


def clipped_encodings(box_deltas, anchors: np.ndarray, min_size: float = 1e-6):
    """Our deltas [..., A, 4] (dx, dy, log dw, log dh) / variances -> the op's (ty, tx, th, tw) of the same
    boxes clipped to the image: decoded on the center-size `anchors`, clipped to 0-1, encoded again. The op
    neither clips nor can be told to, and decode_detections clips before its NMS: without this, a box
    reaching past the edge would suppress (or survive) differently in the file than in the SavedModel."""
    import tensorflow as tf

    yx_variance = tf.constant([VARIANCES[1], VARIANCES[0]])
    hw_variance = tf.constant([VARIANCES[3], VARIANCES[2]])
    centre, size = tf.constant(anchors[:, :2]), tf.constant(anchors[:, 2:])
    deltas = tf.gather(box_deltas, [1, 0, 3, 2], axis=-1)  # (dy, dx, dh, dw)
    box_centre = deltas[..., :2] * yx_variance * size + centre
    box_size = tf.exp(deltas[..., 2:] * hw_variance) * size
    low = tf.clip_by_value(box_centre - box_size / 2, 0.0, 1.0)
    high = tf.clip_by_value(box_centre + box_size / 2, 0.0, 1.0)
    box_centre, box_size = (low + high) / 2, tf.maximum(high - low, min_size)
    return tf.concat([(box_centre - centre) / size / yx_variance,
                      tf.math.log(box_size / size) / hw_variance], axis=-1)


def _postprocess_function(detector, config, num_classes: int, spec, nms: str = "regular"):
    """The detector on one image followed by the post-processing op: a tf.function whose composite
    `experimental_implements` stand-in the converter replaces by the op, fed the deltas of the boxes
    clipped to the image (`clipped_encodings`), the sigmoid scores (one column a class: no background
    column, which the op takes as optional) and the anchors as a constant."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    anchors = center_size_anchors(model_anchors(detector, config.detection).numpy(), config.data.image_size)

    @tf.function(experimental_implements=postprocess_signature(config.detection, num_classes, nms))
    def postprocess(box_encodings, class_predictions, anchors):  # noqa: ARG001 (the op reads them)
        return (tf.constant(0.0, name="boxes"), tf.constant(0.0, name="classes"),
                tf.constant(0.0, name="scores"), tf.constant(0.0, name="num_detections"))

    def raw(image):
        outputs = detector(image, training=False)
        return outputs["boxes"], outputs["classes"]

    frozen = convert_variables_to_constants_v2(tf.function(raw, input_signature=[spec]).get_concrete_function())

    def forward(image):
        box_deltas, class_logits = frozen(image)
        deltas = clipped_encodings(tf.cast(box_deltas, tf.float32), anchors)
        scores = tf.sigmoid(tf.cast(class_logits, tf.float32))
        boxes, classes, scores, count = postprocess(deltas, scores, tf.constant(anchors))
        return dict(zip(SIGNATURE_OUTPUTS, (boxes, classes, scores, count)))

    return tf.function(forward, input_signature=[spec])


def _convert_postprocess(detector, config, num_classes: int, quantize: str, calibration=None,
                         nms: str = "regular", io: str = "float") -> bytes:
    """The detector ending in TFLite_Detection_PostProcess, a custom op that LiteRT and the TFLite
    runtimes have built in (hence allow_custom_ops); every other op a builtin. int8: weights and
    activations, calibrated on `calibration` (a callable yielding [image] lists), float input (io "int8":
    int8, as edge accelerators take it) and the op's float outputs (it has no other kind), and the op's
    anchors stored in int8 (`tflite_flatbuffer.anchors_in_int8`)."""
    import tensorflow as tf

    data = config.data
    spec = tf.TensorSpec((1, data.image_size, data.image_size, data.channels), tf.float32, name="image")
    function = _postprocess_function(detector, config, num_classes, spec, nms)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], tf.Module())
    converter.allow_custom_ops = True
    if quantize == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if io == "int8":
            converter.inference_input_type = tf.int8
    else:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        _quantization(converter, quantize)
    content = outputs_in_op_order(converter.convert(), SIGNATURE_OUTPUTS)
    return anchors_in_int8(content, POSTPROCESS_OP) if quantize == "int8" else content


def _quantization(converter, quantize: str) -> None:
    import tensorflow as tf

    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]


def calibration_images(config, count: int = CALIBRATION_IMAGES):
    """A representative_dataset for int8: the run's first `count` training images, normalized as the
    evaluation pipeline feeds them (no augmentation), one [1, S, S, C] image at a time."""
    train, _, _ = detection_data.load_detection_data(config)
    train = train.limit(count)

    def images():
        for batch, _ in detection_data.make_dataset(train, config, training=False):
            for image in batch.numpy():
                yield [image[None].astype(np.float32)]

    return images


def export_detection_tflite(detector, config, run: Run, quantize: str = "none", io: str = "float",
                            out_path: Path | None = None, raw_outputs: bool = False, nms: str = "regular") -> Path:
    """Convert `detector` (the run's, rebuilt from its snapshot and last checkpoint: `shared.tasks.rebuild`)
    with the run's `config` to a TFLite file; returns its path, every file written atomically.

    Default: the file ends in TFLite_Detection_PostProcess (`<run>/export/detector_<quantize>.tflite`,
    quantize none / float16 / dynamic / int8, int8 calibrated on training images), with labels.txt beside it;
    io "int8" (with int8): an int8 input tensor, `detector_int8_int8io.tflite`; nms "fast"
    (`postprocess_signature`) adds `_fast_nms` to the name.
    raw_outputs: builtin ops only, the raw deltas and logits (`detector_<quantize>_raw.tflite`, no int8),
    anchors.npy beside it for `decode_tflite_outputs`. detection.json (beside both) describes each file."""
    offered = TFLITE_QUANTIZE if raw_outputs else (*TFLITE_QUANTIZE, "int8")
    if quantize not in offered:
        form = "the raw-output form" if raw_outputs else "detectors"
        raise UserError(f"quantize={quantize} is not offered for {form}; choose one of {', '.join(offered)}")
    if nms not in NMS_CHOICES:
        raise UserError(f"--nms {nms}: choose one of {', '.join(NMS_CHOICES)}")
    if raw_outputs and nms != "regular":
        raise UserError("--nms chooses the post-processing op's NMS; the raw-output form has none: leave it out")
    check_mode(quantize, io)  # --io int8 goes with --quantize int8 only (the raw form offers neither)
    data = config.data
    names = run.class_names() or [str(i) for i in range(data.num_classes)]
    shape = (data.image_size, data.image_size, data.channels)
    try:
        if raw_outputs:
            content = _convert(detector, shape, quantize)
        else:
            calibration = calibration_images(config) if quantize == "int8" else None
            content = _convert_postprocess(detector, config, len(names), quantize, calibration, nms, io)
    except UserError:
        raise
    except Exception as error:  # the converter's errors are not public types
        reason = " ".join(str(error).split())[:400]
        raise UserError(f"TFLite conversion (quantize={quantize}) of {run.path} failed: {reason}") from error
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    suffix = "_raw" if raw_outputs else ("_int8io" if io == "int8" else "") + ("_fast_nms" if nms == "fast" else "")
    out = Path(out_path) if out_path is not None else run.path / EXPORT_DIR / f"detector_{quantize}{suffix}.tflite"
    anchors = model_anchors(detector, config.detection).numpy()
    detection = config.detection
    if raw_outputs:
        file_info = {"quantize": quantize, "form": "raw",
                     "output_tensors": identify_outputs(interpreter, detector, shape)}
    else:
        file_info = {"quantize": quantize, "io": io, "form": "postprocess", "nms": nms,
                     "outputs": list(POSTPROCESS_OUTPUTS)}
    info = {"run": str(run.path.resolve()), "checkpoint": run.last_checkpoint().name, "model": out.name,
            **preprocessing(config), "input": "one normalized image (1, S, S, C): (pixels - mean) / std",
            "outputs": {"boxes": "[1, A, 4] deltas (dx, dy, log dw, log dh) / variances",
                        "classes": "[1, A, C] logits (sigmoid per class)"},
            "postprocess_outputs": {
                "boxes": "[1, D, 4] float32 (ymin, xmin, ymax, xmax) normalized to 0-1",
                "classes": "[1, D] float32 class index (labels.txt line)", "scores": "[1, D] float32",
                "count": "[1] float32 detections filled in"},
            "anchors": ANCHORS_FILE, "num_anchors": int(len(anchors)), "variances": list(VARIANCES),
            "encoding": "center_xywh", "box_format": "xyxy", "labels": names, "labels_file": LABELS_FILE,
            "score_threshold": detection.score_threshold, "nms_iou": detection.nms_iou,
            "max_detections": detection.max_detections,
            # every file exported here: its form and, for the raw form, its own output tensor names
            "models": {**exported_models(out.parent), out.name: file_info}}
    buffer = io_module.BytesIO()
    np.save(buffer, anchors.astype(np.float32))
    atomic_write(out.parent / ANCHORS_FILE, buffer.getvalue())
    atomic_write(out.parent / LABELS_FILE, "".join(f"{name}\n" for name in names).encode())
    atomic_write(out.parent / INFO_FILE, (json.dumps(info, indent=2) + "\n").encode())
    atomic_write(out, content)
    return out


# ---------------------------------------------------------------- a file evaluated


def evaluate_detection_tflite(path: Path | str, config, limit: int | None = None) -> dict:
    """COCO mAP of the .tflite file on the test split of the run's `config` (its first `limit` images), to
    compare with the run's test_metrics: the post-processing op's detections as they are, or the raw outputs
    decoded in numpy with anchors.npy beside the file and the run's thresholds."""
    path = Path(path)
    interpreter = tflite_interpreter(path, num_threads=os.cpu_count())
    postprocess = is_postprocess_file(interpreter)
    if postprocess:  # the op's regular NMS on N threads skips class N (postprocess_signature)
        interpreter = tflite_interpreter(path, num_threads=1)
    anchors_path = path.parent / ANCHORS_FILE
    if not postprocess and not anchors_path.is_file():
        raise UserError(f"no {ANCHORS_FILE} beside {path}; export the detector again")
    _, test, class_names = detection_data.load_detection_data(config)
    test = test.limit(limit)
    detection, size = config.detection, config.data.image_size
    anchors = None if postprocess else np.load(anchors_path)
    found = []
    for images, _ in detection_data.make_dataset(test, config, training=False):
        if postprocess:
            found.extend(predict_tflite_postprocess(interpreter, images.numpy(), size))
            continue
        decoded = decode_tflite_outputs(*predict_tflite_raw(interpreter, images.numpy(), output_names(path)),
                                        anchors, size, detection.score_threshold, detection.nms_iou,
                                        detection.max_detections)
        for i, count in enumerate(decoded["num_detections"]):
            found.append((decoded["boxes"][i, :count], decoded["classes"][i, :count], decoded["scores"][i, :count]))
    metrics = coco_map(ground_truth(test, size), found, class_names, detection.max_detections)
    metrics.update(examples=len(test), boxes=test.num_boxes)
    return metrics

"""The deployable detection TFLite: `export --format tflite` writes a file ending in TFLite_Detection_PostProcess
whose four outputs (boxes, classes, scores, count), read with the LiteRT interpreter, are the SavedModel's
detections; labels.txt beside it; `--evaluate` reports mAP through LiteRT; `--raw-outputs` keeps the old form;
`--quantize int8` is calibrated on training images with float input and outputs. Tiny sizes (the recipe of
test_detection_runner: 16 train / 8 test canvases at 48 px, ResNet-18 width 4, 2 epochs from scratch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared import runner, runs
from shared.fashion_mnist import FASHION_MNIST_DIRS

REPO = Path(__file__).resolve().parent.parent
TOP = 10  # detections compared one by one, best first

pytestmark = pytest.mark.skipif(not (Path(FASHION_MNIST_DIRS[0]) / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST IDX files not installed")


@pytest.fixture(scope="module")
def trained(tiny_detector) -> runs.Run:
    return tiny_detector


def split_images(run: runs.Run):
    """(normalized images [N, S, S, C] as the file takes them, the same as 0-255 pixels, config)."""
    from shared import config as config_module
    from shared.detection import datasets as detection_data
    from shared.detection.datasets import detection_normalization

    config = config_module.from_dict(run.config_dict())
    _, test, _ = detection_data.load_detection_data(config)
    images = np.concatenate([x.numpy() for x, _ in detection_data.make_dataset(test, config, training=False)])
    mean, std = detection_normalization(config)
    return images, images * np.asarray(std, np.float32) + np.asarray(mean, np.float32), config


@pytest.mark.slow
def test_default_tflite_ends_in_the_postprocess_op_and_finds_what_the_saved_model_finds(trained, tmp_path, capsys):
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from shared.detection import export, tflite, tflite_inference as inference
    from shared.tasks import rebuild

    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--evaluate"]) == 0
    out = capsys.readouterr().out
    path = trained.path / "export" / "detector_none.tflite"
    assert str(path) in out and tflite.POSTPROCESS_OP in out and "LiteRT" in out and "mAP" in out, out
    assert (path.parent / tflite.LABELS_FILE).read_text().splitlines() == trained.class_names()
    assert json.loads((path.parent / inference.INFO_FILE).read_text())["models"][path.name]["form"] == "postprocess"

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    assert tflite.POSTPROCESS_OP in {op["op_name"] for op in interpreter._get_ops_details()}
    outputs = interpreter.get_output_details()
    assert [d["name"] for d in outputs] == list(tflite.SIGNATURE_OUTPUTS)  # by position, as apps read them
    assert [tuple(d["shape"]) for d in outputs][-1] == (1,)

    images, pixels, config = split_images(trained)
    size = config.data.image_size
    saved = tf.saved_model.load(str(export.export_detection_saved_model(*rebuild(trained), trained,
                                                                        tmp_path / "serving")))
    want = {k: v.numpy() for k, v in saved.signatures["predict_images"](images=tf.constant(pixels)).items()}
    compared = 0
    for i, image in enumerate(images):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
        interpreter.invoke()
        boxes, classes, scores, count = (interpreter.get_tensor(d["index"])[0] for d in outputs)
        assert int(count) == int(want["num_detections"][i]) > 0
        top = min(TOP, int(count))
        np.testing.assert_array_equal(classes[:top].astype(int), want["classes"][i, :top])
        np.testing.assert_allclose(scores[:top], want["scores"][i, :top], atol=1e-4)
        # the op's (ymin, xmin, ymax, xmax) normalized vs the SavedModel's xyxy pixels, clipped alike
        np.testing.assert_allclose(boxes[:top][:, [1, 0, 3, 2]] * size, want["boxes"][i, :top], atol=0.02)
        compared += top
    assert compared >= TOP


@pytest.mark.slow
def test_raw_outputs_option_and_int8_with_float_io(trained, capsys):
    from ai_edge_litert.interpreter import Interpreter

    from shared.detection import tflite
    from shared.tasks import rebuild

    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--raw-outputs"]) == 0
    raw = trained.path / "export" / "detector_none_raw.tflite"
    assert raw.is_file() and len(Interpreter(model_path=str(raw)).get_output_details()) == 2
    capsys.readouterr()
    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--raw-outputs",
                        "--quantize", "int8"]) == 2  # the raw form is not calibrated
    assert "int8" in capsys.readouterr().err

    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--quantize", "int8",
                        "--evaluate"]) == 0
    out = capsys.readouterr().out
    path = trained.path / "export" / "detector_int8.tflite"
    assert "LiteRT" in out and "mAP" in out, out
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert [d["dtype"] for d in interpreter.get_output_details()] == [np.float32] * 4
    kinds = {d["dtype"] for d in interpreter.get_tensor_details()}
    assert np.int8 in kinds  # weights and activations quantized, not only float ops
    float_path = trained.path / "export" / "detector_none.tflite"
    if not float_path.is_file():
        tflite.export_detection_tflite(*rebuild(trained), trained)
    print(f"int8 {path.stat().st_size} B vs float32 {float_path.stat().st_size} B; {out.strip().splitlines()[-1]}")
    from tensorflow.lite.tools import flatbuffer_utils

    def constant_bytes(tflite_file) -> int:  # the weights, biases and anchors the file stores, not its graph
        return sum(len(buffer.data) for buffer in flatbuffer_utils.read_model(str(tflite_file)).buffers
                   if buffer.data is not None)

    # a byte per weight instead of four (biases stay 32-bit): 0.26 on the tiny backbone and on a ResNet-18 one
    assert constant_bytes(path) < 0.3 * constant_bytes(float_path)

    # the op's anchors: no float32 copy in the file, an int8 constant dequantized to within half a step
    from shared.detection.model import model_anchors

    model = flatbuffer_utils.read_model(str(path))
    graph = model.subgraphs[0]
    producers = {int(o): op for op in graph.operators for o in op.outputs}
    (op,) = [op for op in graph.operators if model.operatorCodes[op.opcodeIndex].customCode]
    source = graph.tensors[producers[int(op.inputs[2])].inputs[0]]
    assert source.type == 9 and model.buffers[source.buffer].data is not None  # INT8, a constant
    assert model.buffers[graph.tensors[op.inputs[2]].buffer].data is None
    detector, config = rebuild(trained)
    want = tflite.center_size_anchors(model_anchors(detector, config.detection).numpy(), config.data.image_size)
    scale, zero_point = source.quantization.scale[0], source.quantization.zeroPoint[0]
    stored = np.frombuffer(bytes(model.buffers[source.buffer].data), np.int8).reshape(want.shape)
    np.testing.assert_allclose((stored.astype(np.float32) - zero_point) * scale, want, atol=scale / 2 + 1e-6)
    assert scale == pytest.approx(max(1.0, want.max()) / 255)  # one step: 1/255 of the range from 0


@pytest.mark.slow
def test_int8_input_for_edge_accelerators_finds_what_float_input_finds(trained, capsys):
    """--io int8: the input tensor int8 too (the op's outputs stay float: it has no other kind); on the same
    images it finds the float-input int8 file's detections, and --evaluate and predict quantize for it."""
    from ai_edge_litert.interpreter import Interpreter

    from shared.detection import tflite, tflite_inference as inference
    from shared.tasks import rebuild

    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--quantize", "int8",
                        "--io", "int8", "--evaluate"]) == 0
    out = capsys.readouterr().out
    path = trained.path / "export" / "detector_int8_int8io.tflite"
    assert str(path) in out and "LiteRT" in out and "mAP" in out, out
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    assert [d["dtype"] for d in interpreter.get_output_details()] == [np.float32] * 4
    assert json.loads((path.parent / inference.INFO_FILE).read_text())["models"][path.name]["io"] == "int8"
    float_input = trained.path / "export" / "detector_int8.tflite"
    if not float_input.is_file():
        tflite.export_detection_tflite(*rebuild(trained), trained, quantize="int8")
    images, _, config = split_images(trained)
    size = config.data.image_size
    ours = inference.predict_tflite_postprocess(inference.tflite_interpreter(path, 1), images, size)
    theirs = inference.predict_tflite_postprocess(inference.tflite_interpreter(float_input, 1), images, size)
    for (boxes, classes, scores), (want_boxes, want_classes, want_scores) in zip(ours, theirs):
        top = min(3, len(scores), len(want_scores))
        assert top > 0
        np.testing.assert_array_equal(classes[:top], want_classes[:top])
        np.testing.assert_allclose(scores[:top], want_scores[:top], atol=0.02)  # one input rounding apart
        np.testing.assert_allclose(boxes[:top], want_boxes[:top], atol=0.5)
    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--quantize", "dynamic",
                        "--io", "int8"]) == 2  # int8 input needs the calibrated int8 file
    assert "quantize=int8" in capsys.readouterr().err


@pytest.mark.slow
def test_fast_nms_option_writes_its_own_file(trained, capsys):
    from tensorflow.lite.tools import flatbuffer_utils

    from shared.detection import tflite, tflite_inference as inference
    from shared.tasks import rebuild

    def op_options(path: Path) -> bytes:
        model = flatbuffer_utils.read_model(str(path))
        (op,) = [op for op in model.subgraphs[0].operators if model.operatorCodes[op.opcodeIndex].customCode]
        return bytes(op.customOptions)

    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--raw-outputs",
                        "--nms", "fast"]) == 2
    assert "--nms" in capsys.readouterr().err
    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--nms", "fast"]) == 0
    fast = trained.path / "export" / "detector_none_fast_nms.tflite"
    assert str(fast) in capsys.readouterr().out
    info = json.loads((fast.parent / inference.INFO_FILE).read_text())["models"]
    assert info[fast.name]["nms"] == "fast"
    regular = trained.path / "export" / "detector_none.tflite"
    if not regular.is_file():
        tflite.export_detection_tflite(*rebuild(trained), trained)
    assert op_options(fast) != op_options(regular)  # use_regular_nms false: the only attribute that differs
    assert len(op_options(fast)) == len(op_options(regular))


def test_clipped_encodings_decode_to_the_clipped_boxes_the_op_scales_expect():
    """What the op decodes from clipped_encodings, with the scales postprocess_signature gives it, is our own
    decoding of the raw deltas clipped to the image (normalized, y first): hand-checked on one anchor too."""
    import re

    from shared.detection import tflite
    from shared.detection.anchors import decode

    size = 40
    anchors = np.array([[0, 0, 20, 10], [30, 30, 40, 40], [10, 5, 30, 25]], np.float32)  # xyxy pixels
    deltas = np.array([[[-3.0, 0.0, 0.0, 0.0], [4.0, 4.0, 2.0, 1.0], [0.5, -0.5, -1.0, 1.0]]], np.float32)
    attributes = dict(re.findall(r'key: "(\w)_scale" value \{ f: ([\d.]+)', tflite.postprocess_signature(
        type("Detection", (), {"max_detections": 5, "score_threshold": 0.1, "nms_iou": 0.5})(), 3)))
    scale = {key: float(value) for key, value in attributes.items()}
    centre_size = tflite.center_size_anchors(anchors, size)
    encoded = tflite.clipped_encodings(deltas, centre_size).numpy()[0]
    # the op's decoding (TFLite's detection_postprocess.cc DecodeCenterSizeBoxes)
    ty, tx, th, tw = encoded.T
    ya, xa, ha, wa = centre_size.T
    yc, xc = ty / scale["y"] * ha + ya, tx / scale["x"] * wa + xa
    h, w = np.exp(th / scale["h"]) * ha, np.exp(tw / scale["w"]) * wa
    op_boxes = np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], -1)
    ours = np.clip(decode(anchors, deltas).numpy()[0], 0, size) / size  # xyxy
    np.testing.assert_allclose(op_boxes, ours[:, [1, 0, 3, 2]], atol=1e-5)
    assert op_boxes[0, 1] == pytest.approx(0.0, abs=1e-6)  # anchor 0 shifted left of the image: clipped at 0
    assert (op_boxes[1, 2:] <= 1.0 + 1e-6).all() and op_boxes[1, 2] == pytest.approx(1.0, abs=1e-5)


def postprocess_only_file(tmp_path: Path, nms: str, num_classes: int, boxes: int) -> Path:
    """A TFLite file of the post-processing op alone as the export writes it (postprocess_signature), its
    box encodings and scores as inputs, unit anchors on a row."""
    import tensorflow as tf

    from shared.detection import tflite

    detection = type("Detection", (), {"max_detections": 20, "score_threshold": 0.05, "nms_iou": 0.5})()
    anchors = np.array([[0.5, (i + 0.5) / boxes, 0.9, 0.9 / boxes] for i in range(boxes)], np.float32)

    @tf.function(experimental_implements=tflite.postprocess_signature(detection, num_classes, nms))
    def postprocess(box_encodings, class_predictions, anchors):  # noqa: ARG001 (the op reads them)
        return (tf.constant(0.0), tf.constant(0.0), tf.constant(0.0), tf.constant(0.0))

    @tf.function(input_signature=[tf.TensorSpec((1, boxes, 4), tf.float32),
                                  tf.TensorSpec((1, boxes, num_classes), tf.float32)])
    def forward(encodings, scores):
        return postprocess(encodings, scores, tf.constant(anchors))

    converter = tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()], tf.Module())
    converter.allow_custom_ops = True
    path = tmp_path / f"{nms}.tflite"
    path.write_bytes(converter.convert())
    return path


def op_classes(path: Path, threads: int, scores: np.ndarray) -> list[int]:
    """The classes the file's op finds for `scores` [boxes, classes] on `threads` LiteRT threads, sorted."""
    from ai_edge_litert.interpreter import Interpreter

    from shared.detection import tflite

    interpreter = Interpreter(model_path=str(path), num_threads=threads)
    interpreter.allocate_tensors()
    encodings, predictions = sorted(interpreter.get_input_details(), key=lambda d: d["shape"][-1] != 4)
    interpreter.set_tensor(encodings["index"], np.zeros((1, scores.shape[0], 4), np.float32))
    interpreter.set_tensor(predictions["index"], scores[None])
    interpreter.invoke()
    (op,) = [op for op in interpreter._get_ops_details() if op["op_name"] == tflite.POSTPROCESS_OP]
    _, classes, _, count = (interpreter.get_tensor(index)[0] for index in op["outputs"])
    return sorted(int(c) for c in classes[:int(count)])


def test_litert_regular_nms_on_n_threads_skips_class_n_and_fast_nms_does_not(tmp_path):
    """Why `evaluate_detection_tflite` runs the op on one thread and `--nms fast` exists: in the LiteRT this
    project pins, the op's per-class NMS on N threads (1 < N < classes) never visits class N. One box a
    class, apart from each other, each scored 0.9 for its own class only: all 5 must come out. If this
    starts failing after an upgrade, the runtime is fixed: drop the one-thread rule and the note in
    docs/detection.md."""
    classes, boxes = 5, 5
    scores = np.eye(boxes, classes, dtype=np.float32) * 0.9
    regular = postprocess_only_file(tmp_path, "regular", classes, boxes)
    assert op_classes(regular, 1, scores) == list(range(classes))
    for threads in (2, 3):
        assert op_classes(regular, threads, scores) == [c for c in range(classes) if c != threads]
    fast = postprocess_only_file(tmp_path, "fast", classes, boxes)
    for threads in (1, 2, 3):
        assert op_classes(fast, threads, scores) == list(range(classes))


@pytest.mark.slow
def test_predict_refuses_a_tflite_file_of_another_shape(trained, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("L", (20, 20)).save(image)
    foreign = postprocess_only_file(tmp_path, "regular", 3, 5)  # the op alone: its inputs are no image
    assert runner.main(["predict", "--tflite", str(foreign), "--run", str(trained.path), str(image)]) == 2
    err = capsys.readouterr().err
    assert "takes images of" in err and "was not exported from that run" in err and len(err.strip().splitlines()) == 1

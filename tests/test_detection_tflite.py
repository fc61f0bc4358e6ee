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
def trained(tmp_path_factory) -> runs.Run:
    from test_detection_data import load_script
    from test_detection_runner import SIZE, TINY, data_overrides

    base = tmp_path_factory.mktemp("detection_tflite")
    assert load_script().main([str(base / "data"), "--train", "16", "--test", "8", "--size", str(SIZE),
                               "--min-scale", "12", "--max-scale", "28", "--seed", "3", "--no-progress"]) == 0
    overrides = [*TINY, *data_overrides(base / "data"), f"run.dir={base / 'runs'}"]
    assert runner.main(["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
                        *[arg for item in overrides for arg in ("--set", item)]]) == 0
    (folder,) = (base / "runs" / "resnet").iterdir()
    return runs.Run(folder)


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

    from shared.detection import export

    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--evaluate"]) == 0
    out = capsys.readouterr().out
    path = trained.path / "export" / "detector_none.tflite"
    assert str(path) in out and export.POSTPROCESS_OP in out and "LiteRT" in out and "mAP" in out, out
    assert (path.parent / export.LABELS_FILE).read_text().splitlines() == trained.class_names()
    assert json.loads((path.parent / export.INFO_FILE).read_text())["models"][path.name]["form"] == "postprocess"

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    assert export.POSTPROCESS_OP in {op["op_name"] for op in interpreter._get_ops_details()}
    outputs = interpreter.get_output_details()
    assert [d["name"] for d in outputs] == list(export.SIGNATURE_OUTPUTS)  # by position, as apps read them
    assert [tuple(d["shape"]) for d in outputs][-1] == (1,)

    images, pixels, config = split_images(trained)
    size = config.data.image_size
    saved = tf.saved_model.load(str(export.export_detection_saved_model(trained, tmp_path / "serving")))
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

    from shared.detection import export

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
        export.export_detection_tflite(trained)
    assert path.stat().st_size < 0.6 * float_path.stat().st_size  # tiny model: the float anchors weigh a lot
    print(f"int8 {path.stat().st_size} B vs float32 {float_path.stat().st_size} B; {out.strip().splitlines()[-1]}")


def test_clipped_encodings_decode_to_the_clipped_boxes_the_op_scales_expect():
    """What the op decodes from clipped_encodings, with the scales postprocess_signature gives it, is our own
    decoding of the raw deltas clipped to the image (normalized, y first): hand-checked on one anchor too."""
    import re

    from shared.detection import export
    from shared.detection.anchors import decode

    size = 40
    anchors = np.array([[0, 0, 20, 10], [30, 30, 40, 40], [10, 5, 30, 25]], np.float32)  # xyxy pixels
    deltas = np.array([[[-3.0, 0.0, 0.0, 0.0], [4.0, 4.0, 2.0, 1.0], [0.5, -0.5, -1.0, 1.0]]], np.float32)
    attributes = dict(re.findall(r'key: "(\w)_scale" value \{ f: ([\d.]+)', export.postprocess_signature(
        type("Detection", (), {"max_detections": 5, "score_threshold": 0.1, "nms_iou": 0.5})(), 3)))
    scale = {key: float(value) for key, value in attributes.items()}
    centre_size = export.center_size_anchors(anchors, size)
    encoded = export.clipped_encodings(deltas, centre_size).numpy()[0]
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

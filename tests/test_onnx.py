"""`export --format onnx`: each architecture converted by Keras' exporter (tf2onnx) computes what the Keras model
computes on the eval pipeline's tensors (ONNX Runtime), the file says what it takes in its metadata, and an op the
converter cannot take is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared import modelzoo, runner
from shared.config import load_config
from shared.errors import UserError
from shared.eval_view import EvalView
from shared.fashion_mnist import FASHION_MNIST_DIRS

ort = pytest.importorskip("onnxruntime", reason="the ONNX extra is not installed: pip install -e '.[onnx]'")
pytest.importorskip("tf2onnx", reason="the ONNX extra is not installed: pip install -e '.[onnx]'")

from shared.onnx_export import export_onnx, read_metadata  # noqa: E402

HAS_FASHION = (Path(FASHION_MNIST_DIRS[0]) / "t10k-images-idx3-ubyte.gz").is_file()
SMALL = {"resnet": {"depth": 18, "width": 8, "small_input": True},
         "mobilenet_v2": {"alpha": 0.35, "small_input": True},
         "googlenet": {"width": 0.125, "small_input": True, "batch_norm": True, "aux_heads": True},
         "alexnet": {"width": 0.25, "small_input": True}}


def eval_tensors(count: int = 256) -> np.ndarray:
    """The first `count` Fashion-MNIST test images as the eval pipeline hands them to a model (normalized)."""
    from shared.data import make_datasets

    config = load_config(tree={"data": {"source": "fashion_mnist", "limit_test": count, "limit_train": 64,
                                        "image_size": 28, "channels": 1},
                               "train": {"batch_size": 64}})
    return np.concatenate([images.numpy() for images, _ in make_datasets(config).test])


def onnx_outputs(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images.astype(np.float32)})[0]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST IDX files not installed")
@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_architecture_computes_the_same_function_in_onnx_runtime(name, tmp_path):
    module = modelzoo.load_model_module(modelzoo.model_dir(name))
    keras.utils.set_random_seed(0)
    model = modelzoo.inference_model(modelzoo.build_model(module, 10, (28, 28, 1), SMALL[name]))
    images = eval_tensors()
    expected = np.concatenate([np.asarray(model(images[i:i + 64], training=False)) for i in range(0, len(images), 64)])
    path = export_onnx(model, tmp_path / f"{name}.onnx", {"task": "classification"})
    got = onnx_outputs(path, images)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.array_equal(got.argmax(axis=1), expected.argmax(axis=1))  # the same top-1 on every image
    assert read_metadata(path) == {"task": "classification"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.onnx"]  # nothing half-written left


@pytest.mark.slow  # converts a model
def test_the_command_writes_the_file_with_its_eval_view_and_classes(trained_run, tmp_path, capsys):
    source, _ = trained_run
    run_dir = tmp_path / "resnet" / "v0001"
    shutil.copytree(source.path, run_dir)
    assert runner.main(["export", "--run", str(run_dir), "--format", "onnx"]) == 0
    path = run_dir / "export" / "model.onnx"
    assert f"exported {path}" in capsys.readouterr().out
    metadata = read_metadata(path)
    config = load_config(run_dir / "config.yaml")
    assert json.loads(metadata["preprocessing"]) == EvalView.from_config(config).record()
    assert json.loads(metadata["labels"]) == (run_dir / "labels.txt").read_text().split()
    from shared.tasks import rebuild
    from shared import runs

    model, _ = rebuild(runs.open_run(run_dir))
    images = np.random.default_rng(0).normal(size=(8, *model.inputs[0].shape[1:])).astype(np.float32)
    assert np.abs(onnx_outputs(path, images) - np.asarray(model(images, training=False))).max() <= 1e-4


def test_an_op_the_converter_cannot_take_is_one_line_and_leaves_nothing(tmp_path):
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: tf.image.rgb_to_hsv(x))(inputs))
    with pytest.raises(UserError, match=r"^ONNX export: the converter cannot take TensorFlow op RGBToHSV; leave"):
        export_onnx(model, tmp_path / "model.onnx", {})
    assert list(tmp_path.iterdir()) == []


def test_a_missing_converter_names_the_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    with pytest.raises(UserError, match=r"ONNX export needs tf2onnx: pip install -e '\.\[onnx\]'"):
        export_onnx(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), tmp_path / "m.onnx", {})


@pytest.mark.slow
def test_the_detectors_raw_outputs_and_the_restorer_convert_too(tmp_path):
    """The detection model's raw outputs (box deltas and class logits per anchor, as the raw TFLite file) and the
    deblurring model: the same outputs in ONNX Runtime."""
    from shared.config_schema import DetectionConfig
    from shared.deblur.model import build_restorer
    from shared.detection.model import build_detector

    resnet = modelzoo.load_model_module(modelzoo.model_dir("resnet"))
    hparams = modelzoo.resolve_hparams(resnet, {"depth": 18, "width": 4})
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype(np.float32)
    detector = build_detector(resnet, hparams, 3, 64, 3, DetectionConfig(strides=[8, 16, 32], fpn_channels=8,
                                                                          head_depth=1))
    path = export_onnx(detector, tmp_path / "detector_raw.onnx", {"task": "detection"})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: images})))
    expected = detector(images, training=False)
    assert sorted(got) == sorted(expected) == ["boxes", "classes"]
    for key in expected:
        assert np.abs(got[key] - np.asarray(expected[key])).max() <= 1e-4
    restorer = build_restorer(resnet, hparams, 32, 1, decoder_channels=4)
    blurred = np.random.default_rng(2).normal(size=(4, 32, 32, 1)).astype(np.float32)
    path = export_onnx(restorer, tmp_path / "restorer.onnx", {"task": "deblur"})
    assert np.abs(onnx_outputs(path, blurred) - np.asarray(restorer(blurred, training=False))).max() <= 1e-4

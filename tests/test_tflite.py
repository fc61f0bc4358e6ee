"""TFLite export (shared.tflite, shared.classification.tflite) and the size report (shared.size_report) on the
tiny trained run.

Conversions are the slow part (seconds each), so the size report's own conversions (float32, float16,
dynamic, int8 into <run>/export/) are made once per module and reused by the other tests."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from shared import tflite
from shared.classification import tflite as classification_tflite
from shared.errors import UserError
from shared.runs import Run
from shared.tasks import rebuild, task_for

pytestmark = pytest.mark.slow  # every test reads the module's conversions, seconds each

FORMATS = ("keras", "saved_model", "tflite float32", "tflite float16", "tflite dynamic", "tflite int8")


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Run:
    """A private copy of the shared trained run: these tests write export/ and size.* into it."""
    original, _ = trained_run
    target = tmp_path_factory.mktemp("tflite") / original.path.name
    shutil.copytree(original.path, target)
    return Run(target)


@pytest.fixture(scope="module")
def report(run) -> dict:
    from shared.size_report import size_report

    return size_report(task_for(run), rebuild(run)[0], run, latency_runs=5)


@pytest.fixture(scope="module")
def keras_and_images(run):
    """The run's Keras model and 16 of its test images with labels."""
    from shared import data as data_module

    model, config = rebuild(run)
    images, labels = next(iter(data_module.make_datasets(config).test.unbatch().batch(16)))
    return model, images.numpy(), labels.numpy()


def _path(run: Run, report: dict, name: str):
    return run.path / report["formats"][name]["path"]


def test_size_report_writes_json_and_markdown(run, report):
    saved = json.loads((run.path / "size.json").read_text())
    for key in ("trainable_parameters", "non_trainable_parameters", "multiply_adds", "formats", "latency",
                "input_shape", "model"):
        assert key in saved, key
    assert saved["trainable_parameters"] > 0 and saved["non_trainable_parameters"] > 0
    assert saved["multiply_adds"] > saved["trainable_parameters"]  # 16x16 feature maps reuse each weight
    assert sorted(saved["formats"]) == sorted(FORMATS)  # size.json sorts its keys
    assert list(report["formats"]) == list(FORMATS)  # the returned report keeps the order asked for
    for name, entry in saved["formats"].items():
        assert "error" not in entry, entry
        assert entry["size_mb"] > 0, name
        if name != "saved_model":
            assert entry["latency_ms"] > 0, name
    markdown = (run.path / "size.md").read_text()
    for name in FORMATS:
        assert f"| {name} |" in markdown


def test_each_mode_converts_to_a_smaller_file(run, report):
    sizes = {name: _path(run, report, name).stat().st_size for name in FORMATS if name.startswith("tflite")}
    assert _path(run, report, "tflite float32").name == "model_none.tflite"
    assert _path(run, report, "tflite int8").parent == run.path / "export"
    assert sizes["tflite float16"] < 0.7 * sizes["tflite float32"]
    assert sizes["tflite dynamic"] < 0.5 * sizes["tflite float32"]
    assert sizes["tflite int8"] < 0.5 * sizes["tflite float32"]
    assert not list((run.path / "export").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_float32_tflite_matches_keras(run, report, keras_and_images):
    model, images, _ = keras_and_images
    interpreter = tflite.load_interpreter(_path(run, report, "tflite float32"))
    assert tuple(interpreter.get_input_details()[0]["shape"]) == (1, 16, 16, 3)
    expected = model(images, training=False).numpy()
    got = tflite.predict_tflite(interpreter, images)
    assert np.abs(got - expected).max() < 1e-4


def test_int8_has_int8_weights_and_keeps_accuracy(run, report, keras_and_images):
    path = _path(run, report, "tflite int8")
    details = tflite.load_interpreter(path).get_tensor_details()
    kernels = [d for d in details if len(d["shape"]) == 4 and d["name"] != "image"
               and "conv" in d["name"].lower() and d["shape"][0] > 1]  # (out, kh, kw, in) weights
    assert kernels and all(np.dtype(d["dtype"]) == np.int8 for d in kernels)
    float_tensors = [d["name"] for d in details if np.dtype(d["dtype"]) == np.float32]
    assert len(float_tensors) <= 2  # the float input and output only
    assert tflite.non_int8_ops(path.read_bytes()) == []

    model, images, _ = keras_and_images
    agree = (tflite.predict_tflite(tflite.load_interpreter(path), images).argmax(1)
             == model(images, training=False).numpy().argmax(1)).mean()
    assert agree >= 0.75
    metrics = classification_tflite.evaluate_tflite(path, run, task_for(run).config)
    keras_top1 = run.test_metrics()["top1"]
    assert metrics["examples"] == run.test_metrics()["examples"]
    assert abs(metrics["top1"] - keras_top1) <= 0.15
    assert metrics["top5"] >= metrics["top1"]


def test_int8_io(run, report, keras_and_images, tmp_path):
    out = tmp_path / "int8io.tflite"
    assert classification_tflite.convert(*rebuild(run), run, "int8", io="int8", out_path=out) == out
    interpreter = tflite.load_interpreter(out)
    assert np.dtype(interpreter.get_input_details()[0]["dtype"]) == np.int8
    assert np.dtype(interpreter.get_output_details()[0]["dtype"]) == np.int8
    # Quantizing the input / dequantizing the output by hand gives what the float-I/O int8 model gives.
    _, images, _ = keras_and_images
    probabilities = tflite.predict_tflite(interpreter, images)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=0.05)
    float_io = tflite.predict_tflite(tflite.load_interpreter(_path(run, report, "tflite int8")), images)
    assert (probabilities.argmax(1) == float_io.argmax(1)).mean() >= 0.9
    metrics = classification_tflite.evaluate_tflite(out, run, task_for(run).config, limit=16)
    assert metrics["examples"] == 16 and 0.0 <= metrics["top1"] <= 1.0
    assert tflite.default_path(run, "int8", "int8").name == "model_int8_int8io.tflite"


@pytest.mark.parametrize("quantize, io, message", [
    ("int4", "float", "unknown quantization"),
    ("none", "uint8", "unknown input/output type"),
    ("dynamic", "int8", "quantize=int8"),
])
def test_bad_mode_or_io_is_a_user_error(run, tmp_path, quantize, io, message):
    with pytest.raises(UserError, match=message):
        classification_tflite.convert(*rebuild(run), run, quantize, io=io, out_path=tmp_path / "x.tflite")
    assert not (tmp_path / "x.tflite").exists()


def test_op_without_int8_kernel_is_a_user_error(run, tmp_path):
    """SIN has no int8 kernel: the converter would keep it in float; convert() must refuse."""
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.Lambda(keras.ops.sin)(x)
    outputs = keras.layers.Dense(4, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    with pytest.raises(UserError, match=r"SIN.*quantize=dynamic"):
        classification_tflite.convert(model, task_for(run).config, run, "int8", out_path=tmp_path / "sin.tflite",
                                      representative_images=8)
    assert not (tmp_path / "sin.tflite").exists()


def test_latency_functions_return_positive_milliseconds(run, report, keras_and_images):
    path = _path(run, report, "tflite float32")
    assert tflite.latency_ms(path, runs=3, warmup=1) > 0
    both = tflite.interleaved_latency_ms([path, _path(run, report, "tflite int8")], rounds=2, runs=2)
    assert len(both) == 2 and all(value > 0 for value in both)
    model, _, _ = keras_and_images
    assert tflite.keras_latency_ms(model, (16, 16, 3), runs=3, warmup=1) > 0


@pytest.mark.parametrize("flags, named", [(["--raw-outputs"], "--raw-outputs"), (["--nms", "fast"], "--nms")])
def test_detection_only_flags_on_a_classifier_are_one_line_errors(run, capsys, flags, named):
    from shared import runner

    before = sorted((run.path / "export").glob("*")) if (run.path / "export").is_dir() else []
    assert runner.main(["export", "--run", str(run.path), "--format", "tflite", *flags]) == 2
    err = capsys.readouterr().err
    assert f"error: {named} is for detection runs" in err and len(err.strip().splitlines()) == 1
    assert (sorted((run.path / "export").glob("*")) if (run.path / "export").is_dir() else []) == before

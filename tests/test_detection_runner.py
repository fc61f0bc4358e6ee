"""The detection runner end to end: `python -m shared.runner --config models/resnet/detect.yaml` (in-process) on
a tiny generated Fashion-MNIST canvas set, starting from a classification run's backbone with the backbone
frozen for the first epoch; `test --run` reproducing the recorded mAP; bad starting weights refused before a
run folder exists; the SavedModel (bytes in) equal to the Keras pipeline, and the TFLite file's raw outputs
equal to the Keras detector's, with the numpy decoding equal to decode_detections (those two on the session's
`tiny_detector`, whose backbone is conftest.TINY_BACKBONE). Tiny sizes (16 train / 8 test images at 48 px,
ResNet-18 width 4)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared import modelzoo, runner, runs
from shared.config import from_dict
from shared.config_schema import with_changes
from shared.fashion_mnist import FASHION_MNIST_DIRS

from conftest import load_script

REPO = Path(__file__).resolve().parent.parent
SIZE = 48
TINY = ["model.width=4", "detection.fpn_channels=8", "detection.head_depth=1", "train.batch_size=16",
        "train.epochs=2", f"data.image_size={SIZE}", "detection.score_threshold=0.0", "train.verbose=0"]

pytestmark = pytest.mark.skipif(not (Path(FASHION_MNIST_DIRS[0]) / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST IDX files not installed")


def tiny_canvases(out: Path) -> Path:
    """The canvas set the detection tests train on: 16 train / 8 test images of SIZE px, items of 12-28 px."""
    assert load_script("make_detection_dataset").main([str(out), "--train", "16", "--test", "8", "--size", str(SIZE),
                                                       "--min-scale", "12", "--max-scale", "28", "--seed", "3",
                                                       "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return tiny_canvases(tmp_path_factory.mktemp("canvases"))


def data_overrides(root: Path) -> list[str]:
    return [f"data.path={root / 'images'}", f"detection.train_annotations={root / 'annotations' / 'train.json'}",
            f"detection.test_annotations={root / 'annotations' / 'test.json'}"]


def classification_run(root: Path, width: int, model: dict | None = None) -> runs.Run:
    """A finished-looking classification run of ResNet-18 (small_input, 1 channel) at `width`, or of the
    `model` section given: an untrained model saved as its checkpoint (training it would only cost time; its
    weights are what is copied)."""
    model = model or {"name": "resnet", "depth": 18, "width": width, "small_input": True}
    folder = modelzoo.model_dir(model["name"], model.get("path"))
    module = modelzoo.load_model_module(folder)
    config = from_dict({"model": model,
                        "data": {"source": "synthetic", "image_size": 28, "channels": 1, "num_classes": 10},
                        "run": {"dir": str(root)}})
    config = with_changes(config, {"model.hparams": modelzoo.resolve_hparams(module, config.model.hparams)})
    run = runs.create(config, folder)
    model = modelzoo.build_model(module, 10, (28, 28, 1), config.model.hparams)
    model.save(run.checkpoint_dir / "epoch-0001.keras")
    run.set_status("finished")
    return run


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> runs.Run:
    return classification_run(tmp_path_factory.mktemp("classification"), width=4)


@pytest.fixture(scope="module")
def trained(generated, source, tmp_path_factory) -> runs.Run:
    """One detection run through the CLI: backbone from `source`, frozen in epoch 1, trained in epoch 2."""
    runs_dir = tmp_path_factory.mktemp("detection_runs")
    overrides = [*TINY, *data_overrides(generated), f"run.dir={runs_dir}", f"init.from_run={source.path}",
                 "train.freeze=[backbone]", "detection.unfreeze_epoch=1"]
    code = runner.main(["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
                        *[arg for item in overrides for arg in ("--set", item)]])
    assert code == 0
    (run_dir,) = (runs_dir / "resnet").iterdir()
    return runs.Run(run_dir)


@pytest.mark.slow
def test_training_through_the_runner_records_map_and_provenance(trained, source):
    from shared.detection.model import backbone_layer_names
    from shared.tasks import rebuild

    assert trained.status()["status"] == "finished"
    metrics = trained.test_metrics()
    assert {"mAP", "mAP50", "mAP75", "per_class", "examples", "train_seconds"} <= set(metrics)
    assert metrics["examples"] == 8 and 0.0 <= metrics["mAP"] <= metrics["mAP50"] <= 1.0
    assert len(metrics["per_class"]) == 10 and metrics["checkpoint"] == "checkpoints/epoch-0002.keras"
    for name in ("detections.png", "curves.png", "labels.txt", "metrics.csv"):
        assert (trained.path / name).is_file(), name
    assert not (trained.path / "backup").exists()
    rows = (trained.path / "metrics.csv").read_text().strip().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1"]  # two phases, epochs counted through
    assert [p.name for p in trained.checkpoints()] == ["epoch-0001.keras", "epoch-0002.keras"]
    notes = (trained.path / "notes.md").read_text()
    assert f"Starting weights: backbone weights from {source.path}" in notes
    recorded = trained.config_dict()
    assert recorded["task"] == "detection" and Path(recorded["data"]["path"]).is_absolute()
    assert recorded["data"]["num_classes"] == 10

    # epoch 1 trained the heads on the frozen copied backbone; epoch 2 every layer
    detector, _ = rebuild(trained)  # the last checkpoint: epoch 2
    classifier, _ = rebuild(source, training_outputs=True)
    layers = [name for name in backbone_layer_names(detector) if detector.get_layer(name).weights]

    def same(name):
        return all(np.array_equal(a, b) for a, b in zip(detector.get_layer(name).get_weights(),
                                                        classifier.get_layer(name).get_weights()))

    assert not all(same(name) for name in layers)
    modelzoo.load_weight_file(detector, trained.path / "checkpoints" / "epoch-0001.keras")
    assert all(same(name) for name in layers)  # batch-norm statistics included


@pytest.mark.slow
def test_test_command_reproduces_the_recorded_map(trained, capsys):
    from shared.detection.evaluate import summary

    assert runner.main(["test", "--run", str(trained.path)]) == 0
    assert capsys.readouterr().out.strip() == summary(trained.test_metrics())


@pytest.mark.slow
def test_test_command_refuses_annotations_whose_categories_were_renamed(trained, generated, tmp_path, capsys):
    import shutil

    import yaml

    copy = tmp_path / "run"
    shutil.copytree(trained.path, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    for split in ("train", "test"):  # the same ids, one of them renamed, in both files
        tree = json.loads((generated / "annotations" / f"{split}.json").read_text())
        tree["categories"][1]["name"] = "renamed"
        (tmp_path / f"{split}.json").write_text(json.dumps(tree))
        config["detection"][f"{split}_annotations"] = str(tmp_path / f"{split}.json")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert runner.main(["test", "--run", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"where run {copy} was trained on [" in err
    assert f"first difference at index 1: 'renamed' vs {trained.class_names()[1]!r}" in err


@pytest.mark.slow
@pytest.mark.parametrize("case", ["backbone_mismatch", "strides", "augment"])
def test_bad_detection_inputs_are_one_line_errors_without_a_run_folder(case, generated, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    overrides = [*TINY, *data_overrides(generated), f"run.dir={runs_dir}"]
    if case == "backbone_mismatch":
        wide = classification_run(tmp_path / "wide", width=8)
        overrides.append(f"init.from_run={wide.path}")
        fragments = ["does not fit this detector's backbone", "conv1_conv", "model.width 8 there, 4 here"]
    elif case == "strides":
        overrides.append("detection.strides=[64]")
        fragments = ["detection.strides [64]", "stride_8 6x6"]
    else:
        overrides.append("data.augment=[random_crop]")
        fragments = ["data.augment entry 'random_crop'", "flip, zoom, translate"]
    code = runner.main(["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
                        *[arg for item in overrides for arg in ("--set", item)]])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (runs_dir / "resnet").exists()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint", "detections plot"])
def test_a_full_disk_in_a_detection_run_is_one_line_and_keeps_the_last_good_checkpoint(where, generated, tmp_path,
                                                                                        monkeypatch, capsys):
    """The detection runner shares the classification runner's failure handling (failures_marked)."""
    import keras

    from conftest import tiny_backbone
    from test_faults import fail_figure, fail_writer, partials

    runs_dir = tmp_path / "runs"
    overrides = [*TINY, tiny_backbone(tmp_path), *data_overrides(generated), f"run.dir={runs_dir}"]
    if where == "checkpoint":
        fail_writer(monkeypatch, "save", "epoch-0002.keras")
        named, kept = "checkpoints/epoch-0002.keras", 1
    else:
        fail_figure(monkeypatch, "detections.png")
        named, kept = "detections.png", 2
    code = runner.main(["--config", str(REPO / "models" / "resnet" / "detect.yaml"),
                        *[arg for item in overrides for arg in ("--set", item)]])
    monkeypatch.undo()
    err = capsys.readouterr().err
    (run_dir,) = (runs_dir / "tiny_backbone").iterdir()
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: disk full while writing {run_dir / named} (") and "is marked failed" in err, err
    assert json.loads((run_dir / "status.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch-*.keras")) == \
        [f"epoch-{n:04d}.keras" for n in range(1, kept + 1)]
    keras.saving.load_model(run_dir / "checkpoints" / f"epoch-{kept:04d}.keras", compile=False)
    assert partials(run_dir) == []


def keras_detections(detector, config, images) -> dict:
    """The Keras pipeline: normalized images -> detector -> decode_detections, traced as the runner does."""
    from shared.detection.model import model_anchors
    from shared.detection.postprocess import decode_detections

    anchors = model_anchors(detector, config.detection)
    forward = tf.function(lambda x: decode_detections(anchors, detector(x, training=False), config.detection, SIZE))
    return {key: value.numpy() for key, value in forward(tf.constant(images)).items()}


def assert_same_detections(got: dict, want: dict, scale: float = 1.0) -> None:
    """The same detections of each image, best first. Two of near-equal scores (a barely trained detector has
    them) may leave NMS in either order from two graphs, so each detection is matched by class, score and box in
    the other's list rather than compared place by place; the scores, sorted, are compared in order."""
    np.testing.assert_array_equal(got["num_detections"], want["num_detections"])
    assert want["num_detections"].min() > 0  # score_threshold 0: something to compare
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-4, atol=1e-5)
    for image, count in enumerate(want["num_detections"]):
        unmatched = list(range(count))
        for index in range(count):
            matches = [place for place in unmatched if got["classes"][image, place] == want["classes"][image, index]
                       and np.isclose(got["scores"][image, place], want["scores"][image, index], rtol=1e-4, atol=1e-5)
                       and np.allclose(got["boxes"][image, place], want["boxes"][image, index] * scale, rtol=1e-4,
                                       atol=1e-3)]
            assert matches, (f"image {image}: detection {index} (class {want['classes'][image, index]}, score "
                             f"{want['scores'][image, index]:.6f}, box {want['boxes'][image, index] * scale}) "
                             f"not found")
            unmatched.remove(matches[0])
        np.testing.assert_array_equal(got["classes"][image, count:], want["classes"][image, count:])
        np.testing.assert_allclose(got["boxes"][image, count:], want["boxes"][image, count:] * scale, atol=1e-3)


@pytest.mark.slow
def test_saved_model_on_bytes_equals_the_keras_pipeline(tiny_detector, tmp_path, capsys):
    from shared.detection import datasets as detection_data
    from shared.tasks import rebuild

    trained = tiny_detector  # the export is what is checked, not the backbone
    export_dir = tmp_path / "exports"
    assert runner.main(["export", "--run", str(trained.path), "--format", "saved_model",
                        "--export-dir", str(export_dir)]) == 0
    folder = export_dir / "tiny_backbone_detection" / "1"
    assert folder.is_dir() and "tiny_backbone_detection" in capsys.readouterr().out
    info = json.loads((folder / "assets.extra" / "export.json").read_text())
    assert info["task"] == "detection" and info["image_size"] == SIZE

    detector, config = rebuild(trained)
    _, test, class_names = detection_data.load_detection_data(config)
    images = np.concatenate([x.numpy() for x, _ in detection_data.make_dataset(test, config, training=False)])
    want = keras_detections(detector, config, images)
    files = [Path(record.image).read_bytes() for record in test]
    served = tf.saved_model.load(str(folder))
    got = {k: v.numpy() for k, v in served.signatures["serving_default"](image_bytes=tf.constant(files)).items()}
    assert_same_detections(got, want)
    first = got["labels"][0, :got["num_detections"][0]].astype(str).tolist()
    assert first == [class_names[c] for c in got["classes"][0, :got["num_detections"][0]]]
    assert got["labels"][0, -1] == b"" or got["num_detections"][0] == config.detection.max_detections

    # an image of another size: resized to 48 px inside, boxes scaled back to its own 72 px
    pixels = np.asarray(Image.open(test[0].image))
    big = Image.fromarray(pixels).resize((72, 72), Image.BILINEAR)
    buffer = io.BytesIO()
    big.save(buffer, format="PNG")
    resized = tf.image.resize(tf.constant(np.asarray(big), tf.float32)[..., None], [SIZE, SIZE]).numpy()
    normalized = (resized - np.float32(config.data.mean[0])) / np.float32(config.data.std[0])
    want_big = keras_detections(detector, config, normalized[None])
    got_big = served.signatures["serving_default"](image_bytes=tf.constant([buffer.getvalue()]))
    assert_same_detections({k: v.numpy() for k, v in got_big.items()}, want_big, scale=72 / SIZE)

    raw = np.stack([np.asarray(Image.open(record.image), np.float32)[..., None] for record in test])
    by_pixels = served.signatures["predict_images"](images=tf.constant(raw))
    assert_same_detections({k: v.numpy() for k, v in by_pixels.items()}, want)


@pytest.mark.slow
def test_tflite_raw_outputs_and_numpy_decoding_match_keras(tiny_detector, capsys):
    from shared.detection import datasets as detection_data
    from shared.detection import tflite, tflite_inference as inference
    from shared.detection.model import model_anchors
    from shared.detection.postprocess import decode_detections
    from shared.tasks import rebuild

    trained = tiny_detector

    assert runner.main(["export", "--run", str(trained.path), "--format", "tflite", "--raw-outputs"]) == 0
    path = trained.path / "export" / "detector_none_raw.tflite"
    assert path.is_file() and str(path) in capsys.readouterr().out
    detector, config = rebuild(trained)
    anchors = model_anchors(detector, config.detection).numpy()
    np.testing.assert_array_equal(np.load(path.parent / tflite.ANCHORS_FILE), anchors)

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    plain = Interpreter(model_path=str(path),
                        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    operations = {op["op_name"] for op in plain._get_ops_details()}
    assert "CONV_2D" in operations and not any(  # builtins only: no Flex (TF) ops, no NMS
        name.startswith("Flex") or name == "CUSTOM" or "NON_MAX" in name for name in operations), operations
    _, test, _ = detection_data.load_detection_data(config)
    images = np.concatenate([x.numpy() for x, _ in detection_data.make_dataset(test, config, training=False)])
    interpreter = inference.tflite_interpreter(path)
    boxes, logits = inference.predict_tflite_raw(interpreter, images, inference.output_names(path))
    want = detector(images, training=False)
    np.testing.assert_allclose(boxes, want["boxes"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, want["classes"].numpy(), rtol=1e-4, atol=1e-4)

    # the numpy decoding equals decode_detections (distinct random scores: no ties for NMS to break)
    rng = np.random.default_rng(0)
    deltas = rng.normal(0, 0.7, size=(2, *anchors.shape)).astype(np.float32)
    scores = rng.normal(-1.5, 2.0, size=(2, len(anchors), 10)).astype(np.float32)
    config = with_changes(config, {"detection.score_threshold": 0.3, "detection.max_detections": 40})
    want = decode_detections(anchors, {"boxes": deltas, "classes": scores}, config.detection, SIZE)
    got = inference.decode_tflite_outputs(deltas, scores, anchors, SIZE, 0.3, config.detection.nms_iou, 40)
    assert_same_detections(got, {k: v.numpy() for k, v in want.items()})
    single = inference.decode_tflite_outputs(deltas[0], scores[0], anchors, SIZE, 0.3, config.detection.nms_iou, 40)
    np.testing.assert_array_equal(single["classes"], got["classes"][0])

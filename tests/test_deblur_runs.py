"""Deblurring runs end to end through the run lifecycle (task: deblur): train, test --run, the classifier's
view, init.from_run of a classification run's backbone, and export parity (SavedModel on image bytes,
TFLite). Tiny: 16 px synthetic images, conftest.TINY_BACKBONE (three convolutions), a few steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from shared import lifecycle, tasks
from shared.config import load_config
from shared.errors import UserError
from shared.deblur.task import DeblurTask, evaluate_with_classifier
from tests.conftest import tiny_backbone_model, tiny_tree

pytestmark = pytest.mark.slow  # two trainings and two exports: about a minute on 2 cores


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(classification run, deblurring run started from its backbone), both finished."""
    base = tmp_path_factory.mktemp("deblur")
    model = tiny_backbone_model(base)  # the lifecycle is what is checked: on a backbone quick to trace and export
    data = {"channels": 1, "synthetic_train": 64, "synthetic_test": 32}
    tree = tiny_tree(base / "runs", data=data, train={"epochs": 1, "batch_size": 16})
    classifier = lifecycle.train(load_config(tree={**tree, "model": model}),
                                 draw=False)  # no test looks at the classifier's figures
    tree = tiny_tree(base / "runs", data=data, train={"epochs": 1, "batch_size": 16, "steps_per_epoch": 3,
                                                      "optimizer": {"name": "adam"}, "lr": {"base": 1e-3}},
                     deblur={"decoder_channels": 4, "gallery": 4}, init={"from_run": str(classifier.path)})
    tree["task"], tree["model"] = "deblur", model
    return classifier, lifecycle.train(load_config(tree=tree))


def test_a_deblurring_run_trains_tests_and_starts_from_a_classifier_backbone(runs):
    classifier, restorer = runs
    metrics = restorer.test_metrics()
    assert set(metrics) >= {"psnr_blurred", "psnr_restored", "ssim_blurred", "ssim_restored", "psnr_gain"}
    assert metrics["examples"] == 32 and (restorer.path / "deblur.png").stat().st_size > 0
    again = lifecycle.test(restorer)
    # init.from_run copied the classifier's first convolution (frozen nowhere, but 3 steps of Adam at 1e-3
    # move it little): compare to the classifier's own and to a fresh initialization.
    model, _ = tasks.rebuild(restorer)
    source, _ = tasks.rebuild(classifier)
    for key in ("psnr_blurred", "psnr_restored", "ssim_restored"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)  # the same blur, the same weights
    stem = next(layer.name for layer in source.layers if layer.weights)
    copied, original = model.get_layer(stem).get_weights()[0], source.get_layer(stem).get_weights()[0]
    assert np.abs(copied - original).max() < 0.01 < np.abs(original).max()


def test_the_classifier_view_of_sharp_blurred_and_restored_images(runs):
    classifier, restorer = runs
    restorer_model, _ = tasks.rebuild(restorer)
    metrics = evaluate_with_classifier(restorer_model, restorer, tasks.rebuilt(classifier))
    with pytest.raises(UserError, match="needs a deblurring run"):
        evaluate_with_classifier(tasks.rebuild(classifier)[0], classifier, tasks.rebuilt(classifier))
    with pytest.raises(UserError, match="needs a classification run"):
        evaluate_with_classifier(restorer_model, restorer, tasks.rebuilt(restorer))
    result = metrics["classifier"]
    assert set(result) >= {"top1_sharp", "top1_blurred", "top1_restored", "recovered", "examples"}
    assert result["examples"] == 32
    assert json.loads((restorer.path / "classifier_metrics.json").read_text())["top1_sharp"] == result["top1_sharp"]
    assert "classifier top-1 sharp" in DeblurTask.summary(metrics)


def _test_pixels(restorer, count: int = 4) -> np.ndarray:
    """The first blurred test images as 0-255 uint8 pixels (what a client would send)."""
    from shared.config import from_dict
    from shared.deblur.data import pixel_mapping

    config = from_dict(restorer.config_dict())
    blurred, _, _ = next(iter(DeblurTask(config).test_data(restorer).details.test))
    to_pixels, _ = pixel_mapping(config)
    return np.clip(np.round(to_pixels(blurred[:count]).numpy()), 0, 255).astype(np.uint8)


def test_saved_model_and_tflite_match_the_keras_restorer(runs, tmp_path):
    from shared.config import from_dict
    from shared.deblur import export
    from shared.deblur.data import pixel_mapping
    from shared.tflite import load_interpreter, predict_tflite

    _, restorer = runs
    model, config = tasks.rebuild(restorer)
    pixels = _test_pixels(restorer)
    folder = export.export_saved_model(model, config, restorer, tmp_path / "exports")
    tflite_path = export.convert_tflite(model, config, restorer)
    tflite_metrics = DeblurTask(config).evaluate_tflite(tflite_path, restorer)
    with pytest.raises(UserError, match="use quantize none, float16 or dynamic"):
        export.convert_tflite(model, config, restorer, quantize="int8")
    to_pixels, from_pixels = pixel_mapping(from_dict(restorer.config_dict()))
    normalized = from_pixels(tf.constant(pixels, tf.float32))
    expected = np.clip(to_pixels(model(normalized)).numpy(), 0, 255)
    loaded = tf.saved_model.load(str(folder))
    encoded = tf.stack([tf.io.encode_png(image) for image in pixels])
    from_bytes = loaded.signatures["serving_default"](image_bytes=encoded)["restored"].numpy()
    from_images = loaded.signatures["predict_images"](images=tf.constant(pixels, tf.float32))["restored"].numpy()
    np.testing.assert_allclose(from_bytes, expected, atol=1e-3)
    np.testing.assert_allclose(from_images, expected, atol=1e-3)
    assert json.loads((folder / "assets.extra" / "export.json").read_text())["task"] == "deblur"
    from_tflite = predict_tflite(load_interpreter(tflite_path), normalized.numpy())
    np.testing.assert_allclose(from_tflite, model(normalized).numpy(), atol=1e-4)
    recorded = restorer.test_metrics()
    assert tflite_metrics["psnr_restored"] == pytest.approx(recorded["psnr_restored"], abs=0.01)


def test_the_command_line_tests_with_a_classifier_and_exports(runs, tmp_path, capsys):
    from shared import runner

    classifier, restorer = runs
    assert runner.main(["test", "--run", str(restorer.path), "--classifier", str(classifier.path)]) == 0
    assert "classifier top-1 sharp" in capsys.readouterr().out
    assert runner.main(["test", "--run", str(classifier.path), "--classifier", str(classifier.path)]) == 2
    assert "--classifier applies to deblur runs" in capsys.readouterr().err
    assert runner.main(["export", "--run", str(restorer.path), "--format", "tflite", "--quantize", "int8"]) == 2
    assert "use quantize none, float16 or dynamic" in capsys.readouterr().err
    assert runner.main(["export", "--run", str(restorer.path), "--format", "saved_model",
                        "--export-dir", str(tmp_path / "exports")]) == 0
    assert (tmp_path / "exports" / restorer.model_name / "1" / "saved_model.pb").is_file()


def test_a_deblurring_run_killed_mid_epoch_resumes_and_retests_to_its_figures(tmp_path, capsys):
    from shared import runner
    from tests.test_resume import many_steps_tree, metric_epochs, start, status, wait_for_backup

    epochs = 2  # the kill lands in epoch 2: the resume trains one epoch
    # what is checked is the recovery, not the backbone: the tiny one, in epochs of a second or more of small steps
    tree = many_steps_tree(tmp_path / "runs", tiny_backbone_model(tmp_path), optimizer={"name": "adam"},
                           lr={"base": 1e-3}, epochs=epochs)
    tree["task"] = "deblur"
    tree["data"].update(channels=1, synthetic_train=1024)
    tree["deblur"] = {"decoder_channels": 4, "gallery": 2, "blur": [{"gaussian": {"sigma": [1.0, 2.0]}}, "noise"]}
    process = start(tmp_path, tree)
    run_dir = wait_for_backup(tmp_path / "runs", process, epochs=1)
    process.kill()  # SIGKILL: no chance to save anything more
    process.wait()
    assert status(run_dir) == "running"
    backup = json.loads((run_dir / "backup" / "phase-1" / "training_metadata.json").read_text())
    assert backup["epoch"] == 1  # killed inside epoch 2
    # The kill is what needs a process of its own; the resume and the re-test run here (no TF start-up each).
    assert runner.main(["--resume", str(run_dir)]) == 0, capsys.readouterr().err
    assert status(run_dir) == "finished" and metric_epochs(run_dir) == list(range(epochs))
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    capsys.readouterr()
    assert runner.main(["test", "--run", str(run_dir)]) == 0
    assert f"{metrics['psnr_blurred']:.2f} -> {metrics['psnr_restored']:.2f} dB" in capsys.readouterr().out

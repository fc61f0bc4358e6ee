"""Per-class results of a test pass: precision / recall / F1 / support and macro averages from the confusion
matrix (zero division gives 0.0), the worst classes after the summary line, and errors.png (the most confident
mistakes, collected as a running top-N in the same pass)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared import plots
from shared.config import load_config
from shared.data import Datasets
from shared.classification.evaluate import ConfidentMistakes, evaluate_model, per_class_results, worst_classes
from shared.task import TaskData
from shared.classification.task import ClassificationTask, summary

from conftest import tiny_tree

NAMES = ["n01440764", "n01443537", "cat", "dog", "emu"]  # two ImageNet wnids: readable "tench", "goldfish"
TRUE = [0, 0, 0, 1, 1, 2, 2, 2]
PREDICTED = [0, 0, 1, 1, 0, 0, 4, 1]
SCORES = [0.8, 0.7, 0.6, 0.9, 0.9, 0.7, 0.95, 0.5]  # the predicted class's probability


def known_predictions(batch: int = 3):
    """(identity model, dataset) whose inputs are the probability rows themselves: predictions are known."""
    rows = np.zeros((len(TRUE), len(NAMES)), np.float32)
    for row, (predicted, score) in enumerate(zip(PREDICTED, SCORES)):
        rows[row] = (1 - score) / (len(NAMES) - 1)
        rows[row, predicted] = score
    model = tf.keras.Sequential([tf.keras.Input((len(NAMES),)), tf.keras.layers.Identity()])
    return model, tf.data.Dataset.from_tensor_slices((rows, TRUE)).batch(batch), rows


def test_per_class_precision_recall_f1_support_from_known_predictions():
    model, dataset, rows = known_predictions()
    mistakes = ConfidentMistakes(limit=3)
    metrics = evaluate_model(model, dataset, len(NAMES), NAMES, mistakes)
    by_class = {entry["class"]: entry for entry in metrics["per_class"]}
    assert [entry["class"] for entry in metrics["per_class"]] == NAMES
    assert [entry["name"] for entry in metrics["per_class"]] == ["tench", "goldfish", "cat", "dog", "emu"]
    expected = {  # (precision, recall, f1, support), worked out by hand from TRUE / PREDICTED
        "n01440764": (2 / 4, 2 / 3, 4 / 7, 3),
        "n01443537": (1 / 3, 1 / 2, 2 / 5, 2),
        "cat": (0.0, 0.0, 0.0, 3),  # never predicted: precision 0/0 -> 0.0
        "dog": (0.0, 0.0, 0.0, 0),  # neither true nor predicted: all 0/0 -> 0.0
        "emu": (0.0, 0.0, 0.0, 0),  # predicted once, never true: recall 0/0 -> 0.0
    }
    for name, (precision, recall, f1, support) in expected.items():
        entry = by_class[name]
        assert (entry["precision"], entry["recall"], entry["f1"]) == pytest.approx((precision, recall, f1))
        assert entry["support"] == support and isinstance(entry["support"], int)
    # macro: over the 4 classes that occur as a true or predicted label ("dog" does not)
    assert metrics["macro"] == pytest.approx({"precision": (1 / 2 + 1 / 3) / 4, "recall": (2 / 3 + 1 / 2) / 4,
                                              "f1": (4 / 7 + 2 / 5) / 4, "classes": 4})
    assert json.loads(json.dumps(metrics)) == metrics  # test_metrics.json holds it as it is
    # the running top-3 of the 5 mistakes across batches of 3: scores 0.95 (row 6), 0.9 (row 4), 0.7 (row 5)
    assert mistakes.scores.tolist() == pytest.approx([0.95, 0.9, 0.7])
    assert mistakes.labels.tolist() == [2, 1, 2] and mistakes.predicted.tolist() == [4, 0, 0]
    np.testing.assert_array_equal(mistakes.images, rows[[6, 4, 5]])


def test_a_model_evaluated_again_reuses_its_trace_reads_its_weights_of_the_moment_and_is_not_kept_alive():
    import gc
    import weakref

    from shared.classification.evaluate import _forward

    rows = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
    model = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Dense(3, use_bias=False)])
    model.layers[0].set_weights([np.eye(3, dtype=np.float32)])
    dataset = tf.data.Dataset.from_tensor_slices((rows, [0, 1, 2, 0, 1])).batch(2)  # a full and a partial batch
    assert evaluate_model(model, dataset, 3)["top1"] == 1.0
    traces = _forward(model).experimental_get_tracing_count()
    model.layers[0].set_weights([np.eye(3, dtype=np.float32)[[1, 2, 0]]])  # now predicts (label + 1) % 3
    assert evaluate_model(model, dataset, 3)["top1"] == 0.0  # the trace reads the weights as they are now
    assert _forward(model).experimental_get_tracing_count() == traces  # and was not traced again
    other = tf.keras.Sequential([tf.keras.Input((3,)), tf.keras.layers.Identity()])
    assert evaluate_model(other, dataset, 3)["top1"] == 1.0  # another model: its own function
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None  # the cache holds neither the model nor, through its function, a path back to it


def test_all_zero_confusion_gives_zeros_not_nan():
    per_class, macro = per_class_results(np.zeros((3, 3), np.int64))
    assert [entry["class"] for entry in per_class] == ["0", "1", "2"]
    assert all(entry[key] == 0.0 for entry in per_class for key in ("precision", "recall", "f1"))
    assert macro == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "classes": 0}
    assert worst_classes(per_class) == []


def test_the_worst_classes_are_printed_after_the_one_summary_line():
    from shared.runner import _results

    model, dataset, _ = known_predictions()
    metrics = evaluate_model(model, dataset, len(NAMES), NAMES)
    assert summary(metrics).startswith("test top-1 0.3750  top-5 1.0000  loss ") and "\n" not in summary(metrics)
    lines = _results(ClassificationTask, metrics, "runs/x/v0001: ").splitlines()
    assert lines[0] == "runs/x/v0001: " + summary(metrics)
    assert lines[1] == "worst 3 classes by F1 (macro F1 0.2429 over 4 classes):"
    # lowest F1 first; only classes the test split holds (dog, emu have no images)
    assert [line.split()[0] for line in lines[2:]] == ["cat", "goldfish", "tench"]
    assert lines[2].split() == ["cat", "F1", "0.0000", "precision", "0.0000", "recall", "0.0000", "(3", "images)"]
    assert lines[4].split()[:3] == ["tench", "F1", "0.5714"]
    # metrics without per-class results (an older run, LiteRT) keep the one line
    assert _results(ClassificationTask, {"top1": 0.5, "top5": 1.0, "examples": 4}) == \
        "test top-1 0.5000  top-5 1.0000  (4 images)"


def off_by_one_model(num_classes: int, shift: int = 1):
    """Images carry their label in pixel [0, 0] and a confidence in pixel [0, 1]; the model predicts
    (label + shift) % num_classes with that confidence: deliberately wrong for shift 1, right for 0."""
    def predict(images):
        label = tf.cast(tf.round(images[:, 0, 0, 0]), tf.int32)
        confidence = images[:, 0, 1, 0:1]
        return tf.one_hot((label + shift) % num_classes, num_classes) * confidence + (1 - confidence) / num_classes

    return tf.keras.Sequential([tf.keras.Input((4, 4, 1)), tf.keras.layers.Lambda(predict)])


def classification_data(labels: list[int], confidences: list[float], names: list[str], config) -> TaskData:
    images = np.full((len(labels), 4, 4, 1), 0.25, np.float32)
    images[:, 0, 0, 0] = labels
    images[:, 0, 1, 0] = confidences
    test = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
    details = Datasets(train=None, test=test, val=None, steps_per_epoch=1, num_train=0, num_val=0,
                       num_test=len(labels), class_names=names, input_shape=(4, 4, 1), source=None, config=config)
    return TaskData(train=None, val=None, steps_per_epoch=1, class_names=names, input_shape=(4, 4, 1),
                    description="", details=details, config=config)


def drawn_figures(monkeypatch) -> dict:
    """{png name: Figure} of what plots.save_figure writes (it still writes them)."""
    figures, save = {}, plots.save_figure

    def recording(figure, out_png):
        figures[out_png.name] = figure
        return save(figure, out_png)

    monkeypatch.setattr(plots, "save_figure", recording)
    return figures


def test_errors_png_shows_the_most_confident_mistakes_with_names(tmp_path, monkeypatch):
    config = load_config(tree=tiny_tree(tmp_path / "runs", data={"channels": 1, "mean": [100.0], "std": [50.0]}))
    names = ["n01440764", "n01443537", "cat"]
    data = classification_data([0, 1, 2, 0, 1], [0.5, 0.9, 0.6, 0.8, 0.7], names, config)
    figures = drawn_figures(monkeypatch)
    metrics, draw = ClassificationTask(config).evaluate(off_by_one_model(3), data)
    assert metrics["top1"] == 0.0
    draw(tmp_path)
    assert (tmp_path / "errors.png").is_file() and (tmp_path / "confusion.png").is_file()
    errors = figures["errors.png"]
    titles = [text.get_text() for text in errors.texts if text.get_text() != errors.get_suptitle()]
    scores = [f"{c + (1 - c) / 3:.2f}" for c in (0.9, 0.8, 0.7, 0.6, 0.5)]  # most confident first
    assert titles == [  # arrays: each image by its place in the test split
        f"goldfish\ncat {scores[0]}\ntest #1", f"tench\ngoldfish {scores[1]}\ntest #3",
        f"goldfish\ncat {scores[2]}\ntest #4", f"cat\ntench {scores[3]}\ntest #2",
        f"tench\ngoldfish {scores[4]}\ntest #0"]
    # shown as before normalization, not stretched per image: 14 of each image's 16 pixels are 0.25, drawn
    # (0.25 * 50 + 100) / 255 gray (the gray colormap's byte), each over a GRID_CELL / 4 square
    with Image.open(tmp_path / "errors.png") as png:
        pixels = np.asarray(png.convert("RGB"))
    gray = plots.GRAY((0.25 * 50 + 100) / 255, bytes=True)[:3]
    assert gray[0] == pytest.approx(112.5, abs=1)
    assert np.count_nonzero((pixels == gray).all(axis=-1)) >= 5 * 14 * (plots.GRID_CELL * plots.DPI / 4) ** 2
    confusion_labels = [label.get_text() for label in figures["confusion.png"].axes[0].get_yticklabels()]
    assert confusion_labels == ["tench", "goldfish", "cat"]


def test_no_mistakes_draws_a_titled_empty_errors_png(tmp_path, monkeypatch):
    config = load_config(tree=tiny_tree(tmp_path / "runs", data={"channels": 1}))
    data = classification_data([0, 1, 2], [0.9, 0.9, 0.9], ["a", "b", "c"], config)
    figures = drawn_figures(monkeypatch)
    metrics, draw = ClassificationTask(config).evaluate(off_by_one_model(3, shift=0), data)
    assert metrics["top1"] == 1.0
    (tmp_path / "errors.png").write_bytes(b"a stale figure of an earlier test")
    draw(tmp_path)
    errors = figures["errors.png"]
    assert errors.get_suptitle() == "no mistakes on the test split"
    assert [child.get_text() for child in errors.get_children() if child is not errors.patch] == [
        "no mistakes on the test split"]  # the title alone: no images, no axes
    assert (tmp_path / "errors.png").read_bytes().startswith(b"\x89PNG")  # the stale one replaced


def test_a_full_disk_while_drawing_errors_png_names_it_and_leaves_no_partial(tmp_path, monkeypatch):
    from test_faults import fail_figure

    from shared.durable import DiskFull

    config = load_config(tree=tiny_tree(tmp_path / "runs", data={"channels": 1}))
    data = classification_data([0, 1, 2], [0.9, 0.8, 0.7], ["a", "b", "c"], config)
    _, draw = ClassificationTask(config).evaluate(off_by_one_model(3), data)
    fail_figure(monkeypatch, "errors.png")
    with pytest.raises(DiskFull, match=f"disk full while writing {tmp_path / 'errors.png'} "):
        draw(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["confusion.png"]  # no half errors.png

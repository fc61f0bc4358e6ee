"""Classification test figures (top-1 / top-5, confusion matrix) of a model in hand, the check that test data
has a run's classes, and `evaluate(run)`: re-test any finished run from its own snapshot."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from shared.errors import UserError
from shared.runs import Run, open_run


def evaluate_model(model, dataset: tf.data.Dataset, num_classes: int) -> dict:
    """Top-1, top-5 and mean cross-entropy (without any weight penalty), plus the confusion matrix."""
    forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5_hits, loss_sum, count = 0, 0.0, 0
    k = min(5, num_classes)
    for images, labels in dataset:
        probabilities = forward(images).numpy().astype(np.float64)
        labels = labels.numpy()
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if len(outside):  # numpy would wrap -1 to the last class, or fail with an IndexError
            raise UserError(f"the test data holds label {outside[0]}, outside 0-{num_classes - 1} for "
                            f"{num_classes} classes; fix the data's labels or its class list")
        predicted = probabilities.argmax(axis=1)
        np.add.at(confusion, (labels, predicted), 1)
        top_k = np.argsort(-probabilities, axis=1)[:, :k]
        top5_hits += int((top_k == labels[:, None]).any(axis=1).sum())
        loss_sum += float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).sum())
        count += len(labels)
    if count == 0:
        raise UserError("the test split is empty; check data.test_split and data.limit_test")
    return {"top1": float(np.trace(confusion) / count), "top5": top5_hits / count, "loss": loss_sum / count,
            "examples": count, "confusion": confusion.tolist()}


def evaluate(run: Run | str) -> dict:
    """Re-test a finished run (any task) on its test split from its own snapshot; the figures equal those
    recorded at training time. Refuses (UserError) data whose class names are not the run's (labels.txt),
    in the same order. Redraws the task's figure (confusion.png, detections.png, ...)."""
    from shared.lifecycle import test

    return test(run if isinstance(run, Run) else open_run(run))


def class_difference(ours: list[str], theirs: list[str]) -> str | None:
    """Where two class lists (in index order) first differ, in words; None when they are equal."""
    if list(ours) == list(theirs):
        return None
    index = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    mine = repr(ours[index]) if index < len(ours) else "nothing"
    other = repr(theirs[index]) if index < len(theirs) else "nothing"
    return f"first difference at index {index}: {mine} vs {other}"


def _shown(names: list[str], limit: int = 12) -> str:
    more = f", ... {len(names)} in all" if len(names) > limit else ""
    return "[" + ", ".join(map(repr, names[:limit])) + more + "]"


def check_class_names(data_classes: list[str], run: Run) -> None:
    """Refuse to test `run` on data whose classes (names in index order) are not the ones it was trained on
    (labels.txt): its figures would silently compare other classes. Runs without labels.txt (older ones)
    are checked by class count only."""
    recorded = run.class_names()
    if recorded is None:
        trained = run.config_dict().get("data", {}).get("num_classes")
        if trained is not None and trained != len(data_classes):
            raise UserError(f"the test data has {len(data_classes)} classes where run {run.path} was trained on "
                            f"{trained}; test it on the data it was trained on")
        return
    difference = class_difference(data_classes, recorded)
    if difference:
        raise UserError(f"the test data has classes {_shown(data_classes)} where run {run.path} was trained on "
                        f"{_shown(recorded)} ({run.path / 'labels.txt'}): {difference}; test it on data with the "
                        f"run's classes in the same order")

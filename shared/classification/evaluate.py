"""Classification test figures of a model in hand: top-1 / top-5, the confusion matrix, per-class precision /
recall / F1 with the worst classes, and the most confident mistakes."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import tensorflow as tf

from shared.class_names import readable
from shared.errors import UserError

WORST_CLASSES = 5  # how many of the lowest-F1 classes a summary names


class ConfidentMistakes:
    """The `limit` most confident wrong predictions of an evaluation pass: a running top-N by the score of the
    predicted class, so only `limit` images are ever held, never the test set. Ties keep the earlier image."""

    def __init__(self, limit: int = 16):
        self.limit = limit
        self.images: np.ndarray | None = None
        self.labels = np.zeros(0, np.int64)
        self.predicted = np.zeros(0, np.int64)
        self.scores = np.zeros(0, np.float64)
        self.positions = np.zeros(0, np.int64)  # each one's place in the pass, from 0
        self.seen = 0

    def update(self, images, labels: np.ndarray, predicted: np.ndarray, scores: np.ndarray) -> None:
        """One batch: `images` (a tensor or array), true `labels`, `predicted` classes and their `scores`."""
        start, self.seen = self.seen, self.seen + len(labels)
        wrong = np.flatnonzero(predicted != labels)
        if not len(wrong) or not self.limit:
            return
        wrong = wrong[np.argsort(-scores[wrong], kind="stable")[:self.limit]]  # copy out only these images
        batch_images = tf.gather(images, wrong).numpy() if tf.is_tensor(images) else np.asarray(images)[wrong]
        held = self.images if self.images is not None else batch_images[:0]
        scores_now = np.concatenate([self.scores, scores[wrong]])
        keep = np.argsort(-scores_now, kind="stable")[:self.limit]
        self.images = np.concatenate([held, batch_images])[keep]
        self.labels = np.concatenate([self.labels, labels[wrong]])[keep]
        self.predicted = np.concatenate([self.predicted, predicted[wrong]])[keep]
        self.positions = np.concatenate([self.positions, start + wrong])[keep]
        self.scores = scores_now[keep]

    def sources(self, files: list[str] | None = None) -> list[str]:
        """What each mistake is: its file's base name, given the `files` the pass read in its order; else
        (decoded arrays, or files not known in order) its place in the pass, `test #N`."""
        if files:
            return [Path(files[position]).name for position in self.positions]
        return [f"test #{position}" for position in self.positions]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0.0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    numerator = numerator.astype(np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def per_class_results(confusion, class_names: list[str] | None = None) -> tuple[list[dict], dict]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows true, columns predicted), in
    class-index order, each with its class name (labels.txt's) and readable `name`; and their macro averages
    over the classes that occur as a true or a predicted label (as scikit-learn averages)."""
    confusion = np.asarray(confusion, dtype=np.int64)
    hits, support, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    precision, recall = _ratio(hits, predicted), _ratio(hits, support)
    f1 = _ratio(2 * hits, support + predicted)  # = 2PR / (P + R), 0.0 when both are 0
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(confusion))]
    per_class = [{"class": name, "name": shown, "precision": float(p), "recall": float(r), "f1": float(f),
                  "support": int(n)}
                 for name, shown, p, r, f, n in zip(names, readable(names), precision, recall, f1, support)]
    present = (support + predicted) > 0
    macro = {key: float(values[present].mean()) if present.any() else 0.0
             for key, values in (("precision", precision), ("recall", recall), ("f1", f1))}
    macro["classes"] = int(present.sum())
    return per_class, macro


def worst_classes(per_class: list[dict], count: int = WORST_CLASSES) -> list[dict]:
    """The `count` classes of the test split (support > 0) with the lowest F1; ties: more images first."""
    tested = [entry for entry in per_class if entry["support"] > 0]
    return sorted(tested, key=lambda entry: (entry["f1"], -entry["support"]))[:count]


def _averaged(model, images: tf.Tensor) -> tf.Tensor:
    """The model's class probabilities of a batch [B, S, S, C], or of a batch of views [B, V, S, S, C]: each
    image's probabilities averaged over its V views (the papers average the softmax)."""
    if images.shape.rank != 5:
        return model(images, training=False)
    shape = tf.shape(images)
    flat = tf.reshape(images, tf.concat([[shape[0] * shape[1]], shape[2:]], 0))
    probabilities = model(flat, training=False)
    return tf.reduce_mean(tf.reshape(probabilities, [shape[0], shape[1], -1]), axis=1)


_FORWARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its traced forward pass


def _forward(model) -> tf.types.experimental.PolymorphicFunction:
    """`_averaged` of `model` as one tf.function per model object, so a model evaluated again (the loop's kept
    model, round after round) reuses its traces. It reaches the model through a weak reference: the function
    neither keeps the model alive nor the model's cache entry."""
    forward = _FORWARDS.get(model)
    if forward is None:
        held = weakref.ref(model)
        forward = tf.function(lambda images: _averaged(held(), images), reduce_retracing=True)
        _FORWARDS[model] = forward
    return forward


def evaluate_model(model, dataset: tf.data.Dataset, num_classes: int, class_names: list[str] | None = None,
                   mistakes: ConfidentMistakes | None = None) -> dict:
    """Top-1, top-5 and mean cross-entropy (without any weight penalty), the confusion matrix, per-class
    precision / recall / F1 / support with their macro averages (`per_class_results`); `mistakes`, when given,
    collects the most confident wrong predictions in the same pass. Images [B, V, S, S, C] (`test --views`) are
    judged by their views' averaged probabilities."""
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    forward = _forward(model)
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
        if mistakes is not None:  # of several views, the first (the central crop) is what errors.png shows
            shown = images[:, 0] if images.shape.rank == 5 else images
            mistakes.update(shown, labels, predicted, probabilities[np.arange(len(labels)), predicted])
        top_k = np.argsort(-probabilities, axis=1)[:, :k]
        top5_hits += int((top_k == labels[:, None]).any(axis=1).sum())
        loss_sum += float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).sum())
        count += len(labels)
    if count == 0:
        raise UserError("the test split is empty; check data.test_split and data.limit_test")
    per_class, macro = per_class_results(confusion, class_names)
    return {"top1": float(np.trace(confusion) / count), "top5": top5_hits / count, "loss": loss_sum / count,
            "examples": count, "confusion": confusion.tolist(), "per_class": per_class, "macro": macro}

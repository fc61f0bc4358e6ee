"""A classification run's SavedModel for TensorFlow Serving, published by `shared.export` (versions, staging,
pruning, models.config). Each version holds two signatures:

    serving_default  image_bytes: [N] tf.string, encoded JPEG / PNG (REST: {"b64": ...})
    predict_images   images: [N, S, S, C] float32, 0-255 pixels already at the run's image size

both preprocessing inside the graph exactly as the run's eval pipeline does, and both returning
`probabilities` [N, classes], `classes` [N, k] int32 top-k ids, `labels` [N, k] class names (ImageNet
wnids as words, shared.class_names.readable) and `scores` [N, k].
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from shared import export
from shared.class_names import readable
from shared.errors import UserError
from shared.eval_view import EvalView
from shared.runs import Run

OUTPUT_KEYS = ("probabilities", "classes", "labels", "scores")


def serving_functions(model, view: EvalView, class_names: list[str], top_k: int):
    """(bytes_fn, images_fn): the two endpoints as plain functions of batched tensors, preprocessing with
    the run's eval view (`view.pixels`: shared.data.preprocess.eval_view, as the eval pipeline does)."""
    size, channels = view.image_size, view.channels
    normalize = view.normalizer()

    def classify(pixels):
        probabilities = tf.cast(model(normalize(pixels), training=False), tf.float32)
        scores, classes = tf.math.top_k(probabilities, k=min(top_k, len(class_names)))
        return {"probabilities": probabilities, "classes": tf.cast(classes, tf.int32),
                "labels": tf.gather(tf.constant(class_names, tf.string), classes), "scores": scores}

    def bytes_fn(image_bytes):
        pixels = tf.map_fn(view.pixels, image_bytes,
                           fn_output_signature=tf.TensorSpec((size, size, channels), tf.float32))
        return classify(pixels)

    def images_fn(images):
        return classify(images)

    return bytes_fn, images_fn


def export_saved_model(model, config, run: Run, export_dir: str | Path, model_name: str | None = None,
                       version: int | None = None, keep: int = 5, top_k: int = 5) -> Path:
    """Export `model` (the run's, rebuilt from its last checkpoint: `shared.tasks.rebuild`) with the run's
    `config` to `<export_dir>/<model_name>/<version>/` and return that path.

    model_name: default the run's model name. version: default one past the highest there (TF Serving
    serves the highest). keep: how many numeric versions to leave, the newest. top_k: how many classes
    the `classes` / `labels` / `scores` outputs hold (at most the class count)."""
    if top_k < 1:
        raise UserError(f"top_k must be at least 1 (got {top_k})")
    model_dir = export.target_folder(run, export_dir, model_name or run.model_name, version, keep)
    names = run.class_names()
    num_classes = int(model.output_shape[-1])
    if not names or len(names) != num_classes:  # a run from before labels.txt: the index is the name
        names = [str(i) for i in range(num_classes)]
    labels = readable(names)  # what the `labels` output says: ImageNet wnids as words
    view = EvalView.from_config(config)
    bytes_fn, images_fn = serving_functions(model, view, labels, top_k)

    def write(staging: Path) -> dict:
        export.write_archive(model, bytes_fn, images_fn, view.shape, staging,
                             same_as=(json.dumps(view.record(), sort_keys=True), tuple(labels), top_k))
        return {**view.record(), "top_k": min(top_k, len(names)), "labels": labels, "class_names": names}

    return export.publish(run, export_dir, model_dir, version, keep, write)

"""Export a finished detection run as a SavedModel for TensorFlow Serving, decoding and NMS inside (the
TFLite file is `shared.detection.tflite`'s).

`export_detection_saved_model`, the layout of `shared.export` (its versioning, pruning and atomic publishing
are reused): `<export_dir>/<model_name>/<version>/`, model_name by default `<model>_detection` so a model's
detectors and classifiers never share a TF Serving model folder. Signatures:

    serving_default  image_bytes: [N] tf.string, encoded JPEG / PNG of any size
    predict_images   images: [N, S, S, C] float32, 0-255 pixels already at the run's image size

both decode, resize to S x S and normalize as the run's evaluation pipeline does
(`shared.detection.datasets.make_dataset`), run the detector, decode the anchor deltas and apply per-class
NMS (`postprocess.decode_detections`, the run's detection.score_threshold / nms_iou / max_detections), and
return `boxes` [N, D, 4] float32 absolute xyxy, in the pixels of the image as sent (serving_default: scaled
back from S x S to each image's own size), `classes` [N, D] int32 (-1 for padding), `labels` [N, D] class
names ("" for padding), `scores` [N, D] float32 and `num_detections` [N] int32. The signatures'
functions are `shared.detection.serving`'s.
"""

from __future__ import annotations

from pathlib import Path

from shared.detection.serving import detection_serving_functions, preprocessing
from shared.export import publish, target_folder, write_archive
from shared.runs import Run

OUTPUT_KEYS = ("boxes", "classes", "labels", "scores", "num_detections")


def default_model_name(run: Run) -> str:
    return f"{run.model_name}_detection"


def _write_saved_model(detector, config, class_names: list[str], target: Path) -> None:
    size, channels = config.data.image_size, config.data.channels
    bytes_fn, images_fn = detection_serving_functions(detector, config, class_names)
    write_archive(detector, bytes_fn, images_fn, (size, size, channels), target)


def export_detection_saved_model(detector, config, run: Run, export_dir: Path, model_name: str | None = None,
                                 version: int | None = None, keep: int = 5) -> Path:
    """Export `detector` (the run's, rebuilt from its snapshot and last checkpoint: `shared.tasks.rebuild`)
    with the run's `config` to `<export_dir>/<model_name>/<version>/` (default model_name
    `<model>_detection`, version one past the highest) and return that path. The version appears by
    renaming a finished hidden folder; older versions beyond `keep` are pruned and
    `<export_dir>/models.config` is rewritten (see `shared.export`)."""
    model_name = model_name or default_model_name(run)
    model_dir = target_folder(run, export_dir, model_name, version, keep)
    names = run.class_names() or [str(i) for i in range(config.data.num_classes)]

    def write(staging: Path) -> dict:
        _write_saved_model(detector, config, names, staging)
        return {"task": "detection", **preprocessing(config), "labels": names, "outputs": list(OUTPUT_KEYS),
                "boxes": "absolute xyxy pixels of the image as sent",
                "score_threshold": config.detection.score_threshold, "nms_iou": config.detection.nms_iou,
                "max_detections": config.detection.max_detections}

    return publish(run, export_dir, model_dir, version, keep, write)

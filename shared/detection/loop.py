"""Detection in the loop (`shared.loop`): an accepted line says its image's boxes (`"spans": [{"x": 10, "y": 4,
"width": 30, "height": 20, "label": "cat"}]`, pixels), examples become TF Object Detection API records with
`<loop>/label_map.pbtxt`, the held-out set is loop.eval's or the recipe's detection.test_annotations, and a
loop may start from a classification backbone (its classes: the recipe's label map or detection data)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from shared import durable
from shared.annotations import AnswerSchema, Example, Malformed, brief, class_index
from shared.data.tfrecord import shard_name
from shared.detection.datasets import load_detection_data
from shared.detection.label_map import read_class_list, write_label_map
from shared.detection.records import DetectionRecord, DetectionSplit
from shared.detection.tfod import write_tfod_records
from shared.errors import UserError
from shared.loop.folder import EVAL, EVAL_PREFIX, Loop
from shared.loop.support import LoopSupport

LABEL_MAP_FILE = "label_map.pbtxt"  # beside the loop's labels.txt: how its records number the classes
BOX_TOLERANCE = 1.0  # pixels a span may stick out of its image (annotation tools round); it is clipped


@dataclasses.dataclass
class BoxedExample(Example):
    """An accepted detection task: its image and its boxes."""
    boxes: np.ndarray  # float32 [N, 4] absolute pixel xyxy
    classes: np.ndarray  # int32 [N]


class Spans(AnswerSchema):
    """`"spans": [{"x", "y", "width", "height", "label"}, ...]`: boxes in the image's pixels."""
    example_type = BoxedExample

    def says(self, item: dict, width: int, height: int, index: dict[str, int]) -> dict:
        boxes, classes = _spans(item.get("spans"), width, height, index)
        return {"boxes": boxes, "classes": classes}


def spans_of(boxes, labels: Sequence[str], scores=None) -> list[dict]:
    """Pixel xyxy boxes and their class names (and scores) as task spans {x, y, width, height, label[, score]}."""
    out = []
    for i, (x_min, y_min, x_max, y_max) in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4).tolist()):
        span = {"x": x_min, "y": y_min, "width": x_max - x_min, "height": y_max - y_min, "label": labels[i]}
        if scores is not None:
            span["score"] = float(scores[i])
        out.append(span)
    return out


def _spans(spans, width: int, height: int, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel spans {x, y, width, height, label} -> (xyxy boxes clipped to the image, class indices)."""
    if not isinstance(spans, list):
        raise Malformed(f"spans is {brief(spans)}, not a list of boxes")
    boxes, classes = [], []
    for i, span in enumerate(spans):
        if not isinstance(span, dict):
            raise Malformed(f"span {i} is {brief(span)}, not an object")
        values = [span.get(key) for key in ("x", "y", "width", "height")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise Malformed(f"span {i} needs finite numbers x, y, width, height (got {brief(values)})")
        x, y, w, h = values
        if w <= 0 or h <= 0:
            raise Malformed(f"span {i} is empty (width {w}, height {h})")
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE \
                or y + h > height + BOX_TOLERANCE:
            raise Malformed(f"span {i} (x {x}, y {y}, width {w}, height {h}) lies outside the {width}x{height} "
                            f"image")
        classes.append(class_index(span.get("label"), index, f"span {i} label"))
        boxes.append([max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)])
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int32)


class DetectionLoop(LoopSupport):
    answers = Spans()
    unmeasured_start = "a classification backbone: no detector yet"

    def classes_without_run(self, loop: Loop) -> list[str]:
        """A classification backbone for a detector: the recipe's label map, else its detection data's classes."""
        if loop.config.detection.label_map:
            return read_class_list(loop.config.detection.label_map)
        return load_detection_data(loop.config)[2]

    def write_class_files(self, folder: Path, class_names: list[str]) -> None:
        with durable.partial_path(folder / LABEL_MAP_FILE) as partial:
            write_label_map(partial, class_names)

    def write_records(self, folder: Path, prefix: str, examples: list[Example], class_names: list[str]) -> None:
        split = DetectionSplit([DetectionRecord(example.image, example.width, example.height, example.boxes,
                                                example.classes, name=example.name) for example in examples],
                               class_names)
        write_tfod_records(split, folder / f"{shard_name(prefix, 0, 1)}.tfrecord", class_names)

    def write_test_split(self, loop: Loop, class_names: list[str], folder: Path) -> None:
        _, test, _ = load_detection_data(loop.config)
        if test is None:
            raise UserError(f"loop.eval is null and the recipe has no detection.test_annotations{loop.config.where}; "
                            f"name a held-out annotations file in loop.eval")
        write_tfod_records(test, folder / f"{EVAL_PREFIX}-00000-of-00001.tfrecord", class_names)

    def data_changes(self, loop: Loop, train: str) -> dict:
        return {"detection.format": "tfrecord",
                "detection.train_annotations": str(loop.dir / f"{train}-*.tfrecord"),
                "detection.test_annotations": str(loop.dir / EVAL / f"{EVAL_PREFIX}-*.tfrecord"),
                "detection.label_map": str(loop.dir / LABEL_MAP_FILE)}

    def round_changes(self, loop: Loop, state: dict, epochs: int) -> dict:
        unfreeze = loop.config.detection.unfreeze_epoch
        if unfreeze is not None and unfreeze >= epochs:
            return {"detection.unfreeze_epoch": None}  # the round is shorter than its frozen stretch
        return {}

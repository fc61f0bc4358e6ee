"""The common form every detection reader produces (`shared.detection.coco`, `voc`, `tfod`) and the checks
each applies to what it reads.

A `DetectionSplit` of `DetectionRecord`s holds, per image, its file path (or encoded bytes), width and height,
boxes as float32 [N, 4] in ABSOLUTE pixel xyxy (x_min, y_min, x_max, y_max; continuous coordinates, so a box
covering pixel columns 3..7 is x 3.0 to 8.0) and 0-based int32 class indices [N], plus the class names in
index order. Every reader validates what it reads and raises a one-line `UserError` naming the file and the
fix.
"""

from __future__ import annotations

import os
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from shared.errors import UserError

BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in annotation tools); it is clipped


@dataclass
class DetectionRecord:
    """One image and its objects."""
    image: str | bytes  # an image file path, or the encoded image (PNG, JPEG, ...)
    width: int
    height: int
    boxes: np.ndarray  # float32 [N, 4], absolute pixel xyxy
    classes: np.ndarray  # int32 [N], 0-based indices into the split's class_names
    name: str = ""  # where it came from: a file name, a TFRecord's image/filename or source_id
    difficult: np.ndarray | None = None  # bool [N] (VOC's `difficult`); None: none is

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.classes = np.asarray(self.classes, np.int32).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.classes), bool)
        self.difficult = np.asarray(self.difficult, bool).reshape(-1)
        if not len(self.boxes) == len(self.classes) == len(self.difficult):
            raise ValueError(f"{self.name}: {len(self.boxes)} boxes but {len(self.classes)} classes")


@dataclass
class DetectionSplit:
    """The records of one split, with the class names their indices point into."""
    records: list[DetectionRecord]
    class_names: list[str]
    source: str = ""  # the annotation file, folder or pattern it was read from (for messages)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DetectionRecord:
        return self.records[index]

    def __iter__(self):
        return iter(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_boxes(self) -> int:
        return sum(len(record.classes) for record in self.records)

    def limit(self, count: int | None) -> DetectionSplit:
        """The first `count` records (all with None)."""
        if count is None:
            return self
        return DetectionSplit(self.records[:count], self.class_names, self.source)


def require_image_files(records: list, where: str, fix: str) -> None:
    """One error naming the first missing image file (and how many more), before anything is written."""
    missing = [record.image for record in records if not os.path.isfile(record.image)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"image file {missing[0]} {where} not found{more}; {fix}")


def image_size_problem(image: str | bytes, width: int, height: int, stated: str = "its annotation states"
                       ) -> str | None:
    """Why an image file (or encoded image) does not match the `width` x `height` its annotation (`stated`)
    gives, or cannot be an image at all; None when its header agrees. The size is the image's as shown (EXIF
    orientation applied, as annotation tools show it and training decodes it: `shared.data.formats`). Reads only
    the header: a cheap check of every image before training, not a decode (a corrupt body is caught in
    `make_dataset`)."""
    from shared.data import formats

    try:
        if isinstance(image, str):
            with open(image, "rb") as handle:
                image = handle.read()
        found = formats.facts(image)
    except OSError as error:
        return f"is not a readable image ({error.strerror or error})"
    except formats.Refused as why:
        return str(why)
    if (found.width, found.height) != (width, height):
        turned = " as shown (its EXIF orientation turns it)" if found.orientation >= 5 else ""
        return f"is {found.width}x{found.height} pixels{turned} but {stated} {width}x{height}"
    return None


def require_image_sizes(records: list, where: str, fix: str) -> None:
    """One error naming the first image file whose header is unreadable or disagrees with the width and
    height `where` (the annotation) states for it (and how many more)."""
    problems = [(record, problem) for record in records
                if (problem := image_size_problem(record.image, record.width, record.height, where))]
    if problems:
        record, problem = problems[0]
        more = f" (and {len(problems) - 1} more image(s))" if len(problems) > 1 else ""
        name = record.image if isinstance(record.image, str) else record.name
        raise UserError(f"image {name} {problem}{more}; {fix}")


def check_box(box: Sequence[float], width: int, height: int, where: str, fix: str) -> list[float]:
    """An absolute xyxy box checked against its `width` x `height` image and clipped (within BOX_TOLERANCE), as
    every reader checks its boxes; raises a UserError starting with `where` (the file and object) and ending
    with `fix`."""
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    if not all(np.isfinite(v) for v in (x_min, y_min, x_max, y_max)):
        raise UserError(f"{where}: box {format_box(box)} is not finite; {fix}")
    if x_max <= x_min or y_max <= y_min:
        raise UserError(f"{where}: box {format_box(box)} (xyxy) is empty: x_max <= x_min or y_max <= y_min; {fix}")
    if (x_min < -BOX_TOLERANCE or y_min < -BOX_TOLERANCE or x_max > width + BOX_TOLERANCE
            or y_max > height + BOX_TOLERANCE):
        raise UserError(f"{where}: box {format_box(box)} (xyxy) lies outside the {width}x{height} image; {fix}")
    return [min(max(x_min, 0.0), width), min(max(y_min, 0.0), height),
            min(max(x_max, 0.0), width), min(max(y_max, 0.0), height)]


def format_box(box: Sequence[float]) -> str:
    """A box as messages print it: [1, 2.5, 30, 40]."""
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def read_annotation_text(path: Path, what: str, fix: str) -> str:
    """A UTF-8 annotation file's text; a missing or unreadable file is one UserError naming `what` and `fix`."""
    if not path.is_file():
        raise UserError(f"{what} not found: {path}; {fix}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {what} {path} ({error}); {fix}") from None


def brief(value) -> str:
    """A short repr for messages, safe for deeply nested or huge values."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 2, 60, 60, 40
    return short.repr(value)


def positive_int(value, where: str, what: str, fix: str) -> int:
    """`value` (a width or height as an annotation states it) as a positive int, else a UserError."""
    try:
        number = float("nan") if isinstance(value, bool) else float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if not np.isfinite(number) or number <= 0 or number != int(number):
        raise UserError(f"{where}: {what} is {brief(value)}, not a positive whole number; {fix}")
    return int(number)

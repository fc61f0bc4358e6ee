"""An annotation tool's append-only JSONL export, read in increments: one task a line,

    {"image": "photos/1.jpg" | "data:image/png;base64,...", "answer": "accept" | "reject" | "ignore",
     "label": "cat"}                                                         classification
     "spans": [{"x": 10, "y": 4, "width": 30, "height": 20, "label": "cat"}]  detection (pixels)

`task_line(...)` / `spans_of(...)` write that format (a simulated annotator, pre-annotations).
`read_new(path, offset, lines_before, task, class_names)` reads the complete lines after byte `offset`: a last
line without its newline is still being written and is left for the next read. Accepted tasks become
`Example`s (the image's own bytes, checked to decode); rejected and ignored ones are only counted. A line that
cannot be a task (bad JSON, no image, an unknown label, an unreadable image, a span outside the image) is
reported by its line number and skipped, never fatal. Relative image paths are relative to the annotations
file's folder.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from shared.errors import UserError

ANSWERS = ("accept", "reject", "ignore")
TASKS = ("classification", "detection")
BOX_TOLERANCE = 1.0  # pixels a span may stick out of its image (annotation tools round); it is clipped
SHOWN_PROBLEMS = 10  # malformed lines named one by one in a report; the rest are counted


class Malformed(ValueError):
    """Why one line is not a usable task."""


@dataclasses.dataclass
class Example:
    """One accepted task: the image's own encoded bytes and what it shows."""
    line: int  # 1-based line number in the annotations file
    image: bytes
    image_format: str  # as TensorFlow names it: jpeg, png, gif, bmp
    width: int
    height: int
    name: str  # the image path, or "data URI of line N"
    label: int | None = None  # classification: index into the class names
    boxes: np.ndarray | None = None  # detection: float32 [N, 4] absolute pixel xyxy
    classes: np.ndarray | None = None  # detection: int32 [N]


@dataclasses.dataclass
class Batch:
    """What one read found after the byte offset it started from."""
    examples: list[Example]
    end_offset: int  # the byte after the last complete line read
    lines: int  # complete lines read (blank ones included)
    accepted: int = 0  # well-formed accepted tasks (= len(examples))
    rejected: int = 0
    ignored: int = 0
    malformed: list[str] = dataclasses.field(default_factory=list)  # "line N: why", one per skipped line
    waiting: bool = False  # a last line without its newline was left for later

    def describe(self) -> str:
        """One line: the counts, then the malformed lines by number."""
        text = (f"{self.lines} new line(s): {self.accepted} accepted, {self.rejected} rejected, {self.ignored} "
                f"ignored, {len(self.malformed)} malformed")
        if self.waiting:
            text += " (a last line without its newline waits for the next read)"
        if self.malformed:
            shown = "; ".join(self.malformed[:SHOWN_PROBLEMS])
            more = f"; and {len(self.malformed) - SHOWN_PROBLEMS} more" if len(self.malformed) > SHOWN_PROBLEMS else ""
            text += f"; skipped {shown}{more}"
        return text


def task_line(image: str, answer: str | None = None, label: str | None = None, spans: list[dict] | None = None,
              **extra) -> str:
    """One task as a JSONL line (newline included), in the format `read_new` reads: for a simulated annotator
    (answer set) or pre-annotations (no answer yet: the tool adds it; `extra` such as a score rides along)."""
    if answer is not None and answer not in ANSWERS:
        raise ValueError(f"answer {answer!r} is not one of {ANSWERS}")
    item = {"image": image, **({"answer": answer} if answer is not None else {}),
            **({"label": label} if label is not None else {}), **({"spans": spans} if spans is not None else {}),
            **extra}
    return json.dumps(item, ensure_ascii=False) + "\n"


def spans_of(boxes, labels: Sequence[str], scores=None) -> list[dict]:
    """Pixel xyxy boxes and their class names (and scores) as task spans {x, y, width, height, label[, score]}."""
    out = []
    for i, (x_min, y_min, x_max, y_max) in enumerate(np.asarray(boxes, np.float64).reshape(-1, 4).tolist()):
        span = {"x": x_min, "y": y_min, "width": x_max - x_min, "height": y_max - y_min, "label": labels[i]}
        if scores is not None:
            span["score"] = float(scores[i])
        out.append(span)
    return out


def read_new(path: str | os.PathLike, offset: int = 0, lines_before: int = 0, task: str = "classification",
             class_names: Sequence[str] = ()) -> Batch:
    """The complete lines of the JSONL file `path` from byte `offset` on (`lines_before` lines precede it, for
    the line numbers), parsed as `task` tasks whose labels must be among `class_names`. UserError when the
    file is missing or shorter than `offset` (it must only grow)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < offset:
                raise UserError(f"annotations file {path} is {size} bytes, shorter than the {offset} already read: "
                                f"it must only be appended to; restore it, or start a new loop (loop.dir)")
            handle.seek(offset)
            data = handle.read()
    except OSError as error:
        raise UserError(f"cannot read annotations file {path} ({error.strerror or error}); "
                        f"check --annotations") from None
    end = data.rfind(b"\n") + 1  # 0: no complete line yet
    batch = Batch(examples=[], end_offset=offset + end, lines=0, waiting=bool(data[end:].strip()))
    index = {name: i for i, name in enumerate(class_names)}
    for number, raw in enumerate(data[:end].split(b"\n")[:-1], start=lines_before + 1):
        batch.lines += 1
        if not raw.strip():
            continue
        try:
            answer, example = parse_line(raw, number, path.parent, task, index)
        except Malformed as why:
            batch.malformed.append(f"line {number}: {why}")
            continue
        if answer == "accept":
            batch.accepted += 1
            batch.examples.append(example)
        elif answer == "reject":
            batch.rejected += 1
        else:
            batch.ignored += 1
    return batch


def parse_line(raw: bytes, number: int, base: Path, task: str, index: dict[str, int]) -> tuple[str, Example | None]:
    """(answer, the Example for an accepted task else None); Malformed says why the line is no task."""
    try:
        item = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise Malformed(f"not JSON ({str(error).splitlines()[0][:80]})") from None
    if not isinstance(item, dict):
        raise Malformed(f"a JSON {type(item).__name__}, not an object")
    answer = item.get("answer")
    if answer not in ANSWERS:
        raise Malformed(f"answer is {_brief(answer)}, not one of {', '.join(ANSWERS)}")
    if answer != "accept":
        return answer, None  # counted only: what it says is never trained on
    image = item.get("image")
    if not isinstance(image, str) or not image:
        raise Malformed("no image (a path or a data: URI)")
    data, name = _image_bytes(image, number, base)
    image_format, width, height = image_facts(data, name)
    example = Example(number, data, image_format, width, height, name)
    if task == "classification":
        example.label = _class_index(item.get("label"), index, "label")
    else:
        example.boxes, example.classes = _spans(item.get("spans"), width, height, index)
    return answer, example


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _class_index(label, index: dict[str, int], what: str) -> int:
    if not isinstance(label, str):
        raise Malformed(f"{what} is {_brief(label)}, not a class name")
    if label not in index:
        raise Malformed(f"{what} {label!r} is not a class of the model ({', '.join(list(index)[:5])}"
                        f"{' ...' if len(index) > 5 else ''})")
    return index[label]


def _image_bytes(image: str, number: int, base: Path) -> tuple[bytes, str]:
    """The encoded image of a path (relative to `base`) or a base64 data: URI, and its name for messages."""
    if image.startswith("data:"):
        header, comma, payload = image.partition(",")
        if not comma or not header.endswith(";base64"):
            raise Malformed("image is a data: URI without ';base64,' (only base64 data URIs are read)")
        try:
            return base64.b64decode(payload, validate=True), f"data URI of line {number}"
        except (binascii.Error, ValueError):
            raise Malformed("image is a data: URI whose base64 does not decode") from None
    path = Path(image).expanduser()
    path = path if path.is_absolute() else base / path
    try:
        return path.read_bytes(), str(path)
    except OSError as error:
        raise Malformed(f"cannot read image {path} ({error.strerror or error})") from None


def image_facts(data: bytes, name: str) -> tuple[str, int, int]:
    """(format as TensorFlow names it, width, height) of an encoded image that decodes, else Malformed."""
    from PIL import Image

    from shared.data.tfrecord import TF_FORMATS

    try:
        with Image.open(io.BytesIO(data)) as image:
            pil_format, (width, height) = image.format, image.size
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:80]
        raise Malformed(f"image {name} does not decode ({reason})") from None
    if pil_format not in TF_FORMATS:
        raise Malformed(f"image {name} is a {pil_format} image, which TensorFlow does not decode")
    return TF_FORMATS[pil_format], width, height


def _spans(spans, width: int, height: int, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel spans {x, y, width, height, label} -> (xyxy boxes clipped to the image, class indices)."""
    if not isinstance(spans, list):
        raise Malformed(f"spans is {_brief(spans)}, not a list of boxes")
    boxes, classes = [], []
    for i, span in enumerate(spans):
        if not isinstance(span, dict):
            raise Malformed(f"span {i} is {_brief(span)}, not an object")
        values = [span.get(key) for key in ("x", "y", "width", "height")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise Malformed(f"span {i} needs finite numbers x, y, width, height (got {_brief(values)})")
        x, y, w, h = values
        if w <= 0 or h <= 0:
            raise Malformed(f"span {i} is empty (width {w}, height {h})")
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE \
                or y + h > height + BOX_TOLERANCE:
            raise Malformed(f"span {i} (x {x}, y {y}, width {w}, height {h}) lies outside the {width}x{height} "
                            f"image")
        classes.append(_class_index(span.get("label"), index, f"span {i} label"))
        boxes.append([max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)])
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int32)

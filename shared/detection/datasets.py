"""Detection data: COCO JSON, Pascal VOC XML and TF Object Detection API TFRecords read into one record
form, and the `tf.data` pipeline that feeds a detector.

The common form (`DetectionSplit` of `DetectionRecord`s) holds, per image, its file path (or encoded bytes),
width and height, boxes as float32 [N, 4] in ABSOLUTE pixel xyxy (x_min, y_min, x_max, y_max; continuous
coordinates, so a box covering pixel columns 3..7 is x 3.0 to 8.0) and 0-based int32 class indices [N], plus
the class names in index order. Every reader validates what it reads and raises a one-line `UserError` naming
the file and the fix.

Class indices, per format:
- COCO: `categories` sorted by id, whatever the ids are (1..90 with gaps in COCO itself) -> 0, 1, 2, ...
- VOC: the class names sorted, unless a label list is given (`detection.label_map`: one name a line, or a
  label_map.pbtxt), whose order is kept. `difficult` objects are KEPT (and trained on), flagged in
  `DetectionRecord.difficult` so an evaluation can ignore them; `read_voc(..., skip_difficult=True)` drops them.
- TFRecord: the label map's ids (1-based, 0 is the TF OD API's background) sorted -> 0, 1, 2, ...

The pipeline (`make_dataset`) yields batches `(images, {"boxes", "classes"})`:
  images  float32 [B, S, S, C]: resized to S x S (plain resize, no aspect-preserving letterbox), normalized
          (x - mean) / std on the 0-255 scale; mean = std = 127.5 per channel (pixels in [-1, 1]) unless
          data.mean / data.std are set; data.normalize: false gives x / 255. The detection task writes the
          statistics used into the run's config (data.mean / std), as for classification.
  boxes   float32 [B, max_boxes, 4]: absolute xyxy in the resized S x S image, rows padded with -1.
  classes int32 [B, max_boxes]: 0-based, padded with -1; valid rows come first.
Training augmentation is `shared.detection.augment`: SSD's crop and zoom out per image, Keras' box-aware
layers (RandomFlip, RandomZoom, RandomTranslation with `bounding_box_format="xyxy"`, RandomColorJitter) on
whole batches; boxes that leave the image or shrink below `MIN_BOX_SIDE`
pixels are dropped (set to padding). Keras 3.15's RandomCrop is NOT used: it shifts boxes by the vertical
offset horizontally and vice versa (its transform_bounding_boxes subtracts h_start from x), so its boxes do not
match its crops, and on a batch it crops every image at the same place.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import shutil
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

from shared.config_schema import Config
from shared.data import checks
from shared.detection import augment as detection_augment
from shared.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE

DEFAULT_MEAN = 127.5  # per channel, on the 0-255 scale: (x - 127.5) / 127.5 puts pixels in [-1, 1]
DEFAULT_STD = 127.5
BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in annotation tools); it is clipped
MIN_BOX_SIDE = 2.0  # pixels: boxes narrower or lower than this after augmentation are dropped
DEFAULT_AUGMENT = ("flip", "zoom", "translate")
CACHE_BYTES = 1 << 30  # decoded, resized splits up to this size stay in memory across epochs


# ---------------------------------------------------------------- the common form


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


def _check_box(box: Sequence[float], width: int, height: int, where: str, fix: str) -> list[float]:
    """Validate one absolute xyxy box against its image; returns it clipped to the image (within
    BOX_TOLERANCE). `where` names the file and object, `fix` says what to do."""
    x_min, y_min, x_max, y_max = (float(v) for v in box)
    if not all(np.isfinite(v) for v in (x_min, y_min, x_max, y_max)):
        raise UserError(f"{where}: box {_fmt(box)} is not finite; {fix}")
    if x_max <= x_min or y_max <= y_min:
        raise UserError(f"{where}: box {_fmt(box)} (xyxy) is empty: x_max <= x_min or y_max <= y_min; {fix}")
    if (x_min < -BOX_TOLERANCE or y_min < -BOX_TOLERANCE or x_max > width + BOX_TOLERANCE
            or y_max > height + BOX_TOLERANCE):
        raise UserError(f"{where}: box {_fmt(box)} (xyxy) lies outside the {width}x{height} image; {fix}")
    return [min(max(x_min, 0.0), width), min(max(y_min, 0.0), height),
            min(max(x_max, 0.0), width), min(max(y_max, 0.0), height)]


def check_box(box: Sequence[float], width: int, height: int, where: str, fix: str) -> list[float]:
    """An absolute xyxy box checked against its `width` x `height` image and clipped (within BOX_TOLERANCE), as
    every reader here checks its boxes; raises a UserError starting with `where` and ending with `fix`."""
    return _check_box(box, width, height, where, fix)


def _fmt(box: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in box) + "]"


def _read_text(path: Path, what: str, fix: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}; {fix}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {what} {path} ({error}); {fix}") from None


def _positive_int(value, where: str, what: str, fix: str) -> int:
    try:
        number = float("nan") if isinstance(value, bool) else float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if not np.isfinite(number) or number <= 0 or number != int(number):
        raise UserError(f"{where}: {what} is {_brief(value)}, not a positive whole number; {fix}")
    return int(number)


# ---------------------------------------------------------------- COCO


def read_coco(annotation_file: str | os.PathLike, images_root: str | os.PathLike,
              check_files: bool = True) -> DetectionSplit:
    """A COCO detection JSON: `images` (id, file_name relative to `images_root`, width, height),
    `annotations` (image_id, category_id, bbox [x, y, w, h] in pixels, iscrowd) and `categories` (id, name).
    Categories sorted by id become class indices 0, 1, ...; crowd annotations (iscrowd 1) are skipped; images
    without annotations are kept, with no boxes. `check_files` checks that every image file exists and that
    its header gives the size the file states. Whatever the file holds, a problem is one UserError line."""
    path = Path(annotation_file).expanduser()
    fix = f"fix {path} or regenerate it"
    text = _read_text(path, "COCO annotation file", "set detection.train_annotations / test_annotations to the JSON")
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON (line {error.lineno} column {error.colno}: {error.msg}); "
                        f"fix the file or regenerate it") from None
    except RecursionError:  # Python's parser recurses once per [ or {
        raise UserError(f"{path} nests lists or objects too deeply to be a COCO file; {fix}") from None
    try:
        split = _coco_split(tree, path, Path(images_root).expanduser(), fix)
    except (TypeError, ValueError, OverflowError, AttributeError, RecursionError) as error:
        # a shape the checks below did not foresee: still one line, naming the file
        reason = (str(error).splitlines() or [""])[0][:200]
        raise UserError(f"{path} is not a COCO detection file this reader understands ({type(error).__name__}: "
                        f"{reason}); {fix}") from None
    if check_files:
        require_image_files(split.records, f"listed in {path}",
                            "set data.path to the folder the file_name entries are relative to")
        require_image_sizes(split.records, f"{path} states",
                            f"fix its width and height in {path} or replace the image")
    return split


def _brief(value) -> str:
    """A short repr for messages, safe for deeply nested or huge values."""
    brief = reprlib.Repr()
    brief.maxlevel, brief.maxstring, brief.maxother, brief.maxlong = 2, 60, 60, 40
    return brief.repr(value)


def _coco_id(value, where: str, what: str, fix: str):
    """An id as COCO writes them: a whole number (or, leniently, a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}: {what} {_brief(value)} is not a whole number; {fix}")
    return value


def _coco_split(tree, path: Path, root: Path, fix: str) -> DetectionSplit:
    if not isinstance(tree, dict) or not all(isinstance(tree.get(key), list)
                                             for key in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO detection file: it needs the lists images, annotations and "
                        f"categories; point detection.*_annotations at an instances_*.json")
    categories = {}
    for category in tree["categories"]:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise UserError(f"{path}: category {_brief(category)} needs an id and a name; {fix}")
        category_id = _coco_id(category["id"], path, "category id", fix)
        if not isinstance(category["name"], (str, int)) or isinstance(category["name"], bool):
            raise UserError(f"{path}: category {category_id} has the name {_brief(category['name'])}, not a text; "
                            f"{fix}")
        if category_id in categories:
            raise UserError(f"{path}: category id {category_id} appears twice; {fix}")
        name = str(category["name"])
        if not name.strip() or len(name.splitlines()) > 1:  # a run records its classes one a line
            raise UserError(f"{path}: category {category_id} has the name {name!r}; give it a name of one "
                            f"non-empty line")
        categories[category_id] = name
    if not categories:
        raise UserError(f"{path} lists no categories; {fix}")
    try:
        ids = sorted(categories)
    except TypeError:
        raise UserError(f"{path}: category ids mix numbers and text; {fix}") from None
    index = {category_id: i for i, category_id in enumerate(ids)}
    class_names = [categories[category_id] for category_id in ids]

    images = {}  # id -> [file, width, height, boxes, classes, name]
    for image in tree["images"]:
        if not isinstance(image, dict) or not all(key in image for key in ("id", "file_name", "width", "height")):
            raise UserError(f"{path}: image {_brief(image)} needs id, file_name, width and height; {fix}")
        image_id = _coco_id(image["id"], path, "image id", fix)
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise UserError(f"{path}: image {image_id} has the file_name {_brief(image['file_name'])}, not a "
                            f"path; {fix}")
        where = f"{path}: image {image_id} ({image['file_name']})"
        if image_id in images:
            raise UserError(f"{path}: image id {image_id} appears twice; {fix}")
        width = _positive_int(image["width"], where, "width", fix)
        height = _positive_int(image["height"], where, "height", fix)
        images[image_id] = [str(root / image["file_name"]), width, height, [], [], image["file_name"]]
    for annotation in tree["annotations"]:
        if not isinstance(annotation, dict) or not all(key in annotation for key in ("image_id", "category_id",
                                                                                     "bbox")):
            raise UserError(f"{path}: annotation {_brief(annotation)} needs image_id, category_id and bbox; {fix}")
        if annotation.get("iscrowd", 0):
            continue  # a crowd region, not one object: COCO's own evaluation ignores these too
        where = f"{path}: annotation {_brief(annotation.get('id', '?'))}"
        image_id = _coco_id(annotation["image_id"], where, "image_id", fix)
        category_id = _coco_id(annotation["category_id"], where, "category_id", fix)
        if image_id not in images:
            raise UserError(f"{where} refers to image id {image_id}, which `images` does not list; {fix}")
        if category_id not in index:
            raise UserError(f"{where} has category id {category_id}, which `categories` does not list (ids: "
                            f"{', '.join(map(str, ids[:20]))}); add the category or fix the id")
        bbox = annotation["bbox"]
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise UserError(f"{where}: bbox {_brief(bbox)} is not [x, y, width, height]; {fix}")
        entry = images[image_id]
        x, y, w, h = (float(v) for v in bbox)
        box = _check_box([x, y, x + w, y + h], entry[1], entry[2], f"{where} (image {entry[5]})",
                         "fix the bbox [x, y, width, height] or remove the annotation")
        entry[3].append(box)
        entry[4].append(index[category_id])
    records = [DetectionRecord(file, width, height, np.array(boxes, np.float32).reshape(-1, 4),
                               np.array(classes, np.int32), name=name)
               for file, width, height, boxes, classes, name in images.values()]
    if not records:
        raise UserError(f"{path} lists no images; {fix}")
    return DetectionSplit(records, class_names, str(path))


def write_coco(split: DetectionSplit, path: str | os.PathLike, images_root: str | os.PathLike) -> None:
    """Write a split as a COCO detection JSON; file_name relative to `images_root`, category ids 1, 2, ...
    in class order (COCO's convention), every annotation iscrowd 0 with its box area."""
    root = Path(images_root).resolve()
    images, annotations = [], []
    for image_id, record in enumerate(split.records, 1):
        if not isinstance(record.image, str):
            raise ValueError("write_coco needs records with image files, not encoded bytes")
        file_name = Path(record.image).resolve().relative_to(root).as_posix()
        images.append({"id": image_id, "file_name": file_name, "width": record.width, "height": record.height})
        for box, class_index in zip(record.boxes.tolist(), record.classes.tolist()):
            x_min, y_min, x_max, y_max = box
            w, h = x_max - x_min, y_max - y_min
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": class_index + 1,
                                "bbox": [round(v, 3) for v in (x_min, y_min, w, h)], "area": round(w * h, 3),
                                "iscrowd": 0})
    categories = [{"id": i + 1, "name": name, "supercategory": "object"} for i, name in enumerate(split.class_names)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": {"description": split.source}, "images": images,
                                "annotations": annotations, "categories": categories}), encoding="utf-8")


# ---------------------------------------------------------------- label lists and label maps


@dataclass
class LabelMapItem:
    id: int
    name: str
    display_name: str | None = None


def _unquote(token: str) -> str:
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    return token


def _strip_comments(text: str) -> str:
    """Drop `# ...` to the end of the line, except inside quotes."""
    return re.sub(r"""('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")|#[^\n]*""", lambda m: m.group(1) or "", text)


def _blocks(text: str) -> list[tuple[str, str]]:
    """Top-level `key { body }` (or `key: { body }`) blocks of protobuf text format, nested blocks kept in
    the body; quote-aware brace matching."""
    blocks, position = [], 0
    opener = re.compile(r"\s*([A-Za-z_]\w*)\s*:?\s*\{")
    while True:
        match = opener.match(text, position)
        if not match:
            if text[position:].strip():
                return blocks + [("", text[position:])]  # trailing garbage: reported by the caller
            return blocks
        depth, i, quote = 1, match.end(), None
        while i < len(text) and depth:
            char = text[i]
            if quote:
                if char == "\\":
                    i += 1
                elif char == quote:
                    quote = None
            elif char in "'\"":
                quote = char
            elif char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
            i += 1
        if depth:
            return blocks + [("", text[match.start():])]  # unclosed brace
        blocks.append((match.group(1), text[match.end():i - 1]))
        position = i


def parse_label_map(text: str, source: str = "label map") -> list[LabelMapItem]:
    """Parse a TF Object Detection API label_map.pbtxt (`item { id: 1 name: 'cat' display_name: 'Cat' }`,
    comments, single or double quotes, `item: {` and nested blocks such as keypoints allowed), in file order."""
    fix = "write it as item { id: 1 name: 'class' } blocks, ids from 1"
    items = []
    for key, body in _blocks(_strip_comments(text)):
        if key != "item":
            raise UserError(f"{source}: expected `item {{ ... }}` blocks, found {(key or body.strip())[:60]!r}; "
                            f"{fix}")
        flat = body
        while True:  # drop nested blocks (keypoints { ... }): their ids are not class ids
            stripped = re.sub(r"[A-Za-z_]\w*\s*:?\s*\{[^{}]*\}", " ", flat)
            if stripped == flat:
                break
            flat = stripped
        fields = dict((name, _unquote(value)) for name, value in re.findall(
            r"""([A-Za-z_]\w*)\s*:\s*('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"{}]+)""", flat))
        if "id" not in fields or not re.fullmatch(r"-?\d+", fields["id"]):
            raise UserError(f"{source}: item {{{' '.join(body.split())[:80]}}} has no whole-number id; {fix}")
        name = fields.get("name") or fields.get("display_name")
        if not name:
            raise UserError(f"{source}: item with id {fields['id']} has no name; {fix}")
        items.append(LabelMapItem(int(fields["id"]), name, fields.get("display_name")))
    if not items:
        raise UserError(f"{source} has no `item {{ id: N name: '...' }}` entries; {fix}")
    seen = set()
    for item in items:
        if item.id < 1:
            raise UserError(f"{source}: item {item.name!r} has id {item.id}; ids start at 1 (0 is the TF Object "
                            f"Detection API's background), renumber it")
        if item.id in seen:
            raise UserError(f"{source}: id {item.id} appears twice; give each item its own id")
        seen.add(item.id)
    return items


def read_label_map(path: str | os.PathLike) -> list[LabelMapItem]:
    """`parse_label_map` of a file."""
    path = Path(path).expanduser()
    return parse_label_map(_read_text(path, "label map", "set detection.label_map to the label_map.pbtxt"),
                           str(path))


def label_map_names(items: list[LabelMapItem]) -> list[str]:
    """Class names in index order: items sorted by id, display_name where given, else name."""
    return [item.display_name or item.name for item in sorted(items, key=lambda item: item.id)]


def write_label_map(path: str | os.PathLike, class_names: Sequence[str]) -> None:
    """A label_map.pbtxt with id i + 1 for class_names[i] (name and display_name both the class name)."""
    def quote(name: str) -> str:
        return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"

    text = "".join(f"item {{\n  id: {i + 1}\n  name: {quote(name)}\n  display_name: {quote(name)}\n}}\n"
                   for i, name in enumerate(class_names))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names in index order from a label list: a label_map.pbtxt (by id), or plain text with one name
    a line."""
    path = Path(path).expanduser()
    text = _read_text(path, "label list", "set detection.label_map to a file with one class name a line")
    if re.search(r"^\s*item\s*:?\s*\{", _strip_comments(text), re.MULTILINE):
        return label_map_names(parse_label_map(text, str(path)))
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise UserError(f"label list {path} names no classes; write one class name a line")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"label list {path} names {duplicates[0]!r} twice; list each class once")
    return names


# ---------------------------------------------------------------- Pascal VOC


def _voc_image_ids(root: Path, image_set: str | None) -> tuple[list[str], str]:
    """The ids of an image set (a name under ImageSets/Main/ or a path to a list), or every XML's stem."""
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise UserError(f"{root} has no Annotations/ folder; set data.path to the VOC root "
                        f"(the folder holding Annotations/, JPEGImages/, ImageSets/)")
    if image_set is None:
        ids = sorted(path.stem for path in annotations.glob("*.xml"))
        if not ids:
            raise UserError(f"{annotations} holds no .xml files; set data.path to the VOC root")
        return ids, str(annotations)
    candidates = [Path(image_set).expanduser(), root / "ImageSets" / "Main" / f"{image_set}.txt"]
    if not Path(image_set).is_absolute():
        candidates.insert(1, root / image_set)
    list_file = next((path for path in candidates if path.is_file()), None)
    if list_file is None:
        raise UserError(f"VOC image set {image_set!r} not found (looked for {', '.join(map(str, candidates))}); "
                        f"set detection.train_annotations / test_annotations to a set name such as trainval")
    text = _read_text(list_file, "VOC image set", "list one image id a line")
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise UserError(f"VOC image set {list_file} lists no images; list one image id a line")
    return ids, str(list_file)


def _voc_text(element: ET.Element, tag: str, where: str, fix: str) -> str:
    child = element.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise UserError(f"{where} has no <{tag}>; {fix}")
    return child.text.strip()


def _parse_voc_xml(path: Path, images_dir: Path) -> tuple[str, int, int, list, list, list]:
    """(image file, width, height, boxes, class names, difficult flags) of one VOC annotation file. VOC
    boxes are 1-based inclusive pixel indices; they become continuous xyxy: (xmin - 1, ymin - 1, xmax, ymax)."""
    fix = "fix the XML or regenerate it"
    if not path.is_file():
        raise UserError(f"VOC annotation {path} not found; remove its id from the image set or add the XML")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read VOC annotation {path} ({error.strerror or error}); {fix}") from None
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        # VOC files declare nothing; entity expansion ("billion laughs") is refused outright, whatever
        # protection the linked expat has
        raise UserError(f"{path} declares a DTD or entities, which a VOC annotation never does; {fix}")
    try:
        tree = ET.fromstring(data)
    except ET.ParseError as error:
        raise UserError(f"{path} is not valid XML ({error}); {fix}") from None
    size = tree.find("size")
    if size is None:
        raise UserError(f"{path} has no <size> (width, height); add <size><width>W</width><height>H</height>"
                        f"</size>")
    width = _positive_int(_voc_text(size, "width", f"{path} <size>", fix), str(path), "<width>", fix)
    height = _positive_int(_voc_text(size, "height", f"{path} <size>", fix), str(path), "<height>", fix)
    filename = tree.findtext("filename")
    image = images_dir / (filename.strip() if filename and filename.strip() else f"{path.stem}.jpg")
    boxes, names, difficult = [], [], []
    for number, obj in enumerate(tree.findall("object"), 1):
        where = f"{path} object {number}"
        name = _voc_text(obj, "name", where, fix)
        box = obj.find("bndbox")
        if box is None:
            raise UserError(f"{where} ({name}) has no <bndbox>; {fix}")
        try:
            x_min, y_min, x_max, y_max = (float(_voc_text(box, tag, f"{where} <bndbox>", fix))
                                          for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise UserError(f"{where} ({name}): <bndbox> holds a value that is not a number; {fix}") from None
        boxes.append(_check_box([x_min - 1, y_min - 1, x_max, y_max], width, height, f"{where} ({name})",
                                "fix <bndbox> (1-based pixel indices, xmax >= xmin) or remove the object"))
        names.append(name)
        difficult.append((obj.findtext("difficult") or "0").strip() not in ("0", "", "false"))
    return str(image), width, height, boxes, names, difficult


def read_voc(root: str | os.PathLike, image_set: str | None = None, class_names: Sequence[str] | None = None,
             skip_difficult: bool = False, check_files: bool = True,
             skipped: list[str] | None = None) -> DetectionSplit:
    """A Pascal VOC folder: root/Annotations/<id>.xml and root/JPEGImages/<filename>, the images of
    `image_set` (a name under ImageSets/Main/, or a path to a list of ids; None: every XML). Class indices
    follow `class_names` (a label list) or, without one, the sorted names found. `difficult` objects are kept
    and flagged (`DetectionRecord.difficult`), or left out with `skip_difficult`. With a `skipped` list, an XML
    that does not parse or check is left out and its one-line message appended, instead of raised."""
    root = Path(root).expanduser()
    ids, listed_in = _voc_image_ids(root, image_set)
    parsed = []
    for image_id in ids:
        try:
            parsed.append((image_id, _parse_voc_xml(root / "Annotations" / f"{image_id}.xml", root / "JPEGImages")))
        except UserError as error:
            if skipped is None:
                raise
            skipped.append(str(error))  # the converter's skip mode: this XML is left out, named once
    if class_names is None:
        class_names = sorted({name for _, entry in parsed for name in entry[4]})
        if not class_names:
            raise UserError(f"the VOC images of {listed_in} hold no objects; check the image set")
    index = {name: i for i, name in enumerate(class_names)}
    records = []
    for image_id, (image, width, height, boxes, names, difficult) in parsed:
        keep = [i for i in range(len(names)) if not (skip_difficult and difficult[i])]
        for i in keep:
            if names[i] not in index:
                raise UserError(f"{root / 'Annotations' / image_id}.xml names class {names[i]!r}, which the label "
                                f"list does not have; add it to detection.label_map or fix the <name>")
        records.append(DetectionRecord(image, width, height, np.array([boxes[i] for i in keep], np.float32),
                                       np.array([index[names[i]] for i in keep], np.int32), name=image_id,
                                       difficult=np.array([difficult[i] for i in keep], bool)))
    if check_files:
        require_image_files(records, "(from its VOC annotation)",
                            f"put the images in {root / 'JPEGImages'} or fix <filename>")
        require_image_sizes(records, "its VOC annotation's <size> states",
                            "fix <size> in the annotation or replace the image")
    return DetectionSplit(records, list(class_names), listed_in)


def voc_class_names(root: str | os.PathLike, image_sets: Iterable[str | None]) -> list[str]:
    """The sorted class names of the objects in several image sets (so train and test share indices)."""
    root = Path(root).expanduser()
    names = set()
    for image_set in image_sets:
        ids, _ = _voc_image_ids(root, image_set)
        for image_id in ids:
            names.update(_parse_voc_xml(root / "Annotations" / f"{image_id}.xml", root / "JPEGImages")[4])
    return sorted(names)


def write_voc(split: DetectionSplit, root: str | os.PathLike, image_set: str) -> None:
    """Write a split in the VOC layout: root/JPEGImages/<file> (a hard link or a copy; the format is kept, so
    PNGs stay PNGs), root/Annotations/<stem>.xml (1-based inclusive pixel boxes) and
    root/ImageSets/Main/<image_set>.txt. Record file names must be unique across the sets written."""
    root = Path(root)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    ids = []
    for record in split.records:
        if not isinstance(record.image, str):
            raise ValueError("write_voc needs records with image files, not encoded bytes")
        source = Path(record.image)
        target = root / "JPEGImages" / source.name
        if target.exists():
            target.unlink()
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
        annotation = ET.Element("annotation")
        ET.SubElement(annotation, "folder").text = root.name
        ET.SubElement(annotation, "filename").text = source.name
        size = ET.SubElement(annotation, "size")
        for tag, value in (("width", record.width), ("height", record.height), ("depth", _channels_of(source))):
            ET.SubElement(size, tag).text = str(value)
        for box, class_index, difficult in zip(record.boxes.tolist(), record.classes.tolist(),
                                               record.difficult.tolist()):
            obj = ET.SubElement(annotation, "object")
            ET.SubElement(obj, "name").text = split.class_names[class_index]
            ET.SubElement(obj, "difficult").text = str(int(difficult))
            bndbox = ET.SubElement(obj, "bndbox")
            x_min, y_min, x_max, y_max = box
            for tag, value in (("xmin", x_min + 1), ("ymin", y_min + 1), ("xmax", x_max), ("ymax", y_max)):
                ET.SubElement(bndbox, tag).text = f"{value:g}" if value == int(value) else f"{value:.2f}"
        ET.indent(annotation)
        ET.ElementTree(annotation).write(root / "Annotations" / f"{source.stem}.xml", encoding="utf-8")
        ids.append(source.stem)
    (root / "ImageSets" / "Main" / f"{image_set}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def _channels_of(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as image:
        return len(image.getbands())


# ---------------------------------------------------------------- TF Object Detection API records


def _feature_values(example: tf.train.Example, key: str) -> list:
    feature = example.features.feature.get(key)
    if feature is None:
        return []
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as shown, read from an encoded image's header (`shared.data.formats`)."""
    from shared.data import formats

    try:
        found = formats.facts(data)
    except formats.Refused as why:
        raise UserError(f"an image of the records {why}") from None
    return found.width, found.height


def read_tfod_records(pattern: str | os.PathLike | Sequence[str | os.PathLike],
                      label_map: str | os.PathLike | None = None) -> DetectionSplit:
    """TF Object Detection API TFRecords (a glob or a list of files): image/encoded, image/height,
    image/width, NORMALIZED image/object/bbox/xmin|xmax|ymin|ymax and 1-based image/object/class/label (or,
    without labels, image/object/class/text), read into memory. The label map (`label_map`, else a
    label_map.pbtxt beside the first file) gives the classes: ids sorted -> indices 0, 1, ...; names are the
    items' display_name, else name."""
    from shared.data.tfrecord import resolve_files

    files = resolve_files(pattern if isinstance(pattern, (str, os.PathLike)) else list(pattern))
    label_map_path = Path(label_map).expanduser() if label_map else Path(files[0]).parent / "label_map.pbtxt"
    if not label_map_path.is_file():
        raise UserError(f"label map not found: {label_map_path}; set detection.label_map to the label_map.pbtxt "
                        f"of {files[0]}")
    items = sorted(read_label_map(label_map_path), key=lambda item: item.id)
    by_id = {item.id: i for i, item in enumerate(items)}
    by_text = {}
    for i, item in enumerate(items):
        by_text.setdefault(item.name, i)
        if item.display_name:
            by_text.setdefault(item.display_name, i)
    class_names = label_map_names(items)

    records = []
    for file in files:
        try:
            raw_records = [record.numpy() for record in tf.data.TFRecordDataset(file)]
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
            raise UserError(f"{file} is not a readable TFRecord file ({error.message.splitlines()[0][:120]}); "
                            f"rewrite it") from None
        for number, raw in enumerate(raw_records):
            where = f"{file} record {number}"
            try:
                example = tf.train.Example.FromString(raw)
            except Exception:  # protobuf's DecodeError: not a tf.train.Example
                raise UserError(f"{where} is not a tf.train.Example; write TF Object Detection API records") from None
            encoded = _feature_values(example, "image/encoded")
            if not encoded:
                raise UserError(f"{where} has no image/encoded; write TF Object Detection API records")
            heights, widths = _feature_values(example, "image/height"), _feature_values(example, "image/width")
            height, width = (heights or [0])[0], (widths or [0])[0]
            if height <= 0 or width <= 0:  # not stored: read the encoded image's header
                try:
                    width, height = _image_size(encoded[0])
                except Exception:
                    raise UserError(f"{where}: image/encoded is not an image; rewrite the record") from None
            else:
                problem = image_size_problem(encoded[0], width, height, "image/width and image/height state")
                if problem:
                    raise UserError(f"{where}: image/encoded {problem}; rewrite the record")
            coords = [_feature_values(example, f"image/object/bbox/{key}") for key in ("xmin", "ymin", "xmax", "ymax")]
            labels = _feature_values(example, "image/object/class/label")
            texts = [text.decode("utf-8", "replace") for text in _feature_values(example, "image/object/class/text")]
            count = len(coords[0])
            if any(len(values) != count for values in coords) or (labels and len(labels) != count) or (
                    not labels and len(texts) != count):
                raise UserError(f"{where}: the image/object/bbox/* and class/label (or class/text) lists differ in "
                                f"length ({[len(c) for c in coords]}, {len(labels) or len(texts)}); rewrite it")
            classes = []
            for i in range(count):
                if labels:
                    if labels[i] not in by_id:
                        raise UserError(f"{where}: class label {labels[i]} is not an id in {label_map_path} "
                                        f"(ids {items[0].id}..{items[-1].id}); add an item with id {labels[i]} "
                                        f"or point detection.label_map at the right label map")
                    classes.append(by_id[labels[i]])
                else:
                    if texts[i] not in by_text:
                        raise UserError(f"{where}: class text {texts[i]!r} is not a name in {label_map_path}; add "
                                        f"an item with that name")
                    classes.append(by_text[texts[i]])
            boxes = []
            for i in range(count):
                x_min, y_min, x_max, y_max = (values[i] for values in coords)
                if min(x_min, y_min) < -1e-3 or max(x_max, y_max) > 1 + 1e-3:
                    raise UserError(f"{where}: box {_fmt([x_min, y_min, x_max, y_max])} is not normalized to "
                                    f"[0, 1] (it lies outside the image); store bbox coordinates divided by the "
                                    f"image width / height")
                boxes.append(_check_box([x_min * width, y_min * height, x_max * width, y_max * height], width,
                                        height, where, "fix the record's image/object/bbox/* values"))
            difficult = _feature_values(example, "image/object/difficult")
            name = next((value.decode("utf-8", "replace") for key in ("image/filename", "image/source_id")
                         for value in _feature_values(example, key)[:1] if value), f"{Path(file).name}#{number}")
            records.append(DetectionRecord(encoded[0], width, height, np.array(boxes, np.float32).reshape(-1, 4),
                                           np.array(classes, np.int32), name=name,
                                           difficult=np.array(difficult, bool) if len(difficult) == count else None))
    if not records:
        raise UserError(f"{', '.join(files[:3])} hold no records; write some with write_tfod_records")
    return DetectionSplit(records, class_names, str(pattern if isinstance(pattern, (str, os.PathLike)) else files[0]))


def tfod_example(record: DetectionRecord, labels: Sequence[int], texts: Sequence[str]) -> tf.train.Example:
    """One TF Object Detection API example: the image's own bytes (no re-encoding), its size and format,
    normalized boxes, 1-based `labels` and class `texts`."""
    from shared.data import formats

    if isinstance(record.image, str):
        with open(record.image, "rb") as handle:
            data = handle.read()
    else:
        data = record.image
    try:
        image_format = formats.facts(data).format
    except formats.Refused as why:
        raise UserError(f"image {record.name} {why}") from None

    def floats(values):
        return tf.train.Feature(float_list=tf.train.FloatList(value=list(values)))

    def ints(values):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))

    def strings(values):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))

    boxes = record.boxes.astype(np.float64)
    feature = {
        "image/encoded": strings([data]),
        "image/format": strings([image_format.encode()]),
        "image/height": ints([record.height]),
        "image/width": ints([record.width]),
        "image/filename": strings([record.name.encode()]),
        "image/source_id": strings([record.name.encode()]),
        "image/object/bbox/xmin": floats(boxes[:, 0] / record.width),
        "image/object/bbox/ymin": floats(boxes[:, 1] / record.height),
        "image/object/bbox/xmax": floats(boxes[:, 2] / record.width),
        "image/object/bbox/ymax": floats(boxes[:, 3] / record.height),
        "image/object/class/label": ints(labels),
        "image/object/class/text": strings([text.encode() for text in texts]),
        "image/object/difficult": ints(record.difficult.astype(int)),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def write_tfod_records(split: DetectionSplit, path: str | os.PathLike, class_names: Sequence[str]) -> None:
    """Write a split as one TF Object Detection API TFRecord file. Labels are 1-based positions in
    `class_names` (matched by name, so it may order the classes differently from the split), as
    `write_label_map(path, class_names)` numbers them; class/text holds the names."""
    position = {name: i for i, name in enumerate(class_names)}
    missing = [name for name in split.class_names if name not in position]
    if missing:
        raise UserError(f"class {missing[0]!r} of {split.source or 'the split'} is not in the class list given to "
                        f"write_tfod_records; add it")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in split.records:
            names = [split.class_names[c] for c in record.classes.tolist()]
            example = tfod_example(record, [position[name] + 1 for name in names], names)
            writer.write(example.SerializeToString())


# ---------------------------------------------------------------- from the config


def load_detection_data(config: Config) -> tuple[DetectionSplit, DetectionSplit | None, list[str]]:
    """(train split, test split or None, class names) as `config.detection` describes them:
    - coco: train_annotations / test_annotations are the JSON files, data.path the folder their file_names
      are relative to;
    - voc: data.path is the VOC root, train_annotations / test_annotations image-set names (or list files;
      train None: every XML), detection.label_map an optional label list fixing the class order;
    - tfrecord: train_annotations / test_annotations are file globs, detection.label_map the label_map.pbtxt
      (default: label_map.pbtxt beside the first file).
    test_annotations None: no test split (None). data.limit_train / limit_test keep the first N images."""
    detection, data = config.detection, config.data
    root = os.path.expanduser(data.path) if data.path else None
    fmt = detection.format
    if fmt == "coco":
        if not detection.train_annotations:
            raise UserError("detection.format is coco but detection.train_annotations is empty; set it to the "
                            "training JSON (e.g. annotations/instances_train2017.json)")
        if not root:
            raise UserError("detection.format is coco but data.path is empty; set it to the folder the JSON's "
                            "file_name entries are relative to")
        train = read_coco(detection.train_annotations, root)
        test = read_coco(detection.test_annotations, root) if detection.test_annotations else None
    elif fmt == "voc":
        if not root:
            raise UserError("detection.format is voc but data.path is empty; set it to the VOC root "
                            "(the folder holding Annotations/ and JPEGImages/)")
        sets = [detection.train_annotations] + ([detection.test_annotations] if detection.test_annotations else [])
        names = read_class_list(detection.label_map) if detection.label_map else voc_class_names(root, sets)
        train = read_voc(root, detection.train_annotations, names)
        test = read_voc(root, detection.test_annotations, names) if detection.test_annotations else None
    elif fmt == "tfrecord":
        if not detection.train_annotations:
            raise UserError("detection.format is tfrecord but detection.train_annotations is empty; set it to a "
                            "file glob such as data/train-*.tfrecord")
        train = read_tfod_records(os.path.expanduser(detection.train_annotations), detection.label_map)
        test = (read_tfod_records(os.path.expanduser(detection.test_annotations), detection.label_map)
                if detection.test_annotations else None)
    else:
        raise UserError(f"detection.format {fmt!r} is unknown; choose coco, voc or tfrecord")
    if test is not None and test.class_names != train.class_names:
        raise UserError(f"the test annotations {test.source} have other classes than the training ones "
                        f"{train.source} ({len(test.class_names)} vs {len(train.class_names)}: "
                        f"{', '.join(test.class_names[:5])} ...); use files with the same categories")
    train = train.limit(data.limit_train)
    test = test.limit(data.limit_test) if test is not None else None
    return train, test, train.class_names


# ---------------------------------------------------------------- the tf.data pipeline


def detection_normalization(config: Config) -> tuple[list[float], list[float]]:
    """The (mean, std) per channel on the 0-255 scale that `make_dataset` uses: data.mean / data.std when
    set, else DEFAULT_MEAN / DEFAULT_STD (127.5: pixels in [-1, 1])."""
    channels = config.data.channels
    return (list(config.data.mean or [DEFAULT_MEAN] * channels),
            list(config.data.std or [DEFAULT_STD] * channels))


def _padded_arrays(split: DetectionSplit, max_boxes: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Boxes [N, max_boxes, 4] and classes [N, max_boxes] padded with -1, and how many images lost boxes."""
    boxes = np.full((len(split), max_boxes, 4), -1.0, np.float32)
    classes = np.full((len(split), max_boxes), -1, np.int32)
    truncated = 0
    for i, record in enumerate(split.records):
        count = min(len(record.classes), max_boxes)
        truncated += len(record.classes) > max_boxes
        boxes[i, :count] = record.boxes[:count]
        classes[i, :count] = record.classes[:count]
    return boxes, classes, truncated


def drop_invalid_boxes(boxes: tf.Tensor, classes: tf.Tensor, image_size: int,
                       min_side: float = MIN_BOX_SIDE) -> tuple[tf.Tensor, tf.Tensor]:
    """Clip boxes [..., M, 4] to the image, turn those that are padding (class < 0), empty, or narrower /
    lower than `min_side` into padding (-1), and move the valid ones to the front (stable order)."""
    boxes = tf.clip_by_value(boxes, 0.0, float(image_size))
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    valid = (classes >= 0) & (width > 0) & (height > 0) & (width >= min_side) & (height >= min_side)
    boxes = tf.where(valid[..., None], boxes, -1.0)
    classes = tf.where(valid, classes, -1)
    order = tf.argsort(tf.cast(~valid, tf.int32), axis=-1, stable=True)
    batch_dims = len(classes.shape) - 1
    return (tf.gather(boxes, order, axis=-2, batch_dims=batch_dims),
            tf.gather(classes, order, axis=-1, batch_dims=batch_dims))


def _name_failed_images(loaded: tf.data.Dataset, names: list[str], image_shape: tuple, max_boxes: int
                        ) -> tf.data.Dataset:
    """`loaded` yields (index, pixels, boxes, classes) in index order; an image whose loading fails (a corrupt
    or truncated file TF cannot decode) would stop the pipeline with TF's message, which names no file. Here
    failed images are dropped, and the gap in the indices fails the pipeline with a one-line message naming
    the first of them (`shared.data.checks`). A sentinel after the last image shows a gap at the end."""
    count, names = len(names), tf.constant(names, tf.string)
    sentinel = tf.data.Dataset.from_tensors((tf.constant(count, tf.int64), tf.zeros(image_shape, tf.float32),
                                             tf.fill([max_boxes, 4], -1.0), tf.fill([max_boxes], -1)))

    def expect(next_index, element):
        index = element[0]
        check = checks.check(tf.equal(index, next_index), "detection image ",
                             tf.gather(names, tf.minimum(next_index, count - 1)),
                             " cannot be read or decoded (a corrupt or truncated file?), or its size is not the "
                             "annotation's; replace it or remove it from the annotations")
        with tf.control_dependencies([check]):
            return index + 1, (tf.identity(index), *element[1:])

    return (loaded.ignore_errors().concatenate(sentinel)
            .scan(tf.constant(0, tf.int64), expect)
            .filter(lambda index, *rest: index < count)
            .map(lambda index, *rest: tuple(rest)))


def make_dataset(split: DetectionSplit, config: Config, training: bool, augment: Sequence | None = None,
                 repeat: bool = False, batch_size: int | None = None) -> tf.data.Dataset:
    """Batches `(images float32 [B, S, S, C], {"boxes": float32 [B, M, 4], "classes": int32 [B, M]})` with
    S = data.image_size, C = data.channels, M = detection.max_boxes, B = train.batch_size (or `batch_size`;
    the last batch may be smaller). Boxes are absolute xyxy in the resized S x S image; padding is -1.

    training: shuffle (buffer data.shuffle_buffer, seed train.seed, a new order each pass) and augment with
    `augment` (data.augment entries of shared.detection.augment; None: DEFAULT_AUGMENT; () none);
    evaluation keeps the file order.
    One pass is one epoch unless `repeat`. data.deterministic: one thread for the random maps, so the same
    seed gives the same batches. Images with more than M boxes keep their first M (a warning says how many).
    An image that does not decode (or not to its annotated size) stops the pipeline when it is reached, with
    one line naming it (an InvalidArgumentError whose message `run_cli` prints alone).
    Normalizes with data.mean / data.std, or the defaults when unset (see `detection_normalization`)."""
    from shared.data import preprocess

    if not len(split):
        raise UserError(f"the detection split {split.source} is empty; check the annotations and data.limit_*")
    data, train_config = config.data, config.train
    size, channels, max_boxes = data.image_size, data.channels, config.detection.max_boxes
    batch = batch_size or train_config.batch_size
    mean, std = detection_normalization(config)  # the detection task records them in the run's config
    normalize = preprocess.normalizer(mean, std, data.normalize, size)
    parallel = 1 if data.deterministic else AUTOTUNE

    boxes, classes, truncated = _padded_arrays(split, max_boxes)
    if truncated:
        warnings.warn(f"{truncated} image(s) of {split.source} have more than detection.max_boxes={max_boxes} "
                      f"boxes; only the first {max_boxes} are kept (raise detection.max_boxes to keep all)",
                      stacklevel=2)
    by_path = isinstance(split.records[0].image, str)
    if any(isinstance(record.image, str) != by_path for record in split.records):
        raise ValueError("a split must hold either image paths or encoded images, not both")
    images = [record.image for record in split.records]
    sizes = np.array([[record.height, record.width] for record in split.records], np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((tf.constant(images, tf.string), sizes, boxes, classes))

    def load(image, hw, boxes, classes):
        encoded = tf.io.read_file(image) if by_path else image
        pixels = preprocess.decode(encoded, channels, data.max_pixels, image if by_path else "an image of the records")
        same_size = tf.debugging.assert_equal(tf.shape(pixels)[:2], hw)  # the readers checked the header
        with tf.control_dependencies([same_size]):
            pixels = tf.image.resize(tf.cast(pixels, tf.float32), [size, size])
        hw = tf.cast(hw, tf.float32)
        scale = tf.stack([size / hw[1], size / hw[0], size / hw[1], size / hw[0]])
        boxes = tf.where(classes[:, None] >= 0, boxes * scale, -1.0)
        return pixels, boxes, classes

    dataset = _name_failed_images(dataset.enumerate().map(lambda index, example: (index, *load(*example)),
                                                          num_parallel_calls=AUTOTUNE, deterministic=True),
                                  [record.image if by_path else record.name for record in split.records],
                                  (size, size, channels), max_boxes)
    if len(split) * size * size * channels * 4 <= CACHE_BYTES:
        dataset = dataset.cache()  # decode and resize once; augmentation runs after the cache
    if training:
        dataset = dataset.shuffle(min(data.shuffle_buffer, len(split)), seed=train_config.seed,
                                  reshuffle_each_iteration=True)
    if repeat:
        dataset = dataset.repeat()
    entries = list(DEFAULT_AUGMENT if augment is None else augment) if training else []
    augmenter = detection_augment.build(entries, channels, mean, train_config.seed)
    if augmenter.per_image:  # stateless draws from a seed per image: the same train.seed, the same crops
        dataset = tf.data.Dataset.zip(dataset, detection_augment.seeds(train_config.seed)).map(
            lambda example, seed: augmenter.apply_per_image(*example, seed), num_parallel_calls=parallel,
            deterministic=True)
    dataset = dataset.batch(batch, drop_remainder=False)  # every example already padded to M boxes

    def finish(images, boxes, classes):
        if augmenter.per_batch:
            images, boxes, classes = augmenter.apply_per_batch(images, boxes, classes)
        # Training drops slivers an augmentation left at the border; evaluation keeps every non-empty box.
        boxes, classes = drop_invalid_boxes(boxes, classes, size, MIN_BOX_SIDE if training else 0.0)
        images = tf.ensure_shape(normalize(images), (None, size, size, channels))
        return images, {"boxes": tf.ensure_shape(boxes, (None, max_boxes, 4)),
                        "classes": tf.ensure_shape(classes, (None, max_boxes))}

    # Whole batches through the Keras layers: one vectorized call per batch, per-image random draws.
    dataset = dataset.map(finish, num_parallel_calls=parallel if entries else AUTOTUNE, deterministic=True)
    return dataset.prefetch(AUTOTUNE)


def steps_per_epoch(split: DetectionSplit, config: Config) -> int:
    """Batches in one pass over `split` (the last one may be partial), capped by train.steps_per_epoch."""
    steps = -(-len(split) // config.train.batch_size)
    return min(steps, config.train.steps_per_epoch) if config.train.steps_per_epoch else steps

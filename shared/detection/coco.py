"""COCO detection JSON: `read_coco` into the common form (`shared.detection.records`), `write_coco` back.

Class indices: `categories` sorted by id, whatever the ids are (1..90 with gaps in COCO itself) -> 0, 1, 2, ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from shared.detection.records import (DetectionRecord, DetectionSplit, brief, check_box, positive_int,
                                      read_annotation_text, require_image_files, require_image_sizes)
from shared.errors import UserError


def read_coco(annotation_file: str | os.PathLike, images_root: str | os.PathLike,
              check_files: bool = True) -> DetectionSplit:
    """A COCO detection JSON: `images` (id, file_name relative to `images_root`, width, height),
    `annotations` (image_id, category_id, bbox [x, y, w, h] in pixels, iscrowd) and `categories` (id, name).
    Categories sorted by id become class indices 0, 1, ...; crowd annotations (iscrowd 1) are skipped; images
    without annotations are kept, with no boxes. `check_files` checks that every image file exists and that
    its header gives the size the file states. Whatever the file holds, a problem is one UserError line."""
    path = Path(annotation_file).expanduser()
    fix = f"fix {path} or regenerate it"
    text = read_annotation_text(path, "COCO annotation file",
                                "set detection.train_annotations / test_annotations to the JSON")
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


def _coco_id(value, where: str, what: str, fix: str):
    """An id as COCO writes them: a whole number (or, leniently, a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"{where}: {what} {brief(value)} is not a whole number; {fix}")
    return value


def _coco_split(tree, path: Path, root: Path, fix: str) -> DetectionSplit:
    if not isinstance(tree, dict) or not all(isinstance(tree.get(key), list)
                                             for key in ("images", "annotations", "categories")):
        raise UserError(f"{path} is not a COCO detection file: it needs the lists images, annotations and "
                        f"categories; point detection.*_annotations at an instances_*.json")
    categories = {}
    for category in tree["categories"]:
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise UserError(f"{path}: category {brief(category)} needs an id and a name; {fix}")
        category_id = _coco_id(category["id"], path, "category id", fix)
        if not isinstance(category["name"], (str, int)) or isinstance(category["name"], bool):
            raise UserError(f"{path}: category {category_id} has the name {brief(category['name'])}, not a text; "
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
            raise UserError(f"{path}: image {brief(image)} needs id, file_name, width and height; {fix}")
        image_id = _coco_id(image["id"], path, "image id", fix)
        if not isinstance(image["file_name"], str) or not image["file_name"]:
            raise UserError(f"{path}: image {image_id} has the file_name {brief(image['file_name'])}, not a "
                            f"path; {fix}")
        where = f"{path}: image {image_id} ({image['file_name']})"
        if image_id in images:
            raise UserError(f"{path}: image id {image_id} appears twice; {fix}")
        width = positive_int(image["width"], where, "width", fix)
        height = positive_int(image["height"], where, "height", fix)
        images[image_id] = [str(root / image["file_name"]), width, height, [], [], image["file_name"]]
    for annotation in tree["annotations"]:
        if not isinstance(annotation, dict) or not all(key in annotation for key in ("image_id", "category_id",
                                                                                     "bbox")):
            raise UserError(f"{path}: annotation {brief(annotation)} needs image_id, category_id and bbox; {fix}")
        if annotation.get("iscrowd", 0):
            continue  # a crowd region, not one object: COCO's own evaluation ignores these too
        where = f"{path}: annotation {brief(annotation.get('id', '?'))}"
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
            raise UserError(f"{where}: bbox {brief(bbox)} is not [x, y, width, height]; {fix}")
        entry = images[image_id]
        x, y, w, h = (float(v) for v in bbox)
        box = check_box([x, y, x + w, y + h], entry[1], entry[2], f"{where} (image {entry[5]})",
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

"""TF Object Detection API TFRecords: `read_tfod_records` into the common form (`shared.detection.records`),
`tfod_example` and `write_tfod_records` back.

Class indices: the label map's ids (1-based, 0 is the TF OD API's background) sorted -> 0, 1, 2, ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow as tf

from shared.detection.label_map import label_map_names, read_label_map
from shared.detection.records import DetectionRecord, DetectionSplit, check_box, format_box, image_size_problem
from shared.errors import UserError


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
                    raise UserError(f"{where}: box {format_box([x_min, y_min, x_max, y_max])} is not normalized to "
                                    f"[0, 1] (it lies outside the image); store bbox coordinates divided by the "
                                    f"image width / height")
                boxes.append(check_box([x_min * width, y_min * height, x_max * width, y_max * height], width,
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

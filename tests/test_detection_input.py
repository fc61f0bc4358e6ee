"""Hostile detection input: COCO files that cannot be parsed for any reason, VOC XML that is malformed or
expands entities, images of another size than annotated, unreadable or corrupt images. Each is one UserError
line naming the file (or, for a corrupt image found while decoding, one line from the CLI)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared.config import from_dict
from shared.detection.coco import read_coco
from shared.detection.datasets import make_dataset
from shared.detection.label_map import write_label_map
from shared.detection.records import DetectionRecord, DetectionSplit, image_size_problem
from shared.detection.tfod import read_tfod_records, write_tfod_records
from shared.detection.voc import read_voc
from shared.errors import UserError, embedded_user_error, run_cli

SIZE = 32


def write_png(path: Path, width: int = SIZE, height: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)  # noise: no tiny file
    Image.fromarray(pixels).save(path)
    return path


def coco_tree() -> dict:
    return {"images": [{"id": 1, "file_name": "a.png", "width": SIZE, "height": SIZE}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10], "iscrowd": 0}],
            "categories": [{"id": 3, "name": "cat"}]}


def read_coco_text(tmp_path: Path, text: str | bytes):
    write_png(tmp_path / "images" / "a.png")
    path = tmp_path / "a.json"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return read_coco(path, tmp_path / "images")


def changed(change) -> str:
    tree = coco_tree()
    change(tree)
    return json.dumps(tree)


BAD_COCO = {
    "nested 100000 deep": ("[" * 100_000 + "]" * 100_000, r"nests lists or objects too deeply"),
    "nested object in an id": (changed(lambda t: t["images"][0].update(id=json.loads("[" * 300 + "]" * 300))),
                               r"image id \[\[\[\.\.\.\]\]\] is not a whole number"),
    "not UTF-8": (b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "\xff"}]}',
                  r"cannot read COCO annotation file .*a\.json \('utf-8' codec"),
    "invalid JSON": ('{"images": [}', r"is not valid JSON \(line 1"),
    "top level a string": ('"coco"', r"is not a COCO detection file: it needs the lists"),
    "images missing": (json.dumps({"annotations": [], "categories": []}), r"needs the lists images"),
    "image not an object": (changed(lambda t: t["images"].append(5)), r"image 5 needs id, file_name"),
    "image id a list": (changed(lambda t: t["images"][0].update(id=[1])), r"image id \[1\] is not a whole"),
    "file_name a number": (changed(lambda t: t["images"][0].update(file_name=7)), r"file_name 7, not a path"),
    "width text": (changed(lambda t: t["images"][0].update(width="wide")), r"width is 'wide', not a positive"),
    "width true": (changed(lambda t: t["images"][0].update(width=True)), r"width is True, not a positive"),
    "width 10**400": (changed(lambda t: None).replace(f'"width": {SIZE}', '"width": 1' + "0" * 400),
                      r"width is 1000.*, not a positive whole number"),
    "height Infinity": (changed(lambda t: None).replace(f'"height": {SIZE}', '"height": Infinity'),
                        r"height is inf, not a positive"),
    "category id an object": (changed(lambda t: t["categories"][0].update(id={"a": 1})),
                              r"category id \{'a': 1\} is not a whole number"),
    "category name an object": (changed(lambda t: t["categories"][0].update(name={"x": 1})),
                                r"category 3 has the name \{'x': 1\}, not a text"),
    "category name empty": (changed(lambda t: t["categories"][0].update(name=" ")),
                            r"category 3 has the name ' '; give it a name of one non-empty line"),
    "category name two lines": (changed(lambda t: t["categories"][0].update(name="a\nb")),
                                r"category 3 has the name 'a\\nb'; give it a name"),
    "category_id a list": (changed(lambda t: t["annotations"][0].update(category_id=[3])),
                           r"annotation 1: category_id \[3\] is not a whole number"),
    "image_id null": (changed(lambda t: t["annotations"][0].update(image_id=None)),
                      r"annotation 1: image_id None is not a whole number"),
    "annotations an object": (changed(lambda t: t.update(annotations={})), r"needs the lists images, annotations"),
    "bbox NaN": (changed(lambda t: t["annotations"][0].update(bbox=[2, 2, float("nan"), 5])),
                 r"box \[2, 2, nan, 7\] is not finite"),
    "bbox negative size": (changed(lambda t: t["annotations"][0].update(bbox=[20, 2, -5, 5])),
                           r"box \[20, 2, 15, 7\] \(xyxy\) is empty"),
    "bbox huge number": (changed(lambda t: None).replace("[2, 2, 10, 10]", "[2, 2, 1" + "0" * 400 + ", 10]"),
                         r"is not a COCO detection file this reader understands \(OverflowError"),
    "bbox strings": (changed(lambda t: t["annotations"][0].update(bbox=["2", "2", "9", "9"])),
                     r"bbox \['2', '2', '9', '9'\] is not \[x, y, width, height\]"),
}


@pytest.mark.parametrize("case", list(BAD_COCO))
def test_a_coco_file_that_cannot_be_parsed_is_one_line(tmp_path, case):
    text, pattern = BAD_COCO[case]
    with pytest.raises(UserError, match=pattern) as error:
        read_coco_text(tmp_path, text)
    message = str(error.value)
    assert "\n" not in message and "a.json" in message and len(message) < 600


def test_images_of_another_size_than_annotated_are_named(tmp_path):
    write_png(tmp_path / "images" / "a.png", 40, SIZE)  # the JSON says 32x32
    (tmp_path / "a.json").write_text(json.dumps(coco_tree()))
    with pytest.raises(UserError, match=r"image .*images/a\.png is 40x32 pixels but .*a\.json states 32x32; fix"):
        read_coco(tmp_path / "a.json", tmp_path / "images")
    voc = tmp_path / "voc"
    write_png(voc / "JPEGImages" / "a.png", SIZE, 20)
    (voc / "Annotations").mkdir(parents=True)
    (voc / "Annotations" / "a.xml").write_text(voc_xml())
    with pytest.raises(UserError, match=r"JPEGImages/a\.png is 32x20 pixels but its VOC annotation's <size> "
                                        r"states 32x32; fix <size>"):
        read_voc(voc)


def test_an_encoded_image_of_another_size_than_its_record_says(tmp_path):
    image = io.BytesIO()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(image, format="PNG")
    record = DetectionRecord(image.getvalue(), SIZE, SIZE, [[1, 1, 9, 9]], [0], name="a")
    write_tfod_records(DetectionSplit([record], ["cat"]), tmp_path / "a.tfrecord", ["cat"])
    write_label_map(tmp_path / "label_map.pbtxt", ["cat"])
    assert len(read_tfod_records(tmp_path / "a.tfrecord")) == 1
    record.width = 48  # stored as image/width; the boxes still fit
    write_tfod_records(DetectionSplit([record], ["cat"]), tmp_path / "a.tfrecord", ["cat"])
    with pytest.raises(UserError, match=r"a\.tfrecord record 0: image/encoded is 32x32 pixels but "
                                        r"image/width and image/height state 48x32; rewrite the record"):
        read_tfod_records(tmp_path / "a.tfrecord")


def test_an_image_that_is_no_image_is_named_before_training(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"this is not a PNG" * 10)
    (tmp_path / "a.json").write_text(json.dumps(coco_tree()))
    with pytest.raises(UserError, match=r"image .*images/a\.png is not an image format that is read; convert it"):
        read_coco(tmp_path / "a.json", tmp_path / "images")


def detection_config() -> object:
    return from_dict({"task": "detection", "data": {"image_size": 16, "channels": 3},
                      "train": {"batch_size": 2}, "detection": {"max_boxes": 4}})


@pytest.mark.slow
def test_a_corrupt_image_is_named_when_the_pipeline_reaches_it(tmp_path, capsys):
    records = []
    for i in range(5):
        path = write_png(tmp_path / f"{i}.png")
        records.append(DetectionRecord(str(path), SIZE, SIZE, [[1, 1, 9, 9]], [0], name=str(i)))
    split = DetectionSplit(records, ["cat"], "test")
    assert sum(len(images) for images, _ in make_dataset(split, detection_config(), training=False)) == 5
    for bad in (2, 4):  # in the middle, and the last one (no image after it to show the gap)
        data = Path(records[bad].image).read_bytes()
        Path(records[bad].image).write_bytes(data[:len(data) // 2])  # the header still reads: only decoding fails
        assert image_size_problem(records[bad].image, SIZE, SIZE) is None
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            list(make_dataset(split, detection_config(), training=False))
        assert str(embedded_user_error(error.value)).startswith(
            f"detection image {records[bad].image} cannot be read or decoded")
        Path(records[bad].image).write_bytes(data)
    Path(records[2].image).write_bytes(b"")
    assert run_cli(lambda: list(make_dataset(split, detection_config(), training=True))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: detection image {records[2].image} cannot be read") and err.count("\n") == 1


def voc_xml(body: str = "") -> str:
    return (f"<annotation><filename>a.png</filename><size><width>{SIZE}</width><height>{SIZE}</height></size>"
            "<object><name>cat</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
            f"</object>{body}</annotation>")


LAUGHS = ('<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY a "aaaaaaaaaa">'
          + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(9))
          + "]>" + voc_xml("<pose>&j;</pose>"))
BAD_VOC = {
    "billion laughs": (LAUGHS, r"a\.xml declares a DTD or entities"),
    "external entity": ('<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>' + voc_xml("<pose>&x;</pose>"),
                        r"a\.xml declares a DTD or entities"),
    "malformed": (voc_xml()[:-5], r"a\.xml is not valid XML \(unclosed token"),
    "not UTF-8": (voc_xml("<pose>\xff</pose>").encode("latin-1"), r"a\.xml is not valid XML \(not well-formed"),
    "deeply nested": (voc_xml("<a>" * 100_000 + "</a>" * 100_000), None),  # parses: expat does not recurse
    "size text": (voc_xml().replace(f"<width>{SIZE}</width>", "<width>wide</width>"),
                  r"a\.xml: <width> is 'wide', not a positive whole number"),
}


@pytest.mark.parametrize("case", list(BAD_VOC))
def test_voc_xml_that_cannot_be_parsed_is_one_line(tmp_path, case):
    text, pattern = BAD_VOC[case]
    root = tmp_path / "voc"
    write_png(root / "JPEGImages" / "a.png")
    (root / "Annotations").mkdir(parents=True)
    (root / "Annotations" / "a.xml").write_bytes(text.encode() if isinstance(text, str) else text)
    if pattern is None:
        assert len(read_voc(root)) == 1
        return
    with pytest.raises(UserError, match=pattern) as error:
        read_voc(root)
    assert "\n" not in str(error.value)


def test_a_voc_image_set_that_is_not_text_is_one_line(tmp_path):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "train.txt").write_bytes(b"\xff\xfe\x00a")
    with pytest.raises(UserError, match=r"cannot read VOC image set .*train\.txt \('utf-8' codec"):
        read_voc(root, "train")


def test_anchor_thresholds_out_of_order_are_the_detection_tasks_refusal():
    """negative_iou above positive_iou is a detection rule: the detection task refuses it before a run, and a
    classification recipe that inherits the section is not refused for it."""
    from shared.config import load_config
    from shared.detection.task import DetectionTask

    section = {"positive_iou": 0.4, "negative_iou": 0.5}
    load_config(tree={"detection": section})  # a classification recipe: no detection rule applies
    with pytest.raises(UserError, match="detection.negative_iou 0.5 is above detection.positive_iou 0.4"):
        DetectionTask(load_config(tree={"task": "detection", "detection": section})).check()

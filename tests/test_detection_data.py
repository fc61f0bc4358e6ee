"""Detection data: the Fashion-MNIST generator, the COCO / VOC / TF Object Detection API readers (agreeing with
each other, refusing malformed files with one-line UserErrors) and the tf.data pipeline (shapes, padding,
box-aware Keras augmentation, determinism). Tiny sizes: the whole file runs in well under a minute on 2 CPUs."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared.config import from_dict
from shared.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIRS
from shared.detection.coco import read_coco
from shared.detection.datasets import (MIN_BOX_SIDE, detection_normalization, drop_invalid_boxes, load_detection_data,
                                       make_dataset, steps_per_epoch)
from shared.detection.label_map import label_map_names, parse_label_map, read_class_list, write_label_map
from shared.detection.records import DetectionRecord, DetectionSplit
from shared.detection.tfod import read_tfod_records, write_tfod_records
from shared.detection.voc import read_voc
from shared.errors import UserError

from conftest import load_script

REPO = Path(__file__).resolve().parent.parent
FASHION = Path(FASHION_MNIST_DIRS[0])
SIZE = 64  # the generated canvases

pytestmark = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                                reason="Fashion-MNIST IDX files not installed")



@pytest.fixture(scope="module")
def script():
    return load_script("make_detection_dataset")


@pytest.fixture(scope="module")
def generated(tmp_path_factory, script) -> Path:
    """20 train / 8 test 64 px images in COCO, TFRecord and VOC form."""
    out = tmp_path_factory.mktemp("fashion_detection")
    assert script.main([str(out), "--train", "20", "--test", "8", "--size", str(SIZE), "--seed", "7",
                        "--tfrecord", "--voc", "--no-progress"]) == 0
    return out


def detection_config(root: Path, **sections) -> object:
    tree = {"task": "detection",
            "data": {"path": str(root / "images"), "image_size": 32, "channels": 1, "deterministic": True},
            "train": {"batch_size": 4, "seed": 0},
            "detection": {"format": "coco", "train_annotations": str(root / "annotations" / "train.json"),
                          "test_annotations": str(root / "annotations" / "test.json"), "max_boxes": 6}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    return from_dict(tree)


def by_stem(split: DetectionSplit) -> dict:
    return {Path(record.name).stem: record for record in split}


# ---------------------------------------------------------------- the generator


def test_generator_writes_every_format_with_tight_boxes(generated, script, tmp_path, capsys):
    for split, count in (("train", 20), ("test", 8)):
        assert len(list((generated / "images" / split).glob("*.png"))) == count
        assert (generated / "tfrecord" / f"{split}.tfrecord").is_file()
        assert len((generated / "voc" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()) == count
    assert len(list((generated / "voc" / "Annotations").glob("*.xml"))) == 28
    assert read_class_list(generated / "tfrecord" / "label_map.pbtxt") == FASHION_MNIST_CLASSES

    from pycocotools.coco import COCO  # the JSON is what COCO's own tools read
    coco = COCO(str(generated / "annotations" / "train.json"))
    assert len(coco.getImgIds()) == 20 and [c["name"] for c in coco.loadCats(coco.getCatIds())] == FASHION_MNIST_CLASSES
    capsys.readouterr()

    split = read_coco(generated / "annotations" / "train.json", generated / "images")
    counts = [len(record.classes) for record in split]
    assert min(counts) >= 1 and max(counts) <= 4 and len(set(counts)) > 1
    for record in split:
        pixels = np.asarray(Image.open(record.image))
        assert pixels.shape == (SIZE, SIZE)
        covered = np.zeros_like(pixels, bool)
        for x_min, y_min, x_max, y_max in record.boxes.astype(int).tolist():
            assert 20 * 0.2 <= x_max - x_min <= 56 and 20 * 0.2 <= y_max - y_min <= 56
            inside = pixels[y_min:y_max, x_min:x_max] > 0
            # tight: every edge row / column of the box holds a lit pixel (not the item's empty 28x28 frame)
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y_min:y_max, x_min:x_max] = True
        assert not (pixels[~covered] > 0).any()  # nothing lit outside the boxes
        for i in range(len(record.boxes)):  # mild overlap only
            others = np.delete(record.boxes, i, axis=0)
            if len(others):
                iou, _ = script.overlaps(record.boxes[i], others)
                assert iou.max() <= 0.3 + 1e-6

    # The same seed gives the same files (train does not depend on --test); another seed other files.
    again, other = tmp_path / "again", tmp_path / "other"
    assert script.main([str(again), "--train", "3", "--test", "1", "--size", str(SIZE), "--seed", "7",
                        "--no-progress"]) == 0
    assert script.main([str(other), "--train", "3", "--test", "1", "--size", str(SIZE), "--seed", "8",
                        "--no-progress"]) == 0
    for name in ("train_000000.png", "train_000002.png"):
        first = (generated / "images" / "train" / name).read_bytes()
        assert (again / "images" / "train" / name).read_bytes() == first
        assert (other / "images" / "train" / name).read_bytes() != first
    assert script.main([str(tmp_path / "bad"), "--size", "8", "--no-progress"]) == 2
    assert "--size 8 is too small" in capsys.readouterr().err


def test_generator_rgb(script, tmp_path):
    assert script.main([str(tmp_path), "--train", "2", "--test", "1", "--size", "48", "--rgb", "--min-scale", "20",
                        "--max-scale", "30", "--no-progress"]) == 0
    image = np.asarray(Image.open(tmp_path / "images" / "train" / "train_000000.png"))
    assert image.shape == (48, 48, 3) and image[0, 0].any()  # a tinted background, not black


# ---------------------------------------------------------------- the readers


def test_coco_tfrecord_and_voc_readers_agree(generated):
    root = generated
    for split in ("train", "test"):
        coco = read_coco(root / "annotations" / f"{split}.json", root / "images")
        tfod = read_tfod_records(root / "tfrecord" / f"{split}.tfrecord")  # label_map.pbtxt beside it
        voc = read_voc(root / "voc", split, read_class_list(root / "voc" / "labels.txt"))
        voc_sorted = read_voc(root / "voc", split)  # no label list: the sorted names present
        assert coco.class_names == tfod.class_names == voc.class_names == FASHION_MNIST_CLASSES
        sorted_names = voc_sorted.class_names
        assert sorted_names == sorted(sorted_names) and set(sorted_names) <= set(FASHION_MNIST_CLASSES)
        assert len(coco) == len(tfod) == len(voc) == len(voc_sorted) == {"train": 20, "test": 8}[split]
        tfod, voc, voc_sorted = by_stem(tfod), by_stem(voc), by_stem(voc_sorted)
        for record in coco:
            stem = Path(record.name).stem
            assert record.boxes.dtype == np.float32 and record.classes.dtype == np.int32
            assert (record.width, record.height) == (SIZE, SIZE) == (tfod[stem].width, tfod[stem].height)
            for other in (tfod[stem], voc[stem]):
                np.testing.assert_allclose(other.boxes, record.boxes, atol=0.5)  # an off-by-one fails
                np.testing.assert_array_equal(other.classes, record.classes)
            # other indices, the same classes by name
            assert [sorted_names[c] for c in voc_sorted[stem].classes] == [coco.class_names[c] for c in record.classes]
            assert Image.open(io.BytesIO(tfod[stem].image)).size == (SIZE, SIZE)
            assert not voc[stem].difficult.any()


def test_load_detection_data_each_format_with_limits(generated):
    root = generated
    configs = {
        "coco": {},
        "tfrecord": {"train_annotations": str(root / "tfrecord" / "train*.tfrecord"),
                     "test_annotations": str(root / "tfrecord" / "test.tfrecord"),
                     "label_map": str(root / "tfrecord" / "label_map.pbtxt")},
        "voc": {"train_annotations": "train", "test_annotations": "test",
                "label_map": str(root / "voc" / "labels.txt")},
    }
    results = {}
    for fmt, detection in configs.items():
        data = {"limit_train": 5, "limit_test": 3, **({"path": str(root / "voc")} if fmt == "voc" else {})}
        config = detection_config(root, detection={"format": fmt, **detection}, data=data)
        train, test, names = load_detection_data(config)
        assert (len(train), len(test), names) == (5, 3, FASHION_MNIST_CLASSES)
        results[fmt] = [np.concatenate([r.boxes.ravel() for r in split]) for split in (train, test)]
    for fmt in ("tfrecord", "voc"):
        for ours, theirs in zip(results[fmt], results["coco"]):
            np.testing.assert_allclose(ours, theirs, atol=0.5)
    # VOC without a label list: classes of both image sets, sorted; no test set: None
    config = detection_config(root, detection={"format": "voc", "train_annotations": None, "test_annotations": None},
                              data={"path": str(root / "voc")})
    train, test, names = load_detection_data(config)
    assert len(train) == 28 and test is None and names == sorted(names)


def write_png(path: Path, width: int = SIZE, height: int = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width), np.uint8)).save(path)
    return path


MISSING = object()


def coco_case(tmp_path: Path, change) -> callable:
    write_png(tmp_path / "images" / "a.png")
    tree = {"images": [{"id": 1, "file_name": "a.png", "width": SIZE, "height": SIZE}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "iscrowd": 0}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    text = change(tree)  # a str replaces the file's text, MISSING writes no file, None the changed tree
    path = tmp_path / "a.json"
    if text is not MISSING:
        path.write_text(text if isinstance(text, str) else json.dumps(tree))
    return lambda: read_coco(path, tmp_path / "images")


def voc_case(tmp_path: Path, xml: str | None = None, image_set: str | None = None, labels=None) -> callable:
    write_png(tmp_path / "voc" / "JPEGImages" / "a.png")
    body = xml if xml is not None else (
        f"<annotation><filename>a.png</filename><size><width>{SIZE}</width><height>{SIZE}</height></size>"
        "<object><name>cat</name><bndbox><xmin>11</xmin><ymin>11</ymin><xmax>30</xmax><ymax>30</ymax></bndbox>"
        "</object></annotation>")
    (tmp_path / "voc" / "Annotations").mkdir(parents=True, exist_ok=True)
    (tmp_path / "voc" / "Annotations" / "a.xml").write_text(body)
    return lambda: read_voc(tmp_path / "voc", image_set, labels)


def tfod_case(tmp_path: Path, boxes=((10, 10, 30, 30),), names=("cat",), label_map=("cat",)) -> callable:
    image = io.BytesIO()
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(image, format="PNG")
    split = DetectionSplit([DetectionRecord(image.getvalue(), SIZE, SIZE, np.array(boxes, np.float32),
                                                np.arange(len(boxes), dtype=np.int32), name="a")], list(names))
    write_tfod_records(split, tmp_path / "a.tfrecord", list(names))
    if label_map is not None:
        write_label_map(tmp_path / "label_map.pbtxt", list(label_map))
    return lambda: read_tfod_records(str(tmp_path / "*.tfrecord"))


XML_NO_SIZE = ("<annotation><filename>a.png</filename><object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
               "<xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
XML_OUTSIDE = (f"<annotation><size><width>{SIZE}</width><height>{SIZE}</height></size><filename>a.png</filename>"
               "<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>90</xmax><ymax>5</ymax></bndbox>"
               "</object></annotation>")
MALFORMED = {
    "coco missing file": (lambda p: coco_case(p, lambda t: MISSING), r"COCO annotation file not found: .*a\.json"),
    "coco bad json": (lambda p: coco_case(p, lambda t: '{"images": [,]}'), r"a\.json is not valid JSON \(line 1"),
    "coco not coco": (lambda p: coco_case(p, lambda t: "[1, 2]"), r"is not a COCO detection file"),
    "coco box outside": (lambda p: coco_case(p, lambda t: t["annotations"][0].update(bbox=[50, 10, 30, 5])),
                         r"annotation 1 \(image a\.png\): box \[50, 10, 80, 15\] \(xyxy\) lies outside the 64x64"),
    "coco empty box": (lambda p: coco_case(p, lambda t: t["annotations"][0].update(bbox=[5, 5, 0, 4])),
                       r"is empty: x_max <= x_min"),
    "coco unknown category": (lambda p: coco_case(p, lambda t: t["annotations"][0].update(category_id=5)),
                              r"category id 5, which `categories` does not list \(ids: 3, 7\)"),
    "coco unknown image": (lambda p: coco_case(p, lambda t: t["annotations"][0].update(image_id=9)),
                           r"refers to image id 9"),
    "coco missing image file": (lambda p: coco_case(p, lambda t: t["images"][0].update(file_name="b.png")),
                                r"image file .*b\.png listed in .*a\.json not found; set data\.path"),
    "voc no size": (lambda p: voc_case(p, XML_NO_SIZE), r"a\.xml has no <size>"),
    "voc bad xml": (lambda p: voc_case(p, "<annotation><size>"), r"a\.xml is not valid XML"),
    "voc box outside": (lambda p: voc_case(p, XML_OUTSIDE), r"a\.xml object 1 \(cat\): box .* lies outside"),
    "voc unknown class": (lambda p: voc_case(p, labels=["dog"]), r"names class 'cat', which the label list"),
    "voc missing set": (lambda p: voc_case(p, image_set="val"), r"VOC image set 'val' not found"),
    "voc missing image file": (lambda p: voc_case(p, XML_OUTSIDE.replace("a.png", "b.png").replace("90", "9")),
                               r"image file .*JPEGImages/b\.png \(from its VOC annotation\) not found; put the images"),
    "voc no annotations": (lambda p: lambda: read_voc(p), r"has no Annotations/ folder"),
    "tfod missing label id": (lambda p: tfod_case(p, boxes=((1, 1, 9, 9), (2, 2, 9, 9)), names=("cat", "dog")),
                              r"class label 2 is not an id in .*label_map\.pbtxt \(ids 1\.\.1\); add an item"),
    "tfod not normalized": (lambda p: tfod_case(p, boxes=((10, 10, 80, 30),)), r"is not normalized to \[0, 1\]"),
    "tfod empty box": (lambda p: tfod_case(p, boxes=((30, 10, 10, 30),)), r"is empty"),
    "tfod no label map": (lambda p: tfod_case(p, label_map=None), r"label map not found: .*label_map\.pbtxt"),
    "tfod no files": (lambda p: lambda: read_tfod_records(str(p / "none-*.tfrecord")), r"no TFRecord files match"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_raises_one_line_user_error(tmp_path, case):
    make, pattern = MALFORMED[case]
    read = make(tmp_path)
    with pytest.raises(UserError, match=pattern) as error:
        read()
    assert "\n" not in str(error.value) and ";" in str(error.value)  # one line, with a fix


def test_unreadable_tfrecord_file(tmp_path):
    (tmp_path / "x.tfrecord").write_bytes(b"not a tfrecord at all" * 4)
    write_label_map(tmp_path / "label_map.pbtxt", ["cat"])
    with pytest.raises(UserError, match=r"x\.tfrecord is not a readable TFRecord file"):
        read_tfod_records(tmp_path / "x.tfrecord")


LABEL_MAP = """
# a comment, and an item with double quotes, a nested block and no display_name
item {
  name: "/m/01"   # trailing comment
  id: 3
  display_name: "Person # one"
  keypoints { id: 0 label: 'nose' }
}
item: { id: 1 name: 'it\\'s' }
"""


def test_label_map_parser_and_writer(tmp_path):
    items = parse_label_map(LABEL_MAP, "test")
    assert [(i.id, i.name, i.display_name) for i in items] == [(3, "/m/01", "Person # one"), (1, "it's", None)]
    assert label_map_names(items) == ["it's", "Person # one"]  # sorted by id, display_name preferred
    names = ["a'b", "c\\d", "T-shirt/top"]
    write_label_map(tmp_path / "m.pbtxt", names)
    assert read_class_list(tmp_path / "m.pbtxt") == names
    for text, pattern in (("", r"has no `item"), ("item { id: 0 name: 'x' }", r"ids start at 1"),
                          ("item { id: 1 name: 'x' } item { id: 1 name: 'y' }", r"id 1 appears twice"),
                          ("item { name: 'x' }", r"has no whole-number id"), ("label { id: 1 }", r"expected `item")):
        with pytest.raises(UserError, match=pattern):
            parse_label_map(text, "m.pbtxt")


# ---------------------------------------------------------------- the pipeline


def test_make_dataset_shapes_padding_and_scaling(generated):
    config = detection_config(generated, detection={"max_boxes": 2})
    _, test, _ = load_detection_data(config)
    assert max(len(record.classes) for record in test) > 2 > min(len(record.classes) for record in test)
    with pytest.warns(UserWarning, match=r"more than detection\.max_boxes=2"):
        dataset = make_dataset(test, config, training=False)
    # the defaults it normalized with; the detection task records them in the run's config
    assert detection_normalization(config) == ([127.5], [127.5]) and config.data.mean is None
    batches = list(dataset)
    assert len(batches) == math.ceil(len(test) / 4) == steps_per_epoch(test, config)
    images, targets = batches[0]
    assert images.dtype == tf.float32 and images.shape == (4, 32, 32, 1)
    assert targets["boxes"].dtype == tf.float32 and targets["boxes"].shape == (4, 2, 4)
    assert targets["classes"].dtype == tf.int32 and targets["classes"].shape == (4, 2)
    assert float(tf.reduce_min(images)) == -1.0 and float(tf.reduce_max(images)) <= 1.0  # (x - 127.5) / 127.5
    boxes = np.concatenate([b[1]["boxes"].numpy() for b in batches])
    classes = np.concatenate([b[1]["classes"].numpy() for b in batches])
    for record, row_boxes, row_classes in zip(test, boxes, classes):  # evaluation keeps the file order
        count = min(len(record.classes), 2)
        np.testing.assert_allclose(row_boxes[:count], record.boxes[:count] * 32 / SIZE, atol=1e-4)
        np.testing.assert_array_equal(row_classes[:count], record.classes[:count])
        assert (row_boxes[count:] == -1).all() and (row_classes[count:] == -1).all()

    rgb = detection_config(generated, data={"channels": 3, "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]})
    images, _ = next(iter(make_dataset(test, rgb, training=True, augment=(), batch_size=2)))
    assert images.shape == (2, 32, 32, 3) and float(tf.reduce_min(images)) == 0.0  # the given mean / std


def object_record(tmp_path: Path, size: int = 40) -> tuple[DetectionRecord, list]:
    """One image with one bright rectangle left of centre: pixel columns 4..13, rows 10..29."""
    pixels = np.zeros((size, size), np.uint8)
    pixels[10:30, 4:14] = 255
    path = tmp_path / "object.png"
    Image.fromarray(pixels).save(path)
    box = [4.0, 10.0, 14.0, 30.0]
    return DetectionRecord(str(path), size, size, [box], [1], name="object"), box


def lit_box(image: np.ndarray) -> list | None:
    """The xyxy extent of the pixels brighter than mid-grey (the images come normalized to [-1, 1])."""
    rows, cols = np.nonzero(image[..., 0] > 0.0)
    return None if not len(rows) else [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]


def test_horizontal_flip_moves_box_to_the_mirrored_object(tmp_path):
    record, (x_min, y_min, x_max, y_max) = object_record(tmp_path)
    split = DetectionSplit([record] * 16, ["a", "b"])
    config = detection_config(tmp_path, data={"image_size": 40, "path": None}, train={"batch_size": 16})
    images, targets = next(iter(make_dataset(split, config, training=True, augment=("flip",))))
    mirrored = [40 - x_max, y_min, 40 - x_min, y_max]
    flipped = 0
    for image, boxes, classes in zip(images.numpy(), targets["boxes"].numpy(), targets["classes"].numpy()):
        assert classes.tolist() == [1] + [-1] * 5
        assert boxes[0].tolist() in ([x_min, y_min, x_max, y_max], mirrored)
        assert lit_box(image) == boxes[0].tolist()  # the box sits on the object, flipped or not
        flipped += boxes[0].tolist() == mirrored
    assert 0 < flipped < 16  # both outcomes occur (seeded)


def test_zoom_and_translate_boxes_follow_the_object(tmp_path):
    record, _ = object_record(tmp_path)
    split = DetectionSplit([record] * 32, ["a", "b"])
    config = detection_config(tmp_path, data={"image_size": 40, "path": None}, train={"batch_size": 32, "seed": 3})
    images, targets = next(iter(make_dataset(split, config, training=True)))  # flip, zoom and translate
    moved = 0
    for image, boxes, classes in zip(images.numpy(), targets["boxes"].numpy(), targets["classes"].numpy()):
        lit = lit_box(image)
        if classes[0] < 0:  # dropped: the object left the image, or only a sliver of it is left
            assert lit is None or min(lit[2] - lit[0], lit[3] - lit[1]) <= MIN_BOX_SIDE + 1
            continue
        np.testing.assert_allclose(boxes[0], lit, atol=1.5)
        moved += not np.allclose(boxes[0], [4, 10, 14, 30]) and not np.allclose(boxes[0], [26, 10, 36, 30])
    assert moved > 16


def test_drop_invalid_boxes_pads_and_compacts():
    boxes = tf.constant([[[-1, -1, -1, -1], [5, 5, 5, 9], [38, 2, 50, 9], [1, 1, 9, 9], [30, 30, 31, 40],
                          [45, 0, 60, 9]]], tf.float32)
    classes = tf.constant([[-1, 2, 3, 4, 5, 6]], tf.int32)
    out_boxes, out_classes = drop_invalid_boxes(boxes, classes, 40)
    # kept, in order: [38, 2, 40, 9] (clipped), [1, 1, 9, 9]; empty, 1 px wide and outside ones are padding
    assert out_classes.numpy().tolist() == [[3, 4, -1, -1, -1, -1]]
    assert out_boxes.numpy()[0, :2].tolist() == [[38, 2, 40, 9], [1, 1, 9, 9]]
    assert (out_boxes.numpy()[0, 2:] == -1).all()


@pytest.mark.slow
def test_deterministic_batches_under_a_seed(generated):
    def batches(seed: int):
        config = detection_config(generated, train={"batch_size": 4, "seed": seed})
        train, _, _ = load_detection_data(config)
        return [(x.numpy(), y["boxes"].numpy(), y["classes"].numpy())
                for x, y in make_dataset(train, config, training=True).take(2)]

    first, again, other = batches(5), batches(5), batches(6)
    for a, b in zip(first, again):
        for left, right in zip(a, b):
            np.testing.assert_array_equal(left, right)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))

"""scripts/make_detection_tfrecords.py: COCO, VOC and CSV labels -> TF Object Detection API shards that
`detection.format: tfrecord` reads back with the same boxes; resumable after a SIGKILL; bad rows named by line."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared.config import from_dict
from shared.detection.coco import write_coco
from shared.detection.datasets import load_detection_data, make_dataset
from shared.detection.label_map import read_class_list
from shared.detection.records import DetectionRecord, DetectionSplit
from shared.detection.voc import write_voc

import forked
from conftest import load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "make_detection_tfrecords.py"
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}

# image file -> (width, height, [(class, xmin, ymin, xmax, ymax) in absolute pixels])
LABELS = {
    "a.png": (40, 30, [("dog", 2, 3, 20, 25), ("cat", 21, 0, 40, 30)]),
    "b.png": (32, 32, [("cat", 5.5, 6, 30, 31)]),
    "c.jpg": (50, 20, [("bird", 0, 0, 10, 10), ("dog", 30, 2, 49, 19), ("bird", 12, 4, 22, 16)]),
    "d.png": (24, 36, []),  # an image without objects
}



convert = load_script("make_detection_tfrecords").main


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (width, height, _) in LABELS.items():
        Image.fromarray(rng.integers(0, 255, (height, width, 3), np.uint8)).save(folder / name)
    return folder


def write_csv(path: Path, labels: dict = LABELS, extra_rows: str = "") -> Path:
    rows = ["filename,width,height,class,xmin,ymin,xmax,ymax"]
    for name, (width, height, boxes) in labels.items():
        rows += [f"{name},{width},{height},{c},{x0},{y0},{x1},{y1}" for c, x0, y0, x1, y1 in boxes] or [
            f"{name},{width},{height},,,,,"]
    path.write_text("\n".join(rows) + "\n" + extra_rows)
    return path


def as_split(images: Path, labels: dict = LABELS) -> DetectionSplit:
    names = sorted({box[0] for _, _, boxes in labels.values() for box in boxes})
    records = [DetectionRecord(str(images / name), width, height, np.array([b[1:] for b in boxes], np.float32),
                                 np.array([names.index(b[0]) for b in boxes], np.int32), name=name)
               for name, (width, height, boxes) in labels.items()]
    return DetectionSplit(records, names)


def tfrecord_config(out: Path, split: str = "train"):
    return from_dict({"task": "detection", "data": {"image_size": 32, "channels": 3},
                      "detection": {"format": "tfrecord", "train_annotations": f"{out}/{split}-*", "max_boxes": 4}})


def read_back(out: Path, split: str = "train") -> dict:
    """The shards as `detection.format: tfrecord` loads them: name -> (size, [(class, box)])."""
    train, _, names = load_detection_data(tfrecord_config(out, split))
    return {record.name: ((record.width, record.height),
                          sorted((names[c], tuple(np.round(box, 3))) for c, box in zip(record.classes, record.boxes)))
            for record in train}


def expected(labels: dict = LABELS) -> dict:
    return {name: ((width, height), sorted((b[0], tuple(np.round(np.float32(b[1:]), 3))) for b in boxes))
            for name, (width, height, boxes) in labels.items()}


def test_csv_round_trips_through_the_tfrecord_reader(images, tmp_path):
    out = tmp_path / "out"
    assert convert(["--format", "csv", str(write_csv(tmp_path / "labels.csv")), "--images", str(images),
                    "--out", str(out), "--train-shards", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "label_map.pbtxt", "train-00000-of-00002", "train-00001-of-00002"]
    assert read_class_list(out / "label_map.pbtxt") == ["bird", "cat", "dog"]  # sorted, ids 1..3
    assert read_back(out) == expected()
    config = tfrecord_config(out)
    images, targets = next(iter(make_dataset(load_detection_data(config)[0], config, training=False,
                                               batch_size=8)))  # the detector's input pipeline decodes them
    assert images.shape == (4, 32, 32, 3) and int(tf.reduce_sum(tf.cast(targets["classes"] >= 0, tf.int32))) == 6
    first_record = next(iter(tf.data.TFRecordDataset(str(out / "train-00000-of-00002"))))
    example = tf.train.Example.FromString(first_record.numpy())
    keys = set(example.features.feature)
    assert {"image/encoded", "image/format", "image/height", "image/width", "image/filename", "image/source_id",
            "image/object/bbox/xmin", "image/object/bbox/ymax", "image/object/class/label",
            "image/object/class/text", "image/object/difficult"} <= keys


def test_coco_and_voc_round_trip(images, tmp_path):
    split = as_split(images)
    write_coco(split, tmp_path / "coco.json", images)
    assert convert(["--format", "coco", str(tmp_path / "coco.json"), "--images", str(images),
                    "--out", str(tmp_path / "coco"), "--no-progress"]) == 0
    assert read_back(tmp_path / "coco") == expected()

    write_voc(split, tmp_path / "voc", "trainval")
    assert convert(["--format", "voc", str(tmp_path / "voc"), "--split", "trainval", "--out", str(tmp_path / "voc-out"),
                    "--no-progress"]) == 0
    # VOC stores 1-based integer pixels: b.png's xmin 5.5 comes back within a pixel
    back, wanted = read_back(tmp_path / "voc-out", "trainval"), expected()
    assert back.keys() == wanted.keys()
    for name in wanted:
        assert back[name][0] == wanted[name][0]
        assert [c for c, _ in back[name][1]] == [c for c, _ in wanted[name][1]]
        np.testing.assert_allclose([b for _, b in back[name][1]], [b for _, b in wanted[name][1]], atol=1.0)


def test_classes_file_fixes_the_label_order_and_a_second_split_reuses_it(images, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "classes.txt").write_text("dog\ncat\nbird\n")
    csv_path = write_csv(tmp_path / "labels.csv")
    assert convert(["--format", "csv", str(csv_path), "--images", str(images), "--out", str(out),
                    "--classes", str(tmp_path / "classes.txt"), "--no-progress"]) == 0
    assert read_class_list(out / "label_map.pbtxt") == ["dog", "cat", "bird"]
    record = next(iter(tf.data.TFRecordDataset(str(next(out.glob("train-*")))))).numpy()
    example = tf.train.Example.FromString(record)
    texts = [t.decode() for t in example.features.feature["image/object/class/text"].bytes_list.value]
    labels = list(example.features.feature["image/object/class/label"].int64_list.value)
    assert labels == [{"dog": 1, "cat": 2, "bird": 3}[t] for t in texts]
    # validation with only cats: same label map, the cat still id 2
    write_csv(tmp_path / "val.csv", {"b.png": LABELS["b.png"]})
    assert convert(["--format", "csv", str(tmp_path / "val.csv"), "--images", str(images), "--out", str(out),
                    "--split", "validation", "--no-progress"]) == 0
    assert read_class_list(out / "label_map.pbtxt") == ["dog", "cat", "bird"]
    assert read_back(out, "validation") == expected({"b.png": LABELS["b.png"]})
    # another order into the same shards: refused, not mixed in
    assert convert(["--format", "csv", str(csv_path), "--images", str(images), "--out", str(out), "--seed", "1",
                    "--no-progress"]) == 2
    assert "were written from another image list" in capsys.readouterr().err
    # other classes for shards written before: refused, the label map kept
    (tmp_path / "sorted.txt").write_text("bird\ncat\ndog\n")
    assert convert(["--format", "csv", str(csv_path), "--images", str(images), "--out", str(out),
                    "--classes", str(tmp_path / "sorted.txt"), "--no-progress"]) == 2
    assert f"{out / 'label_map.pbtxt'} lists other classes" in capsys.readouterr().err
    assert read_class_list(out / "label_map.pbtxt") == ["dog", "cat", "bird"]
    # a class the list lacks: its image is named and left out
    (tmp_path / "two.txt").write_text("dog\ncat\n")
    assert convert(["--format", "csv", str(csv_path), "--images", str(images), "--out", str(tmp_path / "two"),
                    "--classes", str(tmp_path / "two.txt"), "--no-progress"]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped: ")]
    assert skipped == [f"skipped: {csv_path} line 5: class 'bird' is not in the class list (2 classes); add it to "
                       f"--classes or fix the label"]
    assert sorted(read_back(tmp_path / "two")) == ["a.png", "b.png", "d.png"]


BAD_ROWS = ("e.png,40,30,cat,1,2,abc,9\n"      # line 9: a bad number
            "a.png,40,30,cat,1,2,60,9\n"       # line 10: outside the 40x30 image (a.png is left out)
            "nothere.png,10,10,cat,1,1,5,5\n"  # line 11: an unknown image file
            "b.png,33,32,cat,1,1,5,5\n")       # line 12: another size than line 4 for b.png


def test_bad_rows_are_named_by_line_and_their_images_left_out(images, tmp_path, capsys):
    csv_path = write_csv(tmp_path / "labels.csv", extra_rows=BAD_ROWS)
    out = tmp_path / "out"
    assert convert(["--format", "csv", str(csv_path), "--images", str(images), "--out", str(out),
                    "--train-shards", "1", "--no-progress"]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped: ")]
    assert [line.split(": ")[1] for line in skipped] == [f"{csv_path} line {n}" for n in (9, 10, 12, 11)], skipped
    assert "xmax 'abc' is not a number" in skipped[0] and "outside the 40x30 image" in skipped[1]
    assert "33x32 here but 32x32 on line 4" in skipped[2] and "nothere.png not found" in skipped[3]
    assert sorted(read_back(out)) == ["c.jpg", "d.png"]  # a.png and b.png had a bad row, e.png a bad number

    code = convert(["--format", "csv", str(csv_path), "--images", str(images), "--out", str(tmp_path / "strict"),
                    "--strict", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: {csv_path} line 9: xmax 'abc' is not a number; fix the row"]


def test_missing_column_and_bad_xml(images, tmp_path, capsys):
    (tmp_path / "labels.csv").write_text("filename,width,height,class,xmin,ymin,xmax\na.png,40,30,cat,1,2,3\n")
    assert convert(["--format", "csv", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'labels.csv'} line 1: the header has no column ymax (it has filename,width,height,"
        f"class,xmin,ymin,xmax); name the columns filename,width,height,class,xmin,ymin,xmax,ymax")

    write_voc(as_split(images), tmp_path / "voc", "trainval")
    (tmp_path / "voc" / "Annotations" / "a.xml").write_text("<annotation><size>")
    assert convert(["--format", "voc", str(tmp_path / "voc"), "--out", str(tmp_path / "voc-out"),
                    "--no-progress"]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 1 and f"{tmp_path / 'voc' / 'Annotations' / 'a.xml'} is not valid XML" in skipped[0]
    assert sorted(read_back(tmp_path / "voc-out")) == ["b.png", "c.jpg", "d.png"]


# Slows the real record writer down, so that the test can SIGKILL it between shards.
SLOW_WRITER = """
import runpy, sys, time
import shared.detection.tfod as D
real = D.tfod_example
def slow(*args):
    time.sleep(0.3)
    return real(*args)
D.tfod_example = slow
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_killed_between_shards_a_rerun_finishes_with_the_same_output(images, tmp_path, capsys):
    labels = {f"{i}_{name}": value for i in range(3) for name, value in LABELS.items()}  # 12 images
    for name in labels:
        (images / name).write_bytes((images / name.split("_", 1)[1]).read_bytes())
    csv_path = write_csv(tmp_path / "labels.csv", labels)
    args = ["--format", "csv", str(csv_path), "--images", str(images), "--train-shards", "4", "--no-progress"]
    assert convert([*args, "--out", str(tmp_path / "clean")]) == 0

    out = tmp_path / "out"
    writer = forked.popen([sys.executable, "-c", SLOW_WRITER, str(SCRIPT), *args, "--out", str(out)],
                          cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "train-00000-of-00004").exists():
        assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    assert not (out / "train-00003-of-00004").exists()
    capsys.readouterr()

    assert convert([*args, "--out", str(out)]) == 0
    assert "train: skipped 1 of 4 shards already complete" in capsys.readouterr().out
    shards = sorted(p.name for p in out.iterdir() if p.name.startswith("train-"))
    assert shards == [f"train-0000{i}-of-00004" for i in range(4)]  # no half shard left
    for name in shards + ["label_map.pbtxt"]:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name

"""Pre-annotation: `predict --format tasks` writes one annotation task per image (the loop's JSONL format,
without an answer) with a classifier's label or a detector's spans, which `shared.annotations` reads back once
an annotator accepts them; detection runs and their SavedModels predict boxes in each image's own pixels."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared import annotations, runs
from shared.classification.loop import ClassLabel
from shared.detection.loop import Spans
from shared.fashion_mnist import FASHION_MNIST_DIRS
from shared.classification.predict import Predictor
from shared.tasks import rebuild

from conftest import TINY_MODEL, tiny_tree
from test_data import make_folder_dataset
from test_predict import CLASSES, assert_one_line_error, fake_run, run_cli

HAS_FASHION_MNIST = (Path(FASHION_MNIST_DIRS[0]) / "train-images-idx3-ubyte.gz").is_file()


def task_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def accept_all(tasks_file: Path, lines: list[dict]) -> Path:
    """The annotator's export: every suggestion accepted, in a file beside the tasks file (so the same
    relative image paths hold)."""
    accepted = tasks_file.with_name("accepted.jsonl")
    accepted.write_text("".join(json.dumps({**line, "answer": "accept"}) + "\n" for line in lines), encoding="utf-8")
    return accepted


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """test_predict's folder of JPEG / PNG files of 40 x 30 px (center-cropped to 16 px) with TINY_MODEL (one
    convolution) trained on it for one epoch: the tasks are checked against the run's own predictions, so the
    model need not be a ResNet, and one convolution builds, traces and exports in a fraction of its time."""
    from shared.config import load_config
    from shared.lifecycle import train

    base = tmp_path_factory.mktemp("preannotate_classification")
    root = make_folder_dataset(base / "images", classes=CLASSES, per_class=4)
    (base / "tiny").mkdir()
    (base / "tiny" / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(base / "runs", train={"epochs": 1, "batch_size": 8})
    tree["data"] = {"source": "folder", "path": str(root), "test_split": "val", "image_size": 16}
    tree["model"] = {"name": "tiny", "path": str(base / "tiny")}
    return train(load_config(tree=tree), argv=["pytest"], draw=False), root  # no test looks at its figures


@pytest.mark.slow
def test_classification_tasks_round_trip_through_the_annotation_reader(folder_run, tmp_path, monkeypatch, capsys):
    from shared.classification import export
    from shared.tasks import rebuild

    run, root = folder_run
    shutil.copytree(root / "val", tmp_path / "photos")
    not_utf8 = tmp_path / "photos" / "cat" / os.fsdecode(b"caf\xe9 1.png")  # a name the file system holds as bytes
    shutil.copy(next((tmp_path / "photos" / "cat").glob("*.png")), not_utf8)
    monkeypatch.chdir(tmp_path)  # paths on the command line are relative to here, not to the tasks file
    files = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "photos").rglob("*.*"))
    want = Predictor.from_run(run, *rebuild(run)).predict(files)

    inside = tmp_path / "photos" / "tasks.jsonl"  # beside the images: paths relative to it
    code, printed, err = run_cli(capsys, "predict", "--run", run.path, "photos", "--format", "tasks", "--out", inside,
                                 "--top-k", "2")
    assert code == 0, err
    assert f"wrote {len(files)} tasks to {inside}" in printed
    lines = task_lines(inside)
    assert [line["image"] for line in lines] == [str(Path(f).relative_to("photos")) for f in files]
    assert all("answer" not in line for line in lines)  # no one has answered yet
    assert [line["label"] for line in lines] == [p.labels[0] for p in want]
    assert {line["label"] for line in lines} <= set(CLASSES)  # wnids as labels.txt has them, not as words
    assert [line["score"] for line in lines] == [round(p.scores[0], 4) for p in want]
    assert [[o["id"] for o in line["options"]] for line in lines] == [p.labels[:2] for p in want]

    batch = annotations.read_new(accept_all(inside, lines), schema=ClassLabel(), class_names=run.class_names())
    assert batch.malformed == [] and batch.accepted == len(files)
    assert [run.class_names()[e.label] for e in batch.examples] == [line["label"] for line in lines]
    assert [e.name for e in batch.examples] == [str(tmp_path / f) for f in files]
    assert str(not_utf8) in [e.name for e in batch.examples]

    # elsewhere (and from the newest export in a model folder): absolute paths, the same labels
    folder = export.export_saved_model(*rebuild(run), run, tmp_path / "exports")
    outside = tmp_path / "elsewhere" / "tasks.jsonl"
    outside.parent.mkdir()
    code, _, err = run_cli(capsys, "predict", "--saved-model", folder.parent, "photos", "--format", "tasks",
                           "--out", outside)
    assert code == 0, err
    served = task_lines(outside)
    assert [line["image"] for line in served] == [str(tmp_path / f) for f in files]
    assert [line["label"] for line in served] == [line["label"] for line in lines]
    batch = annotations.read_new(accept_all(outside, served), schema=ClassLabel(), class_names=run.class_names())
    assert batch.malformed == [] and batch.accepted == len(files)


@pytest.fixture(scope="module")
def detection_run(tiny_detector) -> runs.Run:
    """The tiny detector of the detection runner's tests (2 epochs on 16 generated canvases, 48 px)."""
    return tiny_detector


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="Fashion-MNIST IDX files not installed")
def test_detection_tasks_spans_from_the_run_and_its_saved_model(detection_run, tmp_path, capsys):
    import tensorflow as tf

    run = detection_run
    names = run.class_names()
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((Path(run.config_dict()["data"]["path"]) / "test").glob("*.png"))[:3]
    for image in source:
        shutil.copy(image, images / image.name)
    big = images / "big.png"  # 72 px: boxes come back in its own pixels, not the run's 48
    Image.open(source[0]).resize((72, 72), Image.BILINEAR).save(big)

    tasks = images / "tasks.jsonl"
    code, printed, err = run_cli(capsys, "predict", "--run", run.path, images, "--format", "tasks", "--out", tasks)
    assert code == 0, err
    lines = task_lines(tasks)
    assert [line["image"] for line in lines] == sorted(p.name for p in images.glob("*.png"))
    assert all(line["spans"] for line in lines)  # score_threshold 0: every image has boxes
    spans = {line["image"]: line["spans"] for line in lines}
    assert all(set(s) == {"x", "y", "width", "height", "label", "score"} for line in lines for s in line["spans"])
    assert all(s["label"] in names and s["width"] > 0 and s["height"] > 0 for line in lines for s in line["spans"])
    assert all(s["x"] + s["width"] <= 72.01 for s in spans["big.png"]) and \
        max(s["x"] + s["width"] for s in spans["big.png"]) > 48  # scaled to 72 px
    assert printed.splitlines()[0].startswith(f"{images / 'big.png'}  {len(spans['big.png'])} boxes  ")

    # the reader takes every accepted suggestion, boxes as written
    batch = annotations.read_new(accept_all(tasks, lines), schema=Spans(), class_names=names)
    assert batch.malformed == [] and batch.accepted == len(lines)
    for example, line in zip(batch.examples, lines):
        xyxy = [[s["x"], s["y"], s["x"] + s["width"], s["y"] + s["height"]] for s in line["spans"]]
        np.testing.assert_allclose(example.boxes, xyxy, atol=0.02)
        assert [names[c] for c in example.classes] == [s["label"] for s in line["spans"]]

    # --order margin: the image whose least confident box is nearest a coin toss first, with its score in meta
    ordered = tmp_path / "ordered.jsonl"
    assert run_cli(capsys, "predict", "--run", run.path, images, "--format", "tasks", "--out", ordered, "--order",
                   "margin")[0] == 0
    margin = {name: max(1 - abs(2 * s["score"] - 1) for s in found) for name, found in spans.items()}
    ranked = sorted(margin, key=lambda name: -margin[name])  # stable: ties in file order
    ordered_lines = task_lines(ordered)
    assert [Path(line["image"]).name for line in ordered_lines] == ranked
    assert [line["meta"]["margin"] for line in ordered_lines] == pytest.approx([margin[n] for n in ranked], abs=1e-4)

    # the export answers what the run does; the served boxes on bytes are the spans
    assert run_cli(capsys, "export", "--run", run.path, "--format", "saved_model", "--export-dir",
                   tmp_path / "exports")[0] == 0
    model_folder = tmp_path / "exports" / f"{run.config_dict()['model']['name']}_detection"
    served_tasks = tmp_path / "served.jsonl"
    code, _, err = run_cli(capsys, "predict", "--saved-model", model_folder, images, "--format", "tasks",
                           "--out", served_tasks)
    assert code == 0, err
    served = {Path(line["image"]).name: line["spans"] for line in task_lines(served_tasks)}
    for name, found in spans.items():
        assert [s["label"] for s in served[name]] == [s["label"] for s in found]
        for a, b in zip(served[name], found):
            assert all(abs(a[key] - b[key]) < 0.02 for key in ("x", "y", "width", "height", "score"))
    signature = tf.saved_model.load(str(model_folder / "1")).signatures["serving_default"]
    raw = signature(image_bytes=tf.constant([big.read_bytes()]))
    count = int(raw["num_detections"][0])
    np.testing.assert_allclose([[s["x"], s["y"], s["x"] + s["width"], s["y"] + s["height"]] for s in spans["big.png"]],
                               raw["boxes"][0, :count].numpy(), atol=0.02)

    # the TFLite file (found to be the run's from its place) finds the run's boxes, in each image's pixels,
    # through its own post-processing op; the raw-output form is refused in one line
    assert run_cli(capsys, "export", "--run", run.path, "--format", "tflite")[0] == 0
    lite_tasks = tmp_path / "lite.jsonl"
    code, _, err = run_cli(capsys, "predict", "--tflite", run.path / "export" / "detector_none.tflite", images,
                           "--format", "tasks", "--out", lite_tasks)
    assert code == 0, err
    lite = {Path(line["image"]).name: line["spans"] for line in task_lines(lite_tasks)}
    for name, found in spans.items():
        top = 10  # past the best boxes, near-equal scores of a barely trained detector may swap places
        assert [s["label"] for s in lite[name][:top]] == [s["label"] for s in found[:top]]
        for a, b in zip(lite[name][:top], found[:top]):
            assert all(abs(a[key] - b[key]) < 0.05 for key in ("x", "y", "width", "height", "score")), (a, b)
    assert max(s["x"] + s["width"] for s in lite["big.png"]) > 48  # scaled back to its 72 px
    assert run_cli(capsys, "export", "--run", run.path, "--format", "tflite", "--raw-outputs")[0] == 0
    code, _, err = run_cli(capsys, "predict", "--tflite", run.path / "export" / "detector_none_raw.tflite", big)
    assert_one_line_error(code, err, "has the raw outputs", "export it without --raw-outputs")

    # --min-score keeps the better boxes only; csv: one row per image with its spans as JSON
    scores = sorted(s["score"] for s in spans["big.png"])
    distinct = sorted(set(scores))
    cut = (distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]) / 2  # between two (rounded) scores
    out = tmp_path / "boxes.csv"
    code, _, err = run_cli(capsys, "predict", "--run", run.path, big, "--min-score", cut, "--out", out)
    assert code == 0, err
    (row,) = list(csv.DictReader(out.open(encoding="utf-8")))
    kept = json.loads(row["spans"])
    assert int(row["boxes"]) == len(kept) == sum(s >= cut for s in scores) and min(s["score"] for s in kept) >= cut

    # in Python: a Detector takes files, not arrays; a Predictor refuses a detection run and names the Detector
    from shared.detection.predict import Detector
    from shared.errors import UserError

    with pytest.raises(UserError, match="detects in image files; give paths, not arrays"):
        Detector.from_run(run, *rebuild(run)).predict([np.zeros((48, 48), np.uint8)])
    with pytest.raises(UserError, match="is a detection run; find its boxes with shared.detection.predict.Detector"):
        Predictor.from_run(run, *rebuild(run))

    # a SavedModel drops boxes under its built-in threshold: a lower --min-score is refused in one line
    strict = shutil.copytree(model_folder / "1", tmp_path / "strict" / "1")
    record = json.loads((strict / "assets.extra" / "export.json").read_text())
    (strict / "assets.extra" / "export.json").write_text(json.dumps({**record, "score_threshold": 0.5}))
    code, _, err = run_cli(capsys, "predict", "--saved-model", strict, big, "--min-score", "0.2")
    assert_one_line_error(code, err, "--min-score 0.2 is below the 0.5", "--run RUN")


def test_bad_format_and_score_arguments_are_one_line_before_any_model_loads(tmp_path, capsys):
    run = fake_run(tmp_path / "runs" / "resnet" / "v0001")  # no checkpoint: loading it would fail otherwise
    detector = fake_run(tmp_path / "runs" / "resnet" / "v0002", task="detection")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    cases = [
        (run, ["--format", "tasks"], ["--format tasks says what --out holds", "--out FILE.jsonl"]),
        (run, ["--format", "tasks", "--out", tmp_path / "x.csv"], ["--format tasks writes .jsonl", "x.jsonl"]),
        (run, ["--format", "csv", "--out", tmp_path / "x.jsonl"], ["--format csv writes .csv", "x.csv"]),
        (run, ["--out", tmp_path / "x.txt"], ["use .csv or .jsonl", "--format tasks"]),
        (run, ["--min-score", "0.5"], ["--min-score applies to detection"]),
        (detector, ["--min-score", "1.5"], ["--min-score is 1.5", "between 0 and 1"]),
        (detector, ["--tflite", tmp_path / "detector.tflite"], ["no TFLite model at", "export one first"]),
    ]
    for source, extra, fragments in cases:
        code, _, err = run_cli(capsys, "predict", "--run", source, image, *extra)
        assert_one_line_error(code, err, *fragments)
    assert not any(tmp_path.glob("x.*"))
    with pytest.raises(SystemExit) as stopped:  # argparse's own usage error
        run_cli(capsys, "predict", "--run", run, image, "--format", "xml", "--out", tmp_path / "x.xml")
    assert stopped.value.code == 2 and "invalid choice: 'xml'" in capsys.readouterr().err

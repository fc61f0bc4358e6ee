"""predict: a run, its SavedModel and its .tflite say the same as the run's eval pipeline; paths, damaged files
and user mistakes on the command line."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from shared import runner
from shared.classification.predict import Predictor
from shared.predict import Paths, expand_paths
from shared.tasks import rebuild

import forked
from conftest import REPO, SENSITIVE_MODEL, tiny_tree
from test_data import make_folder_dataset

DAMAGED = b"\xff\xd8\xff\xe0 truncated, not a real JPEG"
CLASSES = ("cat", "fox", "n01440764", "n01443537")  # two ImageNet wnids: shown as "tench" and "goldfish"
NAMES = ["cat", "fox", "tench", "goldfish"]


def run_cli(capsys, *argv):
    code = runner.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """One tiny run on a folder of JPEG / PNG files of 40 x 30 px (center-cropped to 16 px: the view a
    SavedModel must rebuild from encoded bytes), trained for one epoch. Its model is one convolution
    (SENSITIVE_MODEL): the predictions are checked against the run's own eval pipeline, so the model need not be
    a ResNet (the export of one is test_export's), and one convolution builds, exports and converts in a fraction
    of its time."""
    from shared.config import load_config
    from shared.lifecycle import train

    base = tmp_path_factory.mktemp("predict")
    root = make_folder_dataset(base / "images", classes=CLASSES, per_class=4)
    (base / "tiny").mkdir()
    (base / "tiny" / "model.py").write_text(SENSITIVE_MODEL)
    tree = tiny_tree(base / "runs", train={"epochs": 1, "batch_size": 8})
    tree["data"] = {"source": "folder", "path": str(root), "test_split": "val", "image_size": 16}
    tree["model"] = {"name": "tiny", "path": str(base / "tiny")}
    return train(load_config(tree=tree), argv=["pytest"], draw=False), root  # no test looks at its figures


def eval_pipeline_probabilities(run, files: list[Path]) -> np.ndarray:
    """The Keras model on the tensors the run's own eval map (what `test --run` uses) makes of the files."""
    import tensorflow as tf

    from shared.data import _image_fn, sources
    model, config = rebuild(run)
    source = sources.load(config.data)
    assert source.encoding == "path" and not source.fixed_size  # the center-crop view
    eval_fn = _image_fn(config, source, None)
    images = tf.stack([eval_fn(tf.constant(str(f)), 0)[0] for f in files])
    return model(images, training=False).numpy()


@pytest.mark.slow
def test_run_saved_model_and_tflite_predict_what_the_eval_pipeline_sees(folder_run, tmp_path):
    from shared.classification import export, tflite
    from shared.tasks import rebuild

    run, root = folder_run
    files = sorted((root / "val").rglob("*.*"))
    expected = eval_pipeline_probabilities(run, files)

    rebuilt = rebuild(run)  # one model for the run's predictors: each prediction only reads it
    from_run = Predictor.from_run(run, *rebuilt).predict(files, top_k=10, batch_size=5)  # batches of 5, 5, 2
    assert [p.input for p in from_run] == [str(f) for f in files]
    got = np.stack([p.probabilities for p in from_run])
    assert np.abs(got - expected).max() < 1e-5
    assert all(len(p.ids) == 4 for p in from_run)  # top_k 10 of 4 classes: every class, best first
    assert [p.ids[0] for p in from_run] == expected.argmax(axis=1).tolist()
    assert run.class_names() == list(CLASSES)
    assert from_run[0].names == [NAMES[i] for i in from_run[0].ids]
    assert np.allclose(from_run[0].scores, np.sort(expected[0])[::-1])

    folder = export.export_saved_model(*rebuild(run), run, tmp_path / "exports")
    served = Predictor.from_saved_model(folder).predict(files, top_k=2, batch_size=4)
    assert np.abs(np.stack([p.probabilities for p in served]) - expected).max() < 1e-5
    assert [p.names for p in served] == [p.names[:2] for p in from_run]
    record = json.loads((folder / "assets.extra" / "export.json").read_text())
    assert record["labels"] == NAMES and record["class_names"] == list(CLASSES)
    import tensorflow as tf

    serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
    labels = serve(image_bytes=tf.constant([files[0].read_bytes()]))["labels"].numpy()[0]
    assert [label.decode() for label in labels] == from_run[0].names  # the served labels are words too

    # decoded arrays (uint8, H x W x C) get the same view as their files, by the run and by the export
    pngs = [f for f in files if f.suffix == ".png"]
    arrays = [np.asarray(Image.open(f)) for f in pngs]
    want = expected[[files.index(f) for f in pngs]]
    from_saved = Predictor.from_saved_model(folder.parent)  # a model folder: its newest version
    for predictor in (Predictor.from_run(run, *rebuilt), from_saved):
        result = predictor.predict(arrays)
        assert [p.input for p in result] == list(range(len(arrays)))
        assert np.abs(np.stack([p.probabilities for p in result]) - want).max() < 1e-5

    # a damaged file, a missing one and a bad array are skipped with a reason; the rest are still classified
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(DAMAGED)
    mixed = [files[0], damaged, tmp_path / "gone.jpg", files[1], np.zeros((2, 2, 2, 2), np.uint8), arrays[0]]
    for predictor in (Predictor.from_run(run, *rebuilt), Predictor.from_saved_model(folder)):
        result = predictor.predict(mixed, batch_size=3)  # the SavedModel retries its failed batch one by one
        assert [p.error is None for p in result] == [True, False, False, True, False, True]
        assert result[1].error.startswith("does not decode") and result[2].error == "No such file or directory"
        assert result[4].error.startswith("not an image array") and result[4].input == 4
        assert np.abs(np.stack([result[0].probabilities, result[3].probabilities]) - expected[:2]).max() < 1e-5

    # an export without its export.json: names from the served labels; arrays need the recorded preprocessing
    foreign = Path(shutil.copytree(folder, tmp_path / "foreign" / "1"))
    shutil.rmtree(foreign / "assets.extra")
    bare = Predictor.from_saved_model(foreign)
    assert [p.names for p in bare.predict(files)] == [p.names for p in from_run]
    with pytest.raises(Exception, match="has no assets.extra/export.json"):
        bare.predict(arrays)

    lite = tflite.convert(*rebuild(run), run)  # <run>/export/model_none.tflite: the run's preprocessing is there
    from_lite = Predictor.from_tflite(lite).predict(files)
    assert np.abs(np.stack([p.probabilities for p in from_lite]) - expected).max() < 1e-4
    alone = shutil.copy(lite, tmp_path / "model.tflite")
    with pytest.raises(Exception, match="name the run it was exported from with --run RUN"):
        Predictor.from_tflite(alone)
    assert Predictor.from_tflite(alone, run).predict(files[:1])[0].ids == from_lite[0].ids


@pytest.mark.slow
def test_the_command_skips_damaged_files_lists_them_and_writes_csv_and_jsonl(folder_run, tmp_path, capsys):
    run, root = folder_run
    images = tmp_path / "to classify"
    shutil.copytree(root / "val", images)
    (images / "fox" / "déjà vu 猫.png").write_bytes((root / "val" / "cat" / "2.png").read_bytes())
    damaged = images / "cat" / "broken.jpg"
    damaged.write_bytes(DAMAGED)
    not_utf8 = images / "owl" / os.fsdecode(b"caf\xe9.png")  # a name the file system holds as bytes
    not_utf8.parent.mkdir()
    not_utf8.write_bytes((root / "val" / "cat" / "2.png").read_bytes())
    (images / "notes.txt").write_text("not an image: a folder's other files are left out")
    good = sorted(str(p) for p in images.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p != damaged)

    out = tmp_path / "predictions.csv"
    code, printed, err = run_cli(capsys, "predict", "--run", run.path, images, "--out", out, "--top-k", "3")
    assert code == 0, err
    assert f"skipped {damaged}: does not decode" in err and "skipped 1 file " in err
    assert "Traceback" not in err
    assert f"wrote {len(good)} predictions (and 1 skipped, each with its error) to {out}" in printed
    every = list(csv.reader(out.open(encoding="utf-8", errors="surrogateescape")))  # the name's own bytes
    assert every[0] == ["path", "id_1", "name_1", "score_1", "id_2", "name_2", "score_2", "id_3", "name_3",
                        "score_3", "error"]
    # the file alone says what failed: the skipped image's row, in its place, with its error and no ranks
    assert [row[0] for row in every[1:]] == sorted([*good, str(damaged)],
                                                   key=lambda p: Path(p).relative_to(images).parts)
    (failed,) = [row for row in every[1:] if row[-1]]
    assert failed[0] == str(damaged) and failed[1:-1] == [""] * 9 and failed[-1].startswith("does not decode")
    rows = [every[0][:-1]] + [row[:-1] for row in every[1:] if not row[-1]]
    assert all(row[2] in NAMES for row in rows[1:])
    assert printed.splitlines()[0].startswith(rows[1][0] + "  " + rows[1][2])

    jsonl = tmp_path / "predictions.jsonl"
    code, _, err = run_cli(capsys, "predict", "--run", run.path, "--checkpoint", run.last_checkpoint(),
                           f"{images}/**/*.png", "--out", jsonl)
    assert code == 0, err
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert [r["path"] for r in records] == sorted(p for p in good if p.endswith(".png"))
    assert any("déjà vu 猫" in r["path"] for r in records)
    assert all(len(r["ids"]) == len(r["names"]) == len(r["scores"]) == 4 for r in records)  # top 5 of 4 classes
    assert all(r["error"] is None for r in records)

    # a reader that has gone (`| head -1`; here closed before the first line): no traceback, --out gets every image
    piped = tmp_path / "piped.jsonl"
    process = forked.popen([sys.executable, "-m", "shared.runner", "predict", "--run", str(run.path), str(images),
                            "--out", str(piped)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr
    piped_rows = [json.loads(line) for line in piped.read_text(encoding="utf-8").splitlines()]  # valid UTF-8 JSON
    assert [row["path"] for row in piped_rows] == [row[0] for row in every[1:]]  # not-UTF-8 name as \udcXX
    assert [row["error"] is not None for row in piped_rows] == [bool(row[-1]) for row in every[1:]]

    code, _, err = run_cli(capsys, "predict", "--run", run.path, images, "--out", tmp_path / "strict.csv", "--strict")
    assert_one_line_error(code, err, f"cannot classify {damaged}", "--strict")
    assert not (tmp_path / "strict.csv").exists()

    many = tmp_path / "many"  # enough files for a progress bar, which a non-terminal (here: captured) never gets
    many.mkdir()
    for i in range(70):
        shutil.copy(good[0], many / f"{i:02d}.png")
    code, printed, err = run_cli(capsys, "predict", "--run", run.path, many, "--batch-size", "16")
    assert code == 0 and len(printed.splitlines()) == 70 and "\r" not in err and "image/s" not in err



def fake_run(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config or {"task": "classification"}))
    return folder


@pytest.mark.parametrize("task", ["deblur"])  # detection: tests/test_preannotate.py
def test_other_tasks_are_refused_in_one_line(tmp_path, capsys, task):
    run = fake_run(tmp_path / "runs" / "x" / "v0001", task=task)
    code, _, err = run_cli(capsys, "predict", "--run", run, tmp_path)
    assert_one_line_error(code, err, "predict supports tasks classification, detection", f"not {task}")


def test_a_deblur_export_is_refused_by_its_task_in_one_line(tmp_path, capsys):
    """A SavedModel says its task in export.json, a .tflite file by its run: the task refuses, before TF reads
    the (here unreadable) model."""
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    version = tmp_path / "exports" / "deblur" / "1"
    (version / "assets.extra").mkdir(parents=True)
    (version / "saved_model.pb").write_bytes(b"not a model")
    (version / "assets.extra" / "export.json").write_text(json.dumps({"task": "deblur"}))
    code, _, err = run_cli(capsys, "predict", "--saved-model", version.parent, image)
    assert_one_line_error(code, err, "predict does not run deblur models", f"SavedModel {version}")
    run = fake_run(tmp_path / "runs" / "unet" / "v0001", task="deblur")
    (run / "export").mkdir()
    (run / "export" / "model.tflite").write_bytes(b"not a model")
    code, _, err = run_cli(capsys, "predict", "--tflite", run / "export" / "model.tflite", image)
    assert_one_line_error(code, err, "predict does not run deblur models", "TFLite")


def test_bad_input_is_one_line_before_any_model_loads(tmp_path, capsys):
    run = fake_run(tmp_path / "runs" / "resnet" / "v0001")  # no checkpoint: loading it would fail differently
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    cases = [
        ([], ["give the images to classify"]),
        ([tmp_path / "missing.jpg"], ["no such file or folder", "missing.jpg"]),
        ([tmp_path / "*.jpeg"], ["no file matches"]),
        ([empty], ["no images in", str(empty)]),
        ([image, "--out", tmp_path / "out.xlsx"], ["--out", "use .csv or .jsonl"]),
        ([image, "--top-k", "0"], ["--top-k must be at least 1"]),
        ([image, "--saved-model", tmp_path], ["one of --run RUN, --saved-model DIR or --tflite FILE"]),
        ([image, "--checkpoint", "best"], ["no checkpoints/best.keras", "--checkpoint last"]),
        ([image, "--checkpoint", tmp_path / "epoch-0009.keras"], ["checkpoint", "epoch-0009.keras not found"]),
    ]
    for extra, fragments in cases:
        code, _, err = run_cli(capsys, "predict", "--run", run, *extra)
        assert_one_line_error(code, err, *fragments)
    code, _, err = run_cli(capsys, "predict", "--saved-model", tmp_path, image)
    assert_one_line_error(code, err, "no SavedModel at")
    code, _, err = run_cli(capsys, "predict", "--tflite", tmp_path / "model.tflite", image)
    assert_one_line_error(code, err, "no TFLite model at")


LOCK_AND_WAIT = """
import pathlib, sys, time
from shared.runs import Run, lock_run
lock_run(Run(pathlib.Path(sys.argv[1])))
print("locked", flush=True)
time.sleep(60)
"""


def test_a_run_still_training_is_refused(tmp_path, capsys):
    """A real second process holds the run's training lock."""
    run = fake_run(tmp_path / "runs" / "resnet" / "v0001")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_AND_WAIT, str(run)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_cli(capsys, "predict", "--run", run, tmp_path)
        assert_one_line_error(code, err, str(run))
    finally:
        holder.kill()
        holder.wait()


def test_paths_expand_to_sorted_images_recursively_and_lazily(tmp_path):
    (tmp_path / "b" / "inner").mkdir(parents=True)
    for name in ("b/2.jpg", "b/10.PNG", "b/inner/z.gif", "a.jpeg", "b/.hidden.jpg", "b/notes.md", "c.bin"):
        (tmp_path / name).write_bytes(b"x")
    found = list(expand_paths([str(tmp_path / "b"), str(tmp_path / "*.jpeg"), str(tmp_path / "c.bin")]))
    assert found == [str(tmp_path / p) for p in ("b/10.PNG", "b/2.jpg", "b/inner/z.gif", "a.jpeg", "c.bin")]
    walk = expand_paths([str(tmp_path)])
    assert next(walk) == str(tmp_path / "a.jpeg")  # a generator: nothing listed beyond what was asked for
    assert os.fspath(tmp_path / "b" / "10.PNG") == next(walk)


def test_the_check_and_the_walk_list_each_folder_once(tmp_path, monkeypatch):
    for name in ("x/1.png", "x/y/2.png", "z/3.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda folder: listed.append(str(folder)) or real(folder))
    paths = Paths([str(tmp_path / "x"), str(tmp_path / "z")]).check()  # the check lists x and z ...
    assert sorted(listed) == [str(tmp_path / "x"), str(tmp_path / "z")]
    assert list(paths) == [str(tmp_path / p) for p in ("x/1.png", "x/y/2.png", "z/3.png")]
    assert sorted(listed) == [str(tmp_path / p) for p in ("x", "x/y", "z")]  # ... and the walk does not again

"""Training in the loop (`python -m shared.runner loop`): the annotations reader (malformed lines named by
number, rejected / ignored counted, a partial last line left for later), rounds end to end for a classifier
and a detector (shard sets, runs, exports, rounds.csv, garbage collection), and REAL kills: a subprocess
SIGKILLed after a round's shards are published, during its finetune and after its export, each followed by
the same command, with no example ingested twice, none lost and one export per round. Tiny models (a
two-layer classifier, a width-4 ResNet detector at 48 px) keep each training run to seconds."""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import KILLING_RUNNER, REPO, TINY_MODEL, tiny_tree

from shared import annotations, runs

CLASSES = ["class_0", "class_1", "class_2", "class_3"]  # the synthetic source's names, so the source run's


# ---------------------------------------------------------------- helpers


def png(path: Path, seed: int, cls: int = 0, size: int = 16, mode: str = "RGB") -> Path:
    """A small image whose class shows in one channel's brightness (learnable)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    pixels[..., cls % 3] += 120 + 30 * (cls // 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def classification_lines(folder: Path, first: int, count: int, answer: str = "accept") -> list[str]:
    """`count` tasks with images in folder/img (relative paths), labels cycling through the classes."""
    lines = []
    for i in range(first, first + count):
        png(folder / "img" / f"{i}.png", i, i % len(CLASSES))
        lines.append(json.dumps({"image": f"img/{i}.png", "answer": answer, "label": CLASSES[i % len(CLASSES)]}))
    return lines


def append(path: Path, lines: list[str], end: str = "\n") -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + end)


def count_records(folder: Path, pattern: str) -> int:
    import tensorflow as tf

    files = sorted(str(p) for p in folder.glob(pattern))
    return sum(1 for _ in tf.data.TFRecordDataset(files)) if files else 0


def exported_versions(export_dir: Path, name: str) -> list[int]:
    from shared.export import versions

    return sorted(versions(export_dir / name))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[runs.Run, dict]:
    """A finished tiny classification run (4 synthetic classes, 16 px) the loops start from, and its tree."""
    from shared.config import load_config
    from shared.lifecycle import train

    base = tmp_path_factory.mktemp("loop_source")
    (base / "tiny").mkdir()
    (base / "tiny" / "model.py").write_text(TINY_MODEL)
    tree = tiny_tree(base / "runs", data={"synthetic_train": 64, "synthetic_test": 32},
                     train={"epochs": 1, "batch_size": 8})
    tree["model"] = {"name": "tiny", "path": str(base / "tiny")}
    run = train(load_config(tree=tree), argv=["pytest"])
    assert run.class_names() == CLASSES
    return run, tree


def classification_recipe(tmp_path: Path, tree: dict, **loop) -> Path:
    """A recipe file of the source's model and sizes, with runs in tmp_path/runs and a held-out file."""
    held_out = tmp_path / "heldout"
    (held_out / "eval.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (held_out / "eval.jsonl").write_text("\n".join(classification_lines(held_out, 1000, 8)) + "\n")
    recipe = {**tree, "run": {"dir": str(tmp_path / "runs"), "notes": "recipe notes"},
              "loop": {"steps": 4, "eval": str(held_out / "eval.jsonl"), "tolerance": None, **loop}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def state_of(loop_dir: Path) -> dict:
    return json.loads((loop_dir / "state.json").read_text())


# ---------------------------------------------------------------- the annotations reader


def test_malformed_lines_are_named_by_number_and_skipped_rejected_and_ignored_counted(tmp_path):
    good = classification_lines(tmp_path, 0, 2)
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    inline = base64.b64encode((tmp_path / "img" / "0.png").read_bytes()).decode()
    lines = [
        good[0],                                                                      # 1 accepted
        "{not json",                                                                  # 2
        json.dumps({"answer": "accept", "label": "class_0"}),                         # 3 no image
        json.dumps({"image": "img/1.png", "answer": "accept", "label": "zebra"}),     # 4 unknown label
        json.dumps({"image": "img/broken.png", "answer": "accept", "label": "class_1"}),  # 5 unreadable
        json.dumps({"image": "img/nowhere.png", "answer": "accept", "label": "class_1"}),  # 6 missing file
        json.dumps({"image": "img/1.png", "answer": "maybe", "label": "class_1"}),    # 7 unknown answer
        json.dumps({"image": "img/1.png", "answer": "reject", "label": "class_2"}),   # 8 rejected
        json.dumps({"image": "img/1.png", "answer": "ignore"}),                       # 9 ignored
        "",                                                                           # 10 blank: nothing
        json.dumps({"image": f"data:image/png;base64,{inline}", "answer": "accept", "label": "class_3"}),  # 11
        json.dumps(["a", "list"]),                                                    # 12
    ]
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(lines) + "\n")
    batch = annotations.read_new(path, 0, 0, "classification", CLASSES)
    assert (batch.lines, batch.accepted, batch.rejected, batch.ignored) == (12, 2, 1, 1)
    assert [problem.split(":")[0] for problem in batch.malformed] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 12)]
    assert "'zebra' is not a class" in batch.malformed[2] and "does not decode" in batch.malformed[3]
    assert [(e.line, e.label, e.image_format, e.width) for e in batch.examples] == [(1, 0, "png", 16),
                                                                                   (11, 3, "png", 16)]
    assert batch.examples[0].name == str(tmp_path / "img" / "0.png")  # relative to the annotations file
    assert batch.end_offset == path.stat().st_size
    assert "line 2: not JSON" in batch.describe() and "7 malformed" in batch.describe()


def test_detection_spans_outside_the_image_or_of_unknown_labels_are_malformed(tmp_path):
    png(tmp_path / "a.png", 0, size=40)
    spans = [{"x": 2, "y": 3, "width": 10, "height": 20, "label": "square"},
             {"x": 30, "y": 0, "width": 10.5, "height": 40, "label": "bar"}]  # 0.5 px over: within tolerance
    lines = [json.dumps({"image": "a.png", "answer": "accept", "spans": spans}),
             json.dumps({"image": "a.png", "answer": "accept", "spans": [{**spans[0], "x": 35}]}),
             json.dumps({"image": "a.png", "answer": "accept", "spans": [{**spans[0], "label": "circle"}]}),
             json.dumps({"image": "a.png", "answer": "accept", "spans": [{**spans[0], "width": 0}]}),
             json.dumps({"image": "a.png", "answer": "accept", "spans": "none"}),
             json.dumps({"image": "a.png", "answer": "accept", "spans": []})]  # an image without objects
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    batch = annotations.read_new(tmp_path / "tasks.jsonl", 0, 0, "detection", ["square", "bar"])
    assert [p.split(":")[0] for p in batch.malformed] == ["line 2", "line 3", "line 4", "line 5"]
    assert "outside the 40x40 image" in batch.malformed[0] and "'circle'" in batch.malformed[1]
    first = batch.examples[0]
    np.testing.assert_allclose(first.boxes, [[2, 3, 12, 23], [30, 0, 40, 40]])  # xyxy, clipped
    assert first.classes.tolist() == [0, 1] and len(batch.examples[1].boxes) == 0


def test_a_partial_last_line_waits_for_the_next_read(tmp_path):
    lines = classification_lines(tmp_path, 0, 3)
    path = tmp_path / "tasks.jsonl"
    append(path, lines[:2])
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(lines[2][:20])  # the tool is still writing it
    first = annotations.read_new(path, 0, 0, "classification", CLASSES)
    assert (first.lines, first.accepted, first.waiting) == (2, 2, True)
    assert first.end_offset == len(("\n".join(lines[:2]) + "\n").encode())
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(lines[2][20:] + "\n")
    second = annotations.read_new(path, first.end_offset, first.lines, "classification", CLASSES)
    assert (second.lines, second.accepted, second.waiting) == (1, 1, False)
    assert second.examples[0].line == 3 and second.examples[0].label == 2


def test_an_annotations_file_that_shrank_is_refused(tmp_path):
    from shared.errors import UserError

    path = tmp_path / "tasks.jsonl"
    path.write_text("{}\n")
    with pytest.raises(UserError, match="only be appended to"):
        annotations.read_new(path, 100, 5, "classification", CLASSES)


def test_steps_schedule_gives_about_the_steps_in_equal_epochs_of_at_most_one_pass():
    from shared.loop import steps_schedule

    assert steps_schedule(100, 12, 8) == (2, 50)  # 2 batches a pass: 50 epochs of 2
    assert steps_schedule(4, 1000, 8) == (4, 1)  # fewer steps than a pass
    per_epoch, epochs = steps_schedule(10, 24, 8)  # 3 a pass: 4 epochs of 3 = 12, the least above 10
    assert (per_epoch, epochs) == (3, 4) and per_epoch <= 3


def test_the_loop_command_refuses_deblurring_recipes_and_missing_files(tmp_path, capsys):
    from shared import runner

    code = runner.main(["loop", "--config", str(REPO / "models" / "resnet" / "deblur.yaml"), "--annotations",
                        str(tmp_path / "x.jsonl"), "--from", str(tmp_path / "run")])
    assert code == 2 and "loop supports tasks classification, detection, not deblur" in capsys.readouterr().err
    recipe = classification_recipe(tmp_path, tiny_tree(tmp_path / "runs"))
    code = runner.main(["loop", "--config", str(recipe), "--annotations", str(tmp_path / "x.jsonl"), "--from",
                        str(tmp_path / "run")])
    assert code == 2 and "annotations file not found" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "loops").exists()


# ---------------------------------------------------------------- rounds end to end


@pytest.mark.slow
def test_classification_rounds_ingest_train_export_and_collect_garbage(tmp_path, source, capsys):
    from shared import loop as loop_module
    from shared import runner
    from shared.config import load_config

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, keep=2)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 12) + classification_lines(tmp_path, 50, 2, "reject")
           + ["not json"] + classification_lines(tmp_path, 60, 1, "ignore"))
    exports = tmp_path / "exports"
    command = ["loop", "--config", str(recipe), "--annotations", str(tasks), "--from", str(source_run.path),
               "--export-dir", str(exports), "--once"]
    assert runner.main(command) == 0
    out = capsys.readouterr().out
    assert "line 15: not JSON" in out and "round 1: 12 examples" in out

    loop = loop_module.open_loop(load_config(str(recipe)), tasks, source_run.path, exports)
    assert loop.dir == tmp_path / "runs" / "loops" / "tiny-recipe" and loop.export_name == "tiny-recipe"
    results = []
    for round_number in (2, 3):
        append(tasks, classification_lines(tmp_path, 100 * round_number, 6))
        results.append(loop_module.run_round(loop))
    assert [r.round for r in results] == [2, 3] and results[-1].examples == 24
    assert loop_module.run_round(loop).round is None  # nothing new

    state = state_of(loop.dir)
    assert state["totals"] == {"accepted": 24, "rejected": 2, "ignored": 1, "malformed": 1}
    assert (state["round"], state["stage"], state["lines"]) == (3, "done", 28)
    # every accepted example in the data exactly once; keep 2 sets: rounds 1-2 merged
    assert sorted(p.name for p in (loop.dir / "data").iterdir()) == ["merged-0002", "round-0003"]
    assert count_records(loop.dir / "data", "*/train-*") == 24
    assert count_records(loop.dir / "eval", "validation-*") == 8
    # round runs: the newest 2 kept (and the source); versions: the newest 2, the newest served
    round_runs = [entry["run"] for entry in state["history"]]
    assert [Path(p).exists() for p in round_runs] == [False, True, True] and source_run.path.exists()
    assert exported_versions(exports, "tiny-recipe") == [2, 3]
    assert results[-1].exported == exports / "tiny-recipe" / "3"
    with open(loop.dir / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["round"], r["new"], r["examples"], r["exported_version"]) for r in rows] == [
        ("1", "12", "12", "1"), ("2", "6", "18", "2"), ("3", "6", "24", "3")]
    assert all(float(r["seconds"]) > 0 and 0 <= float(r["metric"]) <= 1 for r in rows)
    assert (loop.dir / "rounds.png").stat().st_size > 0
    # each round is a normal run: notes name the loop, round and annotation count; it trained over all sets
    newest = runs.open_run(round_runs[-1])
    notes = (newest.path / "notes.md").read_text()
    assert f"loop {loop.dir}, round 3: 24 annotated examples (6 new" in notes and "recipe notes" in notes
    recorded = newest.config_dict()
    assert recorded["init"]["from_run"] == round_runs[1] and recorded["loop"]["dir"] == str(loop.dir)
    assert recorded["data"]["source"] == "tfrecord" and newest.test_metrics()["examples"] == 8
    first = runs.open_run(Path(round_runs[1]))
    assert first.config_dict()["init"]["from_run"] == round_runs[0]


@pytest.mark.slow
def test_a_metric_that_falls_beyond_the_tolerance_is_not_exported(tmp_path, source):
    from shared import loop as loop_module
    from shared.config import load_config

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, tolerance=0.0)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 8))
    loop = loop_module.open_loop(load_config(str(recipe)), tasks, source_run.path, tmp_path / "exports")
    first = loop_module.run_round(loop)
    state = state_of(loop.dir)
    state["served"]["metric"] = 2.0  # a served round better than any top-1: the next one falls below it
    (loop.dir / "state.json").write_text(json.dumps(state))
    append(tasks, classification_lines(tmp_path, 20, 4))
    second = loop_module.run_round(loop)
    assert first.exported is not None and second.exported is None
    assert exported_versions(tmp_path / "exports", loop.export_name) == [1]
    assert state_of(loop.dir)["served"]["round"] == 1


def detection_image(path: Path, seed: int, boxes: list[tuple[int, int, int, int]], size: int = 48) -> Path:
    """A dark grey image with bright filled rectangles (x, y, width, height)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 40, (size, size)).astype(np.uint8)
    for x, y, w, h in boxes:
        pixels[y:y + h, x:x + w] = 220
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def detection_lines(folder: Path, first: int, count: int) -> list[str]:
    lines = []
    for i in range(first, first + count):
        rng = np.random.default_rng(i)
        x, y = (int(v) for v in rng.integers(0, 24, 2))
        box = (x, y, 16, 8) if i % 2 else (x, y, 12, 12)
        detection_image(folder / "img" / f"{i}.png", i, [box])
        spans = [{"x": box[0], "y": box[1], "width": box[2], "height": box[3], "label": ["square", "bar"][i % 2]}]
        lines.append(json.dumps({"image": f"img/{i}.png", "answer": "accept", "spans": spans}))
    return lines


@pytest.mark.slow
def test_a_detection_round_end_to_end(tmp_path):
    from test_detection_runner import SIZE, TINY, classification_run

    from shared import runner
    from shared.detection.datasets import read_tfod_records

    backbone = classification_run(tmp_path / "backbone_runs", width=4)
    (tmp_path / "classes.txt").write_text("square\nbar\n")
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "eval.jsonl").write_text("\n".join(detection_lines(tmp_path / "heldout", 500, 4)) + "\n")
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, detection_lines(tmp_path, 0, 8))
    overrides = [*TINY, "train.batch_size=4", f"run.dir={tmp_path / 'runs'}", "loop.steps=3", "loop.tolerance=null",
                 f"loop.eval={tmp_path / 'heldout' / 'eval.jsonl'}", f"detection.label_map={tmp_path / 'classes.txt'}"]
    command = ["loop", "--config", str(REPO / "models" / "resnet" / "detect.yaml"), "--annotations", str(tasks),
               "--from", str(backbone.path), "--export-dir", str(tmp_path / "exports"),
               *[arg for item in overrides for arg in ("--set", item)]]
    assert runner.main(command) == 0
    loop_dir = tmp_path / "runs" / "loops" / "resnet-detect"
    state = state_of(loop_dir)
    assert (state["round"], state["stage"], state["examples"]) == (1, "done", 8)
    train = read_tfod_records(str(loop_dir / "data" / "*" / "train-*.tfrecord"), loop_dir / "label_map.pbtxt")
    assert train.class_names == ["square", "bar"] and len(train) == 8 and train.num_boxes == 8
    assert train[0].width == SIZE and train[1].classes.tolist() == [1]
    run = runs.open_run(state["history"][0]["run"])
    metrics = run.test_metrics()
    assert run.config_dict()["task"] == "detection" and metrics["examples"] == 4 and "mAP" in metrics
    assert state["history"][0]["metric"] == pytest.approx(metrics["mAP"])
    assert exported_versions(tmp_path / "exports", "resnet-detect") == [1]
    assert (tmp_path / "exports" / "resnet-detect" / "1" / "saved_model.pb").is_file()
    assert (loop_dir / "rounds.csv").read_text().splitlines()[1].startswith("1,8,8,")  # round, new, examples


# ---------------------------------------------------------------- kills


def killed_at(kill_at: str, command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", KILLING_RUNNER, *command], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "KILL_AT": kill_at})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_kills_at_each_commit_point_of_a_round_lose_nothing_and_duplicate_nothing(tmp_path, source, capsys):
    from shared import runner

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, keep=1)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 10) + classification_lines(tmp_path, 40, 2, "reject"))
    exports = tmp_path / "exports"
    command = ["loop", "--config", str(recipe), "--annotations", str(tasks), "--from", str(source_run.path),
               "--export-dir", str(exports), "--once"]
    loop_dir = tmp_path / "runs" / "loops" / "tiny-recipe"

    # 1. after the round's shards are published, before the state consumes their lines
    killed_at("round-0001:after:1", command)
    assert state_of(loop_dir)["round"] == 0 and state_of(loop_dir)["offset"] == 0
    assert count_records(loop_dir / "data" / "round-0001", "train-*") == 10
    append(tasks, classification_lines(tmp_path, 20, 2))  # arrives meanwhile: the redone round takes it too

    # 2. during the finetune (its first epoch checkpoint written)
    killed_at("epoch-0001.keras:after:1", command)
    state = state_of(loop_dir)
    assert (state["round"], state["stage"], state["examples"]) == (1, "ingested", 12)
    assert count_records(loop_dir / "data", "*/train-*") == 12
    dead_attempt = sorted((tmp_path / "runs" / "tiny").iterdir())[-1]
    assert runs.Run(dead_attempt).status()["status"] == "running"

    # 3. after the export is published, before the state says so
    killed_at("1:after:1", command)
    state = state_of(loop_dir)
    assert state["stage"] == "trained" and exported_versions(exports, "tiny-recipe") == [1]

    # the same command finishes the round: the export found again, not made twice
    assert runner.main(command) == 0
    assert "round 1: 12 examples" in capsys.readouterr().out
    state = state_of(loop_dir)
    assert (state["round"], state["stage"], state["examples"], state["lines"]) == (1, "done", 12, 14)
    assert state["totals"]["accepted"] == 12 and state["totals"]["rejected"] == 2
    assert [entry["round"] for entry in state["history"]] == [1]
    assert exported_versions(exports, "tiny-recipe") == [1]
    assert count_records(loop_dir / "data", "*/train-*") == 12
    assert not list(loop_dir.rglob(".partial-*"))
    # garbage: the killed attempt's run went; the round's run (the newest) and the source stay
    assert not dead_attempt.exists() and Path(state["history"][0]["run"]).is_dir() and source_run.path.is_dir()

    # the next round after a kill between its publish and its commit: the same folder, replaced
    append(tasks, classification_lines(tmp_path, 60, 3))
    killed_at("round-0002:after:1", command)
    assert runner.main(command) == 0
    state = state_of(loop_dir)
    assert (state["round"], state["examples"]) == (2, 15)
    assert count_records(loop_dir / "data", "*/train-*") == 15
    assert exported_versions(exports, "tiny-recipe") == [2]  # keep 1: the served one
    assert [Path(entry["run"]).is_dir() for entry in state["history"]] == [False, True]
    assert runner.main(command) == 0 and "no new accepted annotations" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_while_watching_stops_with_nothing_half_way(tmp_path, source):
    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, poll_seconds=0.2, min_new=5)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 2))  # fewer than min_new: it waits
    process = subprocess.Popen([sys.executable, "-m", "shared.runner", "loop", "--config", str(recipe),
                                "--annotations", str(tasks), "--from", str(source_run.path), "--export-dir",
                                str(tmp_path / "exports"), "--watch"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    loop_dir = tmp_path / "runs" / "loops" / "tiny-recipe"
    for line in process.stdout:
        if "waiting: 2 of 5" in line:  # SIGTERM's handler is in place, the lines were read
            break
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "rerun the same command" in err
    state = state_of(loop_dir)
    assert (state["round"], state["offset"], state["stage"]) == (0, 0, "done")  # the 2 lines wait, unconsumed


@pytest.mark.slow
def test_the_recipes_test_split_is_the_held_out_set_when_loop_eval_is_null(tmp_path, source):
    import shutil

    import tensorflow as tf

    from shared import loop as loop_module
    from shared.config import load_config
    from shared.errors import UserError

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, eval=None)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("")
    loop = loop_module.open_loop(load_config(str(recipe)), tasks, source_run.path, tmp_path / "exports")
    result = loop_module.run_round(loop)
    assert result.round is None and result.describe() == "no new accepted annotations"
    shards = sorted((loop.dir / "eval").glob("validation-*"))
    assert count_records(loop.dir / "eval", "validation-*") == 32  # the synthetic test split, as PNGs
    from shared.data.tfrecord import FEATURES

    record = next(iter(tf.data.TFRecordDataset([str(p) for p in shards])))
    example = tf.io.parse_single_example(record, FEATURES)
    assert tf.io.decode_png(example["image/encoded"]).shape == (16, 16, 3)
    assert 0 <= int(example["image/class/label"]) < 4
    written = shards[0].stat().st_mtime_ns
    loop_module.run_round(loop)
    assert shards[0].stat().st_mtime_ns == written  # ingested once

    other = tmp_path / "other_runs" / "tiny" / "v0001"
    shutil.copytree(source_run.path, other)
    with pytest.raises(UserError, match="--from .* to continue it"):
        loop_module.run_round(loop_module.open_loop(load_config(str(recipe)), tasks, other, tmp_path / "exports"))


def test_task_lines_written_for_an_annotator_read_back_as_the_same_examples(tmp_path):
    png(tmp_path / "a.png", 0, size=40)
    path = tmp_path / "tasks.jsonl"
    path.write_text(annotations.task_line("a.png", "accept", spans=annotations.spans_of(
        [[2, 3, 12, 23]], ["bar"], scores=[0.9])) + annotations.task_line("a.png", score=0.5, label="square"))
    batch = annotations.read_new(path, 0, 0, "detection", ["square", "bar"])
    assert batch.accepted == 1 and batch.malformed == ["line 2: answer is null, not one of accept, reject, ignore"]
    np.testing.assert_allclose(batch.examples[0].boxes, [[2, 3, 12, 23]])
    assert batch.examples[0].classes.tolist() == [1]


def test_a_second_process_on_the_same_loop_folder_is_refused(tmp_path):
    from shared import loop as loop_module
    from shared.config import load_config
    from shared.errors import UserError

    loop_dir = tmp_path / "loop"
    loop_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom shared.locks import folder_writer\n"
                               f"with folder_writer({str(loop_dir)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        loop = loop_module.Loop(load_config(tree=tiny_tree(tmp_path / "runs")), tmp_path / "tasks.jsonl",
                                tmp_path / "run", tmp_path / "exports", loop_dir, "loop")
        with pytest.raises(UserError, match=f"is being written by pid {holder.pid}"):
            loop_module.run_round(loop)
        assert not (loop_dir / "state.json").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_a_full_disk_while_publishing_a_round_leaves_its_lines_unconsumed(tmp_path, source, monkeypatch):
    import errno

    from shared import durable
    from shared import loop as loop_module
    from shared.config import load_config

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 4))
    loop = loop_module.open_loop(load_config(str(recipe)), tasks, source_run.path, tmp_path / "exports")
    fsync_tree = durable.fsync_tree

    def full(path):
        if "round-0001" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        fsync_tree(path)

    monkeypatch.setattr(durable, "fsync_tree", full)
    with pytest.raises(durable.DiskFull, match="disk full while writing .*round-0001"):
        loop_module.run_round(loop)
    state = state_of(loop.dir)
    assert (state["round"], state["offset"], state["lines"]) == (0, 0, 0)
    assert not (loop.dir / "data" / "round-0001").exists() and not list(loop.dir.rglob(".partial-*"))
    monkeypatch.setattr(durable, "fsync_tree", fsync_tree)
    result = loop_module.run_round(loop)  # room again: the same lines make round 1
    assert (result.round, result.examples) == (1, 4)
    assert count_records(loop.dir / "data", "*/train-*") == 4

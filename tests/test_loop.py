"""Training in the loop (`python -m shared.runner loop`): the annotations reader (malformed lines named by
number, rejected / ignored counted, a partial last line left for later), rounds end to end for a classifier
and a detector (shard sets, runs, exports, rounds.csv, garbage collection), and REAL kills: a subprocess
SIGKILLed after a round's shards are published, during its finetune and after its export, each followed by
the same command, with no example ingested twice, none lost and one export per round. Tiny models (a
two-layer classifier, a width-4 ResNet detector at 48 px) keep each training run to seconds."""

from __future__ import annotations

import base64
import contextlib
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

import forked
from conftest import KILLING_RUNNER, REPO, TINY_MODEL, tiny_tree

from shared import annotations, runs
from shared.loop import ingest as loop_ingest
from shared.loop import state as loop_state
from shared.classification.loop import ClassLabel
from shared.detection.loop import Spans, spans_of
from shared.tasks import task_for

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
              # continued rounds of loop.steps (not the defaults, restart and loop.passes): what these tests check
              "loop": {"steps": 4, "eval": str(held_out / "eval.jsonl"), "tolerance": None, "schedule": "cosine",
                       "passes": None, **loop}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def annotated_loop(tmp_path: Path, source, accepted: int, **loop):
    """(a loop of `classification_recipe(**loop)` from the source run, its annotations file) whose file holds
    `accepted` accepted tasks."""
    from shared.config import load_config
    from shared.loop import rounds as loop_module

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, **loop)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, accepted))
    return loop_module.open_loop(task_for(load_config(str(recipe))), tasks, source_run.path,
                                 tmp_path / "exports"), tasks


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
    batch = annotations.read_new(path, 0, 0, ClassLabel(), CLASSES)
    assert (batch.lines, batch.accepted, batch.rejected, batch.ignored) == (12, 2, 1, 1)
    assert [problem.split(":")[0] for problem in batch.malformed] == [f"line {n}" for n in (2, 3, 4, 5, 6, 7, 12)]
    assert "'zebra' is not a class" in batch.malformed[2] and "img/broken.png" in batch.malformed[3]
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
    batch = annotations.read_new(tmp_path / "tasks.jsonl", 0, 0, Spans(), ["square", "bar"])
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
    first = annotations.read_new(path, 0, 0, ClassLabel(), CLASSES)
    assert (first.lines, first.accepted, first.waiting) == (2, 2, True)
    assert first.end_offset == len(("\n".join(lines[:2]) + "\n").encode())
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(lines[2][20:] + "\n")
    second = annotations.read_new(path, first.end_offset, first.lines, ClassLabel(), CLASSES)
    assert (second.lines, second.accepted, second.waiting) == (1, 1, False)
    assert second.examples[0].line == 3 and second.examples[0].label == 2


def test_an_annotations_file_that_shrank_is_refused(tmp_path):
    from shared.errors import UserError

    path = tmp_path / "tasks.jsonl"
    path.write_text("{}\n")
    with pytest.raises(UserError, match="only be appended to"):
        annotations.read_new(path, 100, 5, ClassLabel(), CLASSES)


def test_steps_schedule_gives_about_the_steps_in_equal_epochs_of_at_most_one_pass():
    from shared.loop.rounds import steps_schedule

    assert steps_schedule(100, 12, 8) == (2, 50)  # 2 batches a pass: 50 epochs of 2
    assert steps_schedule(4, 1000, 8) == (4, 1)  # fewer steps than a pass
    per_epoch, epochs = steps_schedule(10, 24, 8)  # 3 a pass: 4 epochs of 3 = 12, the least above 10
    assert (per_epoch, epochs) == (3, 4) and per_epoch <= 3


@pytest.mark.parametrize("lr", [{"schedule": "cosine", "warmup_epochs": 0.5},
                                {"schedule": "exponential", "decay_epochs": 1.5, "gamma": 0.5, "warmup_epochs": 0.3},
                                {"schedule": "polynomial", "power": 2.0}, {"schedule": "constant"}])
def test_a_rounds_epochs_become_one_epoch_of_their_steps_at_the_same_rates(tmp_path, lr):
    """One checkpoint a round: its passes trained as one epoch, the optimizer's rate the same at every step."""
    from shared import optim
    from shared.config import load_config
    from shared.loop.rounds import as_one_epoch, round_steps

    config = load_config(tree=tiny_tree(tmp_path, train={"epochs": 25, "steps_per_epoch": 4, "batch_size": 8,
                                                         "lr": {"base": 0.1, **lr}}))
    one = as_one_epoch(task_for(config), config)
    assert (one.train.epochs, one.train.steps, round_steps(one.train), round_steps(config.train)) == (1, 100, 100, 100)

    def rates(train, steps_per_epoch: int) -> list[float]:
        schedule = optim.learning_rate(train, steps_per_epoch)
        return [float(schedule(step)) if callable(schedule) else schedule for step in range(101)]

    assert rates(one.train, 100) == pytest.approx(rates(config.train, 4))


@pytest.mark.parametrize("train", [{"lr": {"schedule": "step", "milestones": [10]}},
                                   {"lr": {"schedule": "plateau"}}, {"early_stopping": {"monitor": "loss"}},
                                   {"epochs": 1}])
def test_a_round_whose_epochs_mean_more_than_a_length_keeps_them(tmp_path, train):
    from shared.config import load_config
    from shared.loop.rounds import as_one_epoch

    config = load_config(tree=tiny_tree(tmp_path, train={"epochs": 25, "steps_per_epoch": 4, **train}))
    assert as_one_epoch(task_for(config), config) is config


def test_train_steps_needs_one_epoch(tmp_path):
    from shared.config import load_config
    from shared.errors import UserError

    with pytest.raises(UserError, match="train.steps is 10 but train.epochs is 3"):
        load_config(tree=tiny_tree(tmp_path, train={"epochs": 3, "steps": 10}))


def test_a_from_run_with_the_recipes_statistics_differs_in_nothing(tmp_path):
    """The run's config.yaml holds lists, the recipe's frozen config tuples: the same numbers are no difference."""
    from shared.config import load_config
    from shared.loop.rounds import follow_run

    tree = tiny_tree(tmp_path / "runs", data={"mean": [120.0, 110.0, 100.0], "std": [60.0, 61.0, 62.0]})
    config = load_config(tree=tree)
    folder = tmp_path / "runs" / "resnet" / "v0001"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config.dump())
    changes, differences = follow_run(config, runs.open_run(folder))
    assert differences == [] and "data.mean" not in changes


def test_a_round_is_judged_worse_in_the_sense_of_its_tasks_measure():
    from shared.loop.rounds import worse_by

    assert worse_by(0.5, 0.7, higher_is_better=True) == pytest.approx(0.2)  # top-1 fell
    assert worse_by(0.7, 0.5, higher_is_better=False) == pytest.approx(0.2)  # a loss rose
    assert worse_by(0.5, 0.7, higher_is_better=False) == pytest.approx(-0.2)  # a loss fell: better


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
    from shared.loop import rounds as loop_module
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

    loop = loop_module.open_loop(task_for(load_config(str(recipe))), tasks, source_run.path, exports)
    assert loop.dir == tmp_path / "runs" / "loops" / "tiny-recipe" and loop.export_name == "tiny-recipe"
    results = []
    for round_number in (2, 3):
        append(tasks, classification_lines(tmp_path, 100 * round_number, 6))
        results.append(loop_module.run_round(loop))
    assert [r.round for r in results] == [2, 3] and results[-1].examples == 24
    assert loop_module.run_round(loop).round is None  # nothing new

    state = state_of(loop.dir)
    assert state["totals"] == {"accepted": 24, "rejected": 2, "ignored": 1, "malformed": 1, "duplicates": 0,
                               "replaced": 0, "withdrawn": 0}
    assert (state["round"], state["stage"], state["lines"]) == (3, "done", 28)
    # every accepted example in the data exactly once; keep 2 sets: rounds 1-2 merged
    assert len(state["sets"]) == 2 and sorted(p.name for p in (loop.dir / "data").iterdir()) == sorted(state["sets"])
    assert count_records(loop.dir / "data", "*/train-*") == 24
    assert count_records(loop.dir / "eval", "validation-*") == 8
    # round runs: the newest 2 kept (and the source); versions: the newest 2, the newest served
    round_runs = [entry["run"] for entry in state["history"] if entry["round"] > 0]
    assert [Path(p).exists() for p in round_runs] == [False, True, True] and source_run.path.exists()
    assert exported_versions(exports, "tiny-recipe") == [2, 3]
    assert results[-1].exported == exports / "tiny-recipe" / "3"
    with open(loop.dir / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["round"], r["new"], r["examples"], r["exported_version"]) for r in rows] == [
        ("0", "0", "0", ""), ("1", "12", "12", "1"), ("2", "6", "18", "2"), ("3", "6", "24", "3")]
    assert all(float(r["seconds"]) > 0 and 0 <= float(r["metric"]) <= 1 for r in rows)
    # round 0: the --from run's top-1 on the held-out images, as predicting them one by one gives it
    from shared.classification.predict import Predictor
    from shared.tasks import rebuild

    held_out = [(tmp_path / "heldout" / "img" / f"{i}.png", CLASSES[i % 4]) for i in range(1000, 1008)]
    predictions = Predictor.from_run(source_run, *rebuild(source_run)).predict([str(path) for path, _ in held_out])
    top1 = np.mean([p.labels[0] == label for p, (_, label) in zip(predictions, held_out)])
    assert rows[0]["run"] == str(source_run.path) and float(rows[0]["metric"]) == pytest.approx(top1)
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
def test_a_round_reads_the_examples_new_since_the_last_round_oversample_new_times(tmp_path, source, capsys):
    from shared.lifecycle import test as test_run
    from shared.loop import rounds as loop_module

    loop, tasks = annotated_loop(tmp_path, source, 12, oversample_new=3)
    first = loop_module.run_round(loop)
    assert "12 training / 0 validation" in capsys.readouterr().out  # round 1: every example is new, read once
    assert runs.open_run(first.run).config_dict()["data"]["oversample"] == {}
    assert state_of(loop.dir)["fresh"] == []
    append(tasks, classification_lines(tmp_path, 100, 6))
    second = loop_module.run_round(loop)
    state = state_of(loop.dir)
    newest = state["sets"][-1]
    recorded = runs.open_run(second.run).config_dict()["data"]
    assert recorded["oversample"] == {f"data/{newest}/train-*": 3}
    assert "30 training / 0 validation" in capsys.readouterr().out  # 12 old once, 6 new three times
    assert state["fresh"] == []
    # the run re-tests after its newest set is gone (merged by the loop later): said in one line, read once
    merged = loop.dir / "data" / newest
    merged.rename(loop.dir / "data" / "set-999999")
    assert test_run(second.run, draw=False)["examples"] == 8
    assert f"data.oversample 'data/{newest}/train-*' matches none of the train shards" in capsys.readouterr().out


@pytest.mark.slow
def test_a_metric_that_falls_beyond_the_tolerance_is_not_exported(tmp_path, source):
    from shared.loop import rounds as loop_module

    loop, tasks = annotated_loop(tmp_path, source, 8, tolerance=0.0)
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
    from conftest import tiny_backbone, tiny_backbone_model
    from test_detection_runner import SIZE, TINY, classification_run

    from shared import runner
    from shared.detection.tfod import read_tfod_records

    # the round is what is checked: from a classification run of the tiny backbone, quick to trace and export
    backbone = classification_run(tmp_path / "backbone_runs", width=4, model=tiny_backbone_model(tmp_path))
    (tmp_path / "classes.txt").write_text("square\nbar\n")
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "eval.jsonl").write_text("\n".join(detection_lines(tmp_path / "heldout", 500, 4)) + "\n")
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, detection_lines(tmp_path, 0, 8))
    overrides = [*TINY, tiny_backbone(tmp_path), "train.batch_size=4", f"run.dir={tmp_path / 'runs'}",
                 "loop.steps=3", "loop.tolerance=null",
                 f"loop.eval={tmp_path / 'heldout' / 'eval.jsonl'}", f"detection.label_map={tmp_path / 'classes.txt'}"]
    command = ["loop", "--config", str(REPO / "models" / "resnet" / "detect.yaml"), "--annotations", str(tasks),
               "--from", str(backbone.path), "--export-dir", str(tmp_path / "exports"),
               *[arg for item in overrides for arg in ("--set", item)]]
    assert runner.main(command) == 0
    loop_dir = tmp_path / "runs" / "loops" / "tiny_backbone-detect"
    state = state_of(loop_dir)
    assert (state["round"], state["stage"], state["examples"]) == (1, "done", 8)
    train = read_tfod_records(str(loop_dir / "data" / "*" / "train-*.tfrecord"), loop_dir / "label_map.pbtxt")
    assert train.class_names == ["square", "bar"] and len(train) == 8 and train.num_boxes == 8
    assert train[0].width == SIZE and train[1].classes.tolist() == [1]
    run = runs.open_run(state["history"][1]["run"])
    metrics = run.test_metrics()
    assert run.config_dict()["task"] == "detection" and metrics["examples"] == 4 and "mAP" in metrics
    assert state["history"][1]["metric"] == pytest.approx(metrics["mAP"])
    assert exported_versions(tmp_path / "exports", "tiny_backbone-detect") == [1]
    assert (tmp_path / "exports" / "tiny_backbone-detect" / "1" / "saved_model.pb").is_file()
    rows = (loop_dir / "rounds.csv").read_text().splitlines()
    assert rows[1] == f"0,0,0,,,{state['history'][0]['seconds']},{backbone.path}"  # a backbone: no round-0 mAP
    assert rows[2].startswith("1,8,8,")  # round, new, examples


# ---------------------------------------------------------------- kills


def killed_at(kill_at: str, command: list[str]) -> subprocess.CompletedProcess:
    result = forked.run([sys.executable, "-c", KILLING_RUNNER, *command], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "KILL_AT": kill_at})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_kills_at_each_commit_point_of_a_round_lose_nothing_and_duplicate_nothing(tmp_path, source, capsys):
    from shared import runner
    from shared.loop.rounds import round_steps

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, keep=1)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 10) + classification_lines(tmp_path, 40, 2, "reject"))
    exports = tmp_path / "exports"
    command = ["loop", "--config", str(recipe), "--annotations", str(tasks), "--from", str(source_run.path),
               "--export-dir", str(exports), "--once"]
    loop_dir = tmp_path / "runs" / "loops" / "tiny-recipe"

    # 1. after the round's shards are published, before the state consumes their lines
    killed_at("set-000001:after:1", command)
    assert state_of(loop_dir)["round"] == 0 and state_of(loop_dir)["offset"] == 0
    assert count_records(loop_dir / "data" / "set-000001", "train-*") == 10
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
    assert [entry["round"] for entry in state["history"]] == [0, 1]
    assert exported_versions(exports, "tiny-recipe") == [1]
    assert count_records(loop_dir / "data", "*/train-*") == 12
    assert not list(loop_dir.rglob(".partial-*"))
    # garbage: the killed attempt's run went; the round's run (the newest) and the source stay
    assert not dead_attempt.exists() and Path(state["history"][1]["run"]).is_dir() and source_run.path.is_dir()

    # the next round after a kill between its publish and its commit: the lines read again
    append(tasks, classification_lines(tmp_path, 60, 3))
    killed_at("set-000002:after:1", command)
    # round 2 continues round 1's training: killed during it, it starts again from round 1's last checkpoint
    # with that checkpoint's optimizer state (its step count: round 1's steps)
    round_one = runs.Run(Path(state["history"][1]["run"]))
    carried = {"checkpoint": str(round_one.last_checkpoint()),
               "step": round_steps(round_one.config_dict()["train"])}
    assert carried["step"] > 0
    killed_at("epoch-0001.keras:after:1", command)
    dead_attempt = sorted((tmp_path / "runs" / "tiny").iterdir())[-1]
    assert runs.Run(dead_attempt).status()["optimizer_from"] == carried
    assert runner.main(command) == 0
    state = state_of(loop_dir)
    round_two = runs.Run(Path(state["history"][2]["run"]))
    assert round_two.path != dead_attempt and round_two.status()["optimizer_from"] == carried
    assert round_two.config_dict()["init"]["optimizer_state"] is True
    assert round_two.config_dict()["train"]["lr"]["start_step"] == carried["step"]
    assert (state["round"], state["examples"]) == (2, 15)
    assert count_records(loop_dir / "data", "*/train-*") == 15
    assert exported_versions(exports, "tiny-recipe") == [2]  # keep 1: the served one
    assert [Path(entry["run"]).is_dir() for entry in state["history"]] == [True, False, True]  # round 0: --from
    assert runner.main(command) == 0 and "no new accepted annotations" in capsys.readouterr().out


@pytest.mark.slow
def test_sigterm_while_watching_stops_with_nothing_half_way(tmp_path, source):
    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, poll_seconds=0.2, min_new=5)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 2))  # fewer than min_new: it waits
    process = forked.popen([sys.executable, "-m", "shared.runner", "loop", "--config", str(recipe),
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
    assert (state["round"], state["pending"], state["stage"]) == (0, 2, "done")  # ingested, waiting for a round
    assert state["offset"] == tasks.stat().st_size


@pytest.mark.slow
def test_the_recipes_test_split_is_the_held_out_set_when_loop_eval_is_null(tmp_path, source):
    import shutil

    import tensorflow as tf

    from shared.loop import rounds as loop_module
    from shared.config import load_config
    from shared.errors import UserError

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, eval=None)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("")
    loop = loop_module.open_loop(task_for(load_config(str(recipe))), tasks, source_run.path, tmp_path / "exports")
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
        loop_module.run_round(loop_module.open_loop(task_for(load_config(str(recipe))), tasks, other,
                                                    tmp_path / "exports"))


def test_a_run_of_fixed_size_arrays_is_judged_on_the_whole_images_it_saw(tmp_path, source):
    """The source run (synthetic arrays, resized whole) on the loop's held-out set, its own test split written as
    PNGs: round 0 is the run's own test figure, not that of the central crop the eval view takes of encoded
    images (Fashion-MNIST's quick run: 0.81 on its test images, 0.71 on the same images cropped), and the rounds
    follow it there."""
    from shared.loop import rounds as loop_module
    from shared.config import load_config

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, eval=None)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("")
    config = load_config(str(recipe))
    loop = loop_module.open_loop(task_for(config), tasks, source_run.path, tmp_path / "exports")
    loop_module.run_round(loop)  # writes the held-out set: the recipe's test split
    tested = []
    original = loop_module.lifecycle.test

    def recording(run, changes=None, **kwargs):
        metrics = original(run, changes=changes, **kwargs)
        tested.append((changes, metrics))
        return metrics

    loop_module.lifecycle.test = recording
    try:
        assert loop_module.evaluate_run(loop, source_run) is not None
    finally:
        loop_module.lifecycle.test = original
    ((changes, metrics),) = tested
    assert changes["data.crop_fraction"] == 1.0 and config.data.crop_fraction == 0.875
    own = json.loads((source_run.path / "test_metrics.json").read_text())
    assert metrics["loss"] == pytest.approx(own["loss"], abs=1e-5) and metrics["top1"] == own["top1"]
    assert loop_module.follow_run(config, source_run)[0]["data.crop_fraction"] == 1.0
    folder, shards = ({"source": source, "path": str(tmp_path)} for source in ("folder", "tfrecord"))  # as recorded
    assert loop_module.whole_view(folder) == loop_module.whole_view(shards) == {}


def test_task_lines_written_for_an_annotator_read_back_as_the_same_examples(tmp_path):
    png(tmp_path / "a.png", 0, size=40)
    path = tmp_path / "tasks.jsonl"
    path.write_text(annotations.task_line("a.png", "accept", spans=spans_of(
        [[2, 3, 12, 23]], ["bar"], scores=[0.9])) + annotations.task_line("a.png", score=0.5, label="square"))
    batch = annotations.read_new(path, 0, 0, Spans(), ["square", "bar"])
    assert batch.accepted == 1 and batch.malformed == ["line 2: answer is null, not one of accept, reject, ignore"]
    np.testing.assert_allclose(batch.examples[0].boxes, [[2, 3, 12, 23]])
    assert batch.examples[0].classes.tolist() == [1]


def test_a_second_process_on_the_same_loop_folder_is_refused(tmp_path):
    from shared.loop import rounds as loop_module
    from shared.loop.folder import Loop
    from shared.config import load_config
    from shared.errors import UserError

    loop_dir = tmp_path / "loop"
    loop_dir.mkdir()
    # A process of its own that imports no TensorFlow (a tenth of a second), so a plain interpreter.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom shared.locks import folder_writer\n"
                               f"with folder_writer({str(loop_dir)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        loop = Loop(task_for(load_config(tree=tiny_tree(tmp_path / "runs"))), tmp_path / "tasks.jsonl",
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
    from shared.loop import rounds as loop_module
    from shared.config import load_config

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 4))
    loop = loop_module.open_loop(task_for(load_config(str(recipe))), tasks, source_run.path, tmp_path / "exports")
    fsync_tree = durable.fsync_tree

    def full(path):
        if "set-000001" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        fsync_tree(path)

    monkeypatch.setattr(durable, "fsync_tree", full)
    with pytest.raises(durable.DiskFull, match="disk full while writing .*set-000001"):
        loop_module.run_round(loop)
    state = state_of(loop.dir)
    assert (state["round"], state["offset"], state["lines"]) == (0, 0, 0)
    assert not (loop.dir / "data" / "set-000001").exists() and not list(loop.dir.rglob(".partial-*"))
    monkeypatch.setattr(durable, "fsync_tree", fsync_tree)
    result = loop_module.run_round(loop)  # room again: the same lines make round 1
    assert (result.round, result.examples) == (1, 4)
    assert count_records(loop.dir / "data", "*/train-*") == 4


# ---------------------------------------------------------------- identity, chunks, odd paths (issue 22)


def record_labels(folder: Path, pattern: str = "*/train-*") -> list[int]:
    import tensorflow as tf

    from shared.data.tfrecord import FEATURES

    files = sorted(str(p) for p in folder.glob(pattern))
    return sorted(int(tf.io.parse_single_example(record, FEATURES)["image/class/label"])
                  for record in tf.data.TFRecordDataset(files))


def fake_loop(tmp_path: Path, data: dict | None = None, **loop):
    """A loop from a --from run that is only its labels and config (enough to ingest; no round trains), with a
    held-out file whose first image is answered twice (the later label wins there too)."""
    from shared.loop import rounds as loop_module
    from shared.config import load_config

    source = tmp_path / "source_runs" / "tiny" / "v0001"
    source.mkdir(parents=True, exist_ok=True)
    (source / "config.yaml").write_text(yaml.safe_dump({"task": "classification"}))
    (source / "labels.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    held_out = classification_lines(tmp_path / "heldout", 900, 3)
    held_out.append(json.dumps({"image": "img/900.png", "answer": "accept", "label": "class_3"}))
    (tmp_path / "heldout" / "eval.jsonl").write_text("\n".join(held_out) + "\n")
    tree = tiny_tree(tmp_path / "runs", loop={"eval": str(tmp_path / "heldout" / "eval.jsonl"), **loop},
                     data=data or {})
    tasks = tmp_path / "tasks.jsonl"
    tasks.touch()
    return loop_module.open_loop(task_for(load_config(tree=tree)), tasks, source, tmp_path / "exports")


def ingest_only(loop):
    """A run_round that ingests and never trains (a round needs more new answers than there are)."""
    from shared.loop import rounds as loop_module

    result = loop_module.run_round(loop, min_new=10**9)
    assert result.round is None
    return result


def hashed(i: int, label: str, answer: str = "accept", input_hash: int | None = None, task_hash: int | None = None):
    item = {"image": f"img/{i}.png", "answer": answer, "label": label}
    return {**item, "_input_hash": i if input_hash is None else input_hash,
            "_task_hash": 100 + i if task_hash is None else task_hash}


def test_the_answer_table_keeps_the_latest_answer_per_input():
    table = annotations.AnswerTable()
    assert table.take("f1", "img:a", "a|cat", "accept", 1, 0) == (True, None)
    assert table.take("f1", "img:a", "a|cat", "accept", 9, 0) == (False, None)  # the same answer again: skipped
    assert table.take("f2", "img:a", "a|dog", "accept", 2, 1) == (True, 1)  # a new label for the input replaces
    assert table.take("f3", "img:a", "a|cat", "reject", None) == (True, None)  # another question: it stays
    assert table.take("f4", "img:b", "b|cat", "accept", 3, 0) == (True, None)
    assert table.take("f5", "img:b", "b|cat", "ignore", None) == (True, 3)  # the same question: withdrawn
    assert table.take("f6", None, "|x", "reject", None) == (True, None)  # no image: only counted
    assert table.ids() == {2} and table.class_counts(2) == [0, 1]


def test_a_re_exported_file_ingests_only_new_answers_and_the_latest_answer_per_input_wins(tmp_path, capsys):
    loop = fake_loop(tmp_path)
    tasks = loop.annotations
    for i in range(6):
        png(tmp_path / "img" / f"{i}.png", i, i % 4)
    first = [hashed(0, "class_0"), hashed(1, "class_1"), hashed(2, "class_2", "reject")]
    tasks.write_text("".join(json.dumps(item) + "\n" for item in first))
    result = ingest_only(loop)
    state = state_of(loop.dir)
    assert (result.pending, state["examples"], record_labels(loop.dir / "data")) == (2, 2, [0, 1])
    assert count_records(loop.dir / "eval", "validation-*") == 3  # 4 held-out answers, one image twice
    assert "held-out set" in capsys.readouterr().out

    # the tool exports again: the same answers in its own key order and spacing, then new ones, among them a
    # corrected label for image 0 (the same _input_hash, another _task_hash)
    second = first + [hashed(3, "class_3"), hashed(0, "class_3", task_hash=200)]
    tasks.write_text("".join(json.dumps(item, sort_keys=True, separators=(", ", " : ")) + "\n" for item in second))
    batch = ingest_only(loop).batch
    assert "no longer starts with the 3 line(s)" in capsys.readouterr().out
    assert (batch.duplicates, batch.accepted, batch.rejected, batch.replaced) == (3, 2, 0, 1)
    state = state_of(loop.dir)
    assert (state["examples"], state["pending"]) == (3, 4)
    assert record_labels(loop.dir / "data") == [1, 3, 3]  # image 0 once, as class_3
    assert sorted(p.name for p in (loop.dir / "data").iterdir()) == sorted(state["sets"])

    # an edit in place that keeps the size: image 1 relabelled; read from its start again, not mid-line
    text = tasks.read_text()
    tasks.write_text(text.replace('"class_1"', '"class_2"'))
    assert tasks.stat().st_size == len(text.encode())
    batch = ingest_only(loop).batch
    assert "no longer starts with" in capsys.readouterr().out
    assert (batch.duplicates, batch.accepted, batch.replaced, len(batch.malformed)) == (4, 1, 1, 0)
    assert record_labels(loop.dir / "data") == [2, 3, 3]

    # the whole history appended again: nothing new
    with open(tasks, "a") as handle:
        handle.write(tasks.read_text())
    batch = ingest_only(loop).batch
    assert (batch.duplicates, batch.accepted) == (5, 0) and state_of(loop.dir)["examples"] == 3

    # without hashes a task is its image and its answer: a new label replaces, a reject of it withdraws it
    append(tasks, [json.dumps({"image": "img/5.png", "answer": "accept", "label": "class_0"}),
                   json.dumps({"image": "img/5.png", "answer": "accept", "label": "class_1"})])
    batch = ingest_only(loop).batch
    assert (batch.accepted, batch.replaced) == (2, 1) and record_labels(loop.dir / "data") == [1, 2, 3, 3]
    append(tasks, [json.dumps({"image": "img/5.png", "answer": "reject", "label": "class_0"}),  # another question
                   json.dumps({"image": "img/5.png", "answer": "reject", "label": "class_1"})])
    batch = ingest_only(loop).batch
    assert (batch.rejected, batch.withdrawn) == (2, 1) and record_labels(loop.dir / "data") == [2, 3, 3]
    state = state_of(loop.dir)
    assert state["examples"] == 3 == count_records(loop.dir / "data", "*/train-*")
    assert state["class_counts"] == [0, 0, 1, 2]


def test_ingestion_holds_and_commits_one_bounded_chunk_at_a_time(tmp_path, monkeypatch):

    loop = fake_loop(tmp_path)
    ingest_only(loop)  # the loop started: its held-out set written
    append(loop.annotations, classification_lines(tmp_path, 0, 5) + classification_lines(tmp_path, 10, 1, "reject"))
    monkeypatch.setattr(loop_ingest, "CHUNK_BYTES", 1)  # one image a chunk
    held, read_new = [], annotations.read_new

    def reading(*args, **kwargs):
        batch = read_new(*args, **kwargs)
        held.append(len(batch.examples))
        return batch

    commits, commit = [], loop_state.commit
    monkeypatch.setattr(annotations, "read_new", reading)
    monkeypatch.setattr(loop_state, "commit", lambda folder, state: commits.append(state["offset"]) or
                        commit(folder, state))
    result = ingest_only(loop)
    assert held == [1, 1, 1, 1, 1, 0] and result.pending == 5  # the last read: the rejected line
    assert len(commits) == 6 and commits == sorted(set(commits))  # each chunk committed, further each time
    state = state_of(loop.dir)
    assert len(state["sets"]) == 5 and count_records(loop.dir / "data", "*/train-*") == 5


def test_image_fields_name_only_regular_files_within_data_max_image_bytes(tmp_path):
    import threading

    png(tmp_path / "small.png", 0, size=8)
    png(tmp_path / "big.png", 1, size=64)
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "folder.png").mkdir()
    limit = (tmp_path / "small.png").stat().st_size + 10
    inline = base64.b64encode((tmp_path / "big.png").read_bytes()).decode()
    images = ["small.png", "fifo.png", "/dev/zero", "folder.png", "big.png", f"data:image/png;base64,{inline}"]
    (tmp_path / "tasks.jsonl").write_text("".join(
        json.dumps({"image": image, "answer": "accept", "label": "class_0"}) + "\n" for image in images))
    done = []
    reader = threading.Thread(target=lambda: done.append(annotations.read_new(
        tmp_path / "tasks.jsonl", schema=ClassLabel(), class_names=CLASSES, max_image_bytes=limit)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    try:
        assert done, "reading the annotations blocked (on the FIFO?)"
    finally:
        with contextlib.suppress(OSError):  # a reader blocked on the FIFO gets its end of file
            os.close(os.open(tmp_path / "fifo.png", os.O_WRONLY | os.O_NONBLOCK))
    batch = done[0]
    assert batch.accepted == 1 and [p.split(":")[0] for p in batch.malformed] == [f"line {n}" for n in (2, 3, 4, 5, 6)]
    assert "fifo.png is a FIFO, not a regular file" in batch.malformed[0]
    assert "/dev/zero is a device, not a regular file" in batch.malformed[1]
    assert "folder.png is a folder" in batch.malformed[2]
    assert f"above data.max_image_bytes {limit}" in batch.malformed[3]
    assert "data: URI of about" in batch.malformed[4] and f"above data.max_image_bytes {limit}" in batch.malformed[4]


CHUNKED_RUNNER = "import shared.loop.ingest\nshared.loop.ingest.CHUNK_BYTES = 1\n" + KILLING_RUNNER  # a chunk an image


@pytest.mark.slow
def test_kills_between_chunks_and_in_a_rewrite_lose_nothing_and_duplicate_nothing(tmp_path, source, monkeypatch):
    from shared import runner

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 6))
    command = ["loop", "--config", str(recipe), "--annotations", str(tasks), "--from", str(source_run.path),
               "--export-dir", str(tmp_path / "exports"), "--once"]
    loop_dir = tmp_path / "runs" / "loops" / "tiny-recipe"

    def killed(kill_at: str) -> None:
        result = forked.run([sys.executable, "-c", CHUNKED_RUNNER, *command], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "KILL_AT": kill_at})
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]

    killed("state.json:after:3")  # the loop's first state, then two chunks committed
    state = state_of(loop_dir)
    assert (state["pending"], len(state["sets"]), state["lines"]) == (2, 2, 2)
    killed("set-000004:after:1")  # the third chunk committed, the fourth published but not
    state = state_of(loop_dir)
    assert (state["pending"], state["sets"]) == (3, ["set-000001", "set-000002", "set-000003"])
    assert (loop_dir / "data" / "set-000004").is_dir()
    # a corrected label for image 0 (in set-000001): its chunk publishes a new set and set-000001 rewritten
    append(tasks, [json.dumps({"image": "img/0.png", "answer": "accept", "label": "class_2"})])
    killed("state.json:before:4")  # chunks 4-6 committed; the correction's sets published, not committed
    state = state_of(loop_dir)
    assert state["pending"] == 6 and "set-000001" in state["sets"] and len(list((loop_dir / "data").iterdir())) > 6

    monkeypatch.setattr(loop_ingest, "CHUNK_BYTES", 1)
    assert runner.main(command) == 0
    state = state_of(loop_dir)
    assert (state["round"], state["examples"], state["totals"]["accepted"], state["totals"]["replaced"]) == (1, 6, 7, 1)
    assert state["history"][-1]["new"] == 7
    assert record_labels(loop_dir / "data") == [0, 1, 1, 2, 2, 3]  # labels i % 4; image 0: class_2 only
    assert len((loop_dir / "answers.jsonl").read_text().splitlines()) == 7
    assert sorted(p.name for p in (loop_dir / "data").iterdir()) == sorted(state["sets"])


@pytest.mark.slow
def test_no_round_is_exported_below_round_zero_beyond_the_tolerance(tmp_path, source, monkeypatch, capsys):
    from shared.loop import rounds as loop_module
    from shared.config import load_config

    source_run, tree = source
    recipe = classification_recipe(tmp_path, tree, tolerance=0.0)
    tasks = tmp_path / "tasks.jsonl"
    append(tasks, classification_lines(tmp_path, 0, 4))
    loop = loop_module.open_loop(task_for(load_config(str(recipe))), tasks, source_run.path, tmp_path / "exports")
    monkeypatch.setattr(loop_module, "evaluate_run", lambda loop, run: 2.0)  # above any top-1 a round can reach
    result = loop_module.run_round(loop)
    assert result.round == 1 and result.exported is None
    assert "fell more than 0.0 below round 0's (the --from run) 2.0000; nothing is exported" in capsys.readouterr().out
    assert exported_versions(tmp_path / "exports", loop.export_name) == []
    with open(loop.dir / "rounds.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["round"], r["metric"], r["exported_version"], r["run"]) for r in rows][0] == (
        "0", "2.0", "", str(source_run.path))
    assert rows[1]["exported_version"] == "" and state_of(loop.dir)["served"] is None


@pytest.mark.slow
def test_rounds_see_what_the_from_run_saw_count_class_weights_and_print_a_line_a_phase(tmp_path, source, capsys,
                                                                                     monkeypatch):
    import copy

    from shared import runner
    from shared.loop import rounds as loop_module

    rebuilt = []  # the export takes the model the round's test rebuilt: no second build
    monkeypatch.setattr(loop_module, "rebuild", lambda *args, **kwargs: rebuilt.append(args) or 1 / 0)

    source_run, tree = source
    tree = copy.deepcopy(tree)
    tree["data"]["image_size"] = 12  # the source run saw 16
    tree["train"].update(class_weight="auto", verbose=2)  # Keras would print two lines an epoch
    recipe = classification_recipe(tmp_path, tree, steps=6)
    tasks = tmp_path / "tasks.jsonl"
    labels = [0, 0, 0, 1, 1, 2]
    for i, label in enumerate(labels):
        png(tmp_path / "img" / f"{i}.png", i, label)
    append(tasks, [json.dumps({"image": f"img/{i}.png", "answer": "accept", "label": CLASSES[label]})
                   for i, label in enumerate(labels)])
    assert runner.main(["loop", "--config", str(recipe), "--annotations", str(tasks), "--from", str(source_run.path),
                        "--export-dir", str(tmp_path / "exports")]) == 0
    out = capsys.readouterr().out
    state = state_of(tmp_path / "runs" / "loops" / "tiny-recipe")
    recorded = runs.open_run(state["history"][-1]["run"]).config_dict()
    assert recorded["data"]["image_size"] == 16
    # 6 passes of one batch, trained as one epoch of 6 steps: one checkpoint; the loop draws no run figures
    assert (recorded["train"]["epochs"], recorded["train"]["steps"]) == (1, 6)
    trained = runs.open_run(state["history"][-1]["run"])
    assert [path.name for path in trained.checkpoint_dir.glob("*.keras")] == ["epoch-0001.keras"]
    assert not list(trained.path.glob("*.png"))
    assert rebuilt == [] and state["served"]["round"] == 1
    assert "follows --from" in out and "data.image_size 16 (the recipe: 12)" in out
    # auto: n / (k x count) over the loop's examples, 1.0 for a class without any
    assert recorded["train"]["class_weight"] == {"class_0": 0.5, "class_1": 0.75, "class_2": 1.5, "class_3": 1.0}
    assert "Epoch" not in out and len(out.splitlines()) <= 10, out


@pytest.mark.slow
def test_garbage_collection_removes_only_the_runs_the_loop_trained(tmp_path, source):
    import shutil

    from shared.loop import rounds as loop_module
    from shared.config import load_config

    source_run, tree = source
    loop_dir = tmp_path / "my-loop"
    recipe = classification_recipe(tmp_path, tree, keep=1, dir=str(loop_dir))

    def copied(version: str, **loop) -> Path:  # a run trained with the recipe: its config records loop.dir
        path = tmp_path / "runs" / "tiny" / version
        shutil.copytree(source_run.path, path)
        config = yaml.safe_load((path / "config.yaml").read_text())
        config["loop"] = {**config.get("loop", {}), "dir": str(loop_dir), **loop}
        (path / "config.yaml").write_text(yaml.safe_dump(config))
        return path

    start, other, foreign = copied("v0001"), copied("v0002"), copied("v0003", attempt="0123456789abcdef")
    tasks = tmp_path / "tasks.jsonl"
    tasks.touch()
    loop = loop_module.open_loop(task_for(load_config(str(recipe))), tasks, start, tmp_path / "exports")
    results = []
    for first in (0, 10):
        append(tasks, classification_lines(tmp_path, first, 4))
        results.append(loop_module.run_round(loop))
    assert [r.round for r in results] == [1, 2]
    assert start.is_dir() and other.is_dir() and foreign.is_dir()
    assert not results[0].run.exists() and results[1].run.is_dir()  # keep 1: the loop's older round run goes


def test_the_recipes_test_split_as_held_out_set_names_damaged_images_or_skips_them(tmp_path, capsys):
    from shared.errors import UserError

    root = tmp_path / "photos"
    for split in ("train", "test"):
        for cls in (0, 1):
            png(root / split / CLASSES[cls] / "a.png", cls, cls)
    png(root / "test" / "class_0" / os.fsdecode(b"caf\xe9.png"), 5, 0)  # a name the file system holds as bytes
    (root / "test" / "class_1" / "truncated.png").write_bytes((root / "test" / "class_1" / "a.png").read_bytes()[:60])
    data = {"source": "folder", "path": str(root), "test_fraction": 0.0}
    with pytest.raises(UserError, match="truncated.png.*or set data.on_corrupt: skip"):
        ingest_only(fake_loop(tmp_path, data=data, eval=None))
    loop = fake_loop(tmp_path, data={**data, "on_corrupt": "skip"}, eval=None)
    assert not (loop.dir / "eval").exists() and not (loop.dir / "state.json").exists()
    ingest_only(loop)
    assert count_records(loop.dir / "eval", "validation-*") == 3
    assert "left out 1 test image(s)" in capsys.readouterr().out


def test_an_image_name_that_is_not_utf8_is_ingested_and_recognized_again(tmp_path):
    loop = fake_loop(tmp_path)
    name = os.fsdecode(b"img/caf\xe9.png")  # JSON holds it as \udce9, the file system as the byte
    png(tmp_path / name, 0, 1)
    line = json.dumps({"image": name, "answer": "accept", "label": "class_1"})
    append(loop.annotations, [line])
    assert (ingest_only(loop).pending, state_of(loop.dir)["examples"]) == (1, 1)
    append(loop.annotations, [line])  # the same answer again: the ledger knows it
    assert ingest_only(loop).batch.duplicates == 1 and record_labels(loop.dir / "data") == [1]


def test_loop_passes_grows_a_rounds_steps_with_its_examples_and_loop_steps_stays_the_floor():
    from shared.loop.rounds import planned_steps

    assert planned_steps(100, None, 3000, 128) == 100  # null: loop.steps every round, as before
    assert [planned_steps(100, 7, examples, 128) for examples in (500, 2000, 3000)] == [100, 110, 165]
    assert [planned_steps(1, 7, examples, 128) for examples in (500, 1000)] == [28, 55]  # 7 x 500 / 128 = 27.3


def test_a_rounds_config_trains_for_loop_passes_over_its_examples(tmp_path):
    from shared.loop.rounds import round_config, round_steps

    loop = fake_loop(tmp_path, steps=1, passes=3)
    append(loop.annotations, classification_lines(tmp_path, 0, 64))
    ingest_only(loop)
    state = {**state_of(loop.dir), "current": {"round": 1, "examples": 64, "new": 64, "annotation_lines": 64}}
    config = round_config(loop, state)
    # 3 passes over 64 examples at batch 32: 6 steps (as one epoch where the schedule allows), not loop.steps' 1
    assert round_steps(config.train) == 6

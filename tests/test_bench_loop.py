"""scripts/bench_loop.py's pieces: the simulated annotator's rounds read back by the loop's reader with the
counts it wrote (accepted tasks as the same pixels and labels, rejected / ignored counted, the malformed line
named; its rejects ask other questions, so the loop's latest-answer rule keeps every accepted example), and the
steps the rounds train, which the one-run reference adds up."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script

from shared import annotations
from shared.classification.loop import ClassLabel
from shared.detection.loop import Spans


def test_the_annotators_rounds_read_back_with_the_counts_it_wrote(tmp_path):
    from PIL import Image

    bench = load_script("bench_loop")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), np.arange(12) % 3
    names = ["a", "b", "c"]
    annotator = bench.Annotator(tmp_path / "tasks.jsonl", rejected=2, ignored=1, class_names=names)
    first = annotator.add_round(bench.classification_tasks(images, labels, 0, 5, tmp_path / "img", names))
    batch = annotations.read_new(tmp_path / "tasks.jsonl", 0, 0, ClassLabel(), names)
    assert first == {"accepted": 5, "rejected": 2, "ignored": 1, "malformed": 1}
    assert (batch.accepted, batch.rejected, batch.ignored, len(batch.malformed)) == (5, 2, 1, 1)
    table = annotations.AnswerTable()
    for number, answer in enumerate(batch.answers):
        table.take(answer.fingerprint, answer.input, answer.task, answer.answer, number)
    assert len(table.live) == 5  # the rejects and the ignore asked other questions: nothing withdrawn
    assert batch.malformed[0].startswith("line 9: not JSON")
    assert [example.label for example in batch.examples] == [0, 1, 2, 0, 1]
    np.testing.assert_array_equal(np.asarray(Image.open(batch.examples[3].name)), images[3])

    annotator.add_round(bench.classification_tasks(images, labels, 5, 4, tmp_path / "img", names))
    second = annotations.read_new(tmp_path / "tasks.jsonl", batch.end_offset, batch.lines, ClassLabel(), names)
    assert (second.accepted, second.rejected, second.ignored) == (4, 2, 1)
    assert [example.label for example in second.examples] == [2, 0, 1, 2]
    assert second.malformed[0].startswith("line 17:")


def test_detection_tasks_carry_the_canvas_boxes_as_spans(tmp_path):
    from PIL import Image

    from shared.detection.records import DetectionRecord, DetectionSplit

    bench = load_script("bench_loop")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "c.png")
    split = DetectionSplit([DetectionRecord(str(tmp_path / "c.png"), 40, 40, [[2, 3, 12, 23], [20, 20, 39, 30]],
                                            [1, 0])], ["shirt", "bag"])
    annotator = bench.Annotator(tmp_path / "tasks.jsonl", rejected=1, ignored=0)
    annotator.add_round(bench.detection_tasks(split, 0, 1))
    batch = annotations.read_new(tmp_path / "tasks.jsonl", 0, 0, Spans(), ["shirt", "bag"])
    assert (batch.accepted, batch.rejected) == (1, 1) and len(batch.malformed) == 1
    assert batch.answers[0].task != batch.answers[1].task  # the reject is of no boxes: another question
    np.testing.assert_allclose(batch.examples[0].boxes, [[2, 3, 12, 23], [20, 20, 39, 30]])
    assert batch.examples[0].classes.tolist() == [1, 0]


def test_the_seeds_table_gives_each_seeds_gap_to_one_run_and_its_largest_fall_between_rounds():
    bench = load_script("bench_loop")

    def summary(seed, metrics, reference):
        return {"task": "classification", "seed": seed, "rows": [{"metric": m} for m in metrics],
                "reference": {"metric": reference}, "overhead": 4.0}

    table = bench.seeds_table([summary(0, [0.70, 0.80, 0.79, 0.84], 0.85), summary(1, [0.72, 0.81, 0.83, 0.86], 0.86)])
    rows = table.splitlines()
    assert rows[2] == "| 0 | 0.7000 0.8000 0.7900 0.8400 | 0.8400 | 0.8500 | 0.0100 | 0.0100 | 4.0 |"
    assert rows[3] == "| 1 | 0.7200 0.8100 0.8300 0.8600 | 0.8600 | 0.8600 | 0.0000 | none | 4.0 |"
    assert rows[4].startswith("| mean | | 0.8500 | 0.8550 | 0.0050 | 0.0100 (largest) |")


def test_the_orders_table_says_how_many_labels_an_order_needs_to_reach_the_baselines_final_figure():
    bench = load_script("bench_loop")

    def result(order, metrics):
        return {"order": order, "rows": [{"round": i + 1, "labels": 500 * (i + 1), "metric": m}
                                         for i, m in enumerate(metrics)]}

    table = bench.orders_table([result("uncertainty", [0.70, 0.79, 0.83, 0.85]),
                                result("margin", [0.6, 0.7, 0.75, 0.8]), result("random", [0.72, 0.78, 0.80, 0.82])])
    assert "| 2 | 1000 | 0.7900 | 0.7000 | 0.7800 |" in table
    assert "uncertainty reaches random's final 0.8200 (2000 labels) at round 3: 1500 labels, 75 % of them" in table
    assert "margin reaches random's final 0.8200 (2000 labels) in no round" in table


def test_each_seed_of_several_runs_in_a_process_of_its_own_with_the_benchs_settings(tmp_path, monkeypatch):
    bench = load_script("bench_loop")
    calls = []

    def child(command, **kwargs):  # what the child would write: its summary, where the parent reads it
        calls.append(command)
        where = Path(command[command.index("--out-dir") + 1])
        (where / "classification").mkdir(parents=True)
        (where / "classification" / "bench_loop.json").write_text(json.dumps({"source": "SRC", "seed": None}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", child)
    args = bench.parse_args(["--task", "classification", "--rounds", "2", "--set", "loop.passes=3",
                             "--seeds", "0,1", "--from", "SRC"])
    summaries = [bench.bench_in_child(args, "classification", seed, Path("SRC"), tmp_path / f"seed-{seed}")
                 for seed in (0, 1)]
    assert [summary["source"] for summary in summaries] == ["SRC", "SRC"]
    for seed, command in zip((0, 1), calls):
        tail = command[2:]
        assert tail[tail.index("--seeds") + 1] == str(seed) and tail[tail.index("--from") + 1] == "SRC"
        assert tail[tail.index("--rounds") + 1] == "2" and tail[tail.index("--set") + 1] == "loop.passes=3"
        assert "--per-round" not in tail  # unset: the child's own default


def test_a_train_seed_among_the_sets_is_refused_for_the_seeds_option(tmp_path):
    # The bench appends each seed's train.seed after the --set options, so one there would be silently overridden.
    bench = load_script("bench_loop")
    for extra in ([], ["--orders", "margin,random"]):
        with pytest.raises(SystemExit, match="give --seeds instead"):
            bench.main(["--task", "classification", "--set", "train.seed=1", "--out-dir", str(tmp_path), *extra])
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_the_orders_bench_trains_its_own_source_to_convergence_and_the_rounds_bench_briefly(tmp_path, monkeypatch):
    bench = load_script("bench_loop")
    asked = []

    def train_source(out, holdout, epochs=bench.SOURCE_EPOCHS):
        asked.append(epochs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(bench, "train_source", train_source)
    for extra in (["--orders", "uncertainty,random"], []):
        with pytest.raises(RuntimeError, match="stop here"):
            bench.main(["--task", "classification", "--seeds", "0,1", "--out-dir", str(tmp_path), *extra])
    assert asked == [bench.ORDERS_SOURCE_EPOCHS, bench.SOURCE_EPOCHS]
    assert bench.ORDERS_SOURCE_EPOCHS > bench.SOURCE_EPOCHS

"""scripts/bench_loop.py's pieces: the simulated annotator's rounds read back by the loop's reader with the
counts it wrote (accepted tasks as the same pixels and labels, rejected / ignored counted, the malformed line
named; its rejects ask other questions, so the loop's latest-answer rule keeps every accepted example), and the
steps the rounds train, which the one-run reference adds up."""

from __future__ import annotations


import numpy as np

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


def test_round_steps_are_the_loops_whole_epochs_over_the_examples_so_far():
    bench = load_script("bench_loop")
    # batch 128: 500 examples are 4 batches (25 epochs of 4), 1000 are 8 (13 epochs of 8 = 104), ...
    assert bench.round_steps(100, 500, 6, 128) == [100, 104, 108, 105, 100, 100]
    assert bench.round_steps(50, 150, 4, 16) == [50, 51, 50, 50]

"""Asking for the right labels: `predict --format tasks --order` writes the images the model is least sure of
first, each task with its score in its meta, and the loop's pool (`shared.loop.pool`) rewrites its tasks file
after each round without the images already answered. The classifier here is built by hand: its class
probabilities are a fixed function of an image's brightness, so every score is computed here from the weights."""

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from shared import annotation_tasks, runs
from shared.detection.predict import Detections
from shared.loop import pool as loop_pool
from shared.loop import state as loop_state

import forked
from conftest import KILLING_RUNNER, REPO
from test_predict import assert_one_line_error, run_cli

# logits = brightness (0..1) x WEIGHTS + BIASES, softmax: sure of dark and bright images, not of the ones between,
# which two classes (or all three) it cannot tell apart depends on the brightness: the three scores order the
# images differently
WEIGHTS, BIASES = np.array([-16.0, 0.0, 8.0]), np.array([8.0, 0.5, -4.0])
LEVELS = [0, 60, 90, 100, 110, 120, 128, 140, 150, 170, 200, 255, 128]  # the last: a tie with the 7th image
CLASSES = ["class_0", "class_1", "class_2"]

BRIGHTNESS_MODEL = '''
import keras


def build(num_classes: int = 3, input_shape: tuple = (8, 8, 3)):
    inputs = keras.Input(input_shape)
    x = keras.layers.GlobalAveragePooling2D()(inputs)  # each channel's mean: the brightness of a gray image
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name="brightness")
'''


def brightness_tree(runs_dir: Path, model_dir: Path) -> dict:
    return {"model": {"name": "brightness", "path": str(model_dir)},
            "data": {"source": "synthetic", "image_size": 8, "channels": 3, "num_classes": 3, "normalize": False,
                     "synthetic_train": 24, "synthetic_test": 12},
            "train": {"epochs": 1, "batch_size": 8, "verbose": 0, "lr": {"base": 1e-4}},
            "run": {"dir": str(runs_dir), "notes": "a hand-built classifier"}}


def hand_built_run(folder: Path, tree: dict) -> runs.Run:
    """A finished run folder made by hand: the model source, the resolved config, the classes and one
    checkpoint holding WEIGHTS and BIASES (the brightness in the first channel only)."""
    import keras

    from shared import modelzoo
    from shared.config import load_config

    folder.mkdir(parents=True)
    (folder / "model.py").write_text(BRIGHTNESS_MODEL)
    (folder / "config.yaml").write_text(load_config(tree=tree).dump())
    (folder / "labels.txt").write_text("".join(f"{name}\n" for name in CLASSES))
    (folder / "status.json").write_text(json.dumps({"status": "finished"}))
    model = modelzoo.load_model_module(folder).build(3, (8, 8, 3))
    kernel = np.zeros((3, 3), np.float32)
    kernel[0] = WEIGHTS
    model.get_layer("predictions").set_weights([kernel, BIASES.astype(np.float32)])
    (folder / "checkpoints").mkdir()
    model.save(folder / "checkpoints" / "epoch-0001.keras")
    keras.backend.clear_session()
    return runs.Run(folder)


def gray(path: Path, level: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (level, level, level)).save(path)
    return path


def probabilities(levels) -> np.ndarray:
    logits = np.asarray(levels, np.float64)[:, None] / 255.0 * WEIGHTS + BIASES
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def hand_scores(levels, order: str) -> np.ndarray:
    p = probabilities(levels)
    top = -np.sort(-p, axis=1)
    return {"uncertainty": 1 - top[:, 0], "margin": 1 - (top[:, 0] - top[:, 1]),
            "entropy": -(p * np.log(p)).sum(axis=1)}[order]


def task_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def bright(tmp_path_factory):
    """The hand-built run and a folder of gray images, one per LEVELS in name order."""
    base = tmp_path_factory.mktemp("active_order")
    (base / "brightness").mkdir()
    (base / "brightness" / "model.py").write_text(BRIGHTNESS_MODEL)
    tree = brightness_tree(base / "runs", base / "brightness")
    run = hand_built_run(base / "runs" / "brightness" / "v0001", tree)
    images = [gray(base / "photos" / f"{i:02d}.png", level) for i, level in enumerate(LEVELS)]
    return run, images, tree


def test_the_case_tells_the_orders_apart():
    """The three scores rank the images three different ways, none of them the file's, with no two distinct
    scores so close that float32 could swap them: the tests below can tell each order from the others."""
    orders = {order: tuple(np.argsort(-hand_scores(LEVELS, order), kind="stable")) for order in
              annotation_tasks.SCORED_ORDERS}
    assert len(set(orders.values())) == 3 and tuple(range(len(LEVELS))) not in orders.values()
    for order in annotation_tasks.SCORED_ORDERS:
        distinct = np.unique(np.round(hand_scores(LEVELS, order), 9))
        assert np.diff(distinct).min() > 1e-3


@pytest.mark.parametrize("order", ["uncertainty", "margin", "entropy"])
def test_tasks_come_most_informative_first_with_their_score(bright, tmp_path, capsys, order):
    run, images, _ = bright
    out = tmp_path / "tasks.jsonl"
    code, printed, err = run_cli(capsys, "predict", "--run", run.path, images[0].parent, "--format", "tasks",
                                 "--out", out, "--order", order)
    assert code == 0, err
    assert f"wrote {len(images)} tasks to {out}, {order} order (highest first)" in printed
    scores = hand_scores(LEVELS, order)
    want = np.argsort(-scores, kind="stable")  # ties (the two 128 images) in file order
    lines = task_lines(out)
    assert [line["image"] for line in lines] == [str(images[i]) for i in want]
    assert [line["meta"][order] for line in lines] == pytest.approx(scores[want], abs=2e-4)
    tied = [line["image"] for line in lines if line["image"] in (str(images[6]), str(images[12]))]
    assert tied == [str(images[6]), str(images[12])]
    # the rest of the task is the prediction's, as in file order: the top class and its probability
    p = probabilities(LEVELS)
    assert [line["label"] for line in lines] == [CLASSES[int(np.argmax(p[i]))] for i in want]
    assert [line["meta"]["score"] for line in lines] == pytest.approx(p[want].max(axis=1), abs=2e-4)


def test_random_order_is_a_seeded_shuffle_and_file_order_is_unchanged(bright, tmp_path, capsys):
    run, images, _ = bright
    written = {}
    for name, extra in (("file", []), ("file_named", ["--order", "file"]), ("seed0", ["--order", "random"]),
                        ("seed0_again", ["--order", "random", "--seed", "0"]),
                        ("seed1", ["--order", "random", "--seed", "1"])):
        out = tmp_path / f"{name}.jsonl"
        code, printed, err = run_cli(capsys, "predict", "--run", run.path, *images, "--format", "tasks", "--out",
                                     out, *extra)
        assert code == 0, err
        written[name] = [line["image"] for line in task_lines(out)]
    assert "random order (seed 1)" in printed
    assert written["file"] == written["file_named"] == [str(path) for path in images]
    assert written["seed0"] == written["seed0_again"]
    assert sorted(written["seed0"]) == sorted(written["file"])
    assert written["seed0"] != written["file"] and written["seed1"] != written["seed0"]
    assert [str(images[i]) for i in np.random.default_rng(0).permutation(len(images))] == written["seed0"]


def test_order_with_another_format_or_seed_without_random_is_one_line(tmp_path, capsys):
    from shared import commands

    assert commands.ORDERS == annotation_tasks.ORDERS  # the command table cannot import the project
    image = gray(tmp_path / "a.png", 10)
    run = tmp_path / "runs" / "x" / "v0001"  # refused before the run is read
    for extra, fragments in ((["--out", tmp_path / "p.csv", "--order", "uncertainty"], ["--order uncertainty",
                                                                                        "--format tasks"]),
                             (["--out", tmp_path / "p.jsonl", "--format", "jsonl", "--order", "random"],
                              ["--order random orders an annotation tasks file"]),
                             (["--order", "margin"], ["--order margin", "--format tasks"]),
                             (["--out", tmp_path / "t.jsonl", "--format", "tasks", "--seed", "3"],
                              ["--seed 3", "--order random"])):
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"task": "classification"}))
        code, _, err = run_cli(capsys, "predict", "--run", run, image, *extra)
        assert_one_line_error(code, err, *fragments)
    assert not list(tmp_path.glob("*.jsonl")) and not list(tmp_path.glob("*.csv"))


def test_detections_are_ordered_by_their_least_confident_box(tmp_path):
    """Each image's score is its least confident box's: 1 - s, 1 - |2s - 1| or the binary entropy of s; an
    image without a box scores 0 and comes last."""
    box = {"x": 1, "y": 1, "width": 2, "height": 2, "label": "cat"}
    boxes = {"sure.png": [0.99, 0.97], "one_unsure.png": [0.98, 0.55], "faint.png": [0.12], "empty.png": [],
             "mid.png": [0.7, 0.9], "sure_too.png": [0.99]}
    results = [Detections(str(tmp_path / name), [{**box, "score": s} for s in scores])
               for name, scores in boxes.items()]
    results.insert(2, Detections(str(tmp_path / "broken.png"), error="does not decode"))

    def binary_entropy(s):
        return -s * np.log(s) - (1 - s) * np.log(1 - s)

    per_box = {"uncertainty": lambda s: 1 - s, "margin": lambda s: 1 - abs(2 * s - 1), "entropy": binary_entropy}
    for order, score in per_box.items():
        out = tmp_path / f"{order}.jsonl"
        with annotation_tasks.task_file(out, order) as write:
            assert [write(result) for result in results] == [True, True, False, True, True, True, True]
        want = {name: max(map(score, scores)) if scores else 0.0 for name, scores in boxes.items()}
        ranked = sorted(want, key=lambda name: -want[name])  # sorted() is stable: ties in input order
        lines = task_lines(out)
        assert [line["image"] for line in lines] == ranked, order
        assert [line["meta"][order] for line in lines] == pytest.approx([want[n] for n in ranked], abs=1e-4)
        assert lines[-1]["image"] == "empty.png" and lines[-1]["meta"][order] == 0.0
    assert task_lines(tmp_path / "uncertainty.jsonl")[0]["image"] == "faint.png"  # 1 - 0.12
    assert task_lines(tmp_path / "margin.jsonl")[0]["image"] == "one_unsure.png"  # 0.55: nearest to a coin toss


def test_an_error_while_writing_leaves_the_old_tasks_file_whole(bright, tmp_path, monkeypatch):
    from shared.classification.predict import Prediction

    run, images, _ = bright
    out = tmp_path / "tasks.jsonl"
    assert loop_pool.write_pool_tasks(run, images[0].parent, out, "entropy") == len(images)
    before = out.read_bytes()
    scored = []

    def failing(self, order):
        scored.append(self.input)
        if len(scored) == 5:
            raise RuntimeError("disk on fire")
        return 0.5

    monkeypatch.setattr(Prediction, "informativeness", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        loop_pool.write_pool_tasks(run, images[0].parent, out, "uncertainty")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.jsonl"]  # no scratch or partial file left


@pytest.mark.slow
def test_a_kill_before_the_tasks_file_is_published_leaves_the_old_one_whole(bright, tmp_path):
    run, images, _ = bright
    out = tmp_path / "tasks.jsonl"
    out.write_text('{"image": "old.png"}\n')
    command = ["predict", "--run", str(run.path), str(images[0].parent), "--format", "tasks", "--out", str(out),
               "--order", "uncertainty"]
    result = forked.run([sys.executable, "-c", KILLING_RUNNER, *command], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "KILL_AT": "tasks.jsonl:before:1"})
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert out.read_text() == '{"image": "old.png"}\n'


def test_answered_inputs_read_the_image_beside_an_input_hash_and_old_ledgers(tmp_path):
    entries = [{"fingerprint": "a", "input": "path:/p/1.png", "task": "t1", "answer": "accept", "id": 1, "label": 0},
               {"fingerprint": "b", "input": "input:7", "task": "task:8", "answer": "reject", "id": None,
                "label": None, "image": "path:/p/2.png"},
               {"fingerprint": "c", "input": "input:9", "task": "task:9", "answer": "ignore", "id": None,
                "label": None}]  # as ledgers were written before the image was recorded
    length = loop_state.append_ledger(tmp_path, 0, entries)
    state = {"ledger_bytes": length}
    assert loop_state.answered_inputs(tmp_path, state) == {"path:/p/1.png", "input:7", "path:/p/2.png", "input:9"}
    assert set(loop_state.replay(tmp_path, state).live) == {"path:/p/1.png"}


@pytest.mark.slow
def test_the_pool_leaves_out_answered_images_and_is_rewritten_after_a_round(bright, tmp_path):
    from shared.config import load_config
    from shared.loop import rounds
    from shared.tasks import task_for

    run, _, tree = bright
    pool = tmp_path / "pool"
    for i, level in enumerate(LEVELS[:8]):
        gray(pool / f"{i:02d}.png", level)
    held_out = [json.dumps({"image": str(gray(tmp_path / "heldout" / f"{i}.png", level)), "answer": "accept",
                            "label": CLASSES[i % 3]}) for i, level in enumerate((10, 120, 250))]
    (tmp_path / "heldout.jsonl").write_text("\n".join(held_out) + "\n")
    answers = tmp_path / "answers.jsonl"  # the annotator's export: relative paths from its folder
    answers.write_text("\n".join(json.dumps(line) for line in (
        {"image": "pool/00.png", "answer": "accept", "label": "class_0"},
        {"image": "pool/03.png", "answer": "reject", "label": "class_1", "_input_hash": 11, "_task_hash": 12},
        {"image": "pool/05.png", "answer": "ignore", "_input_hash": 13, "_task_hash": 14},
        {"image": "pool/07.png", "answer": "accept", "label": "class_2", "_input_hash": 15, "_task_hash": 16},
    )) + "\n")
    recipe = {**tree, "run": {"dir": str(tmp_path / "runs"), "notes": "pool"},
              "loop": {"steps": 2, "eval": str(tmp_path / "heldout.jsonl"), "tolerance": None,
                       "dir": str(tmp_path / "loop")}}
    tasks_out = pool / "tasks.jsonl"
    (pool / ".partial-0123456789ab-tasks.jsonl").write_text('{"image": "half')  # a kill while it was written
    loop = rounds.open_loop(task_for(load_config(tree=recipe)), answers, run.path, tmp_path / "exports",
                            pool=pool, tasks_out=tasks_out, order="margin")
    said = []
    done = rounds.run_rounds(loop, watch=False, report=said.append)
    assert len(done) == 1
    pool_lines = [line for line in said if line.startswith(f"pool {pool}")]
    assert len(pool_lines) == 2
    assert pool_lines[0].startswith(f"pool {pool}: 8 unlabelled images") and str(run.path) in pool_lines[0]
    assert pool_lines[1].startswith(f"pool {pool}: 4 unlabelled images") and str(done[0].run) in pool_lines[1]
    lines = task_lines(tasks_out)
    assert sorted(line["image"] for line in lines) == ["01.png", "02.png", "04.png", "06.png"]
    margins = [line["meta"]["margin"] for line in lines]
    assert margins == sorted(margins, reverse=True)
    assert not [p for p in pool.iterdir() if p.name.startswith(".partial-")]  # what a kill left is cleared


def test_pool_options_are_refused_in_one_line_before_the_loop_starts(tmp_path):
    from shared.errors import UserError

    annotations = tmp_path / "answers.jsonl"
    gray(tmp_path / "pool" / "a.png", 3)
    (tmp_path / "empty").mkdir()
    for arguments, fragment in (((None, tmp_path / "t.jsonl", None), "add --pool"),
                                ((None, None, "margin"), "add --pool"),
                                ((tmp_path / "pool", None, None), "--pool needs --tasks-out"),
                                ((tmp_path / "empty", tmp_path / "t.jsonl", None), "no images in"),
                                ((tmp_path / "pool", tmp_path / "t.csv", None), "name it t.jsonl"),
                                ((tmp_path / "pool", annotations, None), "is the --annotations file")):
        with pytest.raises(UserError, match=fragment):
            loop_pool.check_pool(*arguments, annotations)
    assert loop_pool.check_pool(tmp_path / "pool", tmp_path / "t.jsonl", None, annotations) == \
        (tmp_path / "pool", tmp_path / "t.jsonl", "margin")  # the default: it did best in bench_loop --orders


def test_the_loop_command_refuses_a_pool_without_watch_in_one_line(tmp_path, capsys):
    gray(tmp_path / "pool" / "a.png", 3)
    code, _, err = run_cli(capsys, "loop", "--config", REPO / "models" / "resnet" / "quick.yaml", "--annotations",
                           tmp_path / "answers.jsonl", "--from", tmp_path / "run", "--pool", tmp_path / "pool",
                           "--tasks-out", tmp_path / "tasks.jsonl", "--once")
    assert_one_line_error(code, err, "--pool rewrites --tasks-out as rounds finish; add --watch")

"""Your own images: a folder of class folders without split folders, split by class and recorded in the
run (`shared.data.split`), and `train.class_weight` against class imbalance (`shared.data.class_weights`)."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from shared.config import load_config
from shared.data import class_weights, make_datasets, sources, split
from shared.errors import UserError

import forked
from conftest import REPO, TINY_MODEL, tiny_tree

COUNTS = {"cat": 10, "dog": 5, "猫 ü": 2, "solo": 1}  # a Unicode class and a class of one image


def make_class_folders(root: Path, counts: dict[str, int] = COUNTS, size: int = 12, seed: int = 0) -> Path:
    """PATH/<class>/<image>.png: each class a flat colour of its own plus noise (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    for index, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = np.full((size, size, 3), 40 + 60 * (index % 4), np.uint8)
            pixels = np.clip(base + rng.integers(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}-{seed}-{i}.png")
    return root


def data_config(tmp_path, root: Path, **data):
    tree = tiny_tree(tmp_path / "runs")
    tree["data"] = {"source": "folder", "path": str(root), "image_size": 12, "channels": 3,
                    "test_fraction": 0.2, **data}
    return load_config(tree=tree)


def class_of(path: str) -> str:
    return Path(path).parent.name


def per_class(files: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in files:
        counts[class_of(path)] = counts.get(class_of(path), 0) + 1
    return counts


# ---------------------------------------------------------------- the split


def test_assign_holds_out_by_hash_and_keeps_the_small_class_rules():
    names = [f"{i}.png" for i in range(400)]
    chosen = split.assign(names, 0.1, 0.2)
    for name, part in chosen.items():  # each name by its own position: test below 0.2, val below 0.3
        point = split.position(name)
        assert part == ("test" if point < 0.2 else "val" if point < 0.3 else "train")
    shares = {part: list(chosen.values()).count(part) / len(names) for part in split.SPLITS}
    assert abs(shares["test"] - 0.2) < 0.06 and abs(shares["val"] - 0.1) < 0.05  # the fractions, on average
    # small classes: two or more names give one to the test split, training always keeps one, and with a
    # validation fraction one goes to validation unless training would be left without
    for count in range(2, 8):
        for start in range(0, 300, count):
            small = split.assign(names[start:start + count], 0.0, 0.2)
            assert "test" in small.values() and "train" in small.values() and "val" not in small.values()
            small = list(split.assign(names[start:start + count], 0.1, 0.2).values())
            assert "test" in small and ("val" in small) == (small.count("train") + small.count("val") > 1)
    assert split.assign(["only.png"], 0.0, 0.9) == {"only.png": "train"}  # a class of one trains
    every = split.assign(names[:5], 0.5, 0.5)  # all held out by hash: the highest goes back to training
    assert list(every.values()).count("train") == 1
    assert every[max(names[:5], key=split.position)] == "train"
    assert set(split.assign(names[:20], 0.1, 0.0).values()) <= {"val", "train"}  # no test fraction: none


def test_split_is_stratified_and_every_class_of_two_or_more_is_tested(tmp_path):
    root = make_class_folders(tmp_path / "imgs")
    source = sources.load(data_config(tmp_path, root, val_fraction=0.2).data)
    assert source.class_names == sorted(COUNTS)
    files = source.files
    tested, trained = per_class(files["test"]), per_class(files["train"])
    assert set(tested) == {"cat", "dog", "猫 ü"} and set(trained) == set(COUNTS)  # 'solo' trains
    assert set(per_class(files["val"])) == {"cat", "dog"}  # 猫 ü has two images: one to test, one to train
    every = [path for name in split.SPLITS for path in files[name]]
    assert len(every) == len(set(every)) == sum(COUNTS.values())  # disjoint, nothing lost
    assert source.num_val == len(files["val"]) and (source.val is not None) == bool(files["val"])
    # the labels the pipeline reads are the files' folders
    for name, dataset in (("train", source.train), ("test", source.test), ("val", source.val)):
        if dataset is None:
            continue
        read = [(Path(path.decode()).parent.name, source.class_names[int(label)])
                for path, label in dataset.as_numpy_iterator()]
        assert [a for a, _ in read] == [b for _, b in read] and len(read) == len(files[name])


def splits_of(parts: dict) -> dict[str, str]:
    """{file: split} of `stratified`'s result."""
    return {path: name for name in split.SPLITS for files in parts[name].values() for path in files}


def test_no_file_changes_split_when_images_are_added_or_removed():
    """The issue's case: 3 classes of 60, one image added: the seeded shuffle moved 6 of the 36 test images to
    training. Each file's split is its own name's hash, so none moves (the classes are large enough that the
    small-class fallback never acts)."""
    by_class = {label: [f"/d/{label}/IMG_{i:04d}.jpg" for i in range(60)] for label in ("cat", "dog", "emu")}
    before = splits_of(split.stratified(by_class, 0.1, 0.2))
    assert 20 <= list(before.values()).count("test") <= 60
    grown = {**by_class, "cat": by_class["cat"] + ["/d/cat/IMG_9999.jpg"]}
    shrunk = {**by_class, "dog": by_class["dog"][1:]}
    for changed in (grown, shrunk):
        after = splits_of(split.stratified(changed, 0.1, 0.2))
        assert {path: part for path, part in after.items() if path in before} == \
            {path: part for path, part in before.items() if path in after}
    # a file keeps its split in another class (a corrected label) and under a renamed class folder
    moved = split.stratified({"cats": by_class["cat"]}, 0.1, 0.2)
    assert [Path(p).name for p in moved["test"]["cats"]] == [Path(p).name for p in
                                                              split.stratified(by_class, 0.1, 0.2)["test"]["cat"]]


def test_split_folders_carve_validation_by_hash_too(tmp_path):
    """train/ and test/ on disk with data.val_fraction: validation is each training file's own hash within its
    class as well (it was the head of a shuffled list, which one added image reshuffled)."""
    root = tmp_path / "imgs"
    make_class_folders(root / "train", {"cat": 30, "dog": 30})
    make_class_folders(root / "test", {"cat": 2, "dog": 2})
    config = data_config(tmp_path, root, val_fraction=0.2, test_fraction=0.0).data
    before = sources.load(config)
    assert 4 <= before.num_val <= 20 and before.num_val + before.num_train == 60 and before.num_test == 4
    make_class_folders(root / "train", {"cat": 1}, seed=7)  # one more cat
    after = sources.load(config)
    assert set(before.files["val"]) <= set(after.files["val"]) and len(after.files["val"]) - before.num_val <= 1
    assert set(before.files["train"]) <= set(after.files["train"])


def test_names_up_to_nohash_share_a_split_and_composed_names_split_alike():
    files = [f"/d/a/object{i}_nohash_{view}.jpg" for i in range(30) for view in range(3)]
    chosen = splits_of(split.stratified({"a": files}, 0.1, 0.3))
    for i in range(30):
        assert len({chosen[f"/d/a/object{i}_nohash_{view}.jpg"] for view in range(3)}) == 1
    assert split.hash_name("/d/a/caf\u00e9.png") == split.hash_name("/d/a/cafe\u0301.png")  # macOS stores NFD


def test_split_is_the_same_whatever_order_the_file_system_lists(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "imgs")
    config = data_config(tmp_path, root, val_fraction=0.2).data
    first = sources.load(config).record
    listing = Path.iterdir

    def shuffled(self):
        entries = list(listing(self))
        random.Random(len(entries)).shuffle(entries)
        return iter(entries[::-1])

    monkeypatch.setattr(Path, "iterdir", shuffled)
    assert sources.load(config).record == first
    # the split lists are relative to data.path, UTF-8, one per line, sorted
    test_lines = first["split/test.txt"].decode("utf-8").splitlines()
    assert "猫 ü/" in "".join(test_lines) and test_lines == sorted(test_lines, key=str.encode)
    assert all(not line.startswith("/") for line in test_lines)


def test_a_class_split_depends_only_on_its_own_images(tmp_path):
    one = split.stratified({"a": [f"a/{i}.png" for i in range(20)]}, 0.1, 0.2)
    two = split.stratified({"a": [f"a/{i}.png" for i in range(20)][::-1], "b": ["b/0.png", "b/1.png"]}, 0.1, 0.2)
    assert all(one[name]["a"] == two[name]["a"] for name in split.SPLITS)


def test_empty_class_folder_is_left_out_with_one_warning(tmp_path, capsys):
    root = make_class_folders(tmp_path / "imgs", {"cat": 3, "dog": 3})
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("not an image")
    (root / ".thumbnails").mkdir()  # hidden: never a class
    source = sources.load(data_config(tmp_path, root).data)
    assert source.class_names == ["cat", "dog"]
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "empty holds no images" in warning[0] and "left out" in warning[0]


def test_a_folder_without_images_is_one_line_naming_both_layouts(tmp_path):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "readme.txt").write_text("no pictures here")
    with pytest.raises(UserError, match=r"holds no images in class folders; lay it out as PATH/<class>/<image> "
                                        r".* or PATH/train/<class>/<image> with PATH/test/<class>/<image>$"):
        sources.load(data_config(tmp_path, root).data)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="holds no images in class folders"):
        sources.load(data_config(tmp_path, empty).data)


def test_no_test_fraction_without_a_test_folder_asks_for_it(tmp_path):
    root = make_class_folders(tmp_path / "imgs", {"cat": 3, "dog": 3})
    with pytest.raises(UserError, match=r"has class folders but no test/ folder to test on; set data.test_fraction"):
        sources.load(data_config(tmp_path, root, test_fraction=0.0).data)


def test_split_folders_keep_working_as_they_are(tmp_path):
    root = tmp_path / "imgs"
    make_class_folders(root / "train", {"cat": 4, "dog": 4})
    make_class_folders(root / "test", {"cat": 2, "dog": 2}, seed=1)
    config = data_config(tmp_path, root, test_fraction=0.0, val_fraction=0.25)
    datasets = make_datasets(config)
    assert (datasets.num_train, datasets.num_val, datasets.num_test) == (6, 2, 4)  # val: one of each class's 4
    assert datasets.source.record == {} and per_class(datasets.source.files["val"]) == {"cat": 1, "dog": 1}
    with pytest.raises(UserError, match=r"data.test_fraction is 0.2 but .* has its own test split"):
        sources.load(data_config(tmp_path, root).data)


def test_a_train_folder_alone_is_split_by_test_fraction(tmp_path):
    root = tmp_path / "imgs"
    make_class_folders(root / "train", {"cat": 5, "dog": 5})
    source = sources.load(data_config(tmp_path, root).data)
    assert per_class(source.files["test"]) == {"cat": 1, "dog": 1}
    assert source.record["split/test.txt"].decode().startswith("train/cat/")


def test_a_class_named_like_a_split_folder_is_a_class(tmp_path):
    root = make_class_folders(tmp_path / "imgs", {"test": 3, "train": 3})
    source = sources.load(data_config(tmp_path, root).data)
    assert source.class_names == ["test", "train"] and source.num_test == 2


@pytest.mark.slow
def test_recorded_split_is_read_back_after_images_were_added(tmp_path):
    root = make_class_folders(tmp_path / "imgs", {"cat": 6, "dog": 6})
    config = data_config(tmp_path, root, val_fraction=0.2)
    run = tmp_path / "run"
    (run / "split").mkdir(parents=True)
    for name, content in make_datasets(config).source.record.items():
        (run / name).write_bytes(content)
    (run / "labels.txt").write_text("cat\ndog\n", encoding="utf-8")
    make_class_folders(root, {"cat": 30, "dog": 30, "eel": 5}, seed=7)  # more images, and a new class
    recorded = split.read(run)
    again = make_datasets(config, recorded=recorded)
    assert sorted(again.source.files["test"]) == sorted(str(root / line) for line in recorded.files["test"])
    counts = tuple(len(recorded.files[name]) for name in ("train", "val", "test"))
    assert (again.num_train, again.num_val, again.num_test) == counts and sum(counts) == 12
    assert again.class_names == ["cat", "dog"]
    assert make_datasets(config).num_test > counts[2]  # the folder itself would now split otherwise
    (root / recorded.files["test"][0]).unlink()
    with pytest.raises(UserError, match=r"1 image\(s\) of the split this run recorded are gone"):
        make_datasets(config, recorded=recorded)


def test_an_image_name_with_a_line_break_is_one_line(tmp_path):
    root = make_class_folders(tmp_path / "imgs", {"cat": 2, "dog": 2})
    Image.new("RGB", (4, 4)).save(root / "cat" / "two\nlines.png")
    with pytest.raises(UserError, match=r"has a line break in its name"):
        sources.load(data_config(tmp_path, root).data)


# ---------------------------------------------------------------- class weights


def test_auto_weights_are_inverse_class_frequency():
    # n / (k * count): 8 / (3 * 6), 8 / (3 * 2) to six digits; a class without training images: 1.0
    assert class_weights.resolve("auto", ["a", "b", "c"], [0] * 6 + [1] * 2, "folder") == [0.444444, 1.33333, 1.0]


def test_named_weights_default_to_one_and_are_checked():
    assert class_weights.resolve({"b": 3, 0: 2.5}, ["0", "b", "c"], None, "tfrecord") == [2.5, 3.0, 1.0]
    with pytest.raises(UserError, match=r"names 'eel', which is not a class of this data; the classes are a, b"):
        class_weights.resolve({"eel": 2.0}, ["a", "b"], [0, 1], "folder")
    for bad in (-1.0, 0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(UserError, match=r"train.class_weight.a is .*; a class weight must be a positive number"):
            class_weights.resolve({"a": bad}, ["a", "b"], [0, 1], "folder")
    with pytest.raises(UserError, match=r"train.class_weight is 'balanced'; set it to auto or"):
        class_weights.resolve("balanced", ["a"], [0], "folder")
    with pytest.raises(UserError, match=r"auto needs the training split's class counts, which the tfrecord"):
        class_weights.resolve("auto", ["a"], None, "tfrecord")


def test_sample_weights_follow_hard_and_mixed_labels():
    weights = [1.0, 3.0]
    hard = tf.data.Dataset.from_tensor_slices((tf.zeros((3, 2)), tf.constant([0, 1, 1])))
    assert [float(w) for _, _, w in class_weights.with_sample_weights(hard, weights, False)] == [1.0, 3.0, 3.0]
    soft = tf.data.Dataset.from_tensor_slices((tf.zeros((2, 2)), tf.constant([[0.75, 0.25], [0.0, 1.0]])))
    assert [float(w) for _, _, w in class_weights.with_sample_weights(soft, weights, True)] == [1.5, 3.0]


def test_resolved_weights_are_recorded_in_the_config_and_load_again(tmp_path):
    root = make_class_folders(tmp_path / "imgs", {"cat": 10, "dog": 5})
    tree = tiny_tree(tmp_path / "runs", train={"class_weight": "auto"})
    tree["data"] = {"source": "folder", "path": str(root), "image_size": 12, "test_fraction": 0.2}
    datasets = make_datasets(load_config(tree=tree))
    # training split: 8 cat, 4 dog -> 12 / (2 * 8), 12 / (2 * 4)
    assert datasets.class_weights == [0.75, 1.5]
    assert datasets.config.train.class_weight == {"cat": 0.75, "dog": 1.5}
    reloaded = load_config(tree=yaml.safe_load(datasets.config.dump()))
    assert reloaded.train.class_weight == {"cat": 0.75, "dog": 1.5}
    assert make_datasets(reloaded).class_weights == [0.75, 1.5]  # a resume or test reads the same weights


# ---------------------------------------------------------------- training on a folder


def train_tree(tmp_path, root: Path, **train) -> dict:
    tree = tiny_tree(tmp_path / "runs", train={"epochs": 1, "batch_size": 8, **train})
    (tmp_path / "tiny_model").mkdir(exist_ok=True)  # what is checked is the data, not the model: the smallest one
    (tmp_path / "tiny_model" / "model.py").write_text(TINY_MODEL)
    tree["model"] = {"name": "tiny", "path": str(tmp_path / "tiny_model")}
    tree["data"] = {"source": "folder", "path": str(root), "image_size": 12, "channels": 3,
                    "test_fraction": 0.25, "val_fraction": 0.2}
    return tree


@pytest.mark.slow
def test_a_run_records_its_split_and_weights_and_test_reads_them_back(tmp_path):
    from shared import lifecycle
    from shared.classification import tflite
    from shared.tasks import rebuild

    root = make_class_folders(tmp_path / "imgs", {"cat": 12, "dog": 6, "猫": 4})
    run = lifecycle.train(load_config(tree=train_tree(tmp_path, root, class_weight="auto")), argv=["pytest"])
    lines = {name: (run.path / "split" / f"{name}.txt").read_text(encoding="utf-8").splitlines()
             for name in split.SPLITS}
    assert sum(map(len, lines.values())) == 22 and len(lines["test"]) >= 3  # each class gives one at least
    assert all((root / line).is_file() for found in lines.values() for line in found)
    # auto: n / (k * count) over the training split's 3 classes
    trained_counts = per_class(lines["train"])
    recorded = yaml.safe_load((run.path / "config.yaml").read_text(encoding="utf-8"))["train"]["class_weight"]
    assert recorded == {name: pytest.approx(len(lines["train"]) / (3 * count), rel=1e-5)
                        for name, count in trained_counts.items()}
    trained = run.test_metrics()
    tested = len(lines["test"])
    assert trained["examples"] == tested
    make_class_folders(root, {"cat": 20, "dog": 20, "eel": 3}, seed=5)  # new images, and a new class
    again = lifecycle.test(run)
    assert again["examples"] == tested and again["top1"] == trained["top1"]
    tflite_file = tflite.convert(*rebuild(run), run)  # the export's check runs on the recorded test split too
    assert tflite.evaluate_tflite(tflite_file, run, rebuild(run)[1])["examples"] == tested


@pytest.mark.slow
@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_a_damaged_image_among_many(tmp_path, on_corrupt):
    from shared import lifecycle

    root = make_class_folders(tmp_path / "imgs", {"cat": 12, "dog": 12})
    for name in ("cat", "dog"):
        (root / name / f"broken-{name}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    tree = train_tree(tmp_path, root)
    tree["data"]["on_corrupt"] = on_corrupt
    if on_corrupt == "error":
        with pytest.raises(UserError, match=r"image \S*broken-\w+\.png has a damaged PNG header; .*marked failed"):
            lifecycle.train(load_config(tree=tree), argv=["pytest"])
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = lifecycle.train(load_config(tree=tree), argv=["pytest"])
    # the validation split's unknown length (images left out) is expected, not Keras' "ran out of data"
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    recorded = {name: (run.path / "split" / f"{name}.txt").read_text(encoding="utf-8") for name in split.SPLITS}
    metrics = run.test_metrics()
    for part in split.SPLITS:  # each broken image skipped is counted once, in the split it was in
        assert metrics.get(f"skipped_{part}_images", 0) == recorded[part].count("broken-")


@pytest.mark.slow
def test_skip_with_not_one_readable_image_is_one_line_before_a_run_folder(tmp_path):
    """data.on_corrupt: skip over a folder of damaged files: one line, no run folder (it spun forever over the
    endless training stream, dropping every image: run in a subprocess with a timeout, so a hang fails)."""
    import sys

    root = tmp_path / "imgs"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(6):
            (root / name / f"broken-{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
    tree = train_tree(tmp_path, root)
    tree["data"]["on_corrupt"] = "skip"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tree))
    result = forked.run([sys.executable, "-m", "shared.runner", "--config", str(config)], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: not one of the ") and "training images of " in line and "decodes" in line
    assert not list((tmp_path / "runs").rglob("status.json"))


# One convolution and two heads: a main classifier and an auxiliary one, as GoogLeNet's aux_heads give (the
# outputs and their loss weights are what is checked, not GoogLeNet's many layers to build and trace).
AUX_HEADS_MODEL = '''
import keras

AUX_LOSS_WEIGHTS = {"aux": 0.3}


def build(num_classes: int = 10, input_shape: tuple = (16, 16, 3)):
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x))
    outputs = {"predictions": keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x),
               "aux": keras.layers.Dense(num_classes, activation="softmax", name="aux")(x)}
    return keras.Model(inputs, outputs, name="auxnet")
'''


@pytest.mark.slow
@pytest.mark.parametrize("aux_heads, batch_augment", [
    (False, []),  # train_tree's one-convolution model (one output is what these two cases need)
    (True, []),
    (False, [{"MixUp": {"alpha": 0.4}}]),
], ids=["plain", "aux-heads", "mixup"])
def test_class_weights_reach_every_output_loss(tmp_path, aux_heads, batch_augment):
    """fit() gets (images, targets, weights): each example weighs as its (mixed) class says, and one weight
    tensor scales the loss of every output, auxiliary heads included."""
    from shared.lifecycle import prepare
    from shared import optim
    from shared.lifecycle import compile_phase
    from shared.tasks import task_for

    root = make_class_folders(tmp_path / "imgs", {"cat": 8, "dog": 8})
    tree = train_tree(tmp_path, root, class_weight={"cat": 3.0})
    if aux_heads:
        (tmp_path / "auxnet").mkdir()
        (tmp_path / "auxnet" / "model.py").write_text(AUX_HEADS_MODEL)
        tree["model"] = {"name": "auxnet", "path": str(tmp_path / "auxnet")}
    tree["data"]["batch_augment"] = batch_augment
    _, module, net, data, task = prepare(task_for(load_config(tree=tree)))
    optim.apply_weight_decay(net, task.config.train)
    compile_phase(task, net, net, module, data, task.config.train.epochs, 1.0, 1)
    train, val = task.fit_data(net, module, data)
    images, targets, weights = next(iter(train))
    labels = next(iter(targets.values())) if isinstance(targets, dict) else targets
    if batch_augment:  # mixed one-hot labels: the mixture of the class weights
        expected = labels.numpy() @ np.array([3.0, 1.0])
    else:
        expected = np.where(labels.numpy() == 0, 3.0, 1.0)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    assert isinstance(targets, dict) == aux_heads and (not aux_heads or set(targets) == {"predictions", "aux"})
    assert len(next(iter(val))) == 2  # validation stays unweighted
    # one weight tensor for all outputs: doubling it doubles the whole loss (main and auxiliary terms)
    plain = net.evaluate(tf.data.Dataset.from_tensors((images, targets)), verbose=0, return_dict=True)["loss"]
    doubled = net.evaluate(tf.data.Dataset.from_tensors((images, targets, 2 * tf.ones_like(weights))), verbose=0,
                           return_dict=True)["loss"]
    assert doubled == pytest.approx(2 * plain, rel=1e-4)
    history = net.fit(train, steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize("weights, problem", [
    ({"eel": 2.0}, r"names 'eel', which is not a class of this data; the classes are cat, dog$"),
    ({"cat": -1.0}, r"train.class_weight.cat is -1.0; a class weight must be a positive number$"),
], ids=["unknown-class", "negative"])
def test_bad_class_weights_stop_before_a_run_folder(tmp_path, weights, problem):
    from shared import lifecycle

    root = make_class_folders(tmp_path / "imgs", {"cat": 3, "dog": 3})
    with pytest.raises(UserError, match=problem):
        lifecycle.train(load_config(tree=train_tree(tmp_path, root, class_weight=weights)), argv=["pytest"])
    assert not (tmp_path / "runs" / "tiny").exists()


@pytest.mark.parametrize("task", ["classification", "deblur", "detection"])
def test_every_task_records_data_and_source_paths_absolute(tmp_path, monkeypatch, task):
    """A run's config.yaml must find its folder from any directory (`test --run` elsewhere, `--resume`)."""
    from shared.config import load_config
    from shared.tasks import TASKS

    monkeypatch.chdir(tmp_path)
    config = load_config(tree={"task": task, "data": {"source": "folder", "path": "my_images", "data_dir": "~/tfds"},
                               "init": {"weights": "w.h5"}, "model": {"name": "resnet", "path": "my_model"},
                               "loop": {"dir": "loops/mine", "eval": "held.jsonl"}, "run": {"dir": "my_runs"}})
    resolved = TASKS[task](config).resolve()
    assert resolved.data.path == str(tmp_path / "my_images")
    assert resolved.data.data_dir == os.path.expanduser("~/tfds")
    assert resolved.init.weights == str(tmp_path / "w.h5") and resolved.init.from_run is None
    assert (resolved.model.path, resolved.run.dir) == (str(tmp_path / "my_model"), str(tmp_path / "my_runs"))
    assert (resolved.loop.dir, resolved.loop.eval) == (str(tmp_path / "loops/mine"), str(tmp_path / "held.jsonl"))
    recorded = yaml.safe_load(resolved.dump())
    assert (recorded["model"]["path"], recorded["run"]["dir"]) == (resolved.model.path, resolved.run.dir)
    assert config.data.path == "my_images"  # the loaded config stays as it was (frozen)

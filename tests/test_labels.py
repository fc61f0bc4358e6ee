"""Labels outside [0, num_classes) in any source are one line naming the file (or shard) and the label, never
a silent wrong training or a TF op traceback; `test --run` refuses data whose classes are not the run's."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared import runs
from shared.config import load_config
from shared.data import sources
from shared.data.tfrecord import read_dataset, write_shards
from shared.errors import UserError, embedded_user_error, run_cli
from shared.classification.evaluate import evaluate_model
from shared.lifecycle import test as evaluate

from conftest import tiny_tree
from test_data import config_for, fake_fashion_dir, make_folder_dataset


def write_tfrecord_dataset(root, labels: list[int], num_classes: int = 10):
    """root/train-00000-of-00001 and validation-00000-of-00001 holding tiny PNGs with `labels`, and a
    labels.txt of `num_classes` names."""
    images = root / "images"
    images.mkdir(parents=True)
    files = []
    for i in range(len(labels)):
        files.append(str(images / f"{i}.png"))
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(files[-1])
    write_shards(files, labels, None, root, "train", 1, progress=False)
    write_shards(files, [0] * len(files), None, root, "validation", 1, progress=False)
    (root / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(num_classes)))
    return root


def test_tfrecord_label_outside_the_classes_names_the_shard(tmp_path):
    root = write_tfrecord_dataset(tmp_path / "tfr", [0, 3, 10, 1])
    shard = root / "train-00000-of-00001"
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        list(read_dataset(shard, num_classes=10))
    message = str(embedded_user_error(error.value))
    assert f"TFRecord shard {shard} holds image/class/label 10, outside 0-9 for 10 classes" in message
    assert "data.label_offset: -1" in message and "\n" not in message
    # 0-based shards read as 1-based: label 0 falls below 0
    zero = write_tfrecord_dataset(tmp_path / "zero", [0, 1])
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        list(read_dataset(zero / "train-00000-of-00001", label_offset=-1, num_classes=10))
    assert "label 0 after label_offset=-1, outside 0-9" in str(embedded_user_error(error.value))
    assert "set data.label_offset: 0" in str(embedded_user_error(error.value))


@pytest.mark.slow
@pytest.mark.parametrize("on_corrupt", ["error", "skip"])
def test_training_on_a_shard_with_a_bad_label_is_one_line_from_the_cli(tmp_path, capsys, on_corrupt, one_conv_model):
    """Also with data.on_corrupt: skip, which drops undecodable images: a wrong label is no damaged image (before
    the fix it was dropped as one; with every label wrong the run "finished" having trained on nothing)."""
    from shared.lifecycle import train

    root = write_tfrecord_dataset(tmp_path / "tfr", [0, 1, 2, 10] * 4)
    tree = tiny_tree(tmp_path / "runs", data={"source": "tfrecord", "path": str(root), "num_classes": None,
                                              "test_split": "validation", "image_size": 8,
                                              "on_corrupt": on_corrupt},
                     train={"epochs": 1, "batch_size": 8})
    tree["model"] = one_conv_model
    assert run_cli(lambda: train(load_config(tree=tree), argv=["pytest"])) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    if on_corrupt == "error":
        assert err.startswith("error: TFRecord shard ")
        assert f"{root / 'train-00000-of-00001'} holds image/class/label 10, outside 0-9 for 10 classes" in err
    else:  # checked after the skipping, where the shard is no longer known
        assert err.startswith("error: a TFRecord example holds image/class/label 10, outside 0-9 for 10 classes")
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    status = runs.Run(run_dir).status()
    # the line names the run it marked failed; status.json holds the reason
    assert status["status"] == "failed" and err == f"error: {status['error']} (run {run_dir} is marked failed)"


def write_labels_idx(path, labels):
    header = bytes([0, 0, 0x08, 1]) + len(labels).to_bytes(4, "big")
    with gzip.open(path, "wb") as out:
        out.write(header + np.asarray(labels, np.uint8).tobytes())


def test_fashion_mnist_label_12_names_the_file(tmp_path):
    folder = fake_fashion_dir(tmp_path / "fm")
    labels = np.arange(20) % 10
    labels[7] = 12
    write_labels_idx(folder / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(UserError, match=r"t10k-labels-idx1-ubyte\.gz holds label 12 at example 7, outside 0-9 "
                                        r"for 10 classes; re-download"):
        sources.load(config_for(tmp_path, source="fashion_mnist", path=str(folder)).data)


def test_tfds_label_outside_its_classes_is_one_line(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(sources, "unreachable", lambda url: None, raising=False)  # the mock downloads nothing

    def as_dataset(self, *args, **kwargs):
        return tf.data.Dataset.from_tensor_slices({"image": np.zeros((3, 28, 28, 1), np.uint8),
                                                   "label": np.array([1, 12, 2], np.int64)})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        source = sources.load(config_for(tmp_path, source="tfds", name="mnist", image_size=28, channels=1).data)
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            list(source.train)
    assert str(embedded_user_error(error.value)).startswith(
        "TFDS dataset 'mnist' split 'train' holds label 12, outside 0-9 for its 10 classes;")


def test_evaluation_refuses_labels_outside_the_classes():
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(3, activation="softmax")])
    for bad in (-1, 3):
        dataset = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2), np.float32), [0, 1, bad, 2])).batch(4)
        with pytest.raises(UserError, match=f"the test data holds label {bad}, outside 0-2 for 3 classes"):
            evaluate_model(model, dataset, 3)


@pytest.mark.slow
def test_test_run_refuses_data_whose_classes_were_renamed(tmp_path, capsys, one_conv_model):
    from shared.lifecycle import train

    root = make_folder_dataset(tmp_path / "imgs", per_class=3)
    tree = tiny_tree(tmp_path / "runs", data={"source": "folder", "path": str(root), "test_split": "val",
                                              "num_classes": None, "image_size": 8},
                     train={"epochs": 1, "batch_size": 9})
    tree["model"] = one_conv_model
    run = train(load_config(tree=tree), argv=["pytest"])
    assert run.class_names() == ["cat", "dog", "fox"]
    for split in ("train", "val"):  # the same count of classes, one of them another
        (root / split / "dog").rename(root / split / "emu")
    with pytest.raises(UserError) as error:
        evaluate(run.path)
    assert str(error.value).startswith("the test data has classes ['cat', 'emu', 'fox'] where run ")
    assert "trained on ['cat', 'dog', 'fox']" in str(error.value)
    assert "first difference at index 1: 'emu' vs 'dog'" in str(error.value)
    for split in ("train", "val"):  # one class more: refused too (not "data.num_classes is 3 ...")
        (root / split / "emu").rename(root / split / "dog")
        (root / split / "gnu").mkdir()
        Image.new("RGB", (8, 8)).save(root / split / "gnu" / "0.png")
    assert run_cli(lambda: evaluate(run.path)) == 2
    err = capsys.readouterr().err
    assert "first difference at index 3: 'gnu' vs nothing" in err and err.count("\n") == 1


def test_ilsvrc_ground_truth_outside_the_1000_classes_names_the_file(tmp_path):
    from shared.data import ilsvrc
    from test_ilsvrc import make_flat_val, write_csv

    truth = make_flat_val(tmp_path)
    (tmp_path / "synsets.txt").write_text("\n".join(ilsvrc.imagenet_wnids()) + "\n")
    ground_truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    for bad in ("1001", "0", "-3"):
        ground_truth.write_text(f"1\n2\n{bad}\n4\n5\n6\n")
        with pytest.raises(UserError, match=f"ILSVRC2012_validation_ground_truth.txt line 3 is '{bad}', not an "
                                            f"ILSVRC2012_ID 1-1000"):
            ilsvrc.list_ilsvrc_split(tmp_path, "val", synsets=tmp_path / "synsets.txt")
    truth["ILSVRC2012_val_00000002"] = "n99999999"
    write_csv(tmp_path / "LOC_val_solution.csv", truth)
    with pytest.raises(UserError, match=r"LOC_val_solution.csv gives ILSVRC2012_val_00000002.JPEG the class "
                                        r"'n99999999', none of the 1000 ILSVRC2012 wnids"):
        ilsvrc.list_ilsvrc_split(tmp_path, "val")


@pytest.mark.slow
def test_fashion_mnist_run_records_its_names_and_per_class_results(tmp_path, capsys, one_conv_model):
    """labels.txt holds Fashion-MNIST's ten names; test_metrics.json their per-class results; training and
    `test --run` print the same worst classes and draw errors.png."""
    from shared import runner
    from shared.fashion_mnist import FASHION_MNIST_CLASSES
    from shared.lifecycle import train
    from shared.classification.task import summary

    tree = tiny_tree(tmp_path / "runs", data={"source": "fashion_mnist", "path": str(fake_fashion_dir(tmp_path / "fm")),
                                              "num_classes": None, "channels": 1, "image_size": 16},
                     train={"epochs": 1, "batch_size": 20})
    tree["model"] = one_conv_model  # the names and per-class figures are checked, not the model
    run = train(load_config(tree=tree), argv=["pytest"])
    assert (run.path / "labels.txt").read_text().splitlines() == FASHION_MNIST_CLASSES == run.class_names()
    recorded = run.test_metrics()
    assert [entry["class"] for entry in recorded["per_class"]] == FASHION_MNIST_CLASSES
    assert [entry["support"] for entry in recorded["per_class"]] == [2] * 10  # 20 test images, labels i % 10
    assert (run.path / "errors.png").is_file()
    (run.path / "errors.png").unlink()
    capsys.readouterr()
    assert runner.main(["test", "--run", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert summary(recorded) in out and "worst 5 classes by F1" in out  # the figures recorded at training time
    assert (run.path / "errors.png").is_file()  # redrawn by test --run


def test_tfds_labels_are_checked_after_on_corrupt_skip_drops_undecodable_images(tmp_path, monkeypatch):
    """An encoded TFDS dataset (variable image size) under data.on_corrupt: skip: the damaged image is dropped
    (its decoding error is not what stops the reading), the label outside the classes still stops it in one
    line, naming the dataset."""
    import tensorflow_datasets as tfds

    from shared.data import make_datasets

    monkeypatch.setattr(sources, "unreachable", lambda url: None, raising=False)  # the mock downloads nothing

    def as_dataset(self, *args, **kwargs):
        good = tf.io.encode_jpeg(np.zeros((10, 12, 3), np.uint8))
        return tf.data.Dataset.from_tensor_slices({"image": tf.stack([good, tf.constant(b"not an image"), good]),
                                                   "label": np.array([1, 2, 12], np.int64)})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        config = config_for(tmp_path, source="tfds", name="tf_flowers", channels=3, on_corrupt="skip",
                            shuffle_buffer=1, deterministic=True)
        datasets = make_datasets(config)
        with pytest.raises(tf.errors.InvalidArgumentError) as error:
            list(datasets.test)
    assert str(embedded_user_error(error.value)).startswith(
        "TFDS dataset 'tf_flowers' holds label 12, outside 0-4 for its 5 classes;")

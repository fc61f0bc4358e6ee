"""ImageNet in the extracted ILSVRC layout: tiny fakes in the real formats with real wnids."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from shared.data import ilsvrc, preprocess
from shared.errors import UserError

# Real wnids and their Keras indices: first, second, last.
CLASSES = {"n01440764": 0, "n01443537": 1, "n15075141": 999}


def write_image(path: Path, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> Path:
    """A small random image, saved in `fmt` whatever the file name says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, channels), dtype=np.uint8)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path, fmt)
    return path


def make_train(root: Path) -> dict[str, int]:
    """train/<wnid>/: two images a class, with the real set's oddities (grayscale, CMYK, PNG as .JPEG),
    and a leftover class tar that must be ignored. Returns file name -> expected label."""
    kinds = {"n01440764": [("RGB", "JPEG"), ("L", "JPEG")],
             "n01443537": [("CMYK", "JPEG"), ("RGB", "JPEG")],
             "n15075141": [("RGB", "PNG"), ("RGB", "JPEG")]}
    expected = {}
    for wnid, images in kinds.items():
        for n, (mode, fmt) in enumerate(images, start=1):
            write_image(root / "train" / wnid / f"{wnid}_{n}.JPEG", mode, fmt, seed=n)
            expected[f"{wnid}_{n}.JPEG"] = CLASSES[wnid]
    (root / "train" / "n01440764.tar").write_bytes(b"leftover")
    return expected


def make_flat_val(root: Path) -> dict[str, str]:
    """val/ILSVRC2012_val_0000000N.JPEG as the val tar extracts; returns image id -> wnid."""
    truth = {f"ILSVRC2012_val_{n:08d}": wnid for n, wnid in
             enumerate(["n15075141", "n01440764", "n01443537", "n01440764", "n15075141", "n01443537"], start=1)}
    for n, image_id in enumerate(truth):
        write_image(root / "val" / f"{image_id}.JPEG", seed=n)
    return truth


def write_csv(path: Path, truth: dict[str, str]) -> None:
    rows = [f"{image_id},{wnid} 10 20 30 40 {wnid} 1 2 3 4 " for image_id, wnid in truth.items()]
    path.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")


def check(files: list[str], labels: list[int], expected: dict[str, int]) -> None:
    assert {Path(f).name: label for f, label in zip(files, labels)} == expected
    assert len(files) == len(expected)
    order = list(range(len(files)))  # sorted, then shuffled once with Random(0)
    random.Random(0).shuffle(order)
    assert [sorted(files)[i] for i in order] == files


def test_wnids_are_keras_order():
    wnids = ilsvrc.imagenet_wnids()
    assert len(wnids) == 1000 and wnids == sorted(set(wnids))
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    index = ilsvrc.wnid_to_index()
    assert all(index[wnid] == i for wnid, i in CLASSES.items())


def test_train_class_folders(tmp_path):
    expected = make_train(tmp_path)
    files, labels = ilsvrc.list_ilsvrc_split(tmp_path, "train")
    check(files, labels, expected)
    assert ilsvrc.list_ilsvrc_split(str(tmp_path), "train") == (files, labels)


@pytest.mark.parametrize("where", [".", "val", ".."])
def test_flat_val_with_kaggle_csv(tmp_path, where):
    root = tmp_path / "imagenet"
    truth = make_flat_val(root)
    write_csv(root / where / "LOC_val_solution.csv", truth)
    files, labels = ilsvrc.list_ilsvrc_split(root, "val")
    check(files, labels, {f"{image_id}.JPEG": CLASSES[wnid] for image_id, wnid in truth.items()})


def test_val_class_folders(tmp_path):
    for n, wnid in enumerate(CLASSES):
        write_image(tmp_path / "val" / wnid / f"ILSVRC2012_val_{n + 1:08d}.JPEG", seed=n)
    files, labels = ilsvrc.list_ilsvrc_split(tmp_path, "val")
    check(files, labels, {f"ILSVRC2012_val_{n + 1:08d}.JPEG": CLASSES[w] for n, w in enumerate(CLASSES)})


def test_val_image_missing_from_csv(tmp_path):
    truth = make_flat_val(tmp_path)
    del truth["ILSVRC2012_val_00000004"]
    write_csv(tmp_path / "LOC_val_solution.csv", truth)
    with pytest.raises(UserError, match="ILSVRC2012_val_00000004.JPEG has no entry in .*LOC_val_solution.csv"):
        ilsvrc.list_ilsvrc_split(tmp_path, "val")


def test_flat_val_without_ground_truth(tmp_path):
    make_flat_val(tmp_path)
    with pytest.raises(UserError, match="no ground truth"):
        ilsvrc.list_ilsvrc_split(tmp_path, "val")


def test_devkit_txt_needs_the_id_mapping(tmp_path):
    truth = make_flat_val(tmp_path)
    # Devkit IDs in a made-up order unlike the sorted one: ID i is the wnid at sorted position 1000 - i.
    id_order = ilsvrc.imagenet_wnids()[::-1]
    ids = [id_order.index(wnid) + 1 for wnid in truth.values()]
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids))
    with pytest.raises(UserError, match="meta.mat"):
        ilsvrc.list_ilsvrc_split(tmp_path, "val")
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("\n".join(id_order) + "\n")
    expected = {f"{image_id}.JPEG": CLASSES[wnid] for image_id, wnid in truth.items()}
    check(*ilsvrc.list_ilsvrc_split(tmp_path, "val", synsets=synsets), expected)

    scipy_io = pytest.importorskip("scipy.io")
    records = [(i, wnid, 0) for i, wnid in enumerate(id_order, start=1)] + [(1001, "n00001740", 5)]
    table = np.array(records, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    scipy_io.savemat(tmp_path / "meta.mat", {"synsets": table.reshape(-1, 1)})
    check(*ilsvrc.list_ilsvrc_split(tmp_path, "val"), expected)


def test_layout_mistakes(tmp_path):
    make_train(tmp_path)
    write_image(tmp_path / "train" / "n99999999" / "x.JPEG")
    with pytest.raises(UserError, match="n99999999 is not an ImageNet class folder"):
        ilsvrc.list_ilsvrc_split(tmp_path, "train")
    with pytest.raises(UserError, match="no test/ folder"):
        ilsvrc.list_ilsvrc_split(tmp_path, "test")
    (tmp_path / "tars" / "train").mkdir(parents=True)
    (tmp_path / "tars" / "train" / "n01440764.tar").write_bytes(b"tar")
    with pytest.raises(UserError, match="only .tar archives"):
        ilsvrc.list_ilsvrc_split(tmp_path / "tars", "train")


def test_decode_handles_the_train_set_oddities(tmp_path):
    """Grayscale, CMYK and a PNG named .JPEG decode to RGB uint8, whole and through the fused crop."""
    make_train(tmp_path)
    for name in ("n01440764_2.JPEG", "n01443537_1.JPEG", "n15075141_1.JPEG"):
        path = next((tmp_path / "train").glob(f"*/{name}"))
        data = tf.io.read_file(str(path))
        image = preprocess.decode(data, 3)
        assert image.shape == (6, 8, 3) and image.dtype == tf.uint8
        reference = np.asarray(Image.open(path).convert("RGB"), np.int32)
        assert np.abs(image.numpy().astype(np.int32) - reference).max() <= 4  # CMYK: rounding only
        crop = preprocess.decode_and_crop(data, (1, 2, 4, 5), 3)
        assert crop.shape == (4, 5, 3) and crop.dtype == tf.uint8
        assert np.abs(crop.numpy().astype(np.int32) - reference[1:5, 2:7]).max() <= 4
        assert list(preprocess.encoded_shape(data).numpy()) == [6, 8]


def test_human_labels_and_decode_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # an empty Keras home: no cached class index
    wnids = ilsvrc.imagenet_wnids()
    assert list(ilsvrc.human_labels()) == wnids and ilsvrc.human_labels()["n01440764"] == "tench"
    probabilities = np.zeros((2, 1000), np.float32)
    probabilities[0, [999, 0, 1]] = [0.5, 0.3, 0.2]
    probabilities[1, 7] = 1.0
    top = ilsvrc.decode_predictions(probabilities, top=3)  # the shipped names, offline
    assert [(w, label) for w, label, _ in top[0]] == [("n15075141", "toilet tissue"), ("n01440764", "tench"),
                                                      ("n01443537", "goldfish")]
    assert not (tmp_path / "keras").exists()  # nothing downloaded or cached

    index = {str(i): [wnid, f"name {i}"] for i, wnid in enumerate(wnids)}
    explicit = tmp_path / "imagenet_class_index.json"
    explicit.write_text(json.dumps(index))
    labels = ilsvrc.human_labels(explicit)
    assert len(labels) == 1000 and labels["n15075141"] == "name 999" and labels["n01440764"] == "name 0"
    top = ilsvrc.decode_predictions(probabilities, top=3, class_index_path=explicit)
    assert top[0] == [("n15075141", "name 999", pytest.approx(0.5)), ("n01440764", "name 0", pytest.approx(0.3)),
                      ("n01443537", "name 1", pytest.approx(0.2))]
    assert top[1][0] == (wnids[7], "name 7", 1.0) and all(isinstance(s, float) for _, _, s in top[1])

    index["0"], index["1"] = index["1"], index["0"]
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(index))
    with pytest.raises(UserError, match="another order"):
        ilsvrc.decode_predictions(probabilities, class_index_path=swapped)
    with pytest.raises(UserError, match="not found"):
        ilsvrc.human_labels(tmp_path / "missing.json")


def test_ilsvrc_source_feeds_the_pipeline_with_keras_indices(tmp_path):
    """The whole path: layout -> data.source ilsvrc -> fused decode-and-crop batches, 1000 classes."""
    from shared.config import load_config
    from shared.data import make_datasets

    make_train(tmp_path)
    write_csv(tmp_path / "LOC_val_solution.csv", make_flat_val(tmp_path))
    config = load_config(tree={"data": {"source": "ilsvrc", "path": str(tmp_path), "test_split": "val",
                                        "image_size": 16, "augment": ["random_resized_crop", "horizontal_flip"]},
                               "train": {"batch_size": 6}})
    datasets = make_datasets(config)
    assert datasets.num_classes == 1000 and (datasets.num_train, datasets.num_test) == (6, 6)
    assert datasets.class_names == ilsvrc.imagenet_wnids()  # a run's labels.txt: wnids; plots show readable()
    images, labels = next(iter(datasets.train))
    assert images.shape == (6, 16, 16, 3) and set(labels.numpy()) <= {0, 1, 999}
    images, labels = next(iter(datasets.test))
    assert sorted(labels.numpy().tolist()) == [0, 0, 1, 1, 999, 999]


def test_shipped_class_names_follow_keras_order_and_read_offline(tmp_path, monkeypatch):
    """The 1000 names ship with the package: same order as imagenet_wnids(), unique, no Keras cache needed."""
    from shared.class_names import imagenet_names, readable

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty"))
    names = imagenet_names()
    assert list(names) == ilsvrc.imagenet_wnids() and len(set(names.values())) == 1000
    assert names["n01440764"] == "tench" and names["n15075141"] == "toilet tissue"
    assert names["n02012849"] != names["n03126707"]  # the two cranes are told apart
    assert readable(["n01440764", "n01443537", "T-shirt/top", "n99999999", "cat"]) == [
        "tench", "goldfish", "T-shirt/top", "n99999999", "cat"]
    assert readable([]) == []

"""`data.source: tfds`, `data.name: imagenet2012` end to end and offline: TFDS's own imagenet2012 builder
prepares fake copies of the manually downloaded tars, and the project reads them with Keras' class indices.

The tars follow what the builder reads (tensorflow_datasets/datasets/imagenet2012/):
- ILSVRC2012_img_train.tar: one inner tar per wnid, `n01440764.tar` holding `n01440764_<k>.JPEG`; the label is
  the inner tar's name.
- ILSVRC2012_img_val.tar: flat `ILSVRC2012_val_<8 digits>.JPEG`. TFDS labels them by *position*: the i-th name
  in sorted order gets line i of its validation_labels.txt (`dict(zip(sorted(names), labels))`), whatever
  the number in the name. So the fake val tar holds the first images, 00000001 ..., whose labels are the
  first lines of that file.
- ILSVRC2012_img_test.tar is optional (the builder skips a missing split), so there is none.
(Without the tars, the UserError naming ILSVRC2012_img_train.tar is tested in test_data.py.)

Every image is one solid color with a little noise, a distinct color per image, so the test checks that each
label arrives paired with its own image, through TFDS and the project's decode/crop/normalize pipeline.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.config import load_config
from shared.data import ilsvrc, make_datasets

IMAGENET_MEAN = np.array([123.675, 116.28, 103.53])
IMAGENET_STD = np.array([58.395, 57.12, 57.375])

# Train: wnid -> colors of its images. Keras indices 0 and 999, and the first val image's class.
TRAIN = {
    "n01440764": [(200, 40, 40), (40, 200, 40)],
    "n01751748": [(40, 40, 200)],
    "n15075141": [(200, 200, 40)],
}
VAL_COLORS = [(40, 200, 200), (200, 40, 200), (120, 120, 120), (230, 230, 230)]  # val images 1, 2, 3, 4


def tfds_validation_labels(count: int) -> list[str]:
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    lines = Path(imagenet_common.tfds.core.tfds_path(imagenet_common._VALIDATION_LABELS_FNAME)).read_text()
    return lines.split()[:count]


def jpeg(color, rng) -> bytes:
    """A real 40x30 JPEG: `color` plus a little random noise."""
    noise = rng.integers(-8, 9, (30, 40, 3))
    pixels = np.clip(np.array(color) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_manual_dir(manual: Path) -> None:
    rng = np.random.default_rng(0)
    manual.mkdir(parents=True)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for wnid, colors in TRAIN.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tar:
                for k, color in enumerate(colors):
                    add_bytes(tar, f"{wnid}_{k + 1}.JPEG", jpeg(color, rng))
            add_bytes(outer, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i in reversed(range(len(VAL_COLORS))):  # not in sorted order: TFDS sorts the names itself
            add_bytes(tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(VAL_COLORS[i], rng))


def colors_by_label(images: np.ndarray, labels: np.ndarray) -> list[tuple[int, tuple]]:
    """(label, mean color on the 0-255 scale) per example, undoing ImageNet normalization."""
    pixels = images * IMAGENET_STD + IMAGENET_MEAN
    return [(int(label), tuple(pixels[i].mean(axis=(0, 1)))) for i, label in enumerate(labels)]


def assert_pairs(images, labels, expected: list[tuple[int, tuple]]) -> None:
    """Each (label, image) matches one expected (label, color), every expected pair used once."""
    remaining = list(expected)
    for label, color in colors_by_label(images, labels):
        match = next((pair for pair in remaining
                      if pair[0] == label and np.allclose(pair[1], color, atol=12)), None)
        assert match is not None, f"label {label} with color {np.round(color)} is not one of {remaining}"
        remaining.remove(match)
    assert not remaining


def test_tfds_imagenet2012_from_manual_tars(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    manual = tmp_path / "manual"
    write_manual_dir(manual)
    config = load_config(tree={
        "data": {"source": "tfds", "name": "imagenet2012", "manual_dir": str(manual),
                 "data_dir": str(tmp_path / "tfds"), "test_split": "validation", "image_size": 16,
                 "augment": ["random_resized_crop", "horizontal_flip"]},
        "train": {"batch_size": 4},
    })
    datasets = make_datasets(config)

    index = ilsvrc.wnid_to_index()
    assert datasets.num_classes == 1000
    assert datasets.class_names == ilsvrc.imagenet_wnids()
    assert datasets.class_names[0] == "n01440764" and datasets.class_names[999] == "n15075141"
    assert datasets.num_train == sum(len(colors) for colors in TRAIN.values()) == 4
    assert datasets.num_test == len(VAL_COLORS)
    assert datasets.source.encoding == "bytes" and not datasets.source.fixed_size  # decoded in the fused crop

    # One train batch is the whole (shuffled) epoch: every image once, with its wnid's Keras index.
    images, labels = (tensor.numpy() for tensor in next(iter(datasets.train)))
    assert images.shape == (4, 16, 16, 3) and labels.dtype == np.int32
    assert sorted(labels.tolist()) == [0, 0, index["n01751748"], 999]
    assert_pairs(images, labels, [(index[wnid], color) for wnid, colors in TRAIN.items() for color in colors])

    # Validation: val image i has the wnid on line i of TFDS's validation_labels.txt.
    val_wnids = tfds_validation_labels(len(VAL_COLORS))
    assert val_wnids[0] == "n01751748"  # the class shared with train above
    images, labels = (tensor.numpy() for tensor in next(iter(datasets.test)))
    assert images.shape == (4, 16, 16, 3)
    assert sorted(labels.tolist()) == sorted(index[wnid] for wnid in val_wnids)
    assert_pairs(images, labels, [(index[wnid], color) for wnid, color in zip(val_wnids, VAL_COLORS)])

    # A second make_datasets reuses the prepared copy in data_dir (the tars are no longer needed).
    for tar in manual.iterdir():
        tar.unlink()
    again = make_datasets(config)
    assert (again.num_train, again.num_test) == (4, len(VAL_COLORS))

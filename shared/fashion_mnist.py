"""The Fashion-MNIST files as the Debian package and the original release ship them: their names, class
names, pixel statistics and the IDX reader. Free of TensorFlow, so that tools on a machine without it
(scripts/fit_on_jax.py) read the data exactly as the `fashion_mnist` source does."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from shared.errors import UserError

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# Per-channel statistics on the 0-255 scale.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = [72.94], [90.02]


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: magic, dims, then raw uint8 data), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        magic = int.from_bytes(data[0:4], "big")
        dtype_code, ndim = magic >> 8, magic & 0xFF
        if data[0:2] != b"\x00\x00" or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return array.reshape(shape)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"{path} is not a readable IDX file ({error}); re-download or reinstall it") from None


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int32 [N]) of a split ("train" or "test") from its two IDX files,
    checked to agree in length and to hold only the class indices 0-9."""
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images, labels = read_idx(folder / images_file), read_idx(folder / labels_file)
    if len(images) != len(labels):
        raise UserError(f"{folder}: {images_file} and {labels_file} disagree on the number of examples")
    check_labels(labels, len(FASHION_MNIST_CLASSES), folder / labels_file)
    return images, labels.astype(np.int32)


def check_labels(labels: np.ndarray, num_classes: int, where: str | Path) -> None:
    """Raise UserError naming `where`, the first label outside 0..num_classes-1 and its position."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"{where} holds label {labels[bad[0]]} at example {bad[0]}{more}, outside 0-{num_classes - 1} "
                        f"for {num_classes} classes; re-download or reinstall the file")

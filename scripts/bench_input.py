"""Input-pipeline throughput on real JPEG photographs at ImageNet-like sizes, all measured in one run:

  (a) decode-only ceiling: tf.io.decode_jpeg on every file, parallel map, nothing else
  (b) the project's train pipeline: folder source, fused decode-and-random-resized-crop to 224, flip,
      normalize, batch (shared.data.make_datasets)
  (c) the project's eval pipeline: fused decode-and-center-crop, resize, normalize, batch
  (d) plain PIL + keras.utils.PyDataset doing the same crop and flip, one batch at a time (how the
      original code fed AlexNet)

The photographs are crops of matplotlib's sample photo (grace_hopper.jpg, shipped with matplotlib),
re-encoded as JPEG at 500x375-like sizes. The last line is `ratio train/decode_only=X.XX train/pil=Y.YY`.

    python scripts/bench_input.py [--images 512] [--batch 64] [--seconds 8]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from pathlib import Path


import shared  # noqa: E402,F401  (first: it sets the host allocator before TensorFlow starts)
import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from shared.config import load_config  # noqa: E402
from shared.data import make_datasets  # noqa: E402

SIZES = [(500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (400, 300)]
IMAGE_SIZE = 224


def make_photos(root: Path, count: int) -> None:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg: random crops of a real photograph."""
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    rng = random.Random(0)
    for split in ("train", "val"):
        for index in range(count):
            width, height = rng.choice(SIZES)
            scale = rng.uniform(0.5, 1.0)
            box_w, box_h = int(photo.width * scale), int(photo.height * scale)
            left, top = rng.randint(0, photo.width - box_w), rng.randint(0, photo.height - box_h)
            crop = photo.crop((left, top, left + box_w, top + box_h)).resize((width, height), Image.BILINEAR)
            folder = root / split / f"class_{index % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            crop.save(folder / f"{index:05d}.jpg", quality=90)


def throughput(batches, batch_size_of, seconds: float) -> float:
    """Images per second over `seconds` after one warm-up batch."""
    iterator = iter(batches)
    next(iterator)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        count += batch_size_of(next(iterator))
    return count / (time.perf_counter() - started)


def decode_only(files: list[str], batch: int) -> tf.data.Dataset:
    def decode(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        return tf.reduce_sum(tf.cast(image[::64, ::64], tf.int32))  # uses the pixels; sizes differ, so no stack
    return (tf.data.Dataset.from_tensor_slices(files).repeat()
            .map(decode, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch).prefetch(tf.data.AUTOTUNE))


class PilBatches(keras.utils.PyDataset):
    """The classic generator: PIL decode, Inception-style random crop, resize, flip, normalize."""

    def __init__(self, files: list[str], batch: int):
        super().__init__()
        self.files, self.batch, self.rng = files, batch, random.Random(0)

    def __len__(self):
        return math.ceil(len(self.files) / self.batch)

    def crop_box(self, width: int, height: int):
        area = width * height
        for _ in range(10):
            target = self.rng.uniform(0.08, 1.0) * area
            aspect = math.exp(self.rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left, top = self.rng.randint(0, width - w), self.rng.randint(0, height - h)
                return left, top, left + w, top + h
        return 0, 0, width, height

    def __getitem__(self, index):
        images = []
        for path in self.files[index * self.batch:(index + 1) * self.batch]:
            image = Image.open(path).convert("RGB")
            image = image.crop(self.crop_box(*image.size)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            if self.rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            images.append((np.asarray(image, np.float32) - 127.5) / 58.0)
        return np.stack(images), np.zeros(len(images), np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="photographs per split")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per pipeline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photos(root, args.images)
        config = load_config(tree={
            "data": {"source": "folder", "path": str(root), "test_split": "val", "image_size": IMAGE_SIZE,
                     "augment": ["random_resized_crop", "horizontal_flip"]},
            "train": {"batch_size": args.batch}})
        datasets = make_datasets(config)
        files = datasets.source.files["train"]
        count = len
        results = {
            "decode_only": throughput(decode_only(files, args.batch), lambda b: int(tf.shape(b)[0]), args.seconds),
            "train": throughput(datasets.train, lambda b: int(tf.shape(b[0])[0]), args.seconds),
            "eval": throughput(datasets.test.repeat(), lambda b: int(tf.shape(b[0])[0]), args.seconds),
            "pil": throughput((PilBatches(files, args.batch)[i % math.ceil(len(files) / args.batch)]
                               for i in range(10**9)), lambda b: count(b[0]), args.seconds),
        }
    print(f"{len(files)} JPEG photographs ({', '.join(f'{w}x{h}' for w, h in SIZES)}), {IMAGE_SIZE} px crops, "
          f"batch {args.batch}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
          f"TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC')}")
    labels = {"decode_only": "(a) decode-only ceiling, tf.io.decode_jpeg", "train": "(b) project train pipeline",
              "eval": "(c) project eval pipeline", "pil": "(d) PIL + keras.utils.PyDataset"}
    for key, label in labels.items():
        print(f"{label:45} {results[key]:8.1f} images/s")
    print(f"ratio train/decode_only={results['train'] / results['decode_only']:.2f} "
          f"train/pil={results['train'] / results['pil']:.2f}")


if __name__ == "__main__":
    main()

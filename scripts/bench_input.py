"""Input-pipeline throughput on real JPEG photographs at ImageNet-like sizes, all measured in one run:

  (a) decode-only ceiling: tf.io.decode_jpeg on every file, parallel map, nothing else
  (b) the project's train pipeline: folder source, fused decode-and-random-resized-crop to 224, flip,
      normalize, batch (shared.data.make_datasets)
  (c) the project's eval pipeline: fused decode-and-center-crop, resize, normalize, batch
  (d) plain PIL + keras.utils.PyDataset doing the same crop and flip, one batch at a time (how the
      original code fed AlexNet)

Then, per core (the train pipeline on one thread: tf.data's private thread pool of 1; images per second of the
process's CPU time, so other work on the machine does not change it), what a decode costs:

  (e) 12-megapixel photos (4000x3000), full-size decode of each crop window vs (f) DCT-scaled decode
      (`data.dct_scaling`: a window at least 2x the 224 px target decoded at 1/2, 1/4 or 1/8)
  (e') and (f') their ceiling: the whole 12-MP file decoded alone, at full size and at 1/8 (the most DCT scaling
      can save: the entropy decoding of every coefficient is left, whatever the scale)
  (g) the ILSVRC-sized photos from TFRecord shards of their own bytes vs (h) from shards written with
      `scripts/make_tfrecords.py --max-side 320` (the same pipeline, DCT scaling on in both)

The photographs are crops of matplotlib's sample photo (grace_hopper.jpg, shipped with matplotlib),
re-encoded as JPEG at 500x375-like sizes (and upscaled to 4000x3000 for (e) and (f)). The last lines are
`ratio train/decode_only=X.XX train/pil=Y.YY` and
`ratio 12mp dct/full=X.XX (ceiling 1/8 vs full decode Z.ZZ) ilsvrc max_side_320/original=Y.YY`.

    python scripts/bench_input.py [--images 512] [--photos-12mp 24] [--batch 64] [--seconds 8]
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
TWELVE_MP = (4000, 3000)


def make_photos(root: Path, count: int, sizes: list[tuple[int, int]] = SIZES, noise: float = 0.0) -> None:
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg: random crops of a real photograph (with Gaussian
    `noise` of that standard deviation: an upscaled crop is smoother than a camera's photo, and compresses better)."""
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    rng = random.Random(0)
    for split in ("train", "val"):
        for index in range(count):
            width, height = rng.choice(sizes)
            scale = rng.uniform(0.5, 1.0)
            box_w, box_h = int(photo.width * scale), int(photo.height * scale)
            left, top = rng.randint(0, photo.width - box_w), rng.randint(0, photo.height - box_h)
            crop = photo.crop((left, top, left + box_w, top + box_h)).resize((width, height), Image.BILINEAR)
            if noise:
                grain = np.random.default_rng(index).normal(0, noise, (height, width, 1))
                pixels = np.asarray(crop, np.float32) + grain
                crop = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            folder = root / split / f"class_{index % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            crop.save(folder / f"{index:05d}.jpg", quality=90)


def throughput(batches, batch_size_of, seconds: float, per_cpu_second: bool = False) -> float:
    """Images per second over `seconds` after one warm-up batch; `per_cpu_second`: per second of this process's
    CPU time instead (images per core-second, which other work on the machine does not change)."""
    iterator = iter(batches)
    next(iterator)
    count, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        count += batch_size_of(next(iterator))
    return count / ((time.process_time() - cpu) if per_cpu_second else (time.perf_counter() - started))


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


def one_core(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """The pipeline on one thread: its images/s is a figure per core."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return dataset.with_options(options)


def train_rate(data: dict, batch: int, seconds: float) -> float:
    """Images/s per core of the project's train pipeline (random-resized crop to 224, flip, normalize) on `data`."""
    config = load_config(tree={"data": {"image_size": IMAGE_SIZE, "test_split": "val", "shuffle_buffer": 64,
                                        "augment": ["random_resized_crop", "horizontal_flip"], **data},
                               "train": {"batch_size": batch}})
    return throughput(one_core(make_datasets(config).train), lambda b: int(tf.shape(b[0])[0]), seconds,
                      per_cpu_second=True)


def decode_rate(folder: Path, ratio: int, seconds: float) -> float:
    """Whole JPEG files of `folder` decoded at 1/`ratio` size, one after another in this thread: files per
    CPU-second."""
    contents = [tf.io.read_file(str(path)) for path in sorted(folder.rglob("*.jpg"))]
    tf.io.decode_jpeg(contents[0], channels=3, ratio=ratio)  # the op's first call aside
    decoded, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        for content in contents:
            tf.io.decode_jpeg(content, channels=3, ratio=ratio)
            decoded += 1
    return decoded / (time.process_time() - started)


def per_core(root: Path, photos_12mp: int, batch: int, seconds: float) -> dict[str, float]:
    """(e)-(h): 12-MP photos with and without DCT scaling; ILSVRC-sized photos from shards of their own bytes and
    from --max-side 320 shards."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tfrecords", Path(__file__).with_name("make_tfrecords.py"))
    make_tfrecords_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_tfrecords_script)
    big = root / "12mp"
    make_photos(big, photos_12mp, [TWELVE_MP, TWELVE_MP[::-1]], noise=4.0)
    results = {"12mp_full": train_rate({"source": "folder", "path": str(big), "dct_scaling": False}, batch, seconds),
               "12mp_dct": train_rate({"source": "folder", "path": str(big), "dct_scaling": True}, batch, seconds),
               "12mp_decode_full": decode_rate(big, 1, seconds), "12mp_decode_eighth": decode_rate(big, 8, seconds)}
    for name, extra in (("original", []), ("max_side_320", ["--max-side", "320"])):
        out = root / f"shards_{name}"
        assert make_tfrecords_script.main([str(root), str(out), "--train-shards", "8", "--val-shards", "2",
                                           "--no-progress", *extra]) == 0
        results[f"ilsvrc_{name}"] = train_rate({"source": "tfrecord", "path": str(out), "dct_scaling": True}, batch,
                                               seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="photographs per split")
    parser.add_argument("--photos-12mp", type=int, default=24, help="12-megapixel photographs per split")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="measuring time per pipeline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_photos(root, args.images)
        config = load_config(tree={
            "data": {"source": "folder", "path": str(root), "test_split": "val", "image_size": IMAGE_SIZE,
                     "augment": ["random_resized_crop", "horizontal_flip"], "dct_scaling": True},  # as a new run
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
        results.update(per_core(root, args.photos_12mp, min(args.batch, 16), args.seconds))
    print(f"{len(files)} JPEG photographs ({', '.join(f'{w}x{h}' for w, h in SIZES)}), {IMAGE_SIZE} px crops, "
          f"batch {args.batch}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
          f"TF_CPU_ALLOCATOR_USE_BFC={os.environ.get('TF_CPU_ALLOCATOR_USE_BFC')}")
    labels = {"decode_only": "(a) decode-only ceiling, tf.io.decode_jpeg", "train": "(b) project train pipeline",
              "eval": "(c) project eval pipeline", "pil": "(d) PIL + keras.utils.PyDataset"}
    for key, label in labels.items():
        print(f"{label:45} {results[key]:8.1f} images/s")
    print(f"per core (one thread; images per CPU-second), train pipeline, {min(args.batch, 16)} a batch:")
    labels = {"12mp_full": f"(e) {args.photos_12mp} 12-MP photos, full-size decode",
              "12mp_dct": "(f) the same, DCT-scaled decode",
              "12mp_decode_full": "(e') whole 12-MP file, decode only, full size",
              "12mp_decode_eighth": "(f') the same at 1/8 (DCT scaling's ceiling)",
              "ilsvrc_original": "(g) ILSVRC-sized, shards of their own bytes",
              "ilsvrc_max_side_320": "(h) ILSVRC-sized, --max-side 320 shards"}
    for key, label in labels.items():
        print(f"{label:45} {results[key]:8.1f} images/s per core")
    print(f"ratio train/decode_only={results['train'] / results['decode_only']:.2f} "
          f"train/pil={results['train'] / results['pil']:.2f}")
    print(f"ratio 12mp dct/full={results['12mp_dct'] / results['12mp_full']:.2f} "
          f"(ceiling 1/8 vs full decode {results['12mp_decode_eighth'] / results['12mp_decode_full']:.2f}) "
          f"ilsvrc max_side_320/original={results['ilsvrc_max_side_320'] / results['ilsvrc_original']:.2f}")


if __name__ == "__main__":
    main()

"""A classification run's TFLite file (`shared.tflite` converts): one normalized image in, the class
probabilities out, int8 calibrated on the run's own training images; and its top-1 / top-5 through LiteRT on
the run's test split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from shared import data as data_module
from shared import modelzoo, tflite
from shared.config_schema import with_changes
from shared.errors import UserError
from shared.runs import Run


def representative_dataset(run: Run, config, count: int = 200) -> Callable[[], Iterator[list[np.ndarray]]]:
    """A generator factory of `count` single normalized training images, for int8 calibration.

    The images come from the run's training split through `make_datasets`, with the augmentations
    switched off: calibration should see the images inference will see (center crop, no mixing),
    not flipped, cropped or MixUp-blended ones. The shuffle (seeded) still mixes the classes."""
    config = with_changes(config, {"data.augment": [], "data.batch_augment": []})
    datasets = data_module.make_datasets(config, modelzoo.load_augment_module(run.path),
                                         recorded=data_module.split.read(run.path))  # a folder's recorded split
    count = max(1, min(count, datasets.num_train))

    def generate():
        for image, _ in datasets.train.unbatch().take(count):
            yield [image.numpy()[None].astype(np.float32)]
    return generate


def convert(model, config, run: Run, quantize: str = "none", io: str = "float", out_path: Path | None = None,
            representative_images: int = 200) -> Path:
    """`model` (the run's, rebuilt from its snapshot and last checkpoint: `shared.tasks.rebuild`) with the run's
    `config` as a .tflite file; returns its path (default `<run>/export/model_<quantize>[_int8io].tflite`).
    `representative_images`: training images used to calibrate the int8 activation ranges."""
    tflite.check_mode(quantize, io)
    data = config.data
    representative = representative_dataset(run, config, representative_images) if quantize == "int8" else None
    out = Path(out_path) if out_path is not None else tflite.default_path(run, quantize, io)
    return tflite.convert(model, (data.image_size, data.image_size, data.channels), out, quantize, io,
                          representative, source=str(run.path))


def evaluate_tflite(path: Path | str, run: Run, config, limit: int | None = None) -> dict:
    """Top-1 / top-5 of the .tflite model on the test split of `run` (with its `config`), its first `limit`
    examples when given, with `examples` the number evaluated. Uses every core: this is about accuracy, not
    speed."""
    datasets = data_module.make_datasets(config, modelzoo.load_augment_module(run.path),
                                         recorded=data_module.split.read(run.path))  # a folder's recorded split
    test = datasets.test.unbatch()
    if limit is not None:
        test = test.take(limit)
    interpreter = tflite.load_interpreter(path, num_threads=os.cpu_count())
    k = min(5, datasets.num_classes)
    top1 = top5 = count = 0
    for images, labels in test.batch(256):
        probabilities = tflite.predict_tflite(interpreter, images.numpy())
        labels = labels.numpy()
        top1 += int((probabilities.argmax(axis=1) == labels).sum())
        top_k = np.argsort(-probabilities, axis=1)[:, :k]
        top5 += int((top_k == labels[:, None]).any(axis=1).sum())
        count += len(labels)
    if count == 0:
        raise UserError("the test split is empty; check data.test_split and data.limit_test")
    return {"top1": top1 / count, "top5": top5 / count, "examples": count}

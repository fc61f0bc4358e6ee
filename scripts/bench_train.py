"""Benchmark: the runner's training loop against a bare `model.compile(); model.fit()`.

Same model (built from the same config), same compile settings, same in-memory Fashion-MNIST images
(no augmentation on either side: this measures the loop, not the data work). The runner's side is
`shared.lifecycle.train` with everything it does around `fit` (metrics.csv, TensorBoard, per-epoch
checkpoint, crash-safe backup, learning-rate logging). Throughput is images/second over whole epochs
after the first (tracing and XLA compilation), measured from one epoch start to the next, so the
work every callback does at the end of an epoch is counted. The two sides alternate, each measurement in
a fresh process.

    python scripts/bench_train.py [--config models/resnet/quick.yaml] [--images 12800] [--epochs 4]

The last line printed is exactly `ratio runner/bare_fit=X.XX`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import shared  # noqa: E402,F401  (first: it sets the host allocator before TensorFlow starts)
import keras  # noqa: E402
import numpy as np  # noqa: E402

from shared.config import load_config  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    """Wall time from each epoch's start to the next one's (the last: to the end of training)."""

    def __init__(self):
        super().__init__()
        self.starts: list[float] = []
        self.end = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.starts.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()

    def seconds_per_epoch(self) -> list[float]:
        marks = [*self.starts, self.end]
        return [b - a for a, b in zip(marks, marks[1:])][1:]  # the first epoch traces and compiles


def bench_config(path: str, images: int, epochs: int, runs_dir: str):
    return load_config(path, [f"data.limit_train={images}", "data.limit_test=1000", "data.augment=[]",
                              f"train.epochs={epochs}", "train.verbose=0", f"run.dir={runs_dir}",
                              "run.notes=bench_train.py"])


def runner_side(path: str, images: int, epochs: int, runs_dir: str) -> float:
    from shared.lifecycle import train

    config = bench_config(path, images, epochs, runs_dir)
    timer = EpochTimer()
    train(config, argv=["scripts/bench_train.py"], callbacks=[timer])
    return images / statistics.median(timer.seconds_per_epoch())


def bare_side(path: str, images: int, epochs: int, runs_dir: str) -> float:
    """The same model and compile settings, fed the runner's own preprocessed arrays by plain fit."""
    from shared import modelzoo
    from shared.classification.objective import compile_classifier, one_hot_targets
    from shared.lifecycle import prepare
    from shared.tasks import task_for

    config = bench_config(path, images, epochs, runs_dir)
    _, module, model, data, task = prepare(task_for(config))
    config = task.config
    datasets = data.details
    xs, ys = [], []
    for batch_images, batch_labels in datasets.train.take(datasets.steps_per_epoch):
        xs.append(batch_images.numpy())
        ys.append(batch_labels.numpy())
    x, y = np.concatenate(xs)[:images], np.concatenate(ys)[:images]
    if one_hot_targets(config.train, datasets.soft_labels) and y.ndim == 1:  # the loss takes one-hot labels
        y = np.eye(datasets.num_classes, dtype="float32")[y]
    compile_classifier(model, config, datasets.steps_per_epoch, datasets.num_classes,
                       modelzoo.auxiliary_loss_weights(module, model))
    timer = EpochTimer()
    model.fit(x, y, batch_size=config.train.batch_size, epochs=epochs, shuffle=True, verbose=0, callbacks=[timer])
    return images / statistics.median(timer.seconds_per_epoch())


def _in_child(side: str, args: argparse.Namespace, runs_dir: str) -> float:
    command = [sys.executable, __file__, "--side", side, "--config", args.config, "--images", str(args.images),
               "--epochs", str(args.epochs), "--runs-dir", runs_dir]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return float(output.split("IMAGES_PER_SECOND ")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="models/resnet/quick.yaml")
    parser.add_argument("--images", type=int, default=12800, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per side and round; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", choices=("bare", "runner"), help=argparse.SUPPRESS)  # one measurement
    parser.add_argument("--runs-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child process: one side, one number
        measure = bare_side if args.side == "bare" else runner_side
        print(f"IMAGES_PER_SECOND {measure(args.config, args.images, args.epochs, args.runs_dir):.1f}")
        return
    runner, bare = [], []
    with tempfile.TemporaryDirectory() as runs_dir:
        for round_number in range(args.rounds):
            # Each measurement in a fresh process: Keras and TF state left by one training (traced
            # functions, writers) must not slow the next.
            bare.append(_in_child("bare", args, runs_dir))
            runner.append(_in_child("runner", args, runs_dir))
            print(f"round {round_number + 1}: bare fit {bare[-1]:.0f} img/s, runner {runner[-1]:.0f} img/s", flush=True)
    best_runner, best_bare = max(runner), max(bare)
    print(f"config {args.config}, {args.images} images per epoch, best of {args.rounds} rounds")
    print(f"bare model.fit: {best_bare:.0f} img/s")
    print(f"runner:         {best_runner:.0f} img/s")
    print(f"ratio runner/bare_fit={best_runner / best_bare:.2f}")


if __name__ == "__main__":
    main()

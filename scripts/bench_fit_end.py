"""Benchmark: how long `fit` takes to return after its last batch, with tf.data's autotuning thread (TensorFlow's
default) and without it (`shared.data.ends_promptly`, what the runner gives `fit`).

With TensorFlow 2.21, the iterator a `fit` made is destroyed when `fit` returns, and that waits until the pipeline's
autotuning thread wakes by itself; the thread's sleep doubles as the iterator lives. The two sides alternate in one
process: the same small convolutional model on the same in-memory images through a shuffle, a parallel map, a batch
and a prefetch, fits of several lengths. Each line gives a fit's training seconds and the seconds from
`on_train_end` to `fit` returning.

    python scripts/bench_fit_end.py [--steps 150,300,600,450] [--rounds 2]

The last line printed is exactly `fit end seconds: autotune X, ends_promptly Y (over N fits each)`.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="150,300,600,450", help="fit lengths in steps, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="times each side fits each length")
    args = parser.parse_args()
    steps = [int(part) for part in args.steps.split(",")]

    import keras
    import numpy as np
    import tensorflow as tf

    from shared.data import ends_promptly

    rng = np.random.default_rng(0)
    images = rng.random((4096, 28, 28, 1), dtype=np.float32)
    labels = rng.integers(0, 10, 4096)
    pipeline = (tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(4096).repeat()
                .map(lambda image, label: (image * 2.0 - 1.0, label), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(64).prefetch(tf.data.AUTOTUNE))
    sides = {"autotune": pipeline, "ends_promptly": ends_promptly(pipeline)}
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(32, 3, activation="relu"),
                              keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    class Ends(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.began = time.monotonic()

        def on_train_end(self, logs=None):
            self.ended = time.monotonic()

    model.fit(pipeline.take(2), verbose=0)  # the trace, outside the figures
    waits: dict[str, list[float]] = {side: [] for side in sides}
    print(f"CPU: {_cpu()}")
    for _ in range(args.rounds):
        for count in steps:
            for side, dataset in sides.items():
                ends = Ends()
                model.fit(dataset, steps_per_epoch=count, epochs=1, verbose=0, callbacks=[ends])
                waited = time.monotonic() - ends.ended
                waits[side].append(waited)
                print(f"{side:14s} {count:4d} steps: trained {ends.ended - ends.began:5.1f} s, "
                      f"then {waited:5.2f} s until fit returned", flush=True)
    print(f"fit end seconds: autotune {sum(waits['autotune']):.2f}, ends_promptly {sum(waits['ends_promptly']):.2f} "
          f"(over {len(waits['autotune'])} fits each)")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return f"{name}, {os.cpu_count()} cores{', avx512f' if ' avx512f' in text else ''}"


if __name__ == "__main__":
    main()

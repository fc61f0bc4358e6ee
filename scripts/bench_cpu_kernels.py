"""Benchmark: training throughput of one config under different CPU-kernel environment settings.

Each setting (the environment as it is, with the oneDNN/TF kernel variables below removed, then each
`--env NAME=VALUE[,NAME=VALUE]`) trains the config's model by plain `model.fit` on in-memory synthetic images
of the config's size, in a fresh process, since TensorFlow reads these variables when it starts. Throughput is
images/second over the epochs after the first (tracing, XLA compilation). The settings alternate within each
round, so a change in the machine's other load falls on all of them alike; the best round of each is reported.

    python scripts/bench_cpu_kernels.py --config models/mobilenet_v2/quick.yaml \\
        --env TF_ENABLE_ONEDNN_OPTS=0 --env ONEDNN_MAX_CPU_ISA=AVX2
    python scripts/bench_cpu_kernels.py --config models/resnet/quick.yaml --set model.width=16 \\
        --set data.image_size=64 --set train.jit_compile=false --env TF_ENABLE_ONEDNN_OPTS=0

One line per setting, `<setting>: <images/s> img/s (x<ratio to the first>)`, then the ratios alone:
`ratio <setting>=<ratio> ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

KERNEL_VARIABLES = ("TF_ENABLE_ONEDNN_OPTS", "ONEDNN_", "DNNL_", "TF_ONEDNN_")  # names or prefixes
REPO = Path(__file__).resolve().parent.parent


def measure(config_path: str, overrides: list[str], images: int, epochs: int) -> float:
    """Images/second of `model.fit` on `images` synthetic examples, median over the epochs after the first."""
    sys.path.insert(0, str(REPO))
    import shared  # noqa: F401  (first: it sets the host allocator before TensorFlow starts)
    import keras
    import numpy as np

    from shared import modelzoo
    from shared.config import load_config
    from shared.classification.objective import compile_classifier, one_hot_targets
    from shared.lifecycle import prepare
    from shared.tasks import task_for

    config = load_config(config_path, [*overrides, "data.source=synthetic", f"data.synthetic_train={images}",
                                       "data.synthetic_test=8", "data.augment=[]",
                                       "train.verbose=0"])
    _, module, model, data, task = prepare(task_for(config))
    config = task.config
    datasets = data.details
    size, channels = datasets.input_shape[0], datasets.input_shape[-1]
    x = np.random.default_rng(0).normal(size=(images, size, size, channels)).astype("float32")
    y = np.arange(images) % datasets.num_classes
    if one_hot_targets(config.train):  # the loss the recipe compiles takes one-hot labels
        y = np.eye(datasets.num_classes, dtype="float32")[y]
    compile_classifier(model, config, images // config.train.batch_size, datasets.num_classes,
                       modelzoo.auxiliary_loss_weights(module, model))
    starts: list[float] = []
    timer = keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: starts.append(time.perf_counter()))
    model.fit(x, y, batch_size=config.train.batch_size, epochs=epochs, verbose=0, callbacks=[timer])
    marks = [*starts, time.perf_counter()]
    return images / statistics.median(b - a for a, b in list(zip(marks, marks[1:]))[1:])


def setting_environment(setting: str) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith(KERNEL_VARIABLES)}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if setting != "default":
        env.update(pair.split("=", 1) for pair in setting.split(","))
    return env


def in_child(setting: str, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--child", "--config", args.config, "--images", str(args.images),
               "--epochs", str(args.epochs)]
    for override in args.set:
        command += ["--set", override]
    result = subprocess.run(command, env=setting_environment(setting), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{setting}: the child exited {result.returncode}:\n{result.stderr[-2000:]}")
    return float(result.stdout.split("IMAGES_PER_SECOND ")[1].split()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="models/resnet/quick.yaml")
    parser.add_argument("--set", action="append", default=[], help="a config override, as the runner takes it")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE[,NAME=VALUE]: one more setting")
    parser.add_argument("--images", type=int, default=1024, help="training images per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement; the first is not timed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one measurement
    args = parser.parse_args()
    if args.child:
        print(f"IMAGES_PER_SECOND {measure(args.config, args.set, args.images, args.epochs):.1f}")
        return
    settings = ["default", *args.env]
    best = dict.fromkeys(settings, 0.0)
    for round_number in range(args.rounds):
        for setting in settings:
            best[setting] = max(best[setting], in_child(setting, args))
            print(f"round {round_number + 1}, {setting}: {best[setting]:.0f} img/s best so far", flush=True)
    print(f"config {args.config} {' '.join(args.set)}, {args.images} images an epoch, best of {args.rounds} rounds")
    for setting in settings:
        print(f"{setting}: {best[setting]:.0f} img/s (x{best[setting] / best['default']:.2f})")
    print("ratio " + " ".join(f"{setting}={best[setting] / best['default']:.2f}" for setting in settings[1:]))


if __name__ == "__main__":
    main()

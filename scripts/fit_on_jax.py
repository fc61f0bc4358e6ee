"""Train a Fashion-MNIST recipe with Keras on the JAX backend: for a GPU machine that has JAX but no
TensorFlow, and as a check that the model files are pure Keras 3. Any Keras backend works
(KERAS_BACKEND=tensorflow runs it here).

    KERAS_BACKEND=jax python scripts/fit_on_jax.py models/mobilenet_v2/fashion.yaml [key=value ...] \
        --data /usr/share/datasets/fashion-mnist --out /tmp/mobilenet_v2

It takes from the config what `python -m shared.runner` takes: the model file and its hyperparameters,
batch size, epochs and seed, and compiles with the runner's own
`shared.classification.objective.compile_classifier` (optimizer,
schedule, weight decay, label smoothing, losses, metrics). It reads the IDX files with
`shared.fashion_mnist`, as the runner's source does; those modules need no TensorFlow. The input pipeline
is the runner's for Fashion-MNIST, rebuilt in NumPy: normalize with the source's statistics, and for
training the config's `random_crop` (zero
padding, a crop at a random place per image) and `horizontal_flip`. What it does not do: run folders,
checkpoints, resume, TensorBoard. It writes history.csv (per epoch: loss, training top-1, test top-1,
seconds) and result.json to --out, and prints one line per epoch.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: JAX unless told otherwise (imported by a test: left alone)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:  # before `import keras`, which fails with a traceback on a backend that is not installed
        if os.environ["KERAS_BACKEND"] == "jax":
            import jax  # noqa: F401
    except ImportError:
        print('error: KERAS_BACKEND=jax needs JAX: pip install -e ".[jax]" (or run with KERAS_BACKEND=tensorflow)',
              file=sys.stderr)
        sys.exit(2)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from shared import modelzoo  # noqa: E402  (these modules are free of TensorFlow)
from shared.callbacks import built_before_fit  # noqa: E402
from shared.classification.objective import compile_classifier  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.config_schema import with_changes  # noqa: E402
from shared.errors import UserError  # noqa: E402
from shared.fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, FASHION_MNIST_MEAN,  # noqa: E402
                                  FASHION_MNIST_STD, read_split)


def augmenter(augment: list, rng: np.random.Generator):
    """The config's augmentations on a whole uint8 array at once. Per image, as the runner's tf.data
    map does: keras.layers.RandomCrop picks one place for a whole batch."""
    steps = []
    for entry in augment:
        name, args = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
        if name == "random_crop":
            steps.append(("crop", int((args or {}).get("padding", 4))))
        elif name == "horizontal_flip":
            steps.append(("flip", None))
        else:
            raise UserError(f"augmentation {name!r} is not supported here; use random_crop and horizontal_flip")

    def apply(images: np.ndarray) -> np.ndarray:
        for kind, padding in steps:
            if kind == "crop":
                n, size = len(images), images.shape[1]
                padded = np.pad(images, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
                windows = np.lib.stride_tricks.sliding_window_view(padded, (size, size), axis=(1, 2))
                rows, cols = rng.integers(0, 2 * padding + 1, (2, n))
                images = np.moveaxis(windows[np.arange(n), rows, cols], 1, -1)  # (n, c, h, w) -> (n, h, w, c)
            else:
                flip = rng.random(len(images)) < 0.5
                images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return images
    return apply


def device_name() -> str:
    if keras.backend.backend() != "jax":
        return keras.backend.backend()
    import jax
    return jax.devices()[0].device_kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value, as for shared.runner")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="folder of the four IDX files")
    parser.add_argument("--out", required=True, help="folder for history.csv and result.json")
    args = parser.parse_args(argv)
    try:
        return fit(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def fit(args) -> int:
    config = load_config(args.config, args.overrides)
    if config.data.source != "fashion_mnist":
        raise UserError(f"{args.config}: data.source is {config.data.source!r}; this script reads Fashion-MNIST only")
    train = config.train
    folder = modelzoo.model_dir(config.model.name, config.model.path)
    module = modelzoo.load_model_module(folder)
    hparams = modelzoo.resolve_hparams(module, config.model.hparams)
    keras.utils.set_random_seed(train.seed)
    rng = np.random.default_rng(train.seed)

    data = Path(args.data)
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair if not (data / name).is_file()]
    if missing:
        raise UserError(f"{data} has no {missing[0]}; pass --data with the folder of the four Fashion-MNIST IDX files")
    arrays = {split: (images[..., None], labels)  # labels checked to be 0-9: JAX would not complain
              for split in FASHION_MNIST_FILES for images, labels in [read_split(data, split)]}
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    # One grey channel: per-channel statistics of a colour config are averaged, as the runner does.
    mean = np.mean(config.data.mean or FASHION_MNIST_MEAN)
    std = np.mean(config.data.std or FASHION_MNIST_STD)

    def normalize(images):
        return ((images.astype(np.float32) - mean) / std).astype(np.float32)

    num_classes = len(FASHION_MNIST_CLASSES)
    model = modelzoo.build_model(module, num_classes, (config.data.image_size, config.data.image_size, 1), hparams)
    aux = modelzoo.auxiliary_loss_weights(module, model)
    steps = math.ceil(len(x_train) / train.batch_size)
    if train.steps_per_epoch:
        steps = min(steps, train.steps_per_epoch)
    if keras.backend.backend() == "jax":
        # JAX without jit runs op by op, far too slow; other backends follow the config
        config = with_changes(config, {"train.jit_compile": True})
        train = config.train
    compile_classifier(model, config, steps, num_classes, aux_loss_weights=aux)
    smoothing = train.label_smoothing
    outputs = [modelzoo.MAIN_OUTPUT, *aux]
    classifier = modelzoo.inference_model(model)
    augment = augmenter(config.data.augment, rng)
    x_test_normalized = normalize(x_test)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{config.model.name} {hparams} params={model.count_params():,} steps/epoch={steps} "
          f"epochs={train.epochs} backend={keras.backend.backend()}", flush=True)

    history = []
    started = time.time()
    for epoch in range(train.epochs):
        tick = time.time()
        order = rng.permutation(len(x_train))[:steps * train.batch_size]
        images, labels = normalize(augment(x_train[order])), y_train[order]
        targets = keras.utils.to_categorical(labels, num_classes) if smoothing else labels
        if aux:
            targets = {name: targets for name in outputs}
        if epoch == 0:  # as the runner's fit: losses built now, so the step is traced once, not twice
            built_before_fit(model, (images, targets))
        logs = model.fit(images, targets, batch_size=train.batch_size, epochs=epoch + 1, initial_epoch=epoch,
                         shuffle=False, verbose=0).history
        train_top1 = logs[f"{modelzoo.MAIN_OUTPUT}_top1" if aux else "top1"][-1]
        probabilities = classifier.predict(x_test_normalized, batch_size=1000, verbose=0)
        test_top1 = float(np.mean(np.argmax(probabilities, -1) == y_test))
        row = {"epoch": epoch + 1, "loss": round(logs["loss"][-1], 5), "train_top1": round(train_top1, 5),
               "test_top1": round(test_top1, 5), "seconds": round(time.time() - tick, 2)}
        history.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        with open(out / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerows(history)
    top5 = float(np.mean(np.any(np.argsort(probabilities, -1)[:, -5:] == y_test[:, None], -1)))
    result = {"config": args.config, "overrides": args.overrides, "model": config.model.name, "hparams": hparams,
              "parameters": model.count_params(), "epochs": train.epochs, "test_top1": test_top1, "test_top5": top5,
              "minutes": round((time.time() - started) / 60, 2), "backend": keras.backend.backend(),
              "device": device_name()}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

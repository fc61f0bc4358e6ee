"""Validation mAP while a detector trains (`detection.eval_every: N`): a Keras callback that evaluates the
detector every N epochs and writes val_map / val_map50 (COCO also val_map75) into the epoch's logs, so
metrics.csv, TensorBoard, train.best and train.early_stopping see them.

The logs of every epoch carry the keys (Keras' CSV logger fixes its columns at the first row): the detector
is evaluated at the first epoch of each `fit` (nothing measured yet, also after a resume), every Nth epoch
and the last one; the epochs between carry the last measured value, so early stopping's patience counts
epochs, not evaluations (give it at least N).

The split evaluated (`validation_split`): data.val_fraction of the training images held out, else the test
split.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import keras
import numpy as np

from shared.config_schema import Config
from shared.detection.records import DetectionSplit
from shared.errors import UserError

LOGGED = {"coco": {"val_map": "mAP", "val_map50": "mAP50", "val_map75": "mAP75"},
          "voc": {"val_map": "mAP", "val_map50": "mAP50"}}  # VOC's mAP is AP@.5


def logged_keys(protocol: str) -> set[str]:
    """The epoch-log keys `ValidationMAP` writes for `protocol`."""
    return set(LOGGED[protocol])


def validation_split(train: DetectionSplit, config: Config, test: DetectionSplit | None
                     ) -> tuple[DetectionSplit, DetectionSplit | None]:
    """(training split, the split detection.eval_every evaluates): data.val_fraction of the training images
    held out (drawn with train.seed, the same on every resume), else the test split itself (then the
    validation mAP, and a best checkpoint picked by it, have seen the test images). None without eval_every."""
    fraction = config.data.val_fraction
    if not config.detection.eval_every:
        return train, None
    if not fraction:
        return train, test
    count = max(1, round(len(train) * fraction))
    if count >= len(train):
        raise UserError(f"data.val_fraction {fraction}{config.where} leaves no training image of {len(train)}; "
                        f"lower it")
    held = set(np.random.default_rng(config.train.seed).permutation(len(train))[:count].tolist())
    kept = [record for i, record in enumerate(train) if i not in held]
    chosen = [record for i, record in enumerate(train) if i in held]
    return (DetectionSplit(kept, train.class_names, train.source),
            DetectionSplit(chosen, train.class_names, f"{train.source} (validation)"))


class ValidationMAP(keras.callbacks.Callback):
    """Calls `evaluate()` (the metrics dict of `shared.detection.metrics.detection_map`) at the end of the
    epochs named in the module's notes and adds its values to the logs; with EMA the averaged weights are
    evaluated, as the checkpoint and the final test see them. Place before the loggers and checkpoints."""

    def __init__(self, evaluate: Callable[[], dict], every: int, epochs: int, protocol: str):
        super().__init__()
        self.evaluate, self.every, self.epochs = evaluate, every, epochs
        self.keys = LOGGED[protocol]
        self.logged = logged_keys(protocol)  # read by the lifecycle's monitor check
        self.last: dict[str, float] | None = None
        self.evaluations = 0

    def on_train_begin(self, logs=None):
        self.last = None  # a new fit (a phase, a resume): measure at its first epoch

    def due(self, epoch: int) -> bool:
        """Whether epoch (0-based, as Keras counts) is evaluated."""
        return self.last is None or (epoch + 1) % self.every == 0 or epoch + 1 >= self.epochs

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self.due(epoch):
            with _ema_weights(self.model):
                metrics = self.evaluate()
            self.evaluations += 1
            # a split without boxes has no mAP: 0 keeps the column numeric and never an improvement
            self.last = {key: float(metrics.get(name) or 0.0) for key, name in self.keys.items()}
        logs.update(self.last)


@contextlib.contextmanager
def _ema_weights(model):
    """The optimizer's moving averages swapped into the model for the block (nothing without EMA)."""
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's
    if not (getattr(optimizer, "use_ema", False) and hasattr(optimizer, "_model_variables_moving_average")):
        yield
        return
    swap = keras.callbacks.SwapEMAWeights()  # Keras' own swap, as its callback does for validation
    swap.set_model(model)
    swap._swap_variables()
    try:
        yield
    finally:
        swap._swap_variables()

"""Keras callbacks the runner adds to `model.fit`: atomic per-epoch checkpoints and the learning
rate in the epoch logs (so metrics.csv and TensorBoard show it)."""

from __future__ import annotations

import os
from pathlib import Path

import keras


class EpochCheckpoint(keras.callbacks.Callback):
    """Save model and optimizer state as checkpoints/epoch-NNNN.keras after every epoch. The file is
    written under a temporary name and renamed, so a crash never leaves a truncated checkpoint."""

    def __init__(self, directory: Path):
        super().__init__()
        self.directory = Path(directory)

    def on_epoch_end(self, epoch, logs=None):
        final = self.directory / f"epoch-{epoch + 1:04d}.keras"
        partial = self.directory / f".epoch-{epoch + 1:04d}.partial.keras"
        self.model.save(partial)
        os.replace(partial, final)


class LearningRateLogger(keras.callbacks.Callback):
    """Add the learning rate at the end of each epoch to the logs, as `lr`."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            optimizer = self.model.optimizer
            logs["lr"] = float(keras.ops.convert_to_numpy(optimizer.learning_rate))

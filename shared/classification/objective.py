"""What a classifier is trained to minimise and reports: cross-entropy on the classifier, plus each auxiliary
head's cross-entropy times its weight (GoogLeNet's, Szegedy et al. 2015), with top-1 / top-5 accuracy.
Free of TensorFlow (Keras alone), so `scripts/fit_on_jax.py` compiles with it on the JAX backend."""

from __future__ import annotations

import keras

from shared import optim
from shared.config_schema import Config, TrainConfig
from shared.modelzoo import MAIN_OUTPUT
from shared.task import Objective


def one_hot_targets(train: TrainConfig, soft_labels: bool = False) -> bool:
    """Whether the loss takes one-hot targets: mixed batches (MixUp, CutMix) or label smoothing."""
    return soft_labels or bool(train.label_smoothing)


def objective(train: TrainConfig, num_classes: int, aux_loss_weights: dict[str, float] | None = None,
              soft_labels: bool = False) -> Objective:
    """Class-index labels use the sparse losses and metrics; one-hot labels (MixUp, CutMix, label smoothing)
    the dense ones."""
    k = min(5, num_classes)
    if one_hot_targets(train, soft_labels):
        def make_loss():
            return keras.losses.CategoricalCrossentropy(label_smoothing=train.label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="top1"),
                   keras.metrics.TopKCategoricalAccuracy(k=k, name="top5")]
    else:
        make_loss = keras.losses.SparseCategoricalCrossentropy
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="top1"),
                   keras.metrics.SparseTopKCategoricalAccuracy(k=k, name="top5")]
    if not aux_loss_weights:
        return Objective(make_loss(), metrics=metrics)
    return Objective({name: make_loss() for name in (MAIN_OUTPUT, *aux_loss_weights)},
                     loss_weights={MAIN_OUTPUT: 1.0, **aux_loss_weights}, metrics={MAIN_OUTPUT: metrics})


def compile_classifier(model: keras.Model, config: Config, steps_per_epoch: int, num_classes: int,
                       aux_loss_weights: dict[str, float] | None = None, soft_labels: bool = False,
                       replicas: int = 1, lr_scale: float = 1.0) -> None:
    """A classifier compiled as a run compiles it (weight decay, optimizer, objective), for the tools and
    benchmarks that train one outside a run."""
    optim.apply_weight_decay(model, config.train)
    optim.compile_trainer(model, objective(config.train, num_classes, aux_loss_weights, soft_labels), config.train,
                          steps_per_epoch, replicas, lr_scale)

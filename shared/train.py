"""The train runner: config -> datasets -> model -> `model.fit` -> run snapshot.

Everything that can be checked (config, model hyperparameters, data) is checked before the run folder
is created, so a bad input leaves nothing behind; once the folder exists, any failure marks it failed.
"""

from __future__ import annotations

import sys
import time

import keras
import tensorflow as tf

from shared import data as data_module
from shared import modelzoo, optim, runs
from shared.callbacks import EpochCheckpoint, LearningRateLogger
from shared.config import Config
from shared.errors import UserError
from shared.modelzoo import MAIN_OUTPUT
from shared.evaluate import evaluate_model


def _where(config: Config) -> str:
    return f" (in {config.source_file})" if config.source_file else ""


def prepare(config: Config):
    """Resolve the model and its hyperparameters, and build the datasets; returns what `fit` needs."""
    folder = modelzoo.model_dir(config.model.name, config.model.path)
    module = modelzoo.load_model_module(folder)
    config.model.hparams = modelzoo.resolve_hparams(module, config.model.hparams, _where(config))
    keras.utils.set_random_seed(config.train.seed)
    datasets = data_module.make_datasets(config, modelzoo.load_augment_module(folder))
    config.data.num_classes = datasets.num_classes  # resolved: the snapshot says how many there were
    model = modelzoo.build_model(module, datasets.num_classes, datasets.input_shape, config.model.hparams)
    return folder, module, model, datasets


def compile_model(model: keras.Model, config: Config, steps_per_epoch: int, num_classes: int,
                  aux_loss_weights: dict[str, float] | None = None, soft_labels: bool = False) -> None:
    """Cross-entropy on the classifier, plus each auxiliary head's cross-entropy times its weight.
    Class-index labels use the sparse losses and metrics; mixed one-hot labels (MixUp, CutMix) the dense."""
    optim.apply_weight_decay(model, config.train.weight_decay)
    k = min(5, num_classes)
    if soft_labels:
        make_loss = keras.losses.CategoricalCrossentropy
        metrics = [keras.metrics.CategoricalAccuracy(name="top1"),
                   keras.metrics.TopKCategoricalAccuracy(k=k, name="top5")]
    else:
        make_loss = keras.losses.SparseCategoricalCrossentropy
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="top1"),
                   keras.metrics.SparseTopKCategoricalAccuracy(k=k, name="top5")]
    loss = make_loss()
    loss_weights = None
    if aux_loss_weights:
        loss = {name: make_loss() for name in (MAIN_OUTPUT, *aux_loss_weights)}
        loss_weights = {MAIN_OUTPUT: 1.0, **aux_loss_weights}
        metrics = {MAIN_OUTPUT: metrics}
    model.compile(optimizer=optim.make_optimizer(config.train, steps_per_epoch), loss=loss,
                  loss_weights=loss_weights, metrics=metrics, jit_compile=config.train.jit_compile)


def _labels_for_every_output(dataset, names: list[str]):
    """Auxiliary heads learn the same label as the classifier."""
    if dataset is None or not names:
        return dataset
    return dataset.map(lambda images, labels: (images, {name: labels for name in names}))


def train(config: Config, argv: list[str] | None = None) -> runs.Run:
    """Train as the config says, test on the held-out split, and return the finished run."""
    folder, module, model, datasets = prepare(config)
    aux_weights = modelzoo.auxiliary_loss_weights(module, model)
    compile_model(model, config, datasets.steps_per_epoch, datasets.num_classes, aux_weights,
                  soft_labels=datasets.soft_labels)
    outputs = [MAIN_OUTPUT, *aux_weights] if aux_weights else []
    run = runs.create(config, folder, argv)
    print(f"run {run.path}: {config.model.name} {config.model.hparams}, {datasets.num_train} training / "
          f"{datasets.num_val} validation / {datasets.num_test} test images, {datasets.num_classes} classes, "
          f"{datasets.steps_per_epoch} steps x {config.train.epochs} epochs", flush=True)
    started = time.time()
    try:
        model.fit(
            _labels_for_every_output(datasets.train, outputs), epochs=config.train.epochs,
            steps_per_epoch=datasets.steps_per_epoch, validation_data=_labels_for_every_output(datasets.val, outputs),
            verbose=_verbosity(config.train.verbose), shuffle=False,
            callbacks=[
                LearningRateLogger(),
                *optim.schedule_callbacks(config.train, validating=datasets.val is not None),
                keras.callbacks.CSVLogger(str(run.path / "metrics.csv")),
                keras.callbacks.TensorBoard(log_dir=str(run.path / "logs"), write_graph=False),
                EpochCheckpoint(run.checkpoint_dir),
            ],
        )
        metrics = evaluate_model(modelzoo.inference_model(model), datasets.test, datasets.num_classes)
    except KeyboardInterrupt:
        run.set_status("interrupted", ended=_now())
        raise
    except BaseException as error:
        # A file the pipeline could not decode: name it instead of showing TF's op trace.
        bad = data_module.find_undecodable(datasets.source) \
            if isinstance(error, tf.errors.InvalidArgumentError) and datasets.source.encoding == "path" else []
        run.set_status("failed", ended=_now(), error=f"undecodable images: {bad}" if bad else _first_line(error))
        if bad:
            raise UserError(f"corrupt or unreadable image(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; "
                            f"delete or replace them (run {run.path} is marked failed)") from None
        raise
    if datasets.skips is not None:  # data.on_corrupt: skip
        metrics["skipped_train_images"] = datasets.skips.skipped
        metrics["skipped_test_images"] = datasets.num_test - metrics["examples"]
        print(f"skipped unreadable images: {metrics['skipped_train_images']} while training, "
              f"{metrics['skipped_test_images']} of the test split", flush=True)
    metrics["train_seconds"] = round(time.time() - started, 1)
    metrics["checkpoint"] = str(run.last_checkpoint().relative_to(run.path))
    run.write_json("test_metrics.json", metrics)
    run.set_status("finished", ended=_now())
    return run


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:500] if text else ''}"


def _verbosity(configured: int) -> int:
    """A progress bar on a terminal; one line per epoch in logs and CI, where a bar is noise."""
    return 2 if configured == 1 and not sys.stdout.isatty() else configured


def summary(metrics: dict) -> str:
    return (f"test top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}  "
            f"({metrics['examples']} images)")

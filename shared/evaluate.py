"""The test runner: top-1 / top-5 on the held-out split, for a model in hand or for a finished run
rebuilt from its own snapshot (model.py, config.yaml, last checkpoint)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from shared import config as config_module
from shared import data as data_module
from shared import modelzoo
from shared.errors import UserError
from shared.runs import Run, open_run, require_idle


def evaluate_model(model, dataset: tf.data.Dataset, num_classes: int) -> dict:
    """Top-1, top-5 and mean cross-entropy (without any weight penalty), plus the confusion matrix."""
    forward = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5_hits, loss_sum, count = 0, 0.0, 0
    k = min(5, num_classes)
    for images, labels in dataset:
        probabilities = forward(images).numpy().astype(np.float64)
        labels = labels.numpy()
        predicted = probabilities.argmax(axis=1)
        np.add.at(confusion, (labels, predicted), 1)
        top_k = np.argsort(-probabilities, axis=1)[:, :k]
        top5_hits += int((top_k == labels[:, None]).any(axis=1).sum())
        loss_sum += float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).sum())
        count += len(labels)
    if count == 0:
        raise UserError("the test split is empty; check data.test_split and data.limit_test")
    return {"top1": float(np.trace(confusion) / count), "top5": top5_hits / count, "loss": loss_sum / count,
            "examples": count, "confusion": confusion.tolist()}


def load_run_model(run: Run):
    """Rebuild the run's model from its snapshotted model.py and config, with its last checkpoint;
    returns the classifier alone (auxiliary heads, if any, are for training only)."""
    require_idle(run)  # a live run's last checkpoint is about to change
    config = config_module.from_dict(run.config_dict())
    module = modelzoo.load_model_module(run.path)
    checkpoint = run.last_checkpoint()
    if checkpoint is None:
        raise UserError(f"run {run.path} has no checkpoint in {run.checkpoint_dir} "
                        f"(status: {run.status().get('status')}); train it first")
    data = config.data
    model = modelzoo.build_model(module, data.num_classes, (data.image_size, data.image_size, data.channels),
                                 config.model.hparams)
    modelzoo.load_weight_file(model, checkpoint, what=f"model built from {run.path / 'model.py'}")
    return modelzoo.inference_model(model), config


def evaluate(run: Run | str) -> dict:
    """Re-test a finished run on its test split; the figures equal those recorded at training time.
    Also draws the confusion matrix as the run's confusion.png."""
    from shared import plots

    run = run if isinstance(run, Run) else open_run(run)
    model, config = load_run_model(run)
    datasets = data_module.make_datasets(config, modelzoo.load_augment_module(run.path))
    metrics = evaluate_model(model, datasets.test, datasets.num_classes)
    plots.plot_confusion(metrics["confusion"], datasets.class_names, run.path / "confusion.png")
    return metrics

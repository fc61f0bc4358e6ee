"""The pipelines `fit` iterates come without tf.data's autotuning thread (`shared.data.ends_promptly`): with it, the
iterator's destruction when `fit` returns waits for that thread's sleep to end (`scripts/bench_fit_end.py`)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared.config import load_config
from shared.data import ends_promptly
from shared.lifecycle import train

from conftest import tiny_tree


def test_ends_promptly_turns_the_autotuning_thread_off_and_keeps_the_elements():
    dataset = tf.data.Dataset.range(10).map(lambda x: x * 2, num_parallel_calls=tf.data.AUTOTUNE) \
        .prefetch(tf.data.AUTOTUNE)
    assert dataset.options().autotune.enabled is not False  # TensorFlow's default: the thread runs
    prompt = ends_promptly(dataset)
    assert prompt.options().autotune.enabled is False
    assert list(prompt.as_numpy_iterator()) == list(range(0, 20, 2))
    assert ends_promptly(None) is None  # no validation pipeline


@pytest.mark.slow
def test_the_runner_gives_fit_its_training_and_validation_pipelines_without_the_thread(tmp_path, one_conv_model,
                                                                                       monkeypatch):
    seen = []
    fit = keras.Model.fit

    def recording_fit(self, x=None, *args, validation_data=None, **kwargs):
        seen.append((x.options().autotune.enabled, validation_data.options().autotune.enabled))
        return fit(self, x, *args, validation_data=validation_data, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    tree = tiny_tree(tmp_path / "runs", data={"synthetic_train": 64, "synthetic_test": 32, "val_fraction": 0.25},
                     train={"epochs": 1})
    tree["model"] = one_conv_model
    run = train(load_config(tree=tree), argv=["pytest"])
    assert seen == [(False, False)]
    assert np.isfinite(run.test_metrics()["top1"])

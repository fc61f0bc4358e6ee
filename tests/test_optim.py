import keras
import numpy as np
import pytest

from shared import optim
from shared.config import load_config


def rates(overrides, steps_per_epoch=10, epochs=None):
    config = load_config(tree={}, overrides=overrides)
    schedule = optim.learning_rate(config.train, steps_per_epoch)
    steps = range((epochs or config.train.epochs) * steps_per_epoch)
    return [float(schedule(step)) if callable(schedule) else schedule for step in steps]


def test_step_schedule_divides_at_milestones():
    lr = rates(["train.epochs=4", "train.lr.base=0.1", "train.lr.schedule=step", "train.lr.milestones=[1, 3]"])
    assert lr[9] == pytest.approx(0.1) and lr[10] == pytest.approx(0.01) and lr[30] == pytest.approx(0.001)


def test_exponential_schedule_staircases_every_decay_epochs():
    lr = rates(["train.epochs=3", "train.lr.base=0.045", "train.lr.schedule=exponential", "train.lr.gamma=0.98"])
    assert lr[0] == lr[9] == pytest.approx(0.045) and lr[10] == pytest.approx(0.045 * 0.98)
    lr = rates(["train.epochs=17", "train.lr.schedule=exponential", "train.lr.gamma=0.96",
                "train.lr.decay_epochs=8"])
    assert lr[79] == pytest.approx(0.1) and lr[80] == pytest.approx(0.096) and lr[160] == pytest.approx(0.1 * 0.96**2)


def test_cosine_with_warmup_and_linear_scaling():
    lr = rates(["train.epochs=4", "train.batch_size=512", "train.lr.base=0.1", "train.lr.base_batch_size=256",
                "train.lr.schedule=cosine", "train.lr.warmup_epochs=1"])
    assert lr[0] == pytest.approx(0.2 / 10) and lr[9] == pytest.approx(0.2)  # warmup to the scaled rate
    assert lr[10] == pytest.approx(0.2) and lr[-1] < 0.01 and np.all(np.diff(lr[10:]) <= 1e-9)


def test_plateau_uses_keras_reduce_on_plateau():
    config = load_config(tree={}, overrides=["train.lr.schedule=plateau", "train.lr.patience=2"])
    (callback,) = optim.schedule_callbacks(config.train, validating=True)
    assert isinstance(callback, keras.callbacks.ReduceLROnPlateau)
    assert callback.monitor == "val_loss" and callback.patience == 2 and callback.factor == pytest.approx(0.1)


def test_weight_decay_is_an_l2_penalty_on_kernels_only():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    model.layers[0].kernel.assign(np.ones((3, 2)))
    optim.apply_weight_decay(model, load_config(tree={"train": {"weight_decay": 1e-2}}).train)
    (penalty,) = model.losses
    assert float(penalty) == pytest.approx(1e-2 / 2 * 6)  # wd/2 * ||w||^2, the papers' convention

"""Optimizers, learning-rate schedules and weight decay, from `train:` in the config."""

from __future__ import annotations

import keras

from shared.config import TrainConfig


@keras.saving.register_keras_serializable(package="shared")
class WarmupThen(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to the schedule's first value over `warmup_steps`, then the schedule
    (counted from the end of warmup). Goyal et al. 2017, "Accurate, Large Minibatch SGD"."""

    def __init__(self, schedule, warmup_steps: int):
        self.schedule = schedule
        self.warmup_steps = warmup_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        after = self.schedule(keras.ops.maximum(step - self.warmup_steps, 0.0))
        warm = self.schedule(0.0) * (step + 1.0) / self.warmup_steps
        return keras.ops.where(step < self.warmup_steps, warm, after)

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "warmup_steps": self.warmup_steps}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["warmup_steps"])


@keras.saving.register_keras_serializable(package="shared")
class _Constant(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, value: float):
        self.value = value

    def __call__(self, step):
        return keras.ops.convert_to_tensor(self.value, "float32")

    def get_config(self):
        return {"value": self.value}


def base_learning_rate(train: TrainConfig) -> float:
    """The configured rate, scaled linearly with batch size when lr.base_batch_size is set
    (the ResNet recipe: 0.1 for batch 256)."""
    lr = train.lr
    return lr.base * train.batch_size / lr.base_batch_size if lr.base_batch_size else lr.base


def learning_rate(train: TrainConfig, steps_per_epoch: int):
    lr = train.lr
    base = base_learning_rate(train)
    warmup_steps = int(round(lr.warmup_epochs * steps_per_epoch))
    total_steps = max(train.epochs * steps_per_epoch - warmup_steps, 1)
    if lr.schedule == "constant":
        return WarmupThen(_Constant(base), warmup_steps) if warmup_steps else base
    if lr.schedule == "step":
        # PiecewiseConstantDecay switches *after* a boundary step; step m*steps_per_epoch starts epoch m+1.
        boundaries = [max(m * steps_per_epoch - warmup_steps - 1, 0) for m in sorted(lr.milestones)]
        values = [base * lr.gamma**i for i in range(len(boundaries) + 1)]
        schedule = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    elif lr.schedule == "exponential":  # e.g. MobileNetV2's 0.98 per epoch, GoogLeNet's 0.96 every 8 epochs
        schedule = keras.optimizers.schedules.ExponentialDecay(
            base, decay_steps=max(int(round(lr.decay_epochs * steps_per_epoch)), 1), decay_rate=lr.gamma,
            staircase=True)
    elif lr.schedule == "cosine":  # to zero at the last step (Loshchilov & Hutter 2017, without restarts)
        schedule = keras.optimizers.schedules.CosineDecay(base, total_steps)
    else:  # plateau: a plain variable that shared.callbacks' ReduceLROnPlateau lowers
        return base
    return WarmupThen(schedule, warmup_steps) if warmup_steps else schedule


def schedule_callbacks(train: TrainConfig, validating: bool) -> list:
    """Callbacks a schedule needs: reduce-on-plateau watches the validation loss (training loss
    without a validation split), as AlexNet's recipe divided by 10 when the error stopped falling."""
    if train.lr.schedule != "plateau":
        return []
    return [keras.callbacks.ReduceLROnPlateau(monitor="val_loss" if validating else "loss",
                                              factor=train.lr.gamma, patience=train.lr.patience, verbose=1)]


def make_optimizer(train: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    rate = learning_rate(train, steps_per_epoch)
    opt = train.optimizer
    if opt.name == "sgd":
        return keras.optimizers.SGD(rate, momentum=opt.momentum, nesterov=opt.nesterov)
    if opt.name == "rmsprop":
        return keras.optimizers.RMSprop(rate, rho=0.9, momentum=opt.momentum, epsilon=1e-3)
    if opt.name == "adamw":
        return keras.optimizers.AdamW(rate)
    return keras.optimizers.Adam(rate)


def apply_weight_decay(model: keras.Model, weight_decay: float) -> None:
    """L2 penalty weight_decay/2 * ||w||^2 on every convolution and dense kernel (not on biases or
    batch-norm parameters), added to the loss as in the papers. Keras collects a variable's
    `regularizer` into `model.losses`, so this works on any model without touching its code."""
    if not weight_decay:
        return
    regularizer = keras.regularizers.L2(weight_decay / 2)
    for layer in model.layers:
        for attribute in ("kernel", "depthwise_kernel", "pointwise_kernel"):
            variable = getattr(layer, attribute, None)
            if variable is not None and getattr(variable, "trainable", False):
                variable.regularizer = regularizer

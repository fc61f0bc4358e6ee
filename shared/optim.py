"""Optimizers, learning-rate schedules and weight decay, from `train:` in the config, and `compile_trainer`,
which puts the optimizer together with a task's losses and metrics. Free of TensorFlow (Keras alone)."""

from __future__ import annotations

import keras

from shared.callbacks import ResumableReduceLROnPlateau
from shared.config_schema import TrainConfig


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
class FromStep(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule` counted from the optimizer's step `start`: a training that carries a finished training's
    optimizer state in (its step count goes on, as Adam's bias correction needs) runs its own schedule."""

    def __init__(self, schedule, start: int):
        self.schedule = schedule
        self.start = start

    def __call__(self, step):
        return self.schedule(keras.ops.maximum(keras.ops.cast(step, "float32") - float(self.start), 0.0))

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "start": self.start}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["start"])


@keras.saving.register_keras_serializable(package="shared")
class _Constant(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, value: float):
        self.value = value

    def __call__(self, step):
        return keras.ops.convert_to_tensor(self.value, "float32")

    def get_config(self):
        return {"value": self.value}


def base_learning_rate(train: TrainConfig, replicas: int = 1, scale: float = 1.0) -> float:
    """The configured rate (times `scale`, finetune-all's lower rate), scaled linearly with the global
    batch size (per-replica batch x replicas) when lr.base_batch_size is set (the ResNet recipe: 0.1
    for batch 256; Goyal et al. 2017)."""
    lr = train.lr
    global_batch = train.batch_size * replicas
    return scale * (lr.base * global_batch / lr.base_batch_size if lr.base_batch_size else lr.base)


def learning_rate(train: TrainConfig, steps_per_epoch: int, replicas: int = 1, scale: float = 1.0):
    """The configured schedule over `train.epochs` of `steps_per_epoch`, from the optimizer's step
    `lr.start_step` on (a float where the rate never changes with the step)."""
    schedule = _schedule(train, steps_per_epoch, replicas, scale)
    if train.lr.start_step and isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return FromStep(schedule, train.lr.start_step)
    return schedule


def _schedule(train: TrainConfig, steps_per_epoch: int, replicas: int, scale: float):
    lr = train.lr
    base = base_learning_rate(train, replicas, scale)
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
    elif lr.schedule == "polynomial":  # base -> end as (1 - t/T)^power; power 1 is linear decay
        schedule = keras.optimizers.schedules.PolynomialDecay(base, total_steps, end_learning_rate=lr.end,
                                                              power=lr.power)
    else:  # plateau: a plain variable that shared.callbacks' ReduceLROnPlateau lowers
        return base
    return WarmupThen(schedule, warmup_steps) if warmup_steps else schedule


def schedule_callbacks(train: TrainConfig, validating: bool) -> list:
    """Callbacks a schedule needs: reduce-on-plateau watches the validation loss (training loss
    without a validation split), as AlexNet's recipe divided by 10 when the error stopped falling."""
    if train.lr.schedule != "plateau":
        return []
    return [ResumableReduceLROnPlateau(monitor="val_loss" if validating else "loss",
                                       factor=train.lr.gamma, patience=train.lr.patience, verbose=1)]


def decoupled_weight_decay(train: TrainConfig) -> float | None:
    """The optimizer's own (decoupled) weight decay: for weight_decay_mode decoupled, and always for
    AdamW, which is Adam with decoupled decay by definition (Loshchilov & Hutter 2019)."""
    decoupled = train.weight_decay_mode == "decoupled" or train.optimizer.name == "adamw"
    return train.weight_decay if decoupled and train.weight_decay else None


class StepSchedule(keras.callbacks.Callback):
    """Sets the optimizer's learning-rate variable from `schedule` (a schedule or a fixed rate) at the optimizer's
    step before every batch: the rate the schedule would give inside the step, read from a variable, so another
    run's schedule needs no new trace of the step (a kept trainer, `shared.kept`)."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        optimizer.learning_rate = self.schedule(optimizer.iterations) if callable(self.schedule) else self.schedule

    def on_train_batch_end(self, batch, logs=None):  # the next step's rate: what a schedule's optimizer reports
        self.on_train_batch_begin(batch, logs)


def make_optimizer(train: TrainConfig, steps_per_epoch: int, replicas: int = 1,
                   lr_scale: float = 1.0, rate_variable: bool = False) -> keras.optimizers.Optimizer:
    """The configured optimizer with its schedule, decoupled weight decay, gradient clipping and
    weight EMA (Keras optimizers do all of these natively). `rate_variable`: a learning-rate variable that a
    `StepSchedule` sets, instead of the schedule itself."""
    opt = train.optimizer
    schedule = learning_rate(train, steps_per_epoch, replicas, lr_scale)
    common = {
        "learning_rate": float(schedule(train.lr.start_step)) if rate_variable and callable(schedule) else schedule,
        "weight_decay": decoupled_weight_decay(train),
        "clipnorm": opt.clip_norm,
        "global_clipnorm": opt.clip_global_norm,
        "use_ema": train.ema_momentum is not None,
        "ema_momentum": train.ema_momentum or 0.99,
    }
    if opt.name == "sgd":
        optimizer = keras.optimizers.SGD(momentum=opt.momentum, nesterov=opt.nesterov, **common)
    elif opt.name == "rmsprop":  # TF-style RMSProp of the MobileNet/Inception recipes: decay 0.9, eps 1e-3
        optimizer = keras.optimizers.RMSprop(rho=opt.rho, momentum=opt.momentum,
                                             epsilon=opt.epsilon if opt.epsilon is not None else 1e-3, **common)
    else:
        make = keras.optimizers.AdamW if opt.name == "adamw" else keras.optimizers.Adam
        optimizer = make(epsilon=opt.epsilon if opt.epsilon is not None else 1e-7, **common)
    if common["weight_decay"]:
        # Decay kernels only, as the L2 form does: not biases or batch-norm scales and offsets.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def apply_weight_decay(model: keras.Model, train: TrainConfig) -> None:
    """L2 penalty weight_decay/2 * ||w||^2 on every convolution and dense kernel (not on biases or
    batch-norm parameters), added to the loss as in the papers. Keras collects a variable's
    `regularizer` into `model.losses`, so this works on any model without touching its code.
    Nothing to do when the decay is decoupled (the optimizer applies it)."""
    if not train.weight_decay or decoupled_weight_decay(train):
        return
    regularizer = keras.regularizers.L2(train.weight_decay / 2)
    for layer in model.layers:
        for attribute in ("kernel", "depthwise_kernel", "pointwise_kernel"):
            variable = getattr(layer, attribute, None)
            if variable is not None and getattr(variable, "trainable", False):
                variable.regularizer = regularizer


def compile_trainer(trainer: keras.Model, objective, train: TrainConfig, steps_per_epoch: int, replicas: int = 1,
                    lr_scale: float = 1.0, rate_variable: bool = False) -> None:
    """Compile `trainer` with a task's objective (`shared.task.Objective`: losses, their weights, metrics) and
    the optimizer `train:` describes, its schedule spanning `train.epochs` of `steps_per_epoch`; with
    `rate_variable` (a trainer to keep) its rate is a variable, which fit() needs a `StepSchedule` to set."""
    trainer.compile(optimizer=make_optimizer(train, steps_per_epoch, replicas, lr_scale, rate_variable),
                    loss=objective.loss, loss_weights=objective.loss_weights, metrics=objective.metrics,
                    jit_compile=train.jit_compile)
    # Its slots now, not in the first traced step: variables made during a trace make TensorFlow trace the whole
    # train step a second time. Keras builds it early itself only under an explicit distribution strategy.
    trainer.optimizer.build(trainer.trainable_variables)

"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):
a student learns from a finished run's frozen model (the teacher) as well as from the labels.

    loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(labels, student)

T softens both distributions so the small probabilities the teacher gives wrong classes (its "dark
knowledge") carry weight; the T^2 keeps the soft term's gradients the same size whatever T (Sec. 2).
Every model here ends in a softmax, so the logits are recovered as log(p): softmax is shift-invariant,
and log(softmax(z)) = z - logsumexp(z) differs from z by a constant per example.

How the train runner uses it:

    teacher = load_teacher(rebuilt_teacher_run, datasets.num_classes, datasets.input_shape,
                           normalization=data_normalization(config.data), class_names=datasets.class_names)
    model = Distiller(student, teacher, config.distill.temperature, config.distill.alpha)
    compile_classifier(model, ...); model.fit(...)       # the usual compiled losses and top1/top5 metrics
    model.student                                    # what is saved, evaluated and exported

`Distiller.save` writes the student alone, so a run's checkpoints load into the student's own model.py
(`shared.tasks.rebuild`) like any other run's. The teacher comes rebuilt (`shared.task.Rebuilt`) from the
command at the top (`shared.lifecycle`), which rebuilds every run it uses once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
from keras import ops

from shared.config_schema import DataConfig
from shared.errors import UserError
from shared.modelzoo import MAIN_OUTPUT
from shared.runs import Run
from shared.task import Rebuilt

# Probabilities are clipped here before the log: a float32 softmax underflows to exactly 0 for very
# confident models, and log(0) would make the loss (and 0 * inf its gradient) NaN. 1e-20 keeps 1/p
# finite in float32, and a class that unlikely weighs nothing in either distribution.
PROBABILITY_FLOOR = 1e-20

Normalization = tuple[Sequence[float], Sequence[float]]  # (mean, std) per channel, on the 0-255 scale


# ---------------------------------------------------------------- the loss


def _log_probs(probabilities, temperature: float):
    """log softmax(log(p) / T): the softened distribution's log-probabilities, from probabilities."""
    probabilities = ops.cast(probabilities, "float32")  # half-precision softmax outputs lose the tails
    logits = ops.log(ops.clip(probabilities, PROBABILITY_FLOOR, 1.0))
    return ops.log_softmax(logits / temperature, axis=-1)


@keras.saving.register_keras_serializable(package="shared")
class SoftTargetLoss(keras.losses.Loss):
    """T^2 * KL(teacher_T || student_T) per example, called as loss(teacher_probs, student_probs).
    A Keras Loss so that sample weights, the batch mean and the per-replica scaling under a
    tf.distribute strategy are done exactly as for the compiled cross-entropy it is added to.
    No gradient flows into the teacher's probabilities."""

    def __init__(self, temperature: float = 4.0, name: str = "soft_targets", **kwargs):
        super().__init__(name=name, **kwargs)
        self.temperature = float(temperature)

    def call(self, teacher_probs, student_probs):
        teacher_log = _log_probs(ops.stop_gradient(teacher_probs), self.temperature)
        student_log = _log_probs(student_probs, self.temperature)
        kl = ops.sum(ops.exp(teacher_log) * (teacher_log - student_log), axis=-1)
        return kl * (self.temperature ** 2)

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature}


def cross_entropy(y_true, probabilities, sample_weight=None):
    """Mean cross-entropy of probabilities against class indices (sparse) or one-hot / soft label
    vectors (MixUp, CutMix, label smoothing), told apart by the labels' shape."""
    y_true = ops.convert_to_tensor(y_true)
    dense = (len(y_true.shape) == len(probabilities.shape) and y_true.shape[-1] is not None
             and y_true.shape[-1] == probabilities.shape[-1] and probabilities.shape[-1] != 1)
    loss = keras.losses.CategoricalCrossentropy() if dense else keras.losses.SparseCategoricalCrossentropy()
    return loss(y_true, probabilities, sample_weight=sample_weight)


def distillation_loss(y_true, student_probs, teacher_probs, temperature: float = 4.0, alpha: float = 0.9,
                      sample_weight=None, hard_loss: Callable | None = None):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard_loss(y_true, student_probs), averaged
    over the batch. `student_probs`, `teacher_probs`: softmax outputs (batch, classes); `y_true`: class
    indices or one-hot / soft labels; `hard_loss`: a Keras loss (default: the matching cross-entropy;
    the runner's compiled one carries its label smoothing)."""
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the distillation alpha must be in [0, 1], got {alpha}")
    if hard_loss is None:
        hard = cross_entropy(y_true, student_probs, sample_weight)
    else:
        hard = hard_loss(y_true, student_probs, sample_weight=sample_weight)
    if alpha == 0.0:
        return ops.cast(hard, "float32")
    soft = SoftTargetLoss(temperature)(teacher_probs, student_probs, sample_weight=sample_weight)
    return alpha * soft + (1.0 - alpha) * ops.cast(hard, "float32")


# ---------------------------------------------------------------- the teacher


def data_normalization(data: DataConfig) -> tuple[list[float], list[float]]:
    """The (mean, std) per channel on the 0-255 scale that a run's input pipeline applied, as
    `shared.data.preprocess.normalizer` does: normalize off (pixels / 255) is mean 0, std 255. Needs the
    resolved statistics `make_datasets` writes into the config and every run's config.yaml (older runs:
    the source's)."""
    if not data.normalize:
        return [0.0] * data.channels, [255.0] * data.channels
    from shared.data import normalization_statistics

    mean, std = normalization_statistics(data)
    return [float(v) for v in mean], [float(v) for v in std]


@keras.saving.register_keras_serializable(package="shared")
class Renormalize(keras.layers.Layer):
    """x * scale + offset per channel: images normalized with the student's statistics back to pixels,
    then normalized with the teacher's, in one affine step."""

    def __init__(self, scale: Sequence[float], offset: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.scale = [float(v) for v in scale]
        self.offset = [float(v) for v in offset]

    def call(self, images):
        return images * ops.cast(self.scale, images.dtype) + ops.cast(self.offset, images.dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


def renormalization(student: Normalization, teacher: Normalization) -> tuple[list[float], list[float]] | None:
    """(scale, offset) turning student-normalized images into teacher-normalized ones, or None when the
    two normalizations are the same: (x * s_std + s_mean - t_mean) / t_std."""
    s_mean, s_std = (np.asarray(v, dtype=np.float64) for v in student)
    t_mean, t_std = (np.asarray(v, dtype=np.float64) for v in teacher)
    if s_mean.shape != t_mean.shape or s_std.shape != t_std.shape:
        raise UserError(f"normalization statistics for {len(s_mean)} and {len(t_mean)} channels cannot be "
                        f"converted; teacher and student must use the same data.channels")
    if np.allclose(s_mean, t_mean) and np.allclose(s_std, t_std):
        return None
    return (s_std / t_std).tolist(), ((s_mean - t_mean) / t_std).tolist()


def load_teacher(teacher: Rebuilt, num_classes: int, input_shape: tuple,
                 normalization: Normalization | None = None,
                 class_names: Sequence[str] | None = None) -> keras.Model:
    """The finished run `teacher` (its model rebuilt from the run's own model.py, config and last checkpoint,
    the classifier alone: `shared.tasks.rebuild`) as a frozen teacher for a student with `num_classes` classes
    and `input_shape` (image_size, image_size, channels) inputs.

    `normalization`: the student's (mean, std) on the 0-255 scale (`data_normalization(config.data)`).
    When the teacher was trained with other statistics, the returned model starts with a `Renormalize`
    layer, so it takes the student's batches and sees what it was trained on. None: the student's
    batches are taken to be normalized as the teacher's were.
    `class_names`: the student's classes in index order; checked against the teacher run's labels.txt
    (the same count of different classes, or of the same classes in another order, would teach nonsense).

    Rebuild it under the same tf.distribute strategy scope (and dtype policy) as the student."""
    run, data = teacher.run, teacher.config.data
    size = f"{input_shape[0]}x{input_shape[1]}x{input_shape[2]}"
    teacher_size = f"{data.image_size}x{data.image_size}x{data.channels}"
    if (data.image_size, data.image_size, data.channels) != tuple(input_shape):
        raise UserError(f"teacher run {run.path} takes {teacher_size} images but the student's are {size}; "
                        f"set data.image_size: {data.image_size} and data.channels: {data.channels} in the "
                        f"student's config (e.g. --set data.image_size={data.image_size}), so that both see "
                        f"the same images")
    if data.num_classes is not None and data.num_classes != num_classes:
        raise _class_count_error(run, data.num_classes, num_classes)
    teacher_names = run.class_names()
    if class_names is not None and teacher_names is not None and list(class_names) != teacher_names:
        where = next((i for i, (a, b) in enumerate(zip(class_names, teacher_names)) if a != b),
                     min(len(class_names), len(teacher_names)))
        mine = class_names[where] if where < len(class_names) else "(none)"
        theirs = teacher_names[where] if where < len(teacher_names) else "(none)"
        raise UserError(f"teacher run {run.path} was trained on other classes: class {where} is {theirs!r} "
                        f"there and {mine!r} here; distill on the teacher's dataset and classes")

    teacher = teacher.model
    if teacher.output_shape[-1] != num_classes:  # the config may predate a resolved num_classes
        raise _class_count_error(run, teacher.output_shape[-1], num_classes)
    teacher.trainable = False
    teacher_normalization = data_normalization(data) if normalization is not None else None
    change = renormalization(normalization, teacher_normalization) if normalization is not None else None
    if change is None:
        return teacher
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    renormalized = Renormalize(*change, name="renormalize")(inputs)
    wrapper = keras.Model(inputs, teacher(renormalized), name=f"teacher_{teacher.name}")
    wrapper.trainable = False
    return wrapper


def _class_count_error(run: Run, teacher_classes: int, student_classes: int) -> UserError:
    return UserError(f"teacher run {run.path} predicts {teacher_classes} classes but the student's data has "
                     f"{student_classes}; distill on the teacher's dataset (the same data.source and "
                     f"data.num_classes) or choose a teacher trained on these classes")


# ---------------------------------------------------------------- the student


class Distiller(keras.Model):
    """A student trained against a frozen teacher. It behaves as the student: `call` returns the
    student's output (a dict for models with auxiliary heads), so compiled metrics, `evaluate` and
    `predict` score the student; only the student's weights train. `compile` takes the losses the runner
    would give the student alone (`shared.classification.objective.compile_classifier` works unchanged); in
    training, the main output's loss becomes `distillation_loss` around it, auxiliary heads keep their
    hard-label losses and weights, and weight-decay terms are added unchanged. Evaluation (validation)
    reports the student's plain loss, comparable with runs trained without a teacher, and does not run the teacher.

    `save(path)` saves the student alone: the checkpoint a run keeps is the student, loadable by the
    student's model.py. `save_weights` (the runner's crash backup) keeps both models."""

    def __init__(self, student: keras.Model, teacher: keras.Model, temperature: float = 4.0,
                 alpha: float = 0.9, **kwargs):
        if temperature <= 0:
            raise UserError(f"distill.temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"distill.alpha must be in [0, 1], got {alpha}")
        super().__init__(name=kwargs.pop("name", f"distill_{student.name}"), **kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self._soft_loss = SoftTargetLoss(self.temperature)
        self._hard_losses: dict[str | None, tuple[Callable | None, float]] = {MAIN_OUTPUT: (None, 1.0)}
        if student.built:
            self.built = True  # no weights of its own; the sub-models are built

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    # Only the student's weights reach the optimizer, whatever `trainable` the teacher is later given
    # (the runner's unfreeze_all sets it on every sub-model): the teacher is never trained.
    @property
    def trainable_weights(self):
        return self.student.trainable_weights

    @property
    def trainable_variables(self):
        return self.student.trainable_variables

    @property
    def non_trainable_weights(self):
        trained = {id(v) for v in self.trainable_weights}
        return [v for v in self.weights if id(v) not in trained]

    @property
    def non_trainable_variables(self):
        trained = {id(v) for v in self.trainable_variables}
        return [v for v in self.variables if id(v) not in trained]

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, metrics=None, **kwargs):
        """Keras' compile; the losses are kept here and applied in `compute_loss` (Keras' compiled
        loss cannot take the teacher). `loss`: one loss (for every output) or {output: loss};
        `loss_weights`: None, one float, or {output: weight}. No loss: cross-entropy on the main output."""
        outputs = list(self.student.output) if isinstance(self.student.output, dict) else [None]
        if isinstance(loss, dict):
            unknown = set(loss) - set(outputs)
            if unknown:
                raise ValueError(f"losses for unknown outputs {sorted(unknown)}; the student has {outputs}")
            losses = {name: keras.losses.get(value) for name, value in loss.items()}
        elif loss is None:
            losses = {outputs[0] if outputs == [None] else MAIN_OUTPUT: None}
        else:
            losses = {name: keras.losses.get(loss) for name in outputs}
        weights = loss_weights if isinstance(loss_weights, dict) else \
            {name: 1.0 if loss_weights is None else float(loss_weights) for name in losses}
        self._hard_losses = {name: (fn, float(weights.get(name, 1.0))) for name, fn in losses.items()}
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The training objective (see the class docstring); the plain student loss when not training."""
        total = ops.zeros((), "float32")
        for name, (fn, weight) in self._hard_losses.items():
            pred = y_pred[name if name is not None else MAIN_OUTPUT] if isinstance(y_pred, dict) else y_pred
            true = y[name] if isinstance(y, dict) else y
            weights = sample_weight[name] if isinstance(sample_weight, dict) else sample_weight
            main = name is None or name == MAIN_OUTPUT
            if main and training and self.alpha > 0:
                teacher_probs = self.teacher(x, training=False)  # inference: no dropout, frozen BN
                term = distillation_loss(true, pred, teacher_probs, self.temperature, self.alpha, weights,
                                         hard_loss=fn)
            elif fn is None:
                term = cross_entropy(true, pred, weights)
            else:
                term = fn(true, pred, sample_weight=weights)
            total = total + weight * ops.cast(term, "float32")
        # Weight decay (L2 regularizers) and other added losses of the student, never the teacher's;
        # Keras' own hook sums them and scales them per replica as its default compute_loss does.
        for extra in self.student.losses:
            total = total + ops.cast(self._aggregate_additional_loss(extra), "float32")
        return total

    def save(self, filepath, *args, **kwargs):
        """Save the student alone (the teacher is an input of the training, not part of its result)."""
        return self.student.save(filepath, *args, **kwargs)


def student_of(model: keras.Model) -> keras.Model:
    """The model a run keeps, evaluates and exports: a Distiller's student, else the model itself."""
    return model.student if isinstance(model, Distiller) else model


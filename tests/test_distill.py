"""Knowledge distillation (shared/distill.py): the loss on hand-computed cases, the teacher's checks and
renormalization, and a Distiller fitting a tiny MobileNetV2 student against the shared tiny ResNet run
(conftest.trained_run), whose checkpoint is then the student, loadable by the student's own model.py."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared import optim, runs
from shared.checkpoints import EpochCheckpoint
from shared.config import load_config
from shared.config_schema import DataConfig, with_changes
from shared.distill import (Distiller, Renormalize, cross_entropy, data_normalization, distillation_loss,
                            load_teacher, student_of)
from shared.errors import UserError
from shared.tasks import rebuild, rebuilt
from shared.finetune import unfreeze_all
from shared.modelzoo import MODELS_DIR, load_model_module, resolve_hparams
from shared.classification.objective import compile_classifier

from conftest import tiny_tree

SHAPE = (16, 16, 3)
CLASSES = 4
STUDENT = {"alpha": 0.35, "small_input": True}
SYNTHETIC_MEAN, SYNTHETIC_STD = [127.5] * 3, [36.0] * 3  # what the tiny run's synthetic source resolved to


def probabilities(*rows):
    return tf.constant(rows, tf.float32)


# ---------------------------------------------------------------- the loss


def test_loss_matches_the_hand_computed_value_for_sparse_and_one_hot_labels():
    # T = 2 turns p into sqrt(p) renormalized: student (0.2, 0.8) -> (1/3, 2/3), teacher (0.8, 0.2) -> (2/3, 1/3).
    # KL(teacher || student) = 2/3 ln 2 - 1/3 ln 2 = ln(2)/3, times T^2 = 4; cross-entropy of label 1: -ln 0.8.
    expected = 0.5 * 4 * math.log(2) / 3 + 0.5 * -math.log(0.8)
    student, teacher = probabilities([0.2, 0.8]), probabilities([0.8, 0.2])
    sparse = distillation_loss(tf.constant([1]), student, teacher, temperature=2.0, alpha=0.5)
    one_hot = distillation_loss(tf.constant([[0.0, 1.0]]), student, teacher, temperature=2.0, alpha=0.5)
    assert float(sparse) == pytest.approx(expected, rel=1e-5)
    assert float(one_hot) == pytest.approx(expected, rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy_and_a_matching_student_has_no_soft_loss():
    rng = np.random.default_rng(0)
    student = tf.nn.softmax(rng.normal(size=(6, 5)).astype(np.float32))
    teacher = tf.nn.softmax(rng.normal(size=(6, 5)).astype(np.float32))
    labels = tf.constant([0, 1, 2, 3, 4, 0])
    plain = keras.losses.SparseCategoricalCrossentropy()(labels, student)
    assert float(distillation_loss(labels, student, teacher, 3.0, alpha=0.0)) == pytest.approx(float(plain), rel=1e-5)
    assert float(distillation_loss(tf.one_hot(labels, 5), student, teacher, 3.0, alpha=0.0)) == \
        pytest.approx(float(plain), rel=1e-5)
    assert float(distillation_loss(labels, student, student, 3.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(labels, student, teacher, 3.0, alpha=1.0)) > 0.01


def test_gradient_reaches_only_the_student_and_is_hintons():
    """d(T^2 KL)/dz_student = T (softmax(z_s/T) - softmax(z_t/T)) per example (Hinton et al., Sec. 2),
    from probabilities alone; the teacher gets none."""
    rng = np.random.default_rng(1)
    student_logits = tf.Variable(rng.normal(size=(3, 4)).astype(np.float32))
    teacher_logits = tf.Variable(rng.normal(size=(3, 4)).astype(np.float32))
    temperature = 4.0
    with tf.GradientTape(persistent=True) as tape:
        loss = distillation_loss(tf.constant([0, 1, 2]), tf.nn.softmax(student_logits),
                                 tf.nn.softmax(teacher_logits), temperature, alpha=1.0)
    assert tape.gradient(loss, teacher_logits) is None
    expected = temperature * (tf.nn.softmax(student_logits / temperature)
                              - tf.nn.softmax(teacher_logits / temperature)) / 3  # batch mean
    np.testing.assert_allclose(tape.gradient(loss, student_logits).numpy(), expected.numpy(), atol=1e-5)


def test_saturated_probabilities_stay_finite():
    student, teacher = probabilities([1.0, 0.0]), probabilities([0.0, 1.0])
    with tf.GradientTape() as tape:
        tape.watch(student)
        loss = distillation_loss(tf.constant([1]), student, teacher, 1.0, 0.9)
    assert np.isfinite(float(loss)) and np.isfinite(tape.gradient(loss, student).numpy()).all()


# ---------------------------------------------------------------- the teacher


@pytest.mark.slow
def test_a_teacher_for_other_classes_or_images_is_refused(trained_run):
    run, _ = trained_run
    teacher = rebuilt(run)  # one rebuild for the four refusals: each is refused before its model is touched
    with pytest.raises(UserError, match=r"predicts 4 classes but the student's data has 7"):
        load_teacher(teacher, 7, SHAPE)
    with pytest.raises(UserError, match=r"takes 16x16x3 images but the student's are 32x32x3.*data.image_size: 16"):
        load_teacher(teacher, CLASSES, (32, 32, 3))
    with pytest.raises(UserError, match=r"16x16x1.*data.channels: 3"):
        load_teacher(teacher, CLASSES, (16, 16, 1))
    names = run.class_names()
    with pytest.raises(UserError, match=r"other classes: class 1"):
        load_teacher(teacher, CLASSES, SHAPE, class_names=[names[0], "cat", *names[2:]])


def test_the_teacher_sees_its_own_normalization(trained_run):
    run, _ = trained_run
    reference, _ = rebuild(run)
    pixels = np.random.default_rng(2).uniform(0, 255, size=(5, *SHAPE)).astype(np.float32)
    own = (pixels - np.float32(127.5)) / np.float32(36.0)

    # The same statistics as the teacher: the teacher itself, frozen, no conversion.
    same = load_teacher(rebuilt(run), CLASSES, SHAPE, normalization=(SYNTHETIC_MEAN, SYNTHETIC_STD),
                        class_names=run.class_names())
    assert not any(isinstance(layer, Renormalize) for layer in same.layers) and not same.trainable_weights
    np.testing.assert_allclose(same(own, training=False), reference(own, training=False), atol=1e-6)

    # A student fed pixels / 255 (data.normalize off): the teacher still gets (pixels - 127.5) / 36.
    student_normalization = data_normalization(DataConfig(normalize=False, channels=3))
    assert student_normalization == ([0.0] * 3, [255.0] * 3)
    teacher = load_teacher(rebuilt(run), CLASSES, SHAPE, normalization=student_normalization)
    assert not teacher.trainable_weights
    inside = teacher(pixels / np.float32(255.0), training=False)
    np.testing.assert_allclose(inside, reference(own, training=False), atol=1e-5)
    assert not np.allclose(inside, reference(pixels / np.float32(255.0), training=False), atol=1e-3)

    # Other per-channel statistics (ImageNet's, say) convert as well.
    imagenet = ([123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    teacher = load_teacher(rebuilt(run), CLASSES, SHAPE, normalization=imagenet)
    student_batch = (pixels - np.float32(imagenet[0])) / np.float32(imagenet[1])
    np.testing.assert_allclose(teacher(student_batch, training=False), reference(own, training=False), atol=1e-5)


# ---------------------------------------------------------------- the Distiller


def student_config(runs_dir):
    config = load_config(tree=tiny_tree(runs_dir, train={"batch_size": 8, "lr": {"base": 0.05},
                                                         "weight_decay": 1e-4}))
    module = load_model_module(MODELS_DIR / "mobilenet_v2")
    config = with_changes(config, {"model.name": "mobilenet_v2", "model.hparams": resolve_hparams(module, STUDENT),
                                   # as make_datasets resolves them
                                   "data.mean": SYNTHETIC_MEAN, "data.std": SYNTHETIC_STD})
    return config, module


@pytest.mark.slow
def test_a_distiller_trains_the_student_only_and_its_checkpoint_is_the_student(trained_run, tmp_path):
    teacher_run, _ = trained_run
    config, module = student_config(tmp_path / "runs")
    keras.utils.set_random_seed(0)
    student = module.build(CLASSES, SHAPE, **config.model.hparams)
    teacher = load_teacher(rebuilt(teacher_run), CLASSES, SHAPE, normalization=data_normalization(config.data),
                           class_names=teacher_run.class_names())
    distiller = Distiller(student, teacher, temperature=4.0, alpha=0.9)
    unfreeze_all(distiller)  # what the runner's _freeze does first: the teacher must stay out of training
    assert {id(v) for v in distiller.trainable_weights} == {id(v) for v in student.trainable_weights}
    assert student_of(distiller) is student and student_of(student) is student

    optim.apply_weight_decay(student, config.train)  # on the student: the distiller's layers are sub-models
    compile_classifier(distiller, config, steps_per_epoch=2, num_classes=CLASSES)
    distiller.run_eagerly = True  # 2 steps: eager beats tracing two networks (graph mode: the next test)
    run = runs.create(config, MODELS_DIR / "mobilenet_v2", argv=["pytest"])
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, *SHAPE)).astype(np.float32)
    y = rng.integers(0, CLASSES, size=16)
    teacher_before = [w.copy() for w in teacher.get_weights()]
    student_before = [w.copy() for w in student.get_weights()]

    history = distiller.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False,
                            callbacks=[EpochCheckpoint(run.checkpoint_dir)])

    assert {"loss", "top1", "top5"} <= set(history.history) and np.isfinite(history.history["loss"]).all()
    for before, after in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)  # BN statistics included: the teacher ran in inference
    assert any(not np.array_equal(b, a) for b, a in zip(student_before, student.get_weights(), strict=True))

    # The run's checkpoint is the student: the unchanged evaluation path rebuilds it from its model.py.
    student_model, _ = rebuild(run)
    np.testing.assert_allclose(student_model(x, training=False), distiller(x, training=False), atol=1e-5)
    np.testing.assert_allclose(distiller.predict(x, verbose=0), student(x, training=False), atol=1e-5)
    student.save(tmp_path / "student.keras")
    reloaded = keras.saving.load_model(tmp_path / "student.keras")
    np.testing.assert_allclose(reloaded(x, training=False), distiller(x, training=False), atol=1e-5)


def test_the_training_loss_adds_the_teacher_and_evaluation_reports_the_plain_loss():
    """compute_loss against hand-assembled terms, for a student with an auxiliary head: the main output
    is distilled, the aux head keeps its weighted hard loss, weight decay is added once."""
    inputs = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, activation="relu", kernel_regularizer=keras.regularizers.L2(0.01))(inputs)
    aux = keras.layers.Dense(CLASSES, activation="softmax", name="aux")(keras.layers.GlobalAveragePooling2D()(x))
    main = keras.layers.Dense(CLASSES, activation="softmax", name="predictions")(
        keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(x)))
    student = keras.Model(inputs, {"predictions": main, "aux": aux})
    teacher_in = keras.Input(SHAPE)
    teacher = keras.Model(teacher_in, keras.layers.Dense(CLASSES, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(teacher_in)))
    distiller = Distiller(student, teacher, temperature=2.0, alpha=0.7)
    loss = keras.losses.SparseCategoricalCrossentropy
    distiller.compile(keras.optimizers.SGD(0.1), loss={"predictions": loss(), "aux": loss()},
                      loss_weights={"predictions": 1.0, "aux": 0.3},
                      metrics={"predictions": [keras.metrics.SparseCategoricalAccuracy(name="top1")]})

    rng = np.random.default_rng(4)
    images = rng.normal(size=(6, *SHAPE)).astype(np.float32)
    labels = tf.constant(rng.integers(0, CLASSES, size=6))
    y = {"predictions": labels, "aux": labels}
    outputs = distiller(images, training=False)
    decay = float(tf.add_n(student.losses))
    assert decay > 0

    trained = distiller.compute_loss(images, y, outputs, training=True)
    expected = (distillation_loss(labels, outputs["predictions"], teacher(images), 2.0, 0.7)
                + 0.3 * cross_entropy(labels, outputs["aux"]) + decay)
    assert float(trained) == pytest.approx(float(expected), rel=1e-5)
    evaluated = distiller.compute_loss(images, y, outputs, training=False)
    plain = cross_entropy(labels, outputs["predictions"]) + 0.3 * cross_entropy(labels, outputs["aux"]) + decay
    assert float(evaluated) == pytest.approx(float(plain), rel=1e-5)
    assert float(trained) != pytest.approx(float(evaluated), rel=1e-3)

    # The same objective traced by `fit` (graph mode), with the dict labels the runner feeds.
    teacher_before = [w.copy() for w in teacher.get_weights()]
    history = distiller.fit(images, y, batch_size=6, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(float(trained), rel=1e-4)  # one step: the loss before it
    assert "predictions_top1" in history.history
    for before, after in zip(teacher_before, teacher.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)

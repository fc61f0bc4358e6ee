"""MobileNetV2 (models/mobilenet_v2): sizes against Keras Applications, strides, the small-input variant,
Keras Applications weight files, and one training step. Each test takes a few seconds on a 2-core CPU."""

import keras
import numpy as np
import pytest

from shared.modelzoo import MODELS_DIR, load_model_module, load_weight_file

mobilenet_v2 = load_model_module(MODELS_DIR / "mobilenet_v2")


# keras.applications.MobileNetV2(weights=None, alpha=alpha).count_params() at 224 px, 1000 classes (Keras 3.15).
@pytest.mark.parametrize("alpha, keras_count", [(1.0, 3_538_984), (0.35, 1_691_208), (1.4, 6_156_712)])
def test_parameter_counts_equal_keras_applications(alpha, keras_count):
    assert mobilenet_v2.build(1000, (224, 224, 3), alpha=alpha).count_params() == keras_count


def test_width_multiplier_rounds_channels_as_keras_applications():
    model = mobilenet_v2.build(1000, (224, 224, 3), alpha=0.35)
    assert model.get_layer("Conv1").filters == 16  # 32 * 0.35 = 11.2 -> 16
    assert model.get_layer("expanded_conv_project").filters == 8  # int(16 * 0.35) = 5 -> 8
    assert model.get_layer("block_16_project").filters == 112  # 320 * 0.35
    assert model.get_layer("Conv_1").filters == 1280  # kept at 1280 for alpha <= 1
    assert mobilenet_v2.build(10, (224, 224, 3), alpha=1.4).get_layer("Conv_1").filters == 1792


def test_backbone_features_by_stride():
    features = mobilenet_v2.backbone((64, 64, 3), alpha=1.0)
    shapes = {name: tuple(t.shape[1:]) for name, t in features.output.items()}
    assert shapes == {"stride_8": (8, 8, 32), "stride_16": (4, 4, 96), "stride_32": (2, 2, 1280)}
    small = mobilenet_v2.backbone((32, 32, 3), alpha=1.0, small_input=True)
    shapes = {name: tuple(t.shape[1:]) for name, t in small.output.items()}
    assert shapes == {"stride_2": (16, 16, 32), "stride_4": (8, 8, 96), "stride_8": (4, 4, 1280)}


def test_small_input_keeps_resolution_at_28_px():
    model = mobilenet_v2.build(10, (28, 28, 1), alpha=0.35, small_input=True)
    assert model.get_layer("Conv1_relu").output.shape[1:3] == (28, 28)
    assert model.get_layer("block_2_add").output.shape[1:3] == (28, 28)  # the c = 24 row kept stride 1
    assert model.get_layer("out_relu").output.shape[1:3] == (4, 4)  # total stride 8
    assert predict(model, np.zeros((2, 28, 28, 1), "float32")).shape == (2, 10)


def test_rejects_non_positive_alpha():
    with pytest.raises(ValueError, match="alpha"):
        mobilenet_v2.build(10, (32, 32, 3), alpha=0.0)


def _randomize(model, images, seed: int = 0) -> None:
    """Random kernels and batch-norm scales and offsets, then moving statistics set to the statistics of
    `images` (as after training), so the signal reaches the output and a weight loaded into the wrong place
    shows there."""
    rng = np.random.default_rng(seed)
    values = []
    for w in model.weights:
        shape, name = tuple(w.shape), w.path.rsplit("/", 1)[-1]
        if name == "gamma":
            values.append(rng.uniform(0.5, 1.5, shape))
        elif name in ("beta", "bias", "moving_mean"):
            values.append(rng.normal(0.0, 0.1, shape))
        else:  # kernels; moving_variance is recomputed below
            values.append(rng.normal(0.0, 0.1, shape) if name != "moving_variance" else np.ones(shape))
    model.set_weights([v.astype("float32") for v in values])
    batch_norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in batch_norms]
    for layer in batch_norms:
        layer.momentum = 0.0  # one training-mode pass replaces the moving statistics by the batch's
    model(images, training=True)
    for layer, momentum in zip(batch_norms, momenta):
        layer.momentum = momentum


def predict(model, images):
    """Inference mode, eagerly: faster than model.predict's graph tracing for one small batch."""
    return keras.tree.map_structure(np.asarray, model(images, training=False))


def features_and_probabilities(model, images):
    """The 1280-channel last feature map (order 1, so differences show) and the softmax output."""
    return predict(keras.Model(model.input, [model.get_layer("out_relu").output, model.output]), images)


def assert_close(ours, expected, tolerance: float = 1e-4):
    for a, b in zip(ours, expected):
        assert np.abs(a - b).max() < tolerance


@pytest.mark.slow
def test_keras_applications_weights_load_by_layer_order(tmp_path):
    app = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), alpha=1.0)
    images = np.random.default_rng(1).uniform(-1.0, 1.0, (4, 96, 96, 3)).astype("float32")
    _randomize(app, images)
    expected = features_and_probabilities(app, images)

    ours = mobilenet_v2.build(1000, (96, 96, 3), alpha=1.0)
    assert [tuple(w.shape) for w in ours.weights] == [tuple(w.shape) for w in app.weights]
    ours.set_weights(app.get_weights())
    assert_close(features_and_probabilities(ours, images), expected)

    app.save_weights(tmp_path / "app.weights.h5")  # Keras 3 weight file
    ours = mobilenet_v2.build(1000, (96, 96, 3))
    load_weight_file(ours, tmp_path / "app.weights.h5")
    assert_close(features_and_probabilities(ours, images), expected)

    # A no-top file in the Keras 2 HDF5 format, as the ImageNet downloads are, into the backbone.
    keras.Model(app.input, app.get_layer("out_relu").output).save(tmp_path / "app_no_top.h5")
    backbone = mobilenet_v2.backbone((96, 96, 3))
    load_weight_file(backbone, tmp_path / "app_no_top.h5")
    assert_close([predict(backbone, images)["stride_32"]], expected[:1])


@pytest.mark.slow
def test_one_training_step_on_random_data():
    keras.utils.set_random_seed(0)
    model = mobilenet_v2.build(10, (32, 32, 3), alpha=0.35, dropout=0.2, small_input=True)
    # Eager: tracing the graph of 150 layers takes ~20 s on a 2-core CPU, the two eager steps ~4 s.
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy",
                  run_eagerly=True)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1.0, 1.0, (32, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, 32)
    before = model.get_layer("Conv1").kernel.numpy().copy()
    history = model.fit(images, labels, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(model.get_layer("Conv1").kernel.numpy(), before)

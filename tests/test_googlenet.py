"""GoogLeNet (models/googlenet): Table 1 shapes, parameter counts, auxiliary heads, backbone, small input."""

import ast

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared.modelzoo import MODELS_DIR, load_model_module

googlenet = load_model_module(MODELS_DIR / "googlenet")

TORCHVISION_COUNT = 6_624_904  # torchvision.models.googlenet(aux_logits=False): BN, 3x3 in the "5x5" branch
TORCHVISION_AUX_COUNT = 13_004_888  # the same with aux_logits=True
PAPER_COUNT = 6_998_552  # the default: the paper's form (5x5, conv biases, no BN), measured
PAPER_AUX_COUNT = 13_378_280
TABLE_1_OUTPUTS = {"3a": (28, 28, 256), "3b": (28, 28, 480), "4a": (14, 14, 512), "4b": (14, 14, 512),
                   "4c": (14, 14, 512), "4d": (14, 14, 528), "4e": (14, 14, 832), "5a": (7, 7, 832),
                   "5b": (7, 7, 1024)}


def trainable(model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def multiply_adds(model) -> int:
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            total += int(np.prod(layer.output.shape[1:3])) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return total


def aux_layers(model) -> list[str]:
    return [layer.name for layer in model.layers if layer.name.startswith("aux")]


@pytest.fixture(scope="module")
def paper_model():
    return googlenet.build(1000, (224, 224, 3), aux_heads=True)


def test_model_file_imports_only_keras():
    tree = ast.parse((MODELS_DIR / "googlenet" / "model.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"keras"}


def test_table_1_output_sizes(paper_model):
    for name, shape in TABLE_1_OUTPUTS.items():
        assert tuple(paper_model.get_layer(f"inception_{name}_output").output.shape[1:]) == shape, name
    assert tuple(paper_model.get_layer("pool2").output.shape[1:]) == (28, 28, 192)
    assert tuple(paper_model.get_layer("avg_pool").output.shape[1:]) == (1024,)
    # Sec. 5: the 5x5/3 average pool gives 4x4x512 on 4a and 4x4x528 on 4d.
    assert tuple(paper_model.get_layer("aux1_pool").output.shape[1:]) == (4, 4, 512)
    assert tuple(paper_model.get_layer("aux2_pool").output.shape[1:]) == (4, 4, 528)
    assert paper_model.get_layer("aux1_pool").pool_size == (5, 5)
    assert paper_model.get_layer("aux1_pool").strides == (3, 3)
    assert {name: tuple(t.shape) for name, t in paper_model.output.items()} == \
        {"predictions": (None, 1000), "aux1": (None, 1000), "aux2": (None, 1000)}


def test_reference_configuration_matches_torchvision_count():
    model = googlenet.build(1000, (224, 224, 3), batch_norm=True, kernel_5x5=3)
    assert abs(trainable(model) - TORCHVISION_COUNT) <= 0.01 * TORCHVISION_COUNT
    assert trainable(model) == TORCHVISION_COUNT  # in fact exact
    with_aux = googlenet.build(1000, (224, 224, 3), batch_norm=True, kernel_5x5=3, aux_heads=True)
    assert trainable(with_aux) == TORCHVISION_AUX_COUNT


def test_paper_form_count_and_multiply_adds(paper_model):
    model = googlenet.build(1000, (224, 224, 3))
    assert trainable(model) == model.count_params() == PAPER_COUNT  # no batch norm: nothing non-trainable
    assert trainable(paper_model) == PAPER_AUX_COUNT
    assert 1.5e9 < multiply_adds(model) < 1.6e9  # "1.5 billion multiply-adds" (Sec. 5); 1,582,671,872 here
    assert len([layer for layer in model.layers if isinstance(layer, googlenet.LocalResponseNormalization)]) == 2


def test_aux_heads_only_when_asked_and_dropped_for_inference():
    shape = (64, 64, 3)
    plain = googlenet.build(10, shape, width=0.25)
    with_aux = googlenet.build(10, shape, width=0.25, aux_heads=True)
    assert aux_layers(plain) == [] and not isinstance(plain.output, dict)
    assert set(with_aux.output) == {"predictions", "aux1", "aux2"}
    assert set(googlenet.AUX_LOSS_WEIGHTS) == {"aux1", "aux2"}
    assert aux_layers(with_aux)

    inference = keras.Model(with_aux.inputs, with_aux.get_layer("predictions").output)
    assert aux_layers(inference) == []
    assert trainable(inference) == trainable(plain)
    assert {id(v) for v in inference.weights} <= {id(v) for v in with_aux.weights}  # shared, not copied

    images = np.random.default_rng(0).uniform(-1, 1, (4, *shape)).astype("float32")
    expected = with_aux(images, training=False)["predictions"]
    np.testing.assert_array_equal(inference([images], training=False), expected)
    # The inference model is the aux_heads=False model: its weights load into one by layer name.
    for layer in plain.layers:
        layer.set_weights(inference.get_layer(layer.name).get_weights())
    np.testing.assert_allclose(plain(images, training=False), expected, rtol=1e-5, atol=1e-6)


def test_backbone_features_by_stride():
    features = googlenet.backbone((224, 224, 3))
    shapes = {name: tuple(t.shape[1:]) for name, t in features.output.items()}
    assert shapes == {"stride_8": (28, 28, 480), "stride_16": (14, 14, 832), "stride_32": (7, 7, 1024)}
    small = googlenet.backbone((32, 32, 3), batch_norm=True, small_input=True, width=0.25)
    shapes = {name: tuple(t.shape[1:]) for name, t in small.output.items()}
    assert shapes == {"stride_1": (32, 32, 120), "stride_2": (16, 16, 208), "stride_4": (8, 8, 256)}


def test_small_input_at_32_px():
    model = googlenet.build(10, (32, 32, 1), small_input=True, aux_heads=True, width=0.25)
    assert model.get_layer("inception_3a_output").output.shape[1:3] == (32, 32)
    assert aux_layers(model) and model.get_layer("aux1_pool").output.shape[1:3] == (4, 4)  # 16x16 -> 4x4/4
    assert not any(isinstance(layer, googlenet.LocalResponseNormalization) for layer in model.layers)
    outputs = model.predict(np.zeros((2, 32, 32, 1), "float32"), verbose=0)
    assert {name: value.shape for name, value in outputs.items()} == \
        {"predictions": (2, 10), "aux1": (2, 10), "aux2": (2, 10)}


@pytest.mark.parametrize("size, pool", [(14, (5, 3)), (16, (4, 4)), (7, (4, 1)), (32, (8, 8)), (2, (1, 1))])
def test_aux_pool_gives_the_papers_4x4(size, pool):
    assert googlenet.aux_pool(size) == pool


def test_local_response_normalization_matches_caffe_formula():
    x = np.random.default_rng(1).uniform(0, 50, (2, 3, 3, 7)).astype("float32")
    lrn = googlenet.LocalResponseNormalization(**googlenet.LRN)
    # TensorFlow's LRN takes alpha per element, Caffe's (and the layer's) alpha / size.
    expected = tf.nn.local_response_normalization(x, depth_radius=2, bias=1.0, alpha=1e-4 / 5, beta=0.75)
    np.testing.assert_allclose(lrn(x), expected, rtol=1e-5)


def test_rejects_kernel_sizes_other_than_3_and_5():
    with pytest.raises(ValueError, match="kernel_5x5"):
        googlenet.build(10, (32, 32, 3), small_input=True, kernel_5x5=7)


@pytest.mark.slow
def test_one_training_step_on_random_data():
    # Eager: one step of this ~150-layer graph is 3-4 s, tracing it for graph mode 15 s more.
    model = googlenet.build(10, (32, 32, 3), small_input=True, batch_norm=True, width=0.25)
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="sparse_categorical_crossentropy",
                  run_eagerly=True)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (32, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, 32)
    first, last = model.get_layer("conv1_3x3_conv").kernel, model.get_layer("predictions").kernel
    before = [first.numpy().copy(), last.numpy().copy()]
    history = model.fit(images, labels, batch_size=32, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(before[0], first.numpy()) and not np.array_equal(before[1], last.numpy())


def test_one_training_step_with_weighted_aux_heads():
    # What the train runner does: the classifier's label for every head, aux losses weighted 0.3.
    model = googlenet.build(10, (32, 32, 3), small_input=True, width=0.125, aux_heads=True)
    heads = ["predictions", *googlenet.AUX_LOSS_WEIGHTS]
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss={head: "sparse_categorical_crossentropy" for head in heads},
                  loss_weights={"predictions": 1.0, **googlenet.AUX_LOSS_WEIGHTS}, run_eagerly=True)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (32, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, 10, 32)
    logs = model.fit(images, {head: labels for head in heads}, batch_size=32, epochs=1, verbose=0).history
    weighted = logs["predictions_loss"][0] + 0.3 * (logs["aux1_loss"][0] + logs["aux2_loss"][0])
    assert np.isclose(logs["loss"][0], weighted, rtol=1e-4)

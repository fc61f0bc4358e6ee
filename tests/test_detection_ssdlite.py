"""`detection.head: ssdlite`: SSDLite heads with BatchNorm + ReLU6 between each depthwise 3x3 and its 1x1.
A tiny MobileNetV2 detector at 64 px, trained eagerly for two batches: a few seconds on two CPU cores."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from shared.config import load_config
from shared.config_schema import DetectionConfig
from shared.detection import anchors as anchors_lib
from shared.detection import losses, model
from shared.errors import UserError
from shared.modelzoo import load_model_module, model_dir, resolve_hparams

SIZE = 64
NUM_CLASSES = 3


def detector(head: str, fpn_channels: int = 8, head_depth: int = 1) -> keras.Model:
    keras.utils.set_random_seed(0)
    module = load_model_module(model_dir("mobilenet_v2"))
    config = DetectionConfig(strides=[8, 16], fpn_channels=fpn_channels, head=head, head_depth=head_depth)
    return model.build_detector(module, resolve_hparams(module, {"alpha": 0.35}), NUM_CLASSES, SIZE, 3, config)


def consumer(net: keras.Model, layer: keras.layers.Layer, call: int = 0) -> keras.layers.Layer:
    """The one layer that takes the output of `layer`'s `call`-th call (its inbound node)."""
    tensor = layer._inbound_nodes[call].output_tensors[0]
    found = [other for other in net.layers for node in other._inbound_nodes
             if any(t is tensor for t in keras.tree.flatten(node.input_tensors))]
    assert len(found) == 1, (layer.name, [f.name for f in found])
    return found[0]


def test_ssdlite_puts_batchnorm_and_relu6_between_depthwise_and_pointwise():
    net = detector("ssdlite")
    added = [layer for layer in net.layers if layer.name.startswith(model.HEAD_PREFIXES)]
    assert not any(isinstance(layer, keras.layers.SeparableConv2D) for layer in added)
    depthwise = [layer for layer in added if isinstance(layer, keras.layers.DepthwiseConv2D)]
    # 2 smoothing (one per level) + box and class: 1 tower conv + 1 output each
    assert sorted(layer.name for layer in depthwise) == sorted(
        ["fpn_smooth_stride_8_depthwise", "fpn_smooth_stride_16_depthwise", "head_box_conv0_depthwise",
         "head_class_conv0_depthwise", "head_box_output_depthwise", "head_class_output_depthwise"])
    for layer in depthwise:
        assert layer.kernel_size == (3, 3) and not layer.use_bias
        for call in range(len(layer._inbound_nodes)):  # a head's convolutions serve both levels
            bn = consumer(net, layer, call)
            relu = consumer(net, bn, 0)
            pointwise = consumer(net, relu, 0)
            assert isinstance(bn, keras.layers.BatchNormalization), (layer.name, bn.name)
            assert isinstance(relu, keras.layers.ReLU) and relu.max_value == 6.0
            assert isinstance(pointwise, keras.layers.Conv2D) and pointwise.kernel_size == (1, 1)
            after = consumer(net, pointwise, call)
            if "_output" in layer.name:  # the predictors end in a plain 1x1 with a bias
                assert pointwise.use_bias and isinstance(after, keras.layers.Reshape)
            else:  # smoothing and tower: BatchNorm after the 1x1 too
                assert not pointwise.use_bias and isinstance(after, keras.layers.BatchNormalization)
    # shared convolutions, one BatchNorm per level
    assert len(net.get_layer("head_class_conv0_depthwise")._inbound_nodes) == 2
    for key in ("stride_8", "stride_16"):
        net.get_layer(f"head_class_conv0_depthwise_bn_{key}")
        net.get_layer(f"head_class_output_depthwise_bn_{key}")
    prior = -math.log(99.0)
    np.testing.assert_allclose(net.get_layer("head_class_output").bias.numpy(), prior, rtol=1e-6)
    # and the earlier form is untouched: depthwise stays SeparableConv2D without normalization
    old = detector("depthwise")
    assert isinstance(old.get_layer("head_class_output"), keras.layers.SeparableConv2D)
    assert not any(isinstance(layer, keras.layers.BatchNormalization)
                   for layer in old.layers if layer.name.startswith(model.HEAD_PREFIXES))


def tower_gain(net: keras.Model, into_class_output: str) -> float:
    """Std of what the class output convolution receives on the finest level over the std of the pyramid's
    sum there (a training-mode forward pass on noise)."""
    images = np.random.default_rng(0).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    pyramid_in = net.get_layer("fpn_add_stride_8").output
    tower_out = net.get_layer(into_class_output)._inbound_nodes[0].input_tensors[0]
    before, after = keras.Model(net.inputs, [pyramid_in, tower_out])(images, training=True)
    return float(np.std(after) / np.std(before))


@pytest.mark.slow
def test_ssdlite_keeps_the_signal_that_the_unnormalized_depthwise_head_shrinks():
    # detect.yaml's head width and depth: three depthwise 3x3 from the pyramid sum to the class output
    ssdlite = tower_gain(detector("ssdlite", 32, 2), "head_class_output_depthwise")
    depthwise = tower_gain(detector("depthwise", 32, 2), "head_class_output")
    assert ssdlite > 0.1 and depthwise < ssdlite / 10, (ssdlite, depthwise)


@pytest.mark.slow
def test_ssdlite_trains_a_step_and_updates_its_batchnorm():
    net = detector("ssdlite")
    config = DetectionConfig(strides=[8, 16], fpn_channels=8, head="ssdlite", head_depth=1)
    anchors = model.model_anchors(net, config)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
    boxes = np.zeros((4, config.max_boxes, 4), np.float32)
    classes = np.full((4, config.max_boxes), -1, np.int32)
    boxes[:, 0] = [8, 8, 40, 40]
    classes[:, 0] = rng.integers(NUM_CLASSES, size=4)
    data = tf.data.Dataset.from_tensor_slices((images, {"boxes": boxes, "classes": classes})).batch(2)
    data = data.map(anchors_lib.training_targets(anchors, config))
    bn = net.get_layer("head_class_conv0_depthwise_bn_stride_16")
    mean_before = bn.moving_mean.numpy().copy()
    net.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses.detection_losses(config), run_eagerly=True,
                jit_compile=False)
    history = net.fit(data, epochs=1, verbose=0, shuffle=False).history
    assert np.isfinite(history["loss"]).all()
    assert not np.allclose(bn.moving_mean.numpy(), mean_before)


def test_a_misspelt_head_is_a_one_line_error_naming_ssdlite():
    with pytest.raises(UserError, match="detection.head .*'sslite'.*ssdlite"):
        load_config(tree={"task": "detection", "model": {"name": "mobilenet_v2"}},
                    overrides=["detection.head=sslite"])
    assert load_config(tree={"task": "detection", "model": {"name": "mobilenet_v2"}},
                       overrides=["detection.head=ssdlite"]).detection.head == "ssdlite"

"""What a model costs: parameters and multiply-adds, counted from the built Keras model."""

from __future__ import annotations

import math

import keras


def trainable_parameters(model: keras.Model) -> int:
    """Parameters the optimizer updates: the figure torchvision and the papers quote (Keras'
    `count_params()` adds batch-norm moving statistics)."""
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))


def multiply_adds(model: keras.Model) -> int:
    """Multiply-accumulates of one forward pass of one image, over convolutions (plain, grouped,
    depthwise) and dense layers, the layers the papers count."""
    total = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = layer.kernel if hasattr(layer, "kernel") else layer.depthwise_kernel
            total += math.prod(layer.output.shape[1:3]) * math.prod(kernel.shape)
        elif isinstance(layer, keras.layers.Conv2D):  # kernel is (k, k, in / groups, out): grouping included
            total += math.prod(layer.output.shape[1:3]) * math.prod(layer.kernel.shape)
        elif isinstance(layer, keras.layers.Dense):
            total += math.prod(layer.output.shape[1:-1]) * math.prod(layer.kernel.shape)
    return int(total)

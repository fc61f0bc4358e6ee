"""A single-shot detector on a classification backbone: the model's own `backbone()`, a light feature
pyramid, and box / class heads shared across levels.

* Feature pyramid (Lin et al. 2017, "Feature Pyramid Networks", as RetinaNet uses it: Lin et al. 2017,
  "Focal Loss for Dense Object Detection", Sec. 4): a 1x1 lateral convolution to `fpn_channels` per level,
  top-down nearest-neighbour upsampling added into the next finer level, a 3x3 smoothing convolution.
* Heads (RetinaNet Sec. 4): `head_depth` 3x3 convolutions with ReLU, then a box output of
  anchors_per_location * 4 deltas and a class output of anchors_per_location * num_classes logits whose
  bias starts at -log((1 - pi) / pi), pi = 0.01, so that every anchor begins as "background with
  probability 0.99" and the focal loss is not swamped by the easy negatives in the first steps. One set of
  head weights serves every level, as in RetinaNet.
* `head: ssdlite` is SSDLite (Sandler et al. 2018, "MobileNetV2", Sec. 6.2; SSD: Liu et al. 2016) as the
  TF Object Detection API builds it: every 3x3 convolution of the pyramid and heads becomes a depthwise 3x3
  with BatchNorm + ReLU6, then a 1x1; in the smoothing and tower convolutions the 1x1 has BatchNorm too
  (+ ReLU6 in the towers), the outputs' 1x1 is a plain convolution with a bias (the prior's, for classes).
  Convolutions are shared across levels, each level has its own BatchNorm (the API's weight-shared
  predictor does the same), as levels differ in statistics. The normalization keeps the signal's scale
  whatever the initialization: without it a depthwise 3x3 at Keras' default initialization (fan-in taken
  as 9 x channels, not 9) shrinks the signal at every layer, so the class logits barely move from the prior
  in the first hundreds of steps.
* `head: depthwise` is the earlier form, kept so its runs rebuild and load: every 3x3 convolution a
  `SeparableConv2D` (no normalization), ReLU6 in the towers. It learns slowly; prefer `ssdlite`.

The backbone's layers are used as they are (the detector is one flat functional model over the backbone's
graph, not a nested model), so they keep the classification model's layer names and weights copy by name
from a classification run. Every layer the detector adds is named "fpn_*" or "head_*", plus the two
outputs "boxes" and "classes".

Outputs: {"boxes": [B, A, 4] deltas, "classes": [B, A, num_classes] logits}, float32, in the anchor order
of `anchors.anchor_grid(feature_shapes(model), image_size, config)`: level (finest first), y, x, anchor.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from types import ModuleType

import keras
import tensorflow as tf
from keras import layers

from shared.detection.anchors import anchor_grid, anchors_per_location
from shared.errors import UserError

HEAD_PREFIXES = ("fpn_", "head_")  # names of the layers the detector adds to the backbone
OUTPUT_NAMES = ("boxes", "classes")
PRIOR_PROBABILITY = 0.01  # RetinaNet's pi: the initial foreground probability of every anchor
MAX_STRIDE_OCTAVES = 0.75  # a map serves a requested stride if its measured stride is within 2^0.75 (1.68x)
# ssdlite BatchNorm: MobileNetV2's epsilon; momentum 0.9 so the moving statistics settle in a few hundred steps
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.9


# ---------------------------------------------------------------- the backbone and its feature maps


def backbone_kwargs(module: ModuleType, hparams: dict) -> dict:
    """The hyperparameters the model's `backbone()` accepts (a backbone has no dropout or aux_heads), lists
    as tuples as `modelzoo.build_model` passes them."""
    parameters = inspect.signature(module.backbone).parameters
    return {name: tuple(value) if isinstance(value, list) else value
            for name, value in hparams.items() if name in parameters and name != "input_shape"}


def build_backbone(module: ModuleType, hparams: dict, image_size: int, channels: int) -> keras.Model:
    """`module.backbone(input_shape=(image_size, image_size, channels), **accepted hparams)`."""
    if not callable(getattr(module, "backbone", None)):
        raise UserError(f"{getattr(module, '__file__', module)} has no backbone(input_shape, ...) function; "
                        f"a detector needs the model's feature maps")
    kwargs = backbone_kwargs(module, hparams)
    try:
        return module.backbone(input_shape=(image_size, image_size, channels), **kwargs)
    except (ValueError, TypeError) as error:
        raise UserError(f"backbone could not be built with {kwargs} at {image_size} px: {error}") from error


def backbone_feature_maps(backbone: keras.Model) -> dict[str, object]:
    """The backbone's output tensors by key ("stride_8", ... for a dict; "map_0", ... for a list), finest
    (largest) first, ties in the backbone's own order."""
    outputs = backbone.output
    if isinstance(outputs, dict):
        items = list(outputs.items())
    else:
        items = [(f"map_{i}", tensor) for i, tensor in enumerate(keras.tree.flatten(outputs))]
    for key, tensor in items:
        if len(tensor.shape) != 4 or tensor.shape[1] is None or tensor.shape[2] is None:
            raise UserError(f"backbone output {key!r} has shape {tuple(tensor.shape)}; a detector needs "
                            f"feature maps [batch, height, width, channels] of a fixed size")
    order = sorted(range(len(items)), key=lambda i: (-items[i][1].shape[1], -items[i][1].shape[2], i))
    return {items[i][0]: items[i][1] for i in order}


def _describe(shapes: dict, image_size: int) -> str:
    return ", ".join(f"{key} {h}x{w} (stride {image_size / h:.3g})" for key, (h, w) in shapes.items())


def select_levels(shapes: dict[str, tuple[int, int]], strides: list[int], image_size: int,
                  what: str = "the backbone") -> list[str]:
    """The feature maps (keys of `shapes`, finest first) serving the requested strides, matched by their
    measured stride image_size / h, not their names: the most requested strides served, each by a
    different map, in the same order, within MAX_STRIDE_OCTAVES, then the smallest total log2 distance.
    A stride nothing serves is dropped with a warning; none served is a UserError listing what exists."""
    if not strides:
        raise UserError("detection.strides is empty; list the backbone strides to detect on, e.g. [8, 16, 32]")
    requested = sorted(set(int(s) for s in strides))
    keys = list(shapes)
    measured = [math.log2(image_size / math.sqrt(shapes[k][0] * shapes[k][1])) for k in keys]
    best, best_cost = None, math.inf
    for count in range(min(len(requested), len(keys)), 0, -1):
        for wanted in itertools.combinations(range(len(requested)), count):
            for maps in itertools.combinations(range(len(keys)), count):  # increasing: order kept
                gaps = [abs(measured[m] - math.log2(requested[r])) for r, m in zip(wanted, maps)]
                if max(gaps) < MAX_STRIDE_OCTAVES and sum(gaps) < best_cost:
                    best, best_cost = (wanted, maps), sum(gaps)
        if best:
            break
    if not best:
        raise UserError(f"detection.strides {requested}: {what} at {image_size} px has no feature map near "
                        f"any of them; its maps: {_describe(shapes, image_size)}. Set detection.strides "
                        f"to some of those strides (or change small_input / data.image_size)")
    wanted, maps = best
    if len(wanted) < len(requested):
        missing = [requested[i] for i in range(len(requested)) if i not in wanted]
        used = ", ".join(f"{requested[r]} -> {keys[m]}" for r, m in zip(wanted, maps))
        warnings.warn(f"detection.strides {missing} not available from {what} at {image_size} px (its maps: "
                      f"{_describe(shapes, image_size)}); detecting on {used} only", stacklevel=3)
    return [keys[m] for m in maps]


# ---------------------------------------------------------------- pyramid and heads


def _conv3x3(filters: int, depthwise: bool, name: str, activation=None, **initializers):
    """A 3x3 convolution, or its depthwise-separable version (SSDLite)."""
    if depthwise:
        return layers.SeparableConv2D(filters, 3, padding="same", activation=activation, name=name,
                                      pointwise_initializer=initializers.pop("kernel_initializer", "he_normal"),
                                      **initializers)
    return layers.Conv2D(filters, 3, padding="same", activation=activation, name=name,
                         kernel_initializer=initializers.pop("kernel_initializer", "he_normal"), **initializers)


class SSDLiteConv:
    """SSDLite's depthwise-separable 3x3: depthwise 3x3 (no bias) -> BatchNorm -> ReLU6 -> 1x1, then
    BatchNorm (`pointwise_bn`) and `activation`. The two convolutions are made once and shared by every
    level it is called on; the BatchNorm and activation layers are made per call (`key`, the level, ends
    their names when given). Names: <name>_depthwise, <name> (the 1x1), <name>_depthwise_bn[_<key>],
    <name>_bn[_<key>], ..."""

    def __init__(self, filters: int, name: str, pointwise_bn: bool, activation: str | None = None,
                 **pointwise_initializers):
        self.name, self.pointwise_bn, self.activation = name, pointwise_bn, activation
        self.depthwise = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{name}_depthwise")
        pointwise_initializers.setdefault("kernel_initializer", "he_normal")
        self.pointwise = layers.Conv2D(filters, 1, use_bias=not pointwise_bn, name=name, **pointwise_initializers)

    def __call__(self, x, key: str | None = None):
        suffix = f"_{key}" if key else ""
        x = self.depthwise(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM,
                                      name=f"{self.name}_depthwise_bn{suffix}")(x)
        x = layers.ReLU(6.0, name=f"{self.name}_depthwise_relu6{suffix}")(x)
        x = self.pointwise(x)
        if self.pointwise_bn:
            x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{self.name}_bn{suffix}")(x)
        if self.activation:
            x = layers.Activation(self.activation, name=f"{self.name}_{self.activation}{suffix}")(x)
        return x


def _upsample_to(x, target_shape: tuple[int, int], name: str):
    """Nearest-neighbour upsampling to the finer level's size: an exact integer factor as UpSampling2D,
    otherwise (untidy AlexNet-style maps, 3x3 -> 7x7) a resize to the exact shape."""
    h, w = x.shape[1], x.shape[2]
    th, tw = target_shape
    if th % h == 0 and tw % w == 0:
        return layers.UpSampling2D((th // h, tw // w), interpolation="nearest", name=name)(x)
    return layers.Resizing(th, tw, interpolation="nearest", name=name)(x)


def feature_pyramid(features: dict, config) -> dict:
    """Lateral 1x1, top-down upsample + add, 3x3 smoothing; `features` finest first, same keys out."""
    keys = list(features)
    depthwise = config.head == "depthwise"
    laterals = {k: layers.Conv2D(config.fpn_channels, 1, name=f"fpn_lateral_{k}")(features[k]) for k in keys}
    merged = {keys[-1]: laterals[keys[-1]]}
    for finer, coarser in zip(reversed(keys[:-1]), reversed(keys[1:])):
        up = _upsample_to(merged[coarser], laterals[finer].shape[1:3], name=f"fpn_upsample_{coarser}")
        merged[finer] = layers.Add(name=f"fpn_add_{finer}")([laterals[finer], up])
    # Smoothing removes the aliasing of the upsampling (FPN Sec. 3); the coarsest gets it too, for symmetry.
    if config.head == "ssdlite":
        return {k: SSDLiteConv(config.fpn_channels, f"fpn_smooth_{k}", pointwise_bn=True)(merged[k])
                for k in keys}
    return {k: _conv3x3(config.fpn_channels, depthwise, name=f"fpn_smooth_{k}")(merged[k]) for k in keys}


def _tower(prefix: str, config):
    """head_depth convolutions shared by every level. He initialization keeps narrow heads (64 channels)
    from shrinking the signal; only the output convolutions use RetinaNet's N(0, 0.01)."""
    if config.head == "ssdlite":
        return [SSDLiteConv(config.fpn_channels, f"{prefix}_conv{i}", pointwise_bn=True, activation="relu6")
                for i in range(config.head_depth)]
    depthwise = config.head == "depthwise"
    activation = "relu6" if depthwise else "relu"  # MobileNetV2 / SSDLite use ReLU6
    return [_conv3x3(config.fpn_channels, depthwise, name=f"{prefix}_conv{i}", activation=activation)
            for i in range(config.head_depth)]


def _concatenate(tensors: list, name: str):
    """Levels joined along the anchor axis, float32 under mixed precision (the losses and NMS want it)."""
    if len(tensors) == 1:
        return layers.Activation("linear", dtype="float32", name=name)(tensors[0])
    return layers.Concatenate(axis=1, dtype="float32", name=name)(tensors)


def detection_heads(pyramid: dict, num_classes: int, config) -> dict:
    """The shared box and class heads over every level, reshaped and concatenated in anchor order."""
    depthwise = config.head == "depthwise"
    k = anchors_per_location(config)
    small = keras.initializers.RandomNormal(stddev=0.01)
    prior_bias = -math.log((1.0 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
    box_tower, class_tower = _tower("head_box", config), _tower("head_class", config)
    prior = keras.initializers.Constant(prior_bias)
    if config.head == "ssdlite":
        box_output = SSDLiteConv(k * 4, "head_box_output", pointwise_bn=False, kernel_initializer=small)
        class_output = SSDLiteConv(k * num_classes, "head_class_output", pointwise_bn=False,
                                   kernel_initializer=small, bias_initializer=prior)
    else:
        box_output = _conv3x3(k * 4, depthwise, name="head_box_output", kernel_initializer=small)
        class_output = _conv3x3(k * num_classes, depthwise, name="head_class_output", kernel_initializer=small,
                                bias_initializer=prior)

    def apply(layer, x, key: str):
        return layer(x, key) if isinstance(layer, SSDLiteConv) else layer(x)

    boxes, classes = [], []
    for key, x in pyramid.items():
        h, w = x.shape[1], x.shape[2]
        b, c = x, x
        for layer in box_tower:
            b = apply(layer, b, key)
        for layer in class_tower:
            c = apply(layer, c, key)
        # [B, h, w, K*4] -> [B, h*w*K, 4]: row-major, so the order is y, x, anchor, as anchor_grid's.
        boxes.append(layers.Reshape((h * w * k, 4), name=f"head_box_reshape_{key}")(apply(box_output, b, key)))
        classes.append(layers.Reshape((h * w * k, num_classes),
                                      name=f"head_class_reshape_{key}")(apply(class_output, c, key)))
    return {"boxes": _concatenate(boxes, "boxes"), "classes": _concatenate(classes, "classes")}


def build_detector(module: ModuleType, hparams: dict, num_classes: int, image_size: int, channels: int,
                   config) -> keras.Model:
    """The detector for the model in `module` (a models/<name>/model.py with `backbone()`), its
    hyperparameters `hparams` (those `backbone` accepts are passed; e.g. modelzoo.resolve_hparams' output),
    `num_classes` object classes (no background class), square `image_size` px images of `channels`, and a
    DetectionConfig. The feature maps used are those nearest config.strides by measured stride
    (select_levels). Returns a keras.Model image -> {"boxes", "classes"} (see the module docstring)."""
    if num_classes < 1:
        raise UserError(f"a detector needs at least one object class, got num_classes={num_classes}")
    backbone = build_backbone(module, hparams, image_size, channels)
    maps = backbone_feature_maps(backbone)
    shapes = {key: (tensor.shape[1], tensor.shape[2]) for key, tensor in maps.items()}
    keys = select_levels(shapes, config.strides, image_size, what=backbone.name)
    pyramid = feature_pyramid({key: maps[key] for key in keys}, config)
    outputs = detection_heads(pyramid, num_classes, config)
    name = backbone.name.removesuffix("_backbone") + "_detector"
    return keras.Model(backbone.inputs[0], outputs, name=name)


# ---------------------------------------------------------------- anchors that match a built model


def feature_shapes(model_or_backbone: keras.Model) -> dict[str, tuple[int, int]]:
    """{level key: (h, w)} in anchor order (finest first). For a detector from build_detector: the levels
    it predicts on, read from its layers (so a reloaded .keras model works too); for a backbone: all its
    output maps."""
    try:
        joined = model_or_backbone.get_layer("boxes")
    except ValueError:
        joined = None
    if joined is None:
        return {key: (t.shape[1], t.shape[2]) for key, t in backbone_feature_maps(model_or_backbone).items()}
    shapes = {}
    for tensor in keras.tree.flatten(joined.input):
        reshape = tensor._keras_history.operation  # head_box_reshape_<key>, its input [B, h, w, K*4]
        key = reshape.name.removeprefix("head_box_reshape_")
        shapes[key] = (int(reshape.input.shape[1]), int(reshape.input.shape[2]))
    return shapes


def model_anchors(model: keras.Model, config) -> tf.Tensor:
    """The anchors [A, 4] of a detector from build_detector: anchor_grid over its own feature shapes."""
    return anchor_grid(feature_shapes(model), int(model.inputs[0].shape[1]), config)


def backbone_layer_names(model: keras.Model) -> list[str]:
    """The detector's layers that come from the backbone (everything but fpn_*, head_* and the outputs)."""
    return [layer.name for layer in model.layers
            if not layer.name.startswith(HEAD_PREFIXES) and layer.name not in OUTPUT_NAMES]


def head_layer_names(detector: keras.Model) -> set[str]:
    """The layers the detector adds to the backbone: fpn_*, head_* and the two outputs."""
    return {layer.name for layer in detector.layers
            if layer.name.startswith(HEAD_PREFIXES) or layer.name in OUTPUT_NAMES}
